"""Persisted queries: the store of Automatic Persisted Queries (Apollo's protocol) and the
manifest of an allow-list (trusted documents)."""

import hashlib
import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

__all__ = ["Manifest", "QueryStore", "sha256_hex"]

_HEX64 = re.compile(r"[0-9a-f]{64}")


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


class QueryStore:
    """Query texts by their SHA-256, the least recently used dropped past ``max_entries``.

    One per worker: a hash registered through one worker is unknown to the others until a
    client registers it there too (the client's retry with the query text does that)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._texts: OrderedDict[str, str] = OrderedDict()

    def get(self, digest: str) -> str | None:
        text = self._texts.get(digest)
        if text is not None:
            self._texts.move_to_end(digest)
        return text

    def put(self, digest: str, text: str) -> None:
        self._texts[digest] = text
        self._texts.move_to_end(digest)
        while len(self._texts) > self.max_entries:
            self._texts.popitem(last=False)

    def __len__(self) -> int:
        return len(self._texts)


class Manifest:
    """The operations an allow-list lets run, found by id or by the SHA-256 of their text.

    Reads Apollo's persisted query manifest (``{"format": "apollo-persisted-query-manifest",
    "operations": [{"id", "body", ...}]}``) or a plain JSON object of id to query text (as
    Relay and GraphQL Code Generator write)."""

    def __init__(self, entries: dict[str, str]) -> None:
        self._by_id = dict(entries)
        self._by_hash = {sha256_hex(text): text for text in entries.values()}

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        file = Path(path)
        try:
            doc: Any = json.loads(file.read_text())
        except OSError as e:
            raise ValueError(f"cannot read {file}: {e.strerror}") from None
        except ValueError as e:
            raise ValueError(f"{file} is not JSON: {e}") from None
        entries: dict[str, str] = {}
        if isinstance(doc, dict) and isinstance(doc.get("operations"), list):
            for i, op in enumerate(doc["operations"]):
                if not (
                    isinstance(op, dict)
                    and isinstance(op.get("id"), str)
                    and isinstance(op.get("body"), str)
                ):
                    raise ValueError(f"{file}: operations[{i}] needs a string id and body")
                entries[op["id"]] = op["body"]
        elif isinstance(doc, dict) and all(isinstance(v, str) for v in doc.values()):
            entries = dict(doc)
        else:
            raise ValueError(
                f"{file} is neither an Apollo persisted query manifest nor an object of "
                "id to query text"
            )
        if not entries:
            raise ValueError(f"{file} lists no operation")
        return cls(entries)

    def find(self, key: str) -> str | None:
        """The text of the operation whose id or SHA-256 is ``key``."""
        return self._by_id.get(key) or self._by_hash.get(key)

    def allows(self, text: str) -> bool:
        return sha256_hex(text) in self._by_hash

    def __len__(self) -> int:
        return len(self._by_id)
