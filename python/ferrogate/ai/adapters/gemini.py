"""Google's Gemini API (``models/{model}:generateContent``, ``:streamGenerateContent?alt=sse``,
``:batchEmbedContents``) behind the canonical (OpenAI) form.

Differences the translation bridges:

* system messages become ``systemInstruction``; the assistant is the ``model`` role; tool
  answers are ``functionResponse`` parts of a user turn, named after the call they answer
  (Gemini matches them by function name) and wrapped as ``{"content": ...}`` unless they are
  a JSON object already;
* ``response_format`` maps to ``generationConfig.responseMimeType`` (and ``responseSchema``
  for ``json_schema``, with the JSON Schema keywords Gemini's schema subset rejects removed);
* function calls carry no id in older API versions: ``call_<n>`` is made up then;
* the stream has no end marker: the last usage chunk (when ``stream_options.include_usage``
  asks for it) is produced by ``close()``.

Deployment options: ``api_version`` (default ``v1beta``), ``task_type`` (embeddings, e.g.
``RETRIEVAL_DOCUMENT``).
"""

from __future__ import annotations

import base64
import struct
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

__all__ = ["ADAPTER", "FINISH_REASONS", "GeminiAdapter", "GeminiStream", "gemini_error"]

API_VERSION = "v1beta"

FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "MALFORMED_FUNCTION_CALL": "stop",
}

# JSON Schema keywords outside Gemini's OpenAPI-style Schema object (the API rejects them).
_UNSUPPORTED_SCHEMA_KEYS = frozenset(
    {"$schema", "$id", "$ref", "$defs", "definitions", "additionalProperties", "strict", "const"}
)

_decode = msgspec.json.decode
_encode = msgspec.json.encode


def _schema(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _schema(v) for k, v in node.items() if k not in _UNSUPPORTED_SCHEMA_KEYS}
    if isinstance(node, list):
        return [_schema(v) for v in node]
    return node


def _model_path(dep: Deployment, method: str) -> str:
    model = dep.model.removeprefix("models/")
    version = dep.options.get("api_version", API_VERSION)
    return f"{dep.base_path}/{version}/models/{model}:{method}"


def _headers(dep: Deployment) -> list[tuple[str, str]]:
    headers = [("content-type", "application/json")]
    if dep.api_key:
        headers.append(("x-goog-api-key", dep.api_key))
    return headers


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


_MIME_BY_SUFFIX = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "heic": "image/heic",
    "pdf": "application/pdf",
}


def _image_part(url: str) -> dict[str, Any]:
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        mime = head[5:].split(";", 1)[0] or "image/png"
        return {"inlineData": {"mimeType": mime, "data": data}}
    suffix = url.rsplit("?", 1)[0].rsplit(".", 1)[-1].lower()
    return {"fileData": {"mimeType": _MIME_BY_SUFFIX.get(suffix, "image/jpeg"), "fileUri": url}}


def _user_parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}]
    parts: list[dict[str, Any]] = []
    for part in content or ():
        kind = part.get("type")
        if kind == "text":
            parts.append({"text": part.get("text", "")})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url", "") if isinstance(image, dict) else str(image or "")
            parts.append(_image_part(url))
        else:
            raise Unsupported(f"content parts of type {kind!r} are not supported by Gemini")
    return parts


def _contents(req: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    system: list[str] = []
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name

    def add(role: str, parts: list[dict[str, Any]]) -> None:
        if not parts:
            return
        if out and out[-1]["role"] == role:
            out[-1]["parts"].extend(parts)
        else:
            out.append({"role": role, "parts": parts})

    for msg in req.get("messages") or ():
        role = msg.get("role")
        content = msg.get("content")
        if role in ("system", "developer"):
            system.append(_text_of(content))
        elif role == "user":
            add("user", _user_parts(content))
        elif role == "assistant":
            parts: list[dict[str, Any]] = []
            text = _text_of(content)
            if text:
                parts.append({"text": text})
            for call in msg.get("tool_calls") or ():
                fn = call.get("function") or {}
                names[call.get("id") or ""] = fn.get("name") or ""
                raw = fn.get("arguments") or "{}"
                try:
                    args = _decode(raw) if isinstance(raw, str) else raw
                except msgspec.DecodeError:
                    raise Unsupported("tool call arguments must be JSON") from None
                parts.append({"functionCall": {"name": fn.get("name"), "args": args}})
            add("model", parts)
        elif role == "tool":
            text = _text_of(content)
            try:
                value = _decode(text)
            except msgspec.DecodeError:
                value = None
            response = value if isinstance(value, dict) else {"content": text}
            name = names.get(msg.get("tool_call_id") or "") or msg.get("name") or ""
            add("user", [{"functionResponse": {"name": name, "response": response}}])
        else:
            raise Unsupported(f"messages with role {role!r} are not supported by Gemini")
    return out, system


def _tool_config(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice == "auto":
        cfg: dict[str, Any] = {"mode": "AUTO"}
    elif choice == "required":
        cfg = {"mode": "ANY"}
    elif choice == "none":
        cfg = {"mode": "NONE"}
    elif isinstance(choice, dict):
        cfg = {"mode": "ANY", "allowedFunctionNames": [(choice.get("function") or {}).get("name")]}
    else:
        raise Unsupported(f"tool_choice {choice!r} is not supported")
    return {"functionCallingConfig": cfg}


def build_body(dep: Deployment, req: dict[str, Any]) -> dict[str, Any]:
    contents, system = _contents(req)
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    gen: dict[str, Any] = {}
    max_tokens = req.get("max_completion_tokens") or req.get("max_tokens")
    if max_tokens:
        gen["maxOutputTokens"] = max_tokens
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
        ("n", "candidateCount"),
    ):
        if req.get(ours) is not None:
            gen[theirs] = req[ours]
    stop = req.get("stop")
    if stop:
        gen["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    fmt = req.get("response_format")
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_object":
            gen["responseMimeType"] = "application/json"
        elif fmt.get("type") == "json_schema":
            gen["responseMimeType"] = "application/json"
            schema = (fmt.get("json_schema") or {}).get("schema")
            if schema:
                gen["responseSchema"] = _schema(schema)
    if gen:
        body["generationConfig"] = gen
    tools = req.get("tools")
    if tools:
        decls = []
        for t in tools:
            if t.get("type", "function") != "function":
                continue
            fn = t["function"]
            decl: dict[str, Any] = {"name": fn["name"], "description": fn.get("description", "")}
            if fn.get("parameters"):
                decl["parameters"] = _schema(fn["parameters"])
            decls.append(decl)
        body["tools"] = [{"functionDeclarations": decls}]
    cfg = _tool_config(req.get("tool_choice"))
    if cfg is not None and tools:
        body["toolConfig"] = cfg
    return body


def wants_usage(req: dict[str, Any]) -> bool:
    """Whether a streamed request asked for OpenAI's last chunk with the usage."""
    opts = req.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


def usage_of(meta: dict[str, Any] | None) -> Usage | None:
    if not meta:
        return None
    completion = (meta.get("candidatesTokenCount") or 0) + (meta.get("thoughtsTokenCount") or 0)
    return Usage(prompt_tokens=meta.get("promptTokenCount") or 0, completion_tokens=completion)


def _openai_usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def _google_error(err: dict[str, Any], status: int) -> dict[str, Any]:
    return error_body(
        status,
        err.get("message") or f"the provider answered with status {status}",
        code=err.get("status"),
    )


def gemini_error(status: int, body: bytes) -> Translated:
    """A Google error answer (``{"error": {"code", "message", "status"}}``) in OpenAI's shape."""
    err: dict[str, Any] = {}
    try:
        decoded = _decode(body)
        if isinstance(decoded, list) and decoded:  # some endpoints wrap it in a list
            decoded = decoded[0]
        err = decoded.get("error") or {}
    except (msgspec.DecodeError, AttributeError):
        pass
    out = status if status >= 400 else 502
    return Translated(out, _google_error(err, out), None)


def _calls(parts: list[dict[str, Any]], first: int) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    for part in parts:
        fc = part.get("functionCall")
        if fc is not None:
            n = first + len(calls)
            calls.append(
                {
                    "id": fc.get("id") or f"call_{n}",
                    "type": "function",
                    "function": {
                        "name": fc.get("name"),
                        "arguments": _encode(fc.get("args") or {}).decode(),
                    },
                }
            )
    return calls


def _text(parts: list[dict[str, Any]]) -> str:
    return "".join(p.get("text", "") for p in parts if "text" in p and not p.get("thought"))


def _finish(candidate: dict[str, Any], has_calls: bool) -> str | None:
    reason = candidate.get("finishReason")
    if not reason or reason == "FINISH_REASON_UNSPECIFIED":
        return None
    if has_calls and reason == "STOP":
        return "tool_calls"
    return FINISH_REASONS.get(reason, "stop")


class GeminiAdapter(Adapter):
    provider = "gemini"

    def chat_request(self, dep: Deployment, req: dict[str, Any], stream: bool) -> ProviderRequest:
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        return ProviderRequest(
            "POST", _model_path(dep, method), _headers(dep), _encode(build_body(dep, req))
        )

    def chat_response(
        self, dep: Deployment, status: int, body: bytes, req: dict[str, Any]
    ) -> Translated:
        if not 200 <= status < 300:
            return gemini_error(status, body)
        try:
            resp = _decode(body)
        except msgspec.DecodeError:
            return Translated(502, error_body(502, "the provider's answer is not JSON"), None)
        choices = []
        for i, cand in enumerate(resp.get("candidates") or ()):
            parts = (cand.get("content") or {}).get("parts") or []
            calls = _calls(parts, 0)
            message: dict[str, Any] = {"role": "assistant", "content": _text(parts) or None}
            if calls:
                message["tool_calls"] = calls
            elif message["content"] is None:
                message["content"] = ""
            choices.append(
                {
                    "index": cand.get("index", i),
                    "message": message,
                    "finish_reason": _finish(cand, bool(calls)) or "stop",
                }
            )
        if not choices:  # the prompt itself was blocked (promptFeedback.blockReason)
            choices.append(
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ""},
                    "finish_reason": "content_filter",
                }
            )
        usage = usage_of(resp.get("usageMetadata"))
        completion: dict[str, Any] = {
            "id": resp.get("responseId") or f"chatcmpl-{time.time_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": resp.get("modelVersion") or dep.model,
            "choices": choices,
        }
        if usage is not None:
            completion["usage"] = _openai_usage(usage)
        return Translated(200, completion, usage)

    def chat_stream(self, dep: Deployment, req: dict[str, Any]) -> GeminiStream:
        return GeminiStream(dep.model, wants_usage(req))

    def embeddings_request(self, dep: Deployment, req: dict[str, Any]) -> ProviderRequest:
        inputs = req.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
            raise Unsupported("Gemini embeddings take text input (a string or list of strings)")
        model = "models/" + dep.model.removeprefix("models/")
        task = dep.options.get("task_type")
        requests = []
        for text in inputs:
            item: dict[str, Any] = {"model": model, "content": {"parts": [{"text": text}]}}
            if req.get("dimensions"):
                item["outputDimensionality"] = req["dimensions"]
            if task:
                item["taskType"] = task
            requests.append(item)
        return ProviderRequest(
            "POST",
            _model_path(dep, "batchEmbedContents"),
            _headers(dep),
            _encode({"requests": requests}),
        )

    def embeddings_response(
        self, dep: Deployment, status: int, body: bytes, req: dict[str, Any]
    ) -> Translated:
        if not 200 <= status < 300:
            return gemini_error(status, body)
        try:
            resp = _decode(body)
        except msgspec.DecodeError:
            return Translated(502, error_body(502, "the provider's answer is not JSON"), None)
        as_base64 = req.get("encoding_format") == "base64"
        data = []
        for i, emb in enumerate(resp.get("embeddings") or ()):
            values = emb.get("values") or []
            vector: Any = values
            if as_base64:
                vector = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        # Gemini does not count embedding tokens: usage None lets the gateway estimate them
        return Translated(
            200,
            {
                "object": "list",
                "data": data,
                "model": dep.model,
                "usage": {"prompt_tokens": 0, "total_tokens": 0},
            },
            None,
        )


class GeminiStream:
    """Gemini's SSE (one ``GenerateContentResponse`` per event) -> canonical chunks."""

    def __init__(self, model: str, usage_chunk: bool = True) -> None:
        self.usage: Usage | None = None
        self._usage_chunk = usage_chunk
        self._sse = SseParser()
        self._model = model
        self._id = f"chatcmpl-{time.time_ns()}"
        self._created = int(time.time())
        self._started: set[int] = set()
        self._calls: dict[int, int] = {}  # candidate index -> tool calls so far
        self._done = False

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
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
            if self.usage is not None and self._usage_chunk:
                last = self._chunk(0, {}, None)
                last["choices"] = []
                last["usage"] = _openai_usage(self.usage)
                out.append(last)
        return out

    def _event(self, data: str, out: list[dict[str, Any]]) -> None:
        if self._done or not data:
            return
        try:
            resp = _decode(data)
        except msgspec.DecodeError:
            return
        if "error" in resp:
            self._done = True
            err = resp["error"] or {}
            out.append(_google_error(err, int(err.get("code") or 500)))
            return
        if resp.get("responseId"):
            self._id = resp["responseId"]
        self._model = resp.get("modelVersion") or self._model
        usage = usage_of(resp.get("usageMetadata"))
        if usage is not None:
            self.usage = usage
        for i, cand in enumerate(resp.get("candidates") or ()):
            index = cand.get("index", i)
            parts = (cand.get("content") or {}).get("parts") or []
            delta: dict[str, Any] = {}
            if index not in self._started:
                self._started.add(index)
                delta = {"role": "assistant", "content": ""}
            text = _text(parts)
            if text:
                delta["content"] = text
            first = self._calls.get(index, 0)
            calls = _calls(parts, first)
            if calls:
                for n, call in enumerate(calls):
                    call["index"] = first + n
                delta["tool_calls"] = calls
                self._calls[index] = first + len(calls)
            if delta:
                out.append(self._chunk(index, delta, None))
            finish = _finish(cand, bool(self._calls.get(index)))
            if finish:
                out.append(self._chunk(index, {}, finish))
        if not resp.get("candidates") and (resp.get("promptFeedback") or {}).get("blockReason"):
            out.append(self._chunk(0, {}, "content_filter"))


ADAPTER = GeminiAdapter()
