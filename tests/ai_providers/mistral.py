"""A test server speaking Mistral's API (``/v1/chat/completions``, ``/v1/embeddings``) on loopback.

It checks what Mistral checks and OpenAI does not: ``tool_choice`` is one of auto, none, any,
required or a function; tool call ids are 9 alphanumeric characters; ``seed`` is spelled
``random_seed``; unknown fields (e.g. ``stream_options``) are a 422 with a structured message.
Streams put the usage into the last chunk (the one with ``finish_reason``) and end with
``data: [DONE]``. Errors use Mistral's bodies (``{"object": "error", ...}``, or just
``{"message": ...}`` for 401 and 429).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

from ai_providers.loopback import Fault, ProviderServer, Recorded, Reply, words

ANSWER = "Bonjour from Mistral."
_KNOWN = {
    "model", "messages", "temperature", "top_p", "max_tokens", "stream", "stop",
    "random_seed", "response_format", "tools", "tool_choice", "presence_penalty",
    "frequency_penalty", "n", "parallel_tool_calls", "prediction", "safe_prompt",
}  # fmt: skip
_TOOL_ID = re.compile(r"[A-Za-z0-9]{9}")


def _validation(loc: list[str], msg: str) -> Reply:
    doc = {
        "object": "error",
        "message": {"detail": [{"type": "value_error", "loc": ["body", *loc], "msg": msg}]},
        "type": "invalid_request_message_error",
        "param": None,
        "code": None,
    }
    return Reply(422, json.dumps(doc).encode())


class MistralServer(ProviderServer):
    def answer(self, rec: Recorded, fault: Fault) -> Reply:
        if rec.headers.get("authorization") != f"Bearer {self.api_key}":
            return Reply(401, json.dumps({"message": "Unauthorized", "request_id": "r1"}).encode())
        if fault.status == 429:
            return Reply(429, b'{"message":"Requests rate limit exceeded"}')
        if fault.status:
            doc = {
                "object": "error",
                "message": "Service unavailable.",
                "type": "internal_server_error",
                "param": None,
                "code": "1000",
            }
            return Reply(fault.status, json.dumps(doc).encode())
        body = rec.json()
        if rec.path == "/v1/embeddings":
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            doc = {
                "id": "emb-1",
                "object": "list",
                "data": [
                    {"object": "embedding", "embedding": [0.25, -0.5, float(i)], "index": i}
                    for i in range(len(inputs))
                ],
                "model": body["model"],
                "usage": {"prompt_tokens": 5, "total_tokens": 5, "completion_tokens": 0},
            }
            return Reply(200, json.dumps(doc).encode())
        if rec.path != "/v1/chat/completions":
            return Reply(404, b'{"detail":"Not Found"}')
        for key in body:
            if key not in _KNOWN:
                return _validation([key], "Extra inputs are not permitted")
        choice = body.get("tool_choice")
        if isinstance(choice, str) and choice not in ("auto", "none", "any", "required"):
            return _validation(["tool_choice"], "Input should be 'auto', 'none', 'any'")
        for i, m in enumerate(body["messages"]):
            ids = [c["id"] for c in m.get("tool_calls") or []]
            if "tool_call_id" in m:
                ids.append(m["tool_call_id"])
            for cid in ids:
                if not _TOOL_ID.fullmatch(cid):
                    doc = {
                        "object": "error",
                        "message": f"Tool call id was {cid} but must be a-z, A-Z, 0-9, "
                        "with a length of 9.",
                        "type": "invalid_request_message_error",
                        "param": f"messages[{i}]",
                        "code": "3280",
                    }
                    return Reply(400, json.dumps(doc).encode())
        prompt = sum(words(json.dumps(m.get("content"))) for m in body["messages"])
        message: dict[str, Any] = {"role": "assistant", "content": ANSWER, "tool_calls": None}
        finish = "stop"
        if body.get("tools") and choice in ("any", "required"):
            fn = body["tools"][0]["function"]["name"]
            message = {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "D681PevKs", "function": {"name": fn, "arguments": '{"city": "Paris"}'}}
                ],
            }
            finish = "tool_calls"
        elif body.get("max_tokens") == 1:
            message["content"] = "Bonjour"
            finish = "model_length"
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": words(message["content"] or "") or 1,
            "total_tokens": 0,
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if body.get("stream"):
            return Reply(
                200, self._stream(body, message, finish, usage, fault), "text/event-stream"
            )
        doc = {
            "id": "cmpl-mistral",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": usage,
        }
        return Reply(200, json.dumps(doc).encode())

    def _stream(
        self,
        body: dict[str, Any],
        message: dict[str, Any],
        finish: str,
        usage: dict[str, int],
        fault: Fault,
    ) -> Iterator[bytes]:
        base = {"id": "cmpl-mistral", "object": "chat.completion.chunk", "created": 1}
        base["model"] = body["model"]

        def event(delta: dict[str, Any], reason: str | None = None, **extra: Any) -> bytes:
            doc = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            return b"data: " + json.dumps({**doc, **extra}).encode() + b"\n\n"

        yield event({"role": "assistant", "content": ""})
        if message.get("tool_calls"):
            yield event({"tool_calls": message["tool_calls"]})
        else:
            for i, w in enumerate(message["content"].split()):
                if fault.stream_error and i == 1:
                    doc = {"object": "error", "message": "Internal error", "type": "internal"}
                    yield b"data: " + json.dumps(doc).encode() + b"\n\n"
                    return
                yield event({"content": w + " "})
        yield event({"content": ""}, finish, usage=usage)
        yield b"data: [DONE]\n\n"
