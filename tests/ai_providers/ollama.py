"""A test server speaking Ollama's native API (``/api/chat``, ``/api/embed``) on loopback.

Streams are NDJSON (``application/x-ndjson``): one message object per line, the last with
``done: true``, ``done_reason`` and the counts (``prompt_eval_count``, ``eval_count``). Tool
calls come whole in one line, arguments as an object. Errors are ``{"error": "..."}``; an
unknown model is a 404 as when it was never pulled. ``options.num_predict`` of 1 stops with
``done_reason: length``; ``format`` (``json`` or a schema) answers JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from ai_providers.loopback import Fault, ProviderServer, Recorded, Reply, sample, words

ANSWER = "Hello from Ollama."
MODELS = {"llama3.2", "nomic-embed-text"}


def _err(status: int, message: str) -> Reply:
    return Reply(status, json.dumps({"error": message}).encode())


class OllamaServer(ProviderServer):
    def answer(self, rec: Recorded, fault: Fault) -> Reply:
        if fault.status:
            return _err(fault.status, "server busy, please try again.")
        body = rec.json()
        model = body.get("model")
        if model not in MODELS:
            return _err(404, f'model "{model}" not found, try pulling it first')
        if rec.path == "/api/embed":
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            doc = {
                "model": model,
                "embeddings": [[0.125, -0.5, float(i)] for i in range(len(inputs))],
                "total_duration": 1000,
                "load_duration": 10,
                "prompt_eval_count": 2 * len(inputs),
            }
            return Reply(200, json.dumps(doc).encode())
        if rec.path != "/api/chat":
            return Reply(404, b"404 page not found", "text/plain")
        for m in body["messages"]:
            for img in m.get("images") or []:
                if img.startswith("data:"):
                    return _err(400, "illegal base64 data at input byte 4")
            for c in m.get("tool_calls") or []:
                if not isinstance(c["function"]["arguments"], dict):
                    return _err(400, "json: cannot unmarshal string into Go value")
        options = body.get("options") or {}
        message: dict[str, Any] = {"role": "assistant", "content": ANSWER}
        reason = "stop"
        fmt = body.get("format")
        if body.get("tools") and any(
            m["role"] == "user" and "weather" in str(m["content"]) for m in body["messages"]
        ):
            fn = body["tools"][0]["function"]
            args = sample(fn.get("parameters") or {})
            message = {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": fn["name"], "arguments": args}}],
            }
        elif fmt is not None:
            message["content"] = json.dumps(
                sample(fmt) if isinstance(fmt, dict) else {"answer": 42}
            )
        elif options.get("num_predict") == 1:
            message["content"] = "Hello"
            reason = "length"
        prompt = sum(words(str(m.get("content"))) for m in body["messages"])
        counts = {"prompt_eval_count": prompt, "eval_count": words(message["content"]) or 1}
        if body.get("stream", True):
            return Reply(
                200, self._stream(model, message, reason, counts, fault), "application/x-ndjson"
            )
        doc = {
            "model": model,
            "created_at": "2026-01-01T00:00:00Z",
            "message": message,
            "done_reason": reason,
            "done": True,
            "total_duration": 5000,
            **counts,
        }
        return Reply(200, json.dumps(doc).encode())

    def _stream(
        self,
        model: str,
        message: dict[str, Any],
        reason: str,
        counts: dict[str, int],
        fault: Fault,
    ) -> Iterator[bytes]:
        def line(doc: dict[str, Any]) -> bytes:
            return (
                json.dumps({"model": model, "created_at": "2026-01-01T00:00:00Z", **doc}).encode()
                + b"\n"
            )

        if message.get("tool_calls"):
            yield line({"message": message, "done": False})
        else:
            for i, w in enumerate(message["content"].split(" ")):
                if fault.stream_error and i == 1:
                    yield (
                        json.dumps(
                            {"error": "an error was encountered while running the model"}
                        ).encode()
                        + b"\n"
                    )
                    return
                text = w if i == 0 else " " + w
                yield line({"message": {"role": "assistant", "content": text}, "done": False})
        yield line(
            {
                "message": {"role": "assistant", "content": ""},
                "done_reason": reason,
                "done": True,
                "total_duration": 5000,
                **counts,
            }
        )
