"""The Anthropic-compatible endpoint (``POST /v1/messages``): Anthropic SDK clients reach any
provider through the canonical (OpenAI) form.

API for the plugin (all pure, no I/O):

* ``to_canonical(body: dict) -> dict`` — an Anthropic Messages request as a canonical chat
  request (``model`` kept as the client sent it; a streamed request asks for usage).
  Raises ``Unsupported`` (a 400) for what has no canonical equivalent.
* ``to_message(completion: dict, model: str) -> dict`` — a canonical completion as an
  Anthropic message; ``model`` is what the client asked for.
* ``MessageStream(model)`` — ``.feed(chunk: dict) -> bytes`` turns each canonical chunk
  (an ``{"error": ...}`` dict included) into Anthropic SSE bytes; ``.close() -> bytes`` ends
  the stream (``message_delta`` + ``message_stop`` when not sent yet). Content type:
  ``text/event-stream``.
* ``to_anthropic_error(status: int, body: dict) -> dict`` — an OpenAI error body (or any
  ``{"error": {"message": ...}}``) as Anthropic's; ``anthropic_status(status)`` is the status
  the client gets (503 becomes Anthropic's 529 ``overloaded_error``).
* Pass-through, when the chosen deployment is itself Anthropic (no translation either way):
  ``is_passthrough(dep) -> bool``; ``passthrough_request(dep, body: dict, client_headers)
  -> ProviderRequest`` (model replaced by the deployment's, the deployment's key, the client's
  ``anthropic-version``/``anthropic-beta`` kept); ``passthrough_usage(body: bytes) -> Usage``
  for whole answers and ``PassthroughUsage().feed(bytes)`` (``.usage`` at the end) for streams;
  errors from the provider are already Anthropic's and pass unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import msgspec

from ferrogate.ai.adapters.anthropic import headers_for, usage_of
from ferrogate.ai.adapters.base import Deployment, ProviderRequest, Unsupported, Usage
from ferrogate.ai.adapters.sse import SseParser

__all__ = [
    "MessageStream",
    "PassthroughUsage",
    "Unsupported",
    "anthropic_status",
    "is_passthrough",
    "passthrough_request",
    "passthrough_usage",
    "to_anthropic_error",
    "to_canonical",
    "to_message",
]

_decode = msgspec.json.decode
_encode = msgspec.json.encode

_FINISH = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    return "\n\n".join(b.get("text", "") for b in system or () if b.get("type") == "text")


def _image_part(source: dict[str, Any]) -> dict[str, Any]:
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    elif source.get("type") == "url":
        url = source.get("url", "")
    else:
        raise Unsupported(f"image sources of type {source.get('type')!r} are not supported")
    return {"type": "image_url", "image_url": {"url": url}}


def _result_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content or () if b.get("type") == "text")


def _canonical_messages(messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for msg in messages:
        role = msg.get("role")
        content = msg.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if role == "assistant":
            text: list[str] = []
            calls: list[dict[str, Any]] = []
            for block in content or ():
                kind = block.get("type")
                if kind == "text":
                    text.append(block.get("text", ""))
                elif kind == "tool_use":
                    calls.append(
                        {
                            "id": block.get("id"),
                            "type": "function",
                            "function": {
                                "name": block.get("name"),
                                "arguments": _encode(block.get("input") or {}).decode(),
                            },
                        }
                    )
                # thinking blocks are the provider's own; other providers cannot take them
            m: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
            if calls:
                m["tool_calls"] = calls
            out.append(m)
        elif role == "user":
            parts: list[dict[str, Any]] = []
            for block in content or ():
                kind = block.get("type")
                if kind == "tool_result":
                    # OpenAI wants tool answers right after the assistant turn, as "tool" messages
                    out.append(
                        {
                            "role": "tool",
                            "tool_call_id": block.get("tool_use_id"),
                            "content": _result_text(block.get("content")),
                        }
                    )
                elif kind == "text":
                    parts.append({"type": "text", "text": block.get("text", "")})
                elif kind == "image":
                    parts.append(_image_part(block.get("source") or {}))
                else:
                    raise Unsupported(f"content blocks of type {kind!r} are not supported")
            if parts:
                if all(p["type"] == "text" for p in parts):
                    out.append({"role": "user", "content": "".join(p["text"] for p in parts)})
                else:
                    out.append({"role": "user", "content": parts})
        else:
            raise Unsupported(f"messages with role {role!r} are not supported")
    return out


def to_canonical(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages request as a canonical chat request."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Unsupported("messages: a non-empty list is required")
    req: dict[str, Any] = {"model": body.get("model")}
    system = _system_text(body.get("system"))
    canon = _canonical_messages(messages)
    req["messages"] = [{"role": "system", "content": system}, *canon] if system else canon
    if body.get("max_tokens") is not None:
        req["max_tokens"] = body["max_tokens"]
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            req[key] = body[key]
    if body.get("stop_sequences"):
        req["stop"] = list(body["stop_sequences"])
    tools = body.get("tools")
    if tools:
        req["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.get("name"),
                    "description": t.get("description", ""),
                    "parameters": t.get("input_schema") or {"type": "object", "properties": {}},
                },
            }
            for t in tools
        ]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "auto":
            req["tool_choice"] = "auto"
        elif kind == "any":
            req["tool_choice"] = "required"
        elif kind == "none":
            req["tool_choice"] = "none"
        elif kind == "tool":
            req["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        if choice.get("disable_parallel_tool_use") and tools:
            req["parallel_tool_calls"] = False
    user = (body.get("metadata") or {}).get("user_id")
    if user:
        req["user"] = user
    if body.get("stream"):
        req["stream"] = True
        req["stream_options"] = {"include_usage": True}
    return req


def _message_id(cid: str) -> str:
    return cid if cid.startswith("msg_") else "msg_" + (cid or str(time.time_ns()))


def to_message(completion: dict[str, Any], model: str) -> dict[str, Any]:
    """A canonical completion as an Anthropic message."""
    choice = (completion.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = msg.get("content")
    if isinstance(text, list):
        text = "".join(p.get("text", "") for p in text if p.get("type") == "text")
    if text:
        content.append({"type": "text", "text": text})
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {}
        try:
            args = _decode(fn.get("arguments") or "{}")
        except msgspec.DecodeError:
            args = {}
        content.append(
            {"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": args}
        )
    usage = completion.get("usage") or {}
    return {
        "id": _message_id(completion.get("id") or ""),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _FINISH.get(choice.get("finish_reason") or "stop", "end_turn"),
        "stop_sequence": None,
        "usage": {
            "input_tokens": usage.get("prompt_tokens") or 0,
            "output_tokens": usage.get("completion_tokens") or 0,
        },
    }


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_status(status: int) -> int:
    """The status an Anthropic client gets for a canonical one."""
    return 529 if status == 503 else status


def to_anthropic_error(status: int, body: dict[str, Any] | None) -> dict[str, Any]:
    """An OpenAI-shaped error as Anthropic's error body."""
    err = (body or {}).get("error") or {}
    message = err.get("message") if isinstance(err, dict) else str(err)
    kind = _ERROR_TYPES.get(status) or (
        "invalid_request_error" if 400 <= status < 500 else "api_error"
    )
    return {"type": "error", "error": {"type": kind, "message": message or kind}}


# A streamed error carries no status: its OpenAI type, or the provider's code, tells it.
_STREAM_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "rate_limit_error": 429,
    "RESOURCE_EXHAUSTED": 429,
    "ThrottlingException": 429,
    "overloaded_error": 503,
    "UNAVAILABLE": 503,
    "ServiceUnavailableException": 503,
}


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encode(data) + b"\n\n"


class MessageStream:
    """Canonical chunks -> Anthropic's event sequence: message_start, per block
    content_block_start / content_block_delta... / content_block_stop, message_delta (stop
    reason and usage), message_stop; ``error`` for a provider error mid-stream."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._started = False
        self._block: int = -1  # index of the open content block, -1 when none
        self._block_kind = ""
        self._tools: dict[int, int] = {}  # canonical tool call index -> block index
        self._next = 0
        self._stop: str | None = None
        self._usage: dict[str, Any] | None = None
        self._ended = False

    def _start(self, cid: str, out: list[bytes]) -> None:
        self._started = True
        out.append(
            _event(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": _message_id(cid),
                        "type": "message",
                        "role": "assistant",
                        "model": self._model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": 0, "output_tokens": 0},
                    },
                },
            )
        )

    def _close_block(self, out: list[bytes]) -> None:
        if self._block >= 0:
            out.append(
                _event("content_block_stop", {"type": "content_block_stop", "index": self._block})
            )
            self._block = -1

    def _open_block(self, kind: str, block: dict[str, Any], out: list[bytes]) -> int:
        self._close_block(out)
        index = self._next
        self._next += 1
        self._block, self._block_kind = index, kind
        out.append(
            _event(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": block},
            )
        )
        return index

    def feed(self, chunk: dict[str, Any]) -> bytes:
        if self._ended:
            return b""
        out: list[bytes] = []
        if "error" in chunk and not chunk.get("choices"):
            err = chunk["error"] if isinstance(chunk["error"], dict) else {}
            status = _STREAM_ERROR_STATUS.get(
                err.get("code") or "", _STREAM_ERROR_STATUS.get(err.get("type") or "", 500)
            )
            self._ended = True
            if not self._started:
                self._start("", out)
            out.append(_event("error", to_anthropic_error(status, chunk)))
            return b"".join(out)
        if not self._started:
            self._start(chunk.get("id") or "", out)
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                if self._block < 0 or self._block_kind != "text":
                    self._open_block("text", {"type": "text", "text": ""}, out)
                out.append(
                    _event(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": self._block,
                            "delta": {"type": "text_delta", "text": text},
                        },
                    )
                )
            for call in delta.get("tool_calls") or ():
                n = call.get("index", 0)
                fn = call.get("function") or {}
                if n not in self._tools:
                    self._tools[n] = self._open_block(
                        "tool",
                        {
                            "type": "tool_use",
                            "id": call.get("id") or f"toolu_{n}",
                            "name": fn.get("name") or "",
                            "input": {},
                        },
                        out,
                    )
                args = fn.get("arguments")
                if args:
                    out.append(
                        _event(
                            "content_block_delta",
                            {
                                "type": "content_block_delta",
                                "index": self._tools[n],
                                "delta": {"type": "input_json_delta", "partial_json": args},
                            },
                        )
                    )
            if choice.get("finish_reason"):
                self._stop = _FINISH.get(choice["finish_reason"], "end_turn")
        return b"".join(out)

    def close(self) -> bytes:
        if self._ended:
            return b""
        self._ended = True
        out: list[bytes] = []
        if not self._started:
            self._start("", out)
        self._close_block(out)
        usage = self._usage or {}
        out.append(
            _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": self._stop or "end_turn", "stop_sequence": None},
                    "usage": {
                        "input_tokens": usage.get("prompt_tokens") or 0,
                        "output_tokens": usage.get("completion_tokens") or 0,
                    },
                },
            )
        )
        out.append(_event("message_stop", {"type": "message_stop"}))
        return b"".join(out)


def is_passthrough(dep: Deployment) -> bool:
    """Whether a deployment takes Anthropic requests as they are (no translation)."""
    return dep.provider == "anthropic"


def passthrough_request(
    dep: Deployment, body: dict[str, Any], client_headers: Iterable[tuple[str, str]] = ()
) -> ProviderRequest:
    """The client's Anthropic request for an Anthropic deployment: its model and key."""
    version = None
    beta = None
    for name, value in client_headers:
        lname = name.lower()
        if lname == "anthropic-version":
            version = value
        elif lname == "anthropic-beta":
            beta = value
    headers = headers_for(dep, version)
    if beta and not dep.options.get("anthropic_beta"):
        headers.append(("anthropic-beta", beta))
    out = dict(body)
    out["model"] = dep.model
    return ProviderRequest("POST", dep.base_path + "/v1/messages", headers, _encode(out))


def passthrough_usage(body: bytes) -> Usage:
    """The usage of a whole Anthropic answer."""
    try:
        return usage_of(_decode(body).get("usage"))
    except (msgspec.DecodeError, AttributeError):
        return Usage()


class PassthroughUsage:
    """Reads the usage out of an Anthropic stream passed through unchanged."""

    def __init__(self) -> None:
        self._sse = SseParser()
        self._u: dict[str, Any] = {}
        self.usage: Usage | None = None

    def feed(self, data: bytes) -> None:
        for ev in self._sse.feed(data):
            if '"usage"' not in ev.data:
                continue
            try:
                msg = _decode(ev.data)
            except msgspec.DecodeError:
                continue
            u = (msg.get("message") or {}).get("usage") or msg.get("usage") or {}
            self._u.update({k: v for k, v in u.items() if v is not None})
            self.usage = usage_of(self._u)
