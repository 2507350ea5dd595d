"""Mistral's chat completions and embeddings: OpenAI's format with differences smoothed here.

Mistral says ``any`` for OpenAI's ``tool_choice: required``, ``random_seed`` for ``seed`` and
``model_length`` for a ``length`` stop; it accepts only 9-character alphanumeric tool call ids,
always puts the usage into the stream's last chunk, may answer content as a list of chunks
(reasoning models), and reports validation errors as 422 with a structured message.
"""

from __future__ import annotations

import hashlib
import re
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
from ferrogate.ai.adapters.openai_like import OpenAILikeStream, usage_from_bytes, usage_of
from ferrogate.ai.adapters.wire import decode, embeddings_list, encode, fallback_message

# OpenAI request fields Mistral rejects or has no equivalent for
_DROP = (
    "stream_options",
    "user",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "store",
    "metadata",
    "service_tier",
    "modalities",
    "audio",
    "reasoning_effort",
    "web_search_options",
)
_FINISH = {"model_length": "length", "error": "stop"}
_TOOL_ID = re.compile(r"[A-Za-z0-9]{9}")


def tool_id(cid: str) -> str:
    """A tool call id Mistral accepts, the same for the same id in every message."""
    if _TOOL_ID.fullmatch(cid):
        return cid
    return hashlib.sha256(cid.encode()).hexdigest()[:9]


def _messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "developer":
            m["role"] = "system"
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "id": tool_id(str(c.get("id", "")))} for c in m["tool_calls"]]
        if "tool_call_id" in m:
            m["tool_call_id"] = tool_id(str(m["tool_call_id"]))
        out.append(m)
    return out


def _content(content: Any) -> Any:
    """List content (text and thinking chunks) as the text OpenAI clients expect."""
    if not isinstance(content, list):
        return content
    return "".join(
        c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text"
    )


def _fix_choice(choice: dict[str, Any], key: str) -> None:
    fr = choice.get("finish_reason")
    if fr in _FINISH:
        choice["finish_reason"] = _FINISH[fr]
    msg = choice.get(key)
    if isinstance(msg, dict) and isinstance(msg.get("content"), list):
        msg["content"] = _content(msg["content"])


def translate_error(status: int, body: bytes) -> Translated:
    try:
        doc = decode(body)
    except msgspec.DecodeError:
        doc = None
    message: Any = doc.get("message") if isinstance(doc, dict) else None
    if isinstance(doc, dict) and isinstance(doc.get("detail"), (list, str)):
        message = {"detail": doc["detail"]}
    if isinstance(message, dict):
        detail = message.get("detail")
        if isinstance(detail, list):
            message = "; ".join(
                f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', '')}"
                for d in detail
                if isinstance(d, dict)
            )
        else:
            message = encode(message).decode()
    if not isinstance(message, str):
        message = fallback_message(status, body)
    # OpenAI answers an invalid request with 400, which the SDKs map to BadRequestError
    out_status = 400 if status == 422 else status
    code = doc.get("code") if isinstance(doc, dict) else None
    return Translated(
        out_status,
        error_body(out_status, message, code=code if isinstance(code, str) else None),
        None,
    )


def _stream_error(doc: Any) -> dict[str, Any]:
    body = translate_error(500, encode(doc)).body
    assert body is not None
    return body


def _fix_chunk(doc: dict[str, Any]) -> dict[str, Any]:
    for choice in doc["choices"]:
        _fix_choice(choice, "delta")
    return doc


class MistralAdapter(Adapter):
    provider = "mistral"

    def _headers(self, dep: Deployment) -> list[tuple[str, str]]:
        headers = [("content-type", "application/json"), ("accept", "application/json")]
        if dep.api_key:
            headers.append(("authorization", f"Bearer {dep.api_key}"))
        return headers

    def chat_request(self, dep: Deployment, req: dict[str, Any], stream: bool) -> ProviderRequest:
        body = {k: v for k, v in req.items() if k not in _DROP}
        body["model"] = dep.model
        body["stream"] = stream
        if "max_completion_tokens" in body:
            body["max_tokens"] = body.pop("max_completion_tokens")
        if "seed" in body:
            body["random_seed"] = body.pop("seed")
        if body.get("tool_choice") == "required":
            body["tool_choice"] = "any"
        if isinstance(body.get("messages"), list):
            body["messages"] = _messages(body["messages"])
        return ProviderRequest(
            "POST", f"{dep.base_path}/v1/chat/completions", self._headers(dep), encode(body)
        )

    def chat_response(
        self, dep: Deployment, status: int, body: bytes, req: dict[str, Any]
    ) -> Translated:
        if not 200 <= status < 300:
            return translate_error(status, body)
        try:
            doc = decode(body)
        except msgspec.DecodeError:
            return Translated(502, error_body(502, "the provider's answer is not JSON"), None)
        for choice in doc.get("choices") or ():
            _fix_choice(choice, "message")
        return Translated(status, doc, usage_of(doc))

    def chat_stream(self, dep: Deployment, req: dict[str, Any]) -> StreamTranslator:
        return OpenAILikeStream(req, _fix_chunk, _stream_error)

    def embeddings_request(self, dep: Deployment, req: dict[str, Any]) -> ProviderRequest:
        body: dict[str, Any] = {"model": dep.model, "input": req.get("input")}
        if req.get("dimensions"):
            body["output_dimension"] = req["dimensions"]
        return ProviderRequest(
            "POST", f"{dep.base_path}/v1/embeddings", self._headers(dep), encode(body)
        )

    def embeddings_response(
        self, dep: Deployment, status: int, body: bytes, req: dict[str, Any]
    ) -> Translated:
        if not 200 <= status < 300:
            return translate_error(status, body)
        if req.get("encoding_format") != "base64":
            return Translated(status, None, usage_from_bytes(body))
        doc = decode(body)
        usage = usage_of(doc) or Usage()
        vectors = [d["embedding"] for d in sorted(doc["data"], key=lambda d: d["index"])]
        out = embeddings_list(vectors, doc.get("model", dep.model), usage.prompt_tokens, req)
        return Translated(status, out, usage)


ADAPTER = MistralAdapter()
