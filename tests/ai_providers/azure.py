"""A test server speaking Azure OpenAI's data-plane API on loopback.

``POST /openai/deployments/{deployment}/chat/completions?api-version=...`` and ``.../embeddings``
with an ``api-key`` header. Answers carry Azure's content-filter annotations (a first streamed
chunk with ``prompt_filter_results`` and no choices, ``content_filter_results`` in choices, an
annotation-only chunk); errors use Azure's bodies: ``{"error": {"code": "429", ...}}``, the
content filter's 400 with ``innererror``, ``DeploymentNotFound``; an unknown ``api-version`` is
a 404 as on Azure. A request whose last user message contains ``[filtered]`` is refused by the
content filter.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from ai_providers.loopback import Fault, ProviderServer, Recorded, Reply, words

ANSWER = "Hello from Azure OpenAI."
API_VERSIONS = {"2024-10-21", "2024-06-01", "2025-01-01-preview"}
_FILTER_OK = {
    "hate": {"filtered": False, "severity": "safe"},
    "violence": {"filtered": False, "severity": "safe"},
}


def _error(http_status: int, code: str, message: str, **extra: Any) -> Reply:
    return Reply(
        http_status, json.dumps({"error": {"code": code, "message": message, **extra}}).encode()
    )


def _last_user(body: dict[str, Any]) -> str:
    for m in reversed(body.get("messages") or []):
        if m.get("role") == "user":
            c = m.get("content")
            return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c)
    return ""


class AzureServer(ProviderServer):
    def __init__(self, api_key: str = "test-key", deployment: str = "gpt-4o-prod") -> None:
        super().__init__(api_key)
        self.deployment = deployment

    def answer(self, rec: Recorded, fault: Fault) -> Reply:
        if rec.headers.get("api-key") != self.api_key:
            return _error(
                401,
                "401",
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure "
                "to provide a valid key for an active subscription and use a correct regional "
                "API endpoint for your resource.",
            )
        if rec.query.get("api-version", [""])[0] not in API_VERSIONS:
            return _error(404, "404", "Resource not found")
        parts = rec.path.split("/")
        if len(parts) < 5 or parts[1:3] != ["openai", "deployments"]:
            return _error(404, "404", "Resource not found")
        if parts[3] != self.deployment:
            return _error(
                404,
                "DeploymentNotFound",
                "The API deployment for this resource does not exist.",
            )
        if fault.status == 429:
            return _error(
                429,
                "429",
                "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version "
                "2024-10-21 have exceeded token rate limit of your current pricing tier.",
            )
        if fault.status:
            return _error(fault.status, "InternalServerError", "The server had an error.")
        body = rec.json()
        op = "/".join(parts[4:])
        if op == "embeddings":
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            return Reply(
                200,
                json.dumps(
                    {
                        "object": "list",
                        "data": [
                            {"object": "embedding", "index": i, "embedding": [0.5, -0.25, i]}
                            for i in range(len(inputs))
                        ],
                        "model": "text-embedding-3-small",
                        "usage": {"prompt_tokens": 4, "total_tokens": 4},
                    }
                ).encode(),
            )
        if op != "chat/completions":
            return _error(404, "404", "Resource not found")
        if "[filtered]" in _last_user(body):
            return _error(
                400,
                "content_filter",
                "The response was filtered due to the prompt triggering Azure OpenAI's content "
                "management policy.",
                param="prompt",
                status=400,
                innererror={
                    "code": "ResponsibleAIPolicyViolation",
                    "content_filter_result": {"violence": {"filtered": True, "severity": "high"}},
                },
            )
        prompt = sum(words(json.dumps(m.get("content"))) for m in body["messages"])
        completion = words(ANSWER)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if body.get("stream"):
            return Reply(200, self._stream(body, usage, fault), "text/event-stream")
        return Reply(
            200,
            json.dumps(
                {
                    "id": "chatcmpl-azure",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": "gpt-4o-2024-08-06",
                    "prompt_filter_results": [
                        {"prompt_index": 0, "content_filter_results": _FILTER_OK}
                    ],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": ANSWER},
                            "content_filter_results": _FILTER_OK,
                        }
                    ],
                    "usage": usage,
                }
            ).encode(),
        )

    def _stream(self, body: dict[str, Any], usage: dict[str, int], fault: Fault) -> Iterator[bytes]:
        def event(doc: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps(doc).encode() + b"\n\n"

        base = {"id": "chatcmpl-azure", "object": "chat.completion.chunk", "created": 1}
        yield event(
            {
                "choices": [],
                "created": 0,
                "id": "",
                "model": "",
                "object": "",
                "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
            }
        )
        pieces = [{"role": "assistant", "content": ""}] + [
            {"content": w + " "} for w in ANSWER.split()
        ]
        for i, delta in enumerate(pieces):
            if fault.stream_error and i == 2:
                yield event({"error": {"code": "500", "message": "The server had an error."}})
                return
            yield event(
                {
                    **base,
                    "model": "gpt-4o-2024-08-06",
                    "choices": [
                        {
                            "index": 0,
                            "delta": delta,
                            "finish_reason": None,
                            "content_filter_results": _FILTER_OK,
                        }
                    ],
                }
            )
        yield event(
            {
                **base,
                "model": "gpt-4o-2024-08-06",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            }
        )
        # the asynchronous content filter's annotation-only chunk
        yield event(
            {
                **base,
                "model": "",
                "choices": [
                    {
                        "index": 0,
                        "delta": {},
                        "finish_reason": None,
                        "content_filter_offsets": {"check_offset": 0, "start_offset": 0},
                        "content_filter_results": _FILTER_OK,
                    }
                ],
            }
        )
        if (body.get("stream_options") or {}).get("include_usage"):
            yield event({**base, "model": "gpt-4o-2024-08-06", "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"
