"""Reading providers whose answers are nearly OpenAI's (Azure OpenAI, Mistral)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from ferrogate.ai.adapters.base import Translated, Usage, error_body
from ferrogate.ai.adapters.wire import SSEDecoder, decode, wants_usage_chunk

ChunkFix = Callable[[dict[str, Any]], dict[str, Any] | None]


def usage_of(doc: dict[str, Any]) -> Usage | None:
    u = doc.get("usage")
    if not isinstance(u, dict):
        return None
    return Usage(
        prompt_tokens=int(u.get("prompt_tokens") or 0),
        completion_tokens=int(u.get("completion_tokens") or 0),
    )


def usage_from_bytes(body: bytes) -> Usage | None:
    """Usage out of an OpenAI-shaped answer without decoding the rest of it."""
    try:
        doc = msgspec.json.decode(body, type=_UsageOnly)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if doc.usage is None:
        return None
    return Usage(
        prompt_tokens=doc.usage.prompt_tokens or 0,
        completion_tokens=doc.usage.completion_tokens or 0,
    )


class _UsageNumbers(msgspec.Struct):
    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0


class _UsageOnly(msgspec.Struct):
    usage: _UsageNumbers | None = None


class OpenAILikeStream:
    """An OpenAI-shaped SSE stream: each ``data:`` chunk decoded, usage kept, ``fix`` applied.

    The usage is given to the client as OpenAI does, in a last chunk without choices, only when
    the client asked for it with ``stream_options.include_usage``."""

    def __init__(self, req: dict[str, Any], fix: ChunkFix, error: Callable[[Any], dict[str, Any]]):
        self.usage: Usage | None = None
        self._sse = SSEDecoder()
        self._fix = fix
        self._error = error
        self._usage_chunk = wants_usage_chunk(req)
        self._last: dict[str, Any] | None = None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        return self._events(self._sse.feed(data))

    def close(self) -> list[dict[str, Any]]:
        out = self._events(self._sse.close())
        if self.usage is not None and self._usage_chunk and self._last is not None:
            out.append(
                {
                    "id": self._last.get("id", ""),
                    "object": "chat.completion.chunk",
                    "created": self._last.get("created", 0),
                    "model": self._last.get("model", ""),
                    "choices": [],
                    "usage": {
                        "prompt_tokens": self.usage.prompt_tokens,
                        "completion_tokens": self.usage.completion_tokens,
                        "total_tokens": self.usage.prompt_tokens + self.usage.completion_tokens,
                    },
                }
            )
            self._last = None
        return out

    def _events(self, events: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for _event, data in events:
            if data == b"[DONE]":
                continue
            try:
                doc = decode(data)
            except msgspec.DecodeError:
                out.append(error_body(502, "the provider sent a malformed stream event"))
                continue
            if not isinstance(doc, dict):
                continue
            if "error" in doc or doc.get("object") == "error":
                out.append(self._error(doc))
                continue
            usage = usage_of(doc)
            if usage is not None:
                self.usage = usage
                doc.pop("usage", None)
            self._last = doc
            if not doc.get("choices"):
                continue
            fixed = self._fix(doc)
            if fixed is not None:
                out.append(fixed)
        return out


def passthrough_or_error(
    status: int, body: bytes, error: Callable[[int, bytes], Translated]
) -> Translated:
    if 200 <= status < 300:
        return Translated(status, None, usage_from_bytes(body))
    return error(status, body)
