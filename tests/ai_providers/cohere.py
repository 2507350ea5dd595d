"""A test server speaking Cohere's v2 API (``/v2/chat``, ``/v2/embed``) on loopback.

Streams are server-sent events typed ``message-start``, ``content-start``, ``content-delta``,
``content-end``, ``tool-plan-delta``, ``tool-call-start``, ``tool-call-delta``,
``tool-call-end`` and ``message-end`` (with the finish reason and usage). Errors are Cohere's
``{"id": ..., "message": ...}`` bodies. ``tool_choice`` must be ``REQUIRED`` or ``NONE``; the
embed endpoint requires ``input_type`` and ``embedding_types``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

from ai_providers.loopback import Fault, ProviderServer, Recorded, Reply, sample, words

ANSWER = "Hello from Cohere."


def _err(status: int, message: str) -> Reply:
    return Reply(status, json.dumps({"id": str(uuid.uuid4()), "message": message}).encode())


class CohereServer(ProviderServer):
    def answer(self, rec: Recorded, fault: Fault) -> Reply:
        if rec.headers.get("authorization") != f"Bearer {self.api_key}":
            return _err(401, "invalid api token")
        if fault.status == 429:
            return _err(
                429, "You are using a Trial key, which is limited to 10 API calls / minute."
            )
        if fault.status:
            return _err(
                fault.status, "internal server error, this has been reported to our developers"
            )
        body = rec.json()
        if rec.path == "/v2/embed":
            if "input_type" not in body or not body.get("embedding_types"):
                return _err(400, "invalid request: input_type and embedding_types are required")
            texts = body["texts"]
            doc = {
                "id": "emb-1",
                "embeddings": {"float": [[0.75, -0.5, float(i)] for i in range(len(texts))]},
                "texts": texts,
                "meta": {
                    "api_version": {"version": "2"},
                    "billed_units": {"input_tokens": 3 * len(texts)},
                },
                "response_type": "embeddings_by_type",
            }
            return Reply(200, json.dumps(doc).encode())
        if rec.path != "/v2/chat":
            return _err(404, "not found")
        choice = body.get("tool_choice")
        if choice is not None and choice not in ("REQUIRED", "NONE"):
            return _err(400, f"invalid request: tool_choice must be REQUIRED or NONE, got {choice}")
        for m in body["messages"]:
            if m["role"] not in ("system", "user", "assistant", "tool"):
                return _err(400, f"invalid request: unknown role {m['role']}")
        calls: list[dict[str, Any]] = []
        text = ANSWER
        finish = "COMPLETE"
        if body.get("tools") and choice == "REQUIRED":
            fn = body["tools"][0]["function"]
            calls = [
                {
                    "id": "get_weather_x1y2z3",
                    "type": "function",
                    "function": {
                        "name": fn["name"],
                        "arguments": json.dumps(sample(fn.get("parameters"))),
                    },
                }
            ]
            text = ""
            finish = "TOOL_CALL"
        elif body.get("response_format"):
            text = json.dumps(sample(body["response_format"].get("json_schema")) or {"answer": 42})
        elif body.get("max_tokens") == 1:
            text = "Hello"
            finish = "MAX_TOKENS"
        prompt = sum(words(json.dumps(m.get("content", ""))) for m in body["messages"])
        usage = {
            "billed_units": {"input_tokens": prompt, "output_tokens": words(text) or 1},
            "tokens": {"input_tokens": prompt + 100, "output_tokens": (words(text) or 1) + 2},
        }
        if body.get("stream"):
            return Reply(200, self._stream(text, calls, finish, usage, fault), "text/event-stream")
        message: dict[str, Any] = {"role": "assistant"}
        if text:
            message["content"] = [{"type": "text", "text": text}]
        if calls:
            message["tool_plan"] = "I will call the tool."
            message["tool_calls"] = calls
        doc = {"id": "c0ffee", "finish_reason": finish, "message": message, "usage": usage}
        return Reply(200, json.dumps(doc).encode())

    def _stream(
        self,
        text: str,
        calls: list[dict[str, Any]],
        finish: str,
        usage: dict[str, Any],
        fault: Fault,
    ) -> Iterator[bytes]:
        def event(kind: str, **doc: Any) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **doc})}\n\n".encode()

        empty = {
            "role": "assistant",
            "content": [],
            "tool_plan": "",
            "tool_calls": [],
            "citations": [],
        }
        yield event("message-start", id="c0ffee", delta={"message": empty})
        if calls:
            yield event(
                "tool-plan-delta", delta={"message": {"tool_plan": "I will call the tool."}}
            )
            for i, c in enumerate(calls):
                start = {**c, "function": {"name": c["function"]["name"], "arguments": ""}}
                yield event("tool-call-start", index=i, delta={"message": {"tool_calls": start}})
                args = c["function"]["arguments"]
                for piece in (args[: len(args) // 2], args[len(args) // 2 :]):
                    delta = {"message": {"tool_calls": {"function": {"arguments": piece}}}}
                    yield event("tool-call-delta", index=i, delta=delta)
                yield event("tool-call-end", index=i)
        else:
            yield event(
                "content-start",
                index=0,
                delta={"message": {"content": {"type": "text", "text": ""}}},
            )
            for i, w in enumerate(text.split(" ")):
                if fault.stream_error and i == 1:
                    yield b'data: {"message":"internal server error"}\n\n'
                    return
                piece = w if i == 0 else " " + w
                yield event(
                    "content-delta", index=0, delta={"message": {"content": {"text": piece}}}
                )
            yield event("content-end", index=0)
        yield event("message-end", delta={"finish_reason": finish, "usage": usage})
