"""Pieces the non-OpenAI adapters share: stream framing, canonical answers, embeddings lists."""

from __future__ import annotations

import base64
import binascii
import struct
import time
from typing import Any

import msgspec

from ferrogate.ai.adapters.base import Translated, Unsupported, Usage, error_body

decode = msgspec.json.decode
encode = msgspec.json.encode


class SSEDecoder:
    """Server-sent events, fed bytes split anywhere: yields ``(event, data)`` per event."""

    __slots__ = ("_buf", "_data", "_event")

    def __init__(self) -> None:
        self._buf = b""
        self._event = ""
        self._data: list[bytes] = []

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        self._buf += data
        out: list[tuple[str, bytes]] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                return out
            line = self._buf[:nl]
            self._buf = self._buf[nl + 1 :]
            self._line(line.removesuffix(b"\r"), out)

    def close(self) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        if self._buf:
            self._line(self._buf.removesuffix(b"\r"), out)
            self._buf = b""
        self._line(b"", out)
        return out

    def _line(self, line: bytes, out: list[tuple[str, bytes]]) -> None:
        if not line:
            if self._data:
                out.append((self._event, b"\n".join(self._data)))
            self._event = ""
            self._data = []
            return
        if line.startswith(b":"):
            return
        name, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")


class LineDecoder:
    """Newline-delimited JSON, fed bytes split anywhere: yields each complete line."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        if b"\n" not in data:
            return []
        *lines, self._buf = self._buf.split(b"\n")
        return [ln for ln in lines if ln.strip()]

    def close(self) -> list[bytes]:
        rest, self._buf = self._buf, b""
        return [rest] if rest.strip() else []


def text_of(content: Any) -> str:
    """The text of an OpenAI message content (a string, or a list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(
        p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
    )


def data_url(url: str) -> tuple[str, str] | None:
    """``(media type, base64 data)`` of a ``data:`` URL, None for any other URL."""
    if not url.startswith("data:"):
        return None
    head, sep, data = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        return None
    return head.removesuffix(";base64") or "application/octet-stream", data


def b64_bytes(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as e:
        raise Unsupported("an image data URL is not valid base64") from e


def completion(
    cid: str,
    model: str,
    message: dict[str, Any],
    finish_reason: str | None,
    usage: Usage | None,
    created: int | None = None,
) -> dict[str, Any]:
    """A canonical ``chat.completion``."""
    out: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
    }
    if usage is not None:
        out["usage"] = usage_dict(usage)
    return out


def usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class ChunkMaker:
    """Builds the ``chat.completion.chunk`` dicts of one streamed answer."""

    __slots__ = ("created", "id", "model")

    def __init__(self, cid: str, model: str) -> None:
        self.id = cid
        self.model = model
        self.created = int(time.time())

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """OpenAI's last chunk with ``stream_options.include_usage``: no choices, the usage."""
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage_dict(usage),
        }


def wants_usage_chunk(req: dict[str, Any]) -> bool:
    opts = req.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


def tool_call(cid: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


def embeddings_list(
    vectors: list[list[float]], model: str, prompt_tokens: int, req: dict[str, Any]
) -> dict[str, Any]:
    """A canonical embeddings answer; base64 vectors when asked (the OpenAI SDK asks by default)."""
    b64 = req.get("encoding_format") == "base64"
    data = []
    for i, vec in enumerate(vectors):
        emb: Any = vec
        if b64:
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def embedding_inputs(req: dict[str, Any]) -> list[str]:
    """The texts of an embeddings request (token-id inputs only OpenAI itself understands)."""
    inp = req.get("input")
    if isinstance(inp, str):
        return [inp]
    if isinstance(inp, list) and all(isinstance(x, str) for x in inp):
        return inp
    raise Unsupported("input must be a string or a list of strings for this model")


def error_from(status: int, message: str, code: str | None = None) -> Translated:
    return Translated(status, error_body(status, message, code=code), None)


def message_of(body: bytes, *keys: str) -> str | None:
    """A message out of a provider's JSON error body: the first string among ``keys``, looked
    up at the top and in an ``error`` object."""
    try:
        doc = decode(body)
    except msgspec.DecodeError:
        return None
    for obj in (doc.get("error") if isinstance(doc, dict) else None, doc):
        if isinstance(obj, str):
            return obj
        if isinstance(obj, dict):
            for k in keys:
                v = obj.get(k)
                if isinstance(v, str) and v:
                    return v
                if v is not None and k in ("message", "detail"):
                    return encode(v).decode()
    return None


def fallback_message(status: int, body: bytes) -> str:
    text = body[:500].decode("utf-8", "replace").strip()
    return text or f"the provider answered {status}"


def json_args(arguments: Any) -> dict[str, Any]:
    """Tool call arguments as an object (OpenAI carries them as a JSON string)."""
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        value = decode(arguments)
    except msgspec.DecodeError as e:
        raise Unsupported("tool call arguments are not valid JSON") from e
    if not isinstance(value, dict):
        raise Unsupported("tool call arguments must be a JSON object")
    return value
