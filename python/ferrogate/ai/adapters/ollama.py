"""Ollama's native API: ``/api/chat`` (NDJSON when streamed) and ``/api/embed``.

Sampling settings go into Ollama's ``options`` (``max_tokens`` is ``num_predict``), with the
deployment's ``options.options`` as defaults (e.g. ``num_ctx``); ``options.keep_alive`` is passed
on. ``response_format`` becomes ``format`` (``json`` or the JSON schema itself); images must be
``data:`` URLs (Ollama takes base64 only). Usage: ``prompt_eval_count`` and ``eval_count``.
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
    Unsupported,
    Usage,
    error_body,
)
from ferrogate.ai.adapters.wire import (
    ChunkMaker,
    LineDecoder,
    completion,
    data_url,
    decode,
    embedding_inputs,
    embeddings_list,
    encode,
    fallback_message,
    json_args,
    tool_call,
    wants_usage_chunk,
)

_FINISH = {"stop": "stop", "length": "length"}


def _finish(doc: dict[str, Any], tools: bool) -> str:
    if tools:
        return "tool_calls"
    return _FINISH.get(doc.get("done_reason") or "stop", "stop")


def _usage(doc: dict[str, Any]) -> Usage:
    return Usage(
        prompt_tokens=int(doc.get("prompt_eval_count") or 0),
        completion_tokens=int(doc.get("eval_count") or 0),
    )


def _message(m: dict[str, Any], tool_names: dict[str, str]) -> dict[str, Any]:
    role = m.get("role")
    out: dict[str, Any] = {"role": "system" if role == "developer" else role}
    content = m.get("content")
    images = []
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") == "image_url":
                iu = part.get("image_url")
                url = iu.get("url", "") if isinstance(iu, dict) else str(iu or "")
                parsed = data_url(url)
                if parsed is None:
                    raise Unsupported("images for Ollama models must be data: URLs (base64)")
                images.append(parsed[1])
            else:
                raise Unsupported(f"content parts of type {part.get('type')!r} are not supported")
        out["content"] = "".join(texts)
    else:
        out["content"] = content or ""
    if images:
        out["images"] = images
    calls = m.get("tool_calls")
    if calls:
        out["tool_calls"] = []
        for c in calls:
            fn = c.get("function") or {}
            tool_names[str(c.get("id", ""))] = fn.get("name", "")
            out["tool_calls"].append(
                {
                    "function": {
                        "name": fn.get("name", ""),
                        "arguments": json_args(fn.get("arguments")),
                    }
                }
            )
    if role == "tool":
        name = tool_names.get(str(m.get("tool_call_id", "")))
        if name:
            out["tool_name"] = name
    return out


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    return [
        tool_call(
            f"call_{uuid.uuid4().hex[:24]}",
            (c.get("function") or {}).get("name", ""),
            encode((c.get("function") or {}).get("arguments") or {}).decode(),
        )
        for c in calls or ()
    ]


def translate_error(status: int, body: bytes) -> Translated:
    try:
        doc = decode(body)
    except msgspec.DecodeError:
        doc = None
    err = doc.get("error") if isinstance(doc, dict) else None
    message = err if isinstance(err, str) else fallback_message(status, body)
    code = "model_not_found" if status == 404 else None
    return Translated(status, error_body(status, message, code=code), None)


class OllamaStream:
    def __init__(self, dep: Deployment, req: dict[str, Any]) -> None:
        self.usage: Usage | None = None
        self._lines = LineDecoder()
        self._chunks = ChunkMaker(f"chatcmpl-{uuid.uuid4().hex}", dep.model)
        self._usage_chunk = wants_usage_chunk(req)
        self._started = False
        self._tools = 0

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        return self._lines_to_chunks(self._lines.feed(data))

    def close(self) -> list[dict[str, Any]]:
        return self._lines_to_chunks(self._lines.close())

    def _lines_to_chunks(self, lines: list[bytes]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for line in lines:
            try:
                doc = decode(line)
            except msgspec.DecodeError:
                out.append(error_body(502, "the provider sent a malformed stream line"))
                continue
            if not isinstance(doc, dict):
                continue
            if "error" in doc:
                out.append(translate_error(500, line).body or {})
                continue
            msg = doc.get("message") or {}
            delta: dict[str, Any] = {}
            if not self._started:
                delta["role"] = "assistant"
                self._started = True
            text = msg.get("content")
            if text:
                delta["content"] = text
            calls = _tool_calls(msg.get("tool_calls"))
            if calls:
                delta["tool_calls"] = [{"index": self._tools + i, **c} for i, c in enumerate(calls)]
                self._tools += len(calls)
            if doc.get("done"):
                if delta:
                    out.append(self._chunks.chunk(delta))
                out.append(self._chunks.chunk({}, _finish(doc, self._tools > 0)))
                self.usage = _usage(doc)
                if self._usage_chunk:
                    out.append(self._chunks.usage_chunk(self.usage))
            elif delta:
                out.append(self._chunks.chunk(delta))
        return out


class OllamaAdapter(Adapter):
    provider = "ollama"
    stream_content_type = "application/x-ndjson"

    def _headers(self, dep: Deployment) -> list[tuple[str, str]]:
        headers = [("content-type", "application/json")]
        if dep.api_key:
            # Ollama itself has no keys; a proxy in front of it may want one
            headers.append(("authorization", f"Bearer {dep.api_key}"))
        return headers

    def chat_request(self, dep: Deployment, req: dict[str, Any], stream: bool) -> ProviderRequest:
        tool_names: dict[str, str] = {}
        body: dict[str, Any] = {
            "model": dep.model,
            "messages": [_message(m, tool_names) for m in req.get("messages") or ()],
            "stream": stream,
        }
        tools = req.get("tools")
        if tools and req.get("tool_choice") != "none":
            body["tools"] = tools
        rf = req.get("response_format")
        if isinstance(rf, dict):
            if rf.get("type") == "json_object":
                body["format"] = "json"
            elif rf.get("type") == "json_schema":
                body["format"] = (rf.get("json_schema") or {}).get("schema") or "json"
        options = dict(dep.options.get("options") or {})
        for src, dst in (
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("seed", "seed"),
            ("frequency_penalty", "frequency_penalty"),
            ("presence_penalty", "presence_penalty"),
            ("max_tokens", "num_predict"),
            ("max_completion_tokens", "num_predict"),
        ):
            if req.get(src) is not None:
                options[dst] = req[src]
        stop = req.get("stop")
        if stop:
            options["stop"] = [stop] if isinstance(stop, str) else stop
        if options:
            body["options"] = options
        if "keep_alive" in dep.options:
            body["keep_alive"] = dep.options["keep_alive"]
        return ProviderRequest(
            "POST", f"{dep.base_path}/api/chat", self._headers(dep), encode(body)
        )

    def chat_response(
        self, dep: Deployment, status: int, body: bytes, req: dict[str, Any]
    ) -> Translated:
        if not 200 <= status < 300:
            return translate_error(status, body)
        doc = decode(body)
        msg = doc.get("message") or {}
        calls = _tool_calls(msg.get("tool_calls"))
        message: dict[str, Any] = {
            "role": "assistant",
            "content": msg.get("content") or (None if calls else ""),
            "refusal": None,
        }
        if calls:
            message["tool_calls"] = calls
        usage = _usage(doc)
        out = completion(
            f"chatcmpl-{uuid.uuid4().hex}", dep.model, message, _finish(doc, bool(calls)), usage
        )
        return Translated(status, out, usage)

    def chat_stream(self, dep: Deployment, req: dict[str, Any]) -> StreamTranslator:
        return OllamaStream(dep, req)

    def embeddings_request(self, dep: Deployment, req: dict[str, Any]) -> ProviderRequest:
        body: dict[str, Any] = {"model": dep.model, "input": embedding_inputs(req)}
        if req.get("dimensions"):
            body["dimensions"] = req["dimensions"]
        return ProviderRequest(
            "POST", f"{dep.base_path}/api/embed", self._headers(dep), encode(body)
        )

    def embeddings_response(
        self, dep: Deployment, status: int, body: bytes, req: dict[str, Any]
    ) -> Translated:
        if not 200 <= status < 300:
            return translate_error(status, body)
        doc = decode(body)
        usage = Usage(prompt_tokens=int(doc.get("prompt_eval_count") or 0))
        out = embeddings_list(doc.get("embeddings") or [], dep.model, usage.prompt_tokens, req)
        return Translated(status, out, usage)


ADAPTER = OllamaAdapter()
