"""Anthropic's Messages API (``POST /v1/messages``) behind the canonical (OpenAI) form.

Differences the translation bridges:

* system messages become the top-level ``system``; consecutive messages of one role are merged
  (Anthropic wants user and assistant turns to alternate) and tool answers become
  ``tool_result`` blocks of a user turn;
* ``max_tokens`` is required: the request's, else the deployment's ``options.max_tokens``,
  else 4096;
* ``temperature`` is capped at 1 (Anthropic's range is 0..1, OpenAI's 0..2);
* ``response_format``: ``json_schema`` forces a tool whose input schema is the schema and the
  tool's input comes back as the message content (Anthropic's documented way to get JSON that
  follows a schema); ``json_object`` adds a system instruction to answer with one JSON object;
* ``n`` > 1 has no equivalent: a 400.

Deployment options: ``max_tokens``, ``anthropic_version`` (default 2023-06-01),
``anthropic_beta`` (sent as ``anthropic-beta``).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from ferrogate.ai.adapters.base import (
    Adapter,
    Deployment,
    ProviderRequest,
    Translated,
    Unsupported,
    Usage,
    error_body,
)
from ferrogate.ai.adapters.sse import SseParser

__all__ = [
    "ADAPTER",
    "JSON_TOOL",
    "STOP_REASONS",
    "AnthropicAdapter",
    "AnthropicStream",
    "anthropic_error",
    "usage_of",
]

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
JSON_TOOL = "json_response"
"""The forced tool that carries a ``json_schema`` answer."""

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_JSON_OBJECT_INSTRUCTION = (
    "Answer with one valid JSON object and nothing else: no prose, no code fences."
)

_decode = msgspec.json.decode
_encode = msgspec.json.encode


def _text_of(content: Any) -> str:
    """The text of an OpenAI content (a string or a list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def _image_block(url: str) -> dict[str, Any]:
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        media_type = head[5:].split(";", 1)[0] or "image/png"
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    return {"type": "image", "source": {"type": "url", "url": url}}


def _user_blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks: list[dict[str, Any]] = []
    for part in content or ():
        kind = part.get("type")
        if kind == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url", "") if isinstance(image, dict) else str(image or "")
            blocks.append(_image_block(url))
        else:
            raise Unsupported(f"content parts of type {kind!r} are not supported by Anthropic")
    return blocks


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        if not raw.strip():
            return {}
        try:
            return _decode(raw)
        except msgspec.DecodeError:
            raise Unsupported("tool call arguments must be JSON") from None
    return raw if raw is not None else {}


def _messages(req: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    system: list[str] = []
    out: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for msg in req.get("messages") or ():
        role = msg.get("role")
        content = msg.get("content")
        if role in ("system", "developer"):
            system.append(_text_of(content))
        elif role == "user":
            add("user", _user_blocks(content))
        elif role == "assistant":
            blocks: list[dict[str, Any]] = []
            text = _text_of(content)
            if text:
                blocks.append({"type": "text", "text": text})
            for call in msg.get("tool_calls") or ():
                fn = call.get("function") or {}
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.get("id"),
                        "name": fn.get("name"),
                        "input": _arguments(fn.get("arguments")),
                    }
                )
            add("assistant", blocks)
        elif role == "tool":
            add(
                "user",
                [
                    {
                        "type": "tool_result",
                        "tool_use_id": msg.get("tool_call_id"),
                        "content": _text_of(content),
                    }
                ],
            )
        else:
            raise Unsupported(f"messages with role {role!r} are not supported by Anthropic")
    return out, system


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None:
        out: dict[str, Any] | None = None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        out = {"type": "none"}
    elif isinstance(choice, dict):
        out = {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    else:
        raise Unsupported(f"tool_choice {choice!r} is not supported")
    if parallel is False and (out is None or out["type"] != "none"):
        out = dict(out or {"type": "auto"})
        out["disable_parallel_tool_use"] = True
    return out


def wants_usage(req: dict[str, Any]) -> bool:
    """Whether a streamed request asked for OpenAI's last chunk with the usage."""
    opts = req.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


def json_tool(req: dict[str, Any]) -> bool:
    """Whether this request's answer comes back through the forced JSON tool."""
    fmt = req.get("response_format")
    return isinstance(fmt, dict) and fmt.get("type") == "json_schema"


def build_body(dep: Deployment, req: dict[str, Any], stream: bool) -> dict[str, Any]:
    """The Messages API request body for a canonical chat request."""
    if (req.get("n") or 1) > 1:
        raise Unsupported("n > 1 is not supported by Anthropic")
    messages, system = _messages(req)
    max_tokens = req.get("max_completion_tokens") or req.get("max_tokens")
    if not max_tokens:
        max_tokens = int(dep.options.get("max_tokens", DEFAULT_MAX_TOKENS))
    body: dict[str, Any] = {"model": dep.model, "max_tokens": max_tokens, "messages": messages}
    stop = req.get("stop")
    if stop:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    temperature = req.get("temperature")
    if temperature is not None:
        body["temperature"] = min(float(temperature), 1.0)
    if req.get("top_p") is not None:
        body["top_p"] = req["top_p"]
    tools = req.get("tools")
    if tools:
        body["tools"] = [
            {
                "name": t["function"]["name"],
                "description": t["function"].get("description", ""),
                "input_schema": t["function"].get("parameters")
                or {"type": "object", "properties": {}},
            }
            for t in tools
            if t.get("type", "function") == "function"
        ]
    choice = _tool_choice(req.get("tool_choice"), req.get("parallel_tool_calls"))
    if choice is not None and (tools or choice["type"] == "none"):
        body["tool_choice"] = choice
    fmt = req.get("response_format")
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema") or {}
            body.setdefault("tools", []).append(
                {
                    "name": JSON_TOOL,
                    "description": spec.get("description")
                    or "Give the answer as this tool's input.",
                    "input_schema": spec.get("schema") or {"type": "object"},
                }
            )
            body["tool_choice"] = {"type": "tool", "name": JSON_TOOL}
        elif fmt.get("type") == "json_object":
            system.append(_JSON_OBJECT_INSTRUCTION)
    if system:
        body["system"] = "\n\n".join(system)
    user = req.get("user")
    if user:
        body["metadata"] = {"user_id": str(user)}
    if stream:
        body["stream"] = True
    return body


def headers_for(dep: Deployment, version: str | None = None) -> list[tuple[str, str]]:
    headers = [
        ("content-type", "application/json"),
        ("anthropic-version", version or str(dep.options.get("anthropic_version", API_VERSION))),
    ]
    if dep.api_key:
        headers.append(("x-api-key", dep.api_key))
    beta = dep.options.get("anthropic_beta")
    if beta:
        headers.append(("anthropic-beta", str(beta)))
    return headers


def usage_of(u: dict[str, Any] | None) -> Usage:
    """Anthropic's usage: ``input_tokens`` leaves out the cached prompt tokens, OpenAI's
    ``prompt_tokens`` counts them."""
    if not u:
        return Usage()
    prompt = (
        (u.get("input_tokens") or 0)
        + (u.get("cache_creation_input_tokens") or 0)
        + (u.get("cache_read_input_tokens") or 0)
    )
    return Usage(prompt_tokens=prompt, completion_tokens=u.get("output_tokens") or 0)


def openai_usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def anthropic_error(status: int, body: bytes) -> Translated:
    """An Anthropic error answer in OpenAI's shape (529 overloaded becomes 503)."""
    message = f"the provider answered with status {status}"
    code: str | None = None
    try:
        err = _decode(body).get("error") or {}
        message = err.get("message") or message
        code = err.get("type")
    except (msgspec.DecodeError, AttributeError):
        pass
    out = 503 if status == 529 else status
    if out < 400:
        out = 502
    return Translated(out, error_body(out, message, code=code), None)


def _stream_error(err: dict[str, Any]) -> dict[str, Any]:
    kind = err.get("type") or "api_error"
    status = {
        "overloaded_error": 503,
        "rate_limit_error": 429,
        "invalid_request_error": 400,
        "request_too_large": 413,
    }.get(kind, 500)
    return error_body(status, err.get("message") or kind, code=kind)


class AnthropicAdapter(Adapter):
    provider = "anthropic"

    def chat_request(self, dep: Deployment, req: dict[str, Any], stream: bool) -> ProviderRequest:
        body = build_body(dep, req, stream)
        return ProviderRequest(
            "POST", dep.base_path + "/v1/messages", headers_for(dep), _encode(body)
        )

    def chat_response(
        self, dep: Deployment, status: int, body: bytes, req: dict[str, Any]
    ) -> Translated:
        if not 200 <= status < 300:
            return anthropic_error(status, body)
        try:
            msg = _decode(body)
        except msgspec.DecodeError:
            return Translated(502, error_body(502, "the provider's answer is not JSON"), None)
        as_json = json_tool(req)
        text: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in msg.get("content") or ():
            kind = block.get("type")
            if kind == "text":
                text.append(block.get("text", ""))
            elif kind == "tool_use":
                args = _encode(block.get("input") or {}).decode()
                if as_json and block.get("name") == JSON_TOOL:
                    text.append(args)
                else:
                    calls.append(
                        {
                            "id": block.get("id"),
                            "type": "function",
                            "function": {"name": block.get("name"), "arguments": args},
                        }
                    )
        finish = STOP_REASONS.get(msg.get("stop_reason") or "end_turn", "stop")
        if as_json and finish == "tool_calls" and not calls:
            finish = "stop"
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(text) if text or not calls else None,
        }
        if calls:
            message["tool_calls"] = calls
        usage = usage_of(msg.get("usage"))
        completion = {
            "id": msg.get("id") or "",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": msg.get("model") or dep.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": openai_usage(usage),
        }
        return Translated(200, completion, usage)

    def chat_stream(self, dep: Deployment, req: dict[str, Any]) -> AnthropicStream:
        return AnthropicStream(dep.model, json_tool(req), wants_usage(req))


class AnthropicStream:
    """Anthropic's SSE events -> ``chat.completion.chunk`` dicts (and OpenAI's last usage chunk
    when asked for); ``usage`` is set either way."""

    def __init__(self, model: str, as_json: bool = False, usage_chunk: bool = True) -> None:
        self.usage: Usage | None = None
        self._usage_chunk = usage_chunk
        self._sse = SseParser()
        self._as_json = as_json
        self._id = ""
        self._model = model
        self._created = int(time.time())
        self._input: dict[str, Any] = {}
        self._output = 0
        self._tools: dict[int, int] = {}  # content block index -> tool call index
        self._json_blocks: set[int] = set()
        self._finish: str | None = None
        self._started = False
        self._done = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for ev in self._sse.feed(data):
            self._event(ev.data, out)
        return out

    def close(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for ev in self._sse.close():
            self._event(ev.data, out)
        if not self._done:
            self._done = True
            out.append(error_body(502, "the provider's stream ended before message_stop"))
        return out

    def _event(self, data: str, out: list[dict[str, Any]]) -> None:
        if self._done or not data:
            return
        try:
            ev = _decode(data)
        except msgspec.DecodeError:
            return
        kind = ev.get("type")
        if kind == "content_block_delta":
            delta = ev.get("delta") or {}
            index = ev.get("index", 0)
            dkind = delta.get("type")
            if dkind == "text_delta":
                out.append(self._chunk({"content": delta.get("text", "")}))
            elif dkind == "input_json_delta":
                part = delta.get("partial_json", "")
                if index in self._json_blocks:
                    if part:
                        out.append(self._chunk({"content": part}))
                elif index in self._tools:
                    out.append(
                        self._chunk(
                            {
                                "tool_calls": [
                                    {"index": self._tools[index], "function": {"arguments": part}}
                                ]
                            }
                        )
                    )
        elif kind == "content_block_start":
            block = ev.get("content_block") or {}
            index = ev.get("index", 0)
            if block.get("type") == "text" and block.get("text"):
                out.append(self._chunk({"content": block["text"]}))
            elif block.get("type") == "tool_use":
                if self._as_json and block.get("name") == JSON_TOOL:
                    self._json_blocks.add(index)
                    return
                n = self._tools[index] = len(self._tools)
                out.append(
                    self._chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": n,
                                    "id": block.get("id"),
                                    "type": "function",
                                    "function": {"name": block.get("name"), "arguments": ""},
                                }
                            ]
                        }
                    )
                )
        elif kind == "message_start":
            msg = ev.get("message") or {}
            self._id = msg.get("id") or ""
            self._model = msg.get("model") or self._model
            self._input = dict(msg.get("usage") or {})
            self._output = self._input.get("output_tokens") or 0
            self._started = True
            out.append(self._chunk({"role": "assistant", "content": ""}))
        elif kind == "message_delta":
            u = ev.get("usage") or {}
            for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
                if u.get(key) is not None:
                    self._input[key] = u[key]
            if u.get("output_tokens") is not None:
                self._output = u["output_tokens"]
            reason = (ev.get("delta") or {}).get("stop_reason")
            if reason:
                finish = STOP_REASONS.get(reason, "stop")
                if finish == "tool_calls" and not self._tools:
                    finish = "stop"
                self._finish = finish
                out.append(self._chunk({}, finish))
        elif kind == "message_stop":
            self._done = True
            usage = usage_of({**self._input, "output_tokens": self._output})
            self.usage = usage
            if self._usage_chunk:
                last = self._chunk({})
                last["choices"] = []
                last["usage"] = openai_usage(usage)
                out.append(last)
        elif kind == "error":
            self._done = True
            out.append(_stream_error(ev.get("error") or {}))
        # ping and content_block_stop carry nothing the canonical form needs


ADAPTER = AnthropicAdapter()
