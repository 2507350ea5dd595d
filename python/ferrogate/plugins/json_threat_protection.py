"""Refuses JSON request bodies whose structure is built to exhaust the upstream's parser."""

import json
import re
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from ferrogate import auth
from ferrogate.hooks import Request, Response
from ferrogate.plugin import Plugin

__all__ = ["JsonThreatProtection"]

# A JSON string (skipped whole, so brackets inside strings do not count) or a bracket.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_JSON_TYPE = re.compile(r"^application/(?:[\w.+-]+\+)?json\s*(?:;|$)", re.IGNORECASE)


class _TooComplex(Exception):
    pass


def _depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects, without building anything."""
    depth = deepest = 0
    for m in _TOKEN.finditer(body):
        c = m.group()[0]
        if c in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in b"]}":
            depth -= 1
    return deepest


class JsonThreatProtection(Plugin):
    """Refuses JSON bodies that are nested too deep or too big in any part, or do not parse.

    Too deep, too many keys or items, too long strings: 400 ``json_too_complex``; JSON that
    does not parse: 400 ``invalid_json``. Only requests whose Content-Type is JSON
    (``application/json``, ``application/*+json``) are checked; others pass, unless
    ``require_json`` refuses them (415 ``not_json``). The nesting depth is measured before
    the body is parsed, so a body of ten thousand ``[`` costs a scan, not a recursion. Each
    limit admits a body exactly at it; 0 turns it off. The body is read whole (up to the
    plugin's 1 MiB, or ``limits.max_body_bytes`` when lower: 413).
    """

    name = "json-threat-protection"
    priority = 1500
    request_body = "buffered"

    class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
        """Settings of json-threat-protection."""

        max_depth: Annotated[
            int, Meta(ge=0, description="Nesting of arrays and objects (top level is 1).")
        ] = 20
        max_keys: Annotated[int, Meta(ge=0, description="Entries of any one object.")] = 100
        max_array_items: Annotated[
            int, Meta(ge=0, description="Items of any one array; 0 = no limit.")
        ] = 0
        max_string_length: Annotated[
            int,
            Meta(ge=0, description="Characters of any string, keys included; 0 = no limit."),
        ] = 0
        require_json: Annotated[
            bool, Meta(description="Refuse requests with a body that is not declared JSON.")
        ] = False

    config: "JsonThreatProtection.Config"

    def on_request(self, req: Request) -> Response | None:
        body = req.body
        if not body:
            return None
        if not _JSON_TYPE.match(req.headers.get("content-type") or ""):
            if self.config.require_json:
                return auth.error(req, 415, "not_json", "the request body must be JSON")
            return None
        c = self.config
        depth = _depth(body)
        if c.max_depth and depth > c.max_depth:
            return self._refuse(req, f"nests {depth} levels deep, above the limit of {c.max_depth}")
        try:
            doc = json.loads(body, object_pairs_hook=self._object)
            self._walk(doc)
        except _TooComplex as e:
            return self._refuse(req, str(e))
        except (ValueError, RecursionError):
            return auth.error(req, 400, "invalid_json", "the request body is not valid JSON")
        return None

    def _refuse(self, req: Request, what: str) -> Response:
        return auth.error(req, 400, "json_too_complex", f"the JSON body {what}")

    def _object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # Called for each object as it is parsed, with every entry (repeated keys too).
        c = self.config
        if c.max_keys and len(pairs) > c.max_keys:
            raise _TooComplex(
                f"has an object of {len(pairs)} entries, above the limit of {c.max_keys}"
            )
        if c.max_string_length:
            for key, _ in pairs:
                self._string(key)
        return dict(pairs)

    def _string(self, s: str) -> None:
        limit = self.config.max_string_length
        if len(s) > limit:
            raise _TooComplex(f"has a string of {len(s)} characters, above the limit of {limit}")

    def _walk(self, doc: Any) -> None:
        c = self.config
        if not (c.max_array_items or c.max_string_length):
            return
        stack = [doc]
        while stack:
            node = stack.pop()
            if isinstance(node, list):
                if c.max_array_items and len(node) > c.max_array_items:
                    raise _TooComplex(
                        f"has an array of {len(node)} items, above the limit of {c.max_array_items}"
                    )
                stack.extend(node)
            elif isinstance(node, dict):
                stack.extend(node.values())
            elif isinstance(node, str) and c.max_string_length:
                self._string(node)
