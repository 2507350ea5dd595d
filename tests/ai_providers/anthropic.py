"""A test server speaking Anthropic's Messages API (``POST /v1/messages``) as documented:
the key from ``x-api-key`` (or ``Authorization: Bearer``, which recent SDKs send) and
``anthropic-version`` checked, requests validated the way the API does
(``max_tokens`` required, roles alternating from user, no system role in ``messages``,
``tool_result`` only for a ``tool_use`` of the turn before), error bodies
``{"type": "error", "error": {"type", "message"}}`` with Anthropic's statuses (529 overloaded)
and ``request-id``, and streams as the documented event sequence: ``message_start``,
``content_block_start``, ``ping``, ``content_block_delta`` (``text_delta``,
``input_json_delta``), ``content_block_stop``, ``message_delta`` (stop reason, usage),
``message_stop``; a fault mid-stream sends an ``error`` event.

The answers are deterministic: a text ``echo: <last user text>`` (``tool said: <result>``
after a tool result); a ``tool_use`` when the tool choice forces one or the last user text
starts with ``use tool`` (its input follows the tool's input schema); one token per word.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

from ai_providers.loopback import Fault, ProviderServer, Recorded, Reply, sample, words

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def error_reply(status: int, message: str, retry_after: str | None = None) -> Reply:
    body = {
        "type": "error",
        "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message},
    }
    headers = [("request-id", "req_" + uuid.uuid4().hex[:20])]
    if retry_after is not None:
        headers.append(("retry-after", retry_after))
    return Reply(status, json.dumps(body).encode(), headers=headers)


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


class Invalid(Exception):
    pass


def _text_blocks(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(b.get("text", "") for b in content if b.get("type") == "text")


def _validate(req: Any) -> None:
    if not isinstance(req, dict):
        raise Invalid("body: must be an object")
    if not isinstance(req.get("model"), str):
        raise Invalid("model: Field required")
    if not isinstance(req.get("max_tokens"), int) or req["max_tokens"] < 1:
        raise Invalid("max_tokens: Field required")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Invalid("messages: at least one message is required")
    system = req.get("system")
    if system is not None and not isinstance(system, str | list):
        raise Invalid("system: Input should be a valid string or list")
    if "temperature" in req and not 0 <= req["temperature"] <= 1:
        raise Invalid("temperature: Input should be less than or equal to 1")
    previous_tool_uses: set[str] = set()
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role not in ("user", "assistant"):
            raise Invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if i == 0 and role != "user":
            raise Invalid("messages: first message must use the 'user' role")
        if i > 0 and messages[i - 1].get("role") == role:
            raise Invalid("messages: roles must alternate between 'user' and 'assistant'")
        content = msg.get("content")
        if isinstance(content, str):
            previous_tool_uses = set()
            continue
        if not isinstance(content, list):
            raise Invalid(f"messages.{i}.content: Input should be a valid list")
        uses: set[str] = set()
        for j, block in enumerate(content):
            kind = block.get("type")
            where = f"messages.{i}.content.{j}"
            if kind == "text":
                if not isinstance(block.get("text"), str):
                    raise Invalid(f"{where}.text: Field required")
            elif kind == "image":
                src = block.get("source") or {}
                if src.get("type") == "base64":
                    if not src.get("media_type") or not src.get("data"):
                        raise Invalid(f"{where}.source: media_type and data are required")
                elif src.get("type") == "url":
                    if not src.get("url"):
                        raise Invalid(f"{where}.source.url: Field required")
                else:
                    raise Invalid(f"{where}.source.type: Input should be 'base64' or 'url'")
            elif kind == "tool_use" and role == "assistant":
                if not block.get("id") or not block.get("name"):
                    raise Invalid(f"{where}: id and name are required")
                if not isinstance(block.get("input"), dict):
                    raise Invalid(f"{where}.input: Input should be a valid dictionary")
                uses.add(block["id"])
            elif kind == "tool_result" and role == "user":
                if block.get("tool_use_id") not in previous_tool_uses:
                    raise Invalid(
                        f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{block.get('tool_use_id')}. Each `tool_result` block must have a "
                        "corresponding `tool_use` block in the previous message."
                    )
            else:
                raise Invalid(f"{where}.type: unexpected block type {kind!r} for role {role}")
        previous_tool_uses = uses
    for t in req.get("tools") or ():
        if not t.get("name") or not isinstance(t.get("input_schema"), dict):
            raise Invalid("tools: name and input_schema are required")
    choice = req.get("tool_choice")
    if choice is not None and choice.get("type") not in ("auto", "any", "tool", "none"):
        raise Invalid("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")


def _answer(req: dict[str, Any]) -> tuple[list[dict[str, Any]], str, str | None]:
    """The content blocks, stop reason and stop sequence of the answer to a valid request."""
    last = req["messages"][-1]
    content = last["content"]
    tools = req.get("tools") or []
    choice = req.get("tool_choice") or {"type": "auto"}
    results = [] if isinstance(content, str) else [b for b in content if b["type"] == "tool_result"]
    user_text = _text_blocks(content)
    tool = None
    if tools and choice["type"] == "tool":
        tool = next(t for t in tools if t["name"] == choice["name"])
    elif tools and (choice["type"] == "any" or user_text.startswith("use tool")):
        tool = tools[0] if choice["type"] != "none" else None
    if tool is not None:
        block = {
            "type": "tool_use",
            "id": "toolu_" + uuid.uuid4().hex[:24],
            "name": tool["name"],
            "input": sample(tool["input_schema"]),
        }
        return [block], "tool_use", None
    if results:
        text = "tool said: " + " ".join(
            r["content"] if isinstance(r.get("content"), str) else _text_blocks(r["content"])
            for r in results
        )
    else:
        text = "echo: " + user_text
        images = 0 if isinstance(content, str) else sum(b["type"] == "image" for b in content)
        if images:
            text += f" [{images} image]"
    stop_reason, stop_sequence = "end_turn", None
    for seq in req.get("stop_sequences") or ():
        if seq in text:
            text = text[: text.index(seq)]
            stop_reason, stop_sequence = "stop_sequence", seq
            break
    tokens = text.split(" ")
    if len(tokens) > req["max_tokens"]:
        text = " ".join(tokens[: req["max_tokens"]])
        stop_reason, stop_sequence = "max_tokens", None
    return [{"type": "text", "text": text}], stop_reason, stop_sequence


def _input_tokens(req: dict[str, Any]) -> int:
    system = req.get("system") or ""
    n = words(system if isinstance(system, str) else _text_blocks(system))
    for msg in req["messages"]:
        n += words(_text_blocks(msg["content"])) + 1
    return n


def _output_tokens(blocks: list[dict[str, Any]]) -> int:
    n = 0
    for b in blocks:
        n += words(b["text"]) if b["type"] == "text" else len(json.dumps(b["input"])) // 4 + 1
    return n


class AnthropicServer(ProviderServer):
    def answer(self, rec: Recorded, fault: Fault) -> Reply:
        if rec.method != "POST" or rec.path != "/v1/messages":
            return error_reply(404, f"Not found: {rec.method} {rec.path}")
        bearer = rec.headers.get("authorization", "").removeprefix("Bearer ")
        if self.api_key not in (rec.headers.get("x-api-key"), bearer):
            return error_reply(401, "invalid x-api-key")
        if not rec.headers.get("anthropic-version"):
            return error_reply(400, "anthropic-version: header is required")
        if fault.status:
            return error_reply(fault.status, f"injected fault {fault.status}", fault.retry_after)
        try:
            req = rec.json()
            _validate(req)
        except (ValueError, Invalid) as e:
            return error_reply(400, str(e))
        blocks, stop_reason, stop_sequence = _answer(req)
        msg_id = "msg_" + uuid.uuid4().hex[:24]
        usage = {"input_tokens": _input_tokens(req), "output_tokens": _output_tokens(blocks)}
        headers = [("request-id", "req_" + uuid.uuid4().hex[:20])]
        if not req.get("stream"):
            body = {
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "model": req["model"],
                "content": blocks,
                "stop_reason": stop_reason,
                "stop_sequence": stop_sequence,
                "usage": usage,
            }
            return Reply(200, json.dumps(body).encode(), headers=headers)
        events = self._events(req, msg_id, blocks, stop_reason, stop_sequence, usage, fault)
        return Reply(200, events, "text/event-stream; charset=utf-8", headers)

    def _events(
        self,
        req: dict[str, Any],
        msg_id: str,
        blocks: list[dict[str, Any]],
        stop_reason: str,
        stop_sequence: str | None,
        usage: dict[str, int],
        fault: Fault,
    ) -> Iterator[bytes]:
        yield _sse(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "model": req["model"],
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 1},
                },
            },
        )
        for index, block in enumerate(blocks):
            if block["type"] == "text":
                start = {"type": "text", "text": ""}
                words_ = block["text"].split(" ")
                pieces = [w if i == 0 else " " + w for i, w in enumerate(words_)]
                deltas = [{"type": "text_delta", "text": p} for p in pieces]
            else:
                start = {**block, "input": {}}
                raw = json.dumps(block["input"])
                half = len(raw) // 2
                deltas = [
                    {"type": "input_json_delta", "partial_json": ""},
                    {"type": "input_json_delta", "partial_json": raw[:half]},
                    {"type": "input_json_delta", "partial_json": raw[half:]},
                ]
            yield _sse(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": start},
            )
            if index == 0:
                yield _sse("ping", {"type": "ping"})
            for n, delta in enumerate(deltas):
                if fault.stream_error and n == 1:
                    yield _sse(
                        "error",
                        {
                            "type": "error",
                            "error": {"type": "overloaded_error", "message": "Overloaded"},
                        },
                    )
                    return
                yield _sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
        yield _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
        yield _sse("message_stop", {"type": "message_stop"})
