"""Cohere's v2 API: ``/v2/chat`` (SSE events ``message-start`` ... ``message-end``), ``/v2/embed``.

Options: ``input_type`` for embeddings (default ``search_document``; Cohere's v3+ embedding models
require one). Usage is Cohere's ``billed_units`` (what prices apply to), else its ``tokens``.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from ferrogate.ai.adapters.base import (
    Adapter,
    Deployment,
    ProviderRequest,
    StreamTranslator,
    Translated,
    Usage,
    error_body,
)
from ferrogate.ai.adapters.wire import (
    ChunkMaker,
    SSEDecoder,
    completion,
    decode,
    embedding_inputs,
    embeddings_list,
    encode,
    fallback_message,
    text_of,
    tool_call,
    wants_usage_chunk,
)

_FINISH = {
    "COMPLETE": "stop",
    "STOP_SEQUENCE": "stop",
    "MAX_TOKENS": "length",
    "TOOL_CALL": "tool_calls",
}
# Cohere's statuses with no OpenAI counterpart
_STATUS = {498: 401, 422: 400}


def _usage(u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    counts = u.get("billed_units") or u.get("tokens") or {}
    return Usage(
        prompt_tokens=int(counts.get("input_tokens") or 0),
        completion_tokens=int(counts.get("output_tokens") or 0),
    )


def _messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        content = m.get("content")
        if role in ("system", "developer"):
            out.append({"role": "system", "content": text_of(content)})
        elif role == "user":
            out.append({"role": "user", "content": content if content is not None else ""})
        elif role == "assistant":
            msg: dict[str, Any] = {"role": "assistant"}
            text = text_of(content)
            if text:
                msg["content"] = text
            if m.get("tool_calls"):
                msg["tool_calls"] = m["tool_calls"]
            out.append(msg)
        elif role == "tool":
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": m.get("tool_call_id", ""),
                    "content": text_of(content),
                }
            )
    return out


def translate_error(status: int, body: bytes) -> Translated:
    try:
        doc = decode(body)
    except msgspec.DecodeError:
        doc = None
    msg = doc.get("message") if isinstance(doc, dict) else None
    out_status = _STATUS.get(status, status)
    return Translated(
        out_status,
        error_body(out_status, msg if isinstance(msg, str) else fallback_message(status, body)),
        None,
    )


class CohereStream:
    def __init__(self, dep: Deployment, req: dict[str, Any]) -> None:
        self.usage: Usage | None = None
        self._sse = SSEDecoder()
        self._chunks = ChunkMaker(f"chatcmpl-{uuid.uuid4().hex}", dep.model)
        self._usage_chunk = wants_usage_chunk(req)
        self._tools = -1

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        return self._events(self._sse.feed(data))

    def close(self) -> list[dict[str, Any]]:
        return self._events(self._sse.close())

    def _events(self, events: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for event, data in events:
            if data == b"[DONE]":
                continue
            try:
                doc = decode(data)
            except msgspec.DecodeError:
                out.append(error_body(502, "the provider sent a malformed stream event"))
                continue
            if not isinstance(doc, dict):
                continue
            kind = doc.get("type") or event
            delta = (doc.get("delta") or {}).get("message") or {}
            if kind == "message-start":
                if doc.get("id"):
                    self._chunks.id = doc["id"]
                out.append(self._chunks.chunk({"role": "assistant", "content": ""}))
            elif kind == "content-delta":
                text = (delta.get("content") or {}).get("text")
                if text:
                    out.append(self._chunks.chunk({"content": text}))
            elif kind == "tool-call-start":
                call = delta.get("tool_calls") or {}
                fn = call.get("function") or {}
                self._tools += 1
                out.append(
                    self._chunks.chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": self._tools,
                                    **tool_call(
                                        call.get("id", ""),
                                        fn.get("name", ""),
                                        fn.get("arguments") or "",
                                    ),
                                }
                            ]
                        }
                    )
                )
            elif kind == "tool-call-delta":
                args = ((delta.get("tool_calls") or {}).get("function") or {}).get("arguments")
                if args:
                    out.append(
                        self._chunks.chunk(
                            {
                                "tool_calls": [
                                    {"index": self._tools, "function": {"arguments": args}}
                                ]
                            }
                        )
                    )
            elif kind == "message-end":
                end = doc.get("delta") or {}
                reason = _FINISH.get(end.get("finish_reason") or "COMPLETE", "stop")
                out.append(self._chunks.chunk({}, reason))
                self.usage = _usage(end.get("usage"))
                if self.usage is not None and self._usage_chunk:
                    out.append(self._chunks.usage_chunk(self.usage))
            elif kind == "error" or ("message" in doc and "type" not in doc):
                msg = doc.get("message")
                out.append(error_body(500, msg if isinstance(msg, str) else "provider error"))
        return out


class CohereAdapter(Adapter):
    provider = "cohere"

    def _headers(self, dep: Deployment) -> list[tuple[str, str]]:
        headers = [("content-type", "application/json"), ("accept", "application/json")]
        if dep.api_key:
            headers.append(("authorization", f"Bearer {dep.api_key}"))
        return headers

    def chat_request(self, dep: Deployment, req: dict[str, Any], stream: bool) -> ProviderRequest:
        body: dict[str, Any] = {
            "model": dep.model,
            "messages": _messages(req.get("messages") or []),
            "stream": stream,
        }
        tools = req.get("tools")
        choice = req.get("tool_choice")
        if tools and choice != "none":
            if isinstance(choice, dict):
                # Cohere cannot name the tool to call: offer only that one, and require a call
                name = (choice.get("function") or {}).get("name")
                tools = [t for t in tools if (t.get("function") or {}).get("name") == name]
                body["tool_choice"] = "REQUIRED"
            elif choice == "required":
                body["tool_choice"] = "REQUIRED"
            body["tools"] = tools
        for src, dst in (
            ("max_tokens", "max_tokens"),
            ("max_completion_tokens", "max_tokens"),
            ("temperature", "temperature"),
            ("top_p", "p"),
            ("seed", "seed"),
            ("frequency_penalty", "frequency_penalty"),
            ("presence_penalty", "presence_penalty"),
        ):
            if req.get(src) is not None:
                body[dst] = req[src]
        stop = req.get("stop")
        if stop:
            body["stop_sequences"] = [stop] if isinstance(stop, str) else stop
        rf = req.get("response_format")
        if isinstance(rf, dict):
            if rf.get("type") == "json_object":
                body["response_format"] = {"type": "json_object"}
            elif rf.get("type") == "json_schema":
                schema = (rf.get("json_schema") or {}).get("schema")
                body["response_format"] = {"type": "json_object", "json_schema": schema}
        return ProviderRequest("POST", f"{dep.base_path}/v2/chat", self._headers(dep), encode(body))

    def chat_response(
        self, dep: Deployment, status: int, body: bytes, req: dict[str, Any]
    ) -> Translated:
        if not 200 <= status < 300:
            return translate_error(status, body)
        doc = decode(body)
        msg = doc.get("message") or {}
        text = "".join(
            c.get("text", "")
            for c in msg.get("content") or ()
            if isinstance(c, dict) and c.get("type") == "text"
        )
        calls = [
            tool_call(
                c.get("id", ""),
                (c.get("function") or {}).get("name", ""),
                (c.get("function") or {}).get("arguments") or "{}",
            )
            for c in msg.get("tool_calls") or ()
        ]
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text if text or not calls else None,
            "refusal": None,
        }
        if calls:
            message["tool_calls"] = calls
        usage = _usage(doc.get("usage"))
        finish = _FINISH.get(doc.get("finish_reason") or "COMPLETE", "stop")
        out = completion(
            doc.get("id") or f"chatcmpl-{uuid.uuid4().hex}", dep.model, message, finish, usage
        )
        return Translated(status, out, usage)

    def chat_stream(self, dep: Deployment, req: dict[str, Any]) -> StreamTranslator:
        return CohereStream(dep, req)

    def embeddings_request(self, dep: Deployment, req: dict[str, Any]) -> ProviderRequest:
        body: dict[str, Any] = {
            "model": dep.model,
            "texts": embedding_inputs(req),
            "input_type": dep.options.get("input_type") or "search_document",
            "embedding_types": ["float"],
        }
        if req.get("dimensions"):
            body["output_dimension"] = req["dimensions"]
        return ProviderRequest(
            "POST", f"{dep.base_path}/v2/embed", self._headers(dep), encode(body)
        )

    def embeddings_response(
        self, dep: Deployment, status: int, body: bytes, req: dict[str, Any]
    ) -> Translated:
        if not 200 <= status < 300:
            return translate_error(status, body)
        doc = decode(body)
        vectors = (doc.get("embeddings") or {}).get("float") or []
        billed = ((doc.get("meta") or {}).get("billed_units") or {}).get("input_tokens") or 0
        usage = Usage(prompt_tokens=int(billed))
        return Translated(
            status, embeddings_list(vectors, dep.model, usage.prompt_tokens, req), usage
        )


ADAPTER = CohereAdapter()
