"""Azure OpenAI: OpenAI's wire format behind per-deployment paths, an ``api-key`` header and
content-filter annotations.

Options: ``api_version`` (default below, a GA version that streams usage), ``deployment`` (the
Azure deployment name; default: the deployment's ``model``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import msgspec

from ferrogate.ai.adapters.base import (
    Adapter,
    Deployment,
    ProviderRequest,
    StreamTranslator,
    Translated,
    error_body,
)
from ferrogate.ai.adapters.openai_like import OpenAILikeStream, passthrough_or_error
from ferrogate.ai.adapters.wire import decode, encode, fallback_message

DEFAULT_API_VERSION = "2024-10-21"


def _path(dep: Deployment, operation: str) -> str:
    name = quote(str(dep.options.get("deployment") or dep.model), safe="")
    version = quote(str(dep.options.get("api_version") or DEFAULT_API_VERSION), safe="")
    return f"{dep.base_path}/openai/deployments/{name}/{operation}?api-version={version}"


def _headers(dep: Deployment) -> list[tuple[str, str]]:
    headers = [("content-type", "application/json")]
    if dep.api_key:
        headers.append(("api-key", dep.api_key))
    return headers


def translate_error(status: int, body: bytes) -> Translated:
    """Azure's error bodies (``{"error": {"code": "429", ...}}``, content-filter refusals with
    ``innererror``, the API management layer's ``{"statusCode": 401, "message": ...}``) in
    OpenAI's shape; the content filter's verdict is kept for the client."""
    try:
        doc = decode(body)
    except msgspec.DecodeError:
        doc = None
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        msg = doc.get("message") if isinstance(doc, dict) else None
        text = msg if isinstance(msg, str) else fallback_message(status, body)
        return Translated(status, error_body(status, text), None)
    code = err.get("code")
    if isinstance(code, str) and code.isdigit():
        code = "rate_limit_exceeded" if code == "429" else None
    message = err.get("message")
    out = error_body(
        status,
        message if isinstance(message, str) else fallback_message(status, body),
        code=code if isinstance(code, str) else None,
        param=err.get("param") if isinstance(err.get("param"), str) else None,
    )
    if isinstance(err.get("innererror"), dict):
        out["error"]["innererror"] = err["innererror"]
    return Translated(status, out, None)


def _fix_chunk(doc: dict[str, Any]) -> dict[str, Any] | None:
    keep = False
    for choice in doc["choices"]:
        choice.pop("content_filter_results", None)
        choice.pop("content_filter_offsets", None)
        if choice.get("delta") or choice.get("finish_reason") is not None:
            keep = True
    if not keep:
        # an annotation-only chunk of the asynchronous content filter
        return None
    doc.pop("prompt_filter_results", None)
    doc["object"] = "chat.completion.chunk"
    return doc


def _stream_error(doc: Any) -> dict[str, Any]:
    status = 500
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict) and isinstance(err.get("status"), int):
        status = err["status"]
    body = translate_error(status, encode(doc)).body
    assert body is not None
    return body


class AzureAdapter(Adapter):
    provider = "azure"

    def chat_request(self, dep: Deployment, req: dict[str, Any], stream: bool) -> ProviderRequest:
        body = dict(req)
        body["model"] = dep.model
        if stream:
            body["stream"] = True
            opts = dict(body.get("stream_options") or {})
            opts["include_usage"] = True
            body["stream_options"] = opts
        else:
            body.pop("stream", None)
            body.pop("stream_options", None)
        return ProviderRequest("POST", _path(dep, "chat/completions"), _headers(dep), encode(body))

    def chat_response(
        self, dep: Deployment, status: int, body: bytes, req: dict[str, Any]
    ) -> Translated:
        return passthrough_or_error(status, body, translate_error)

    def chat_stream(self, dep: Deployment, req: dict[str, Any]) -> StreamTranslator:
        return OpenAILikeStream(req, _fix_chunk, _stream_error)

    def embeddings_request(self, dep: Deployment, req: dict[str, Any]) -> ProviderRequest:
        body = dict(req)
        body["model"] = dep.model
        return ProviderRequest("POST", _path(dep, "embeddings"), _headers(dep), encode(body))

    def embeddings_response(
        self, dep: Deployment, status: int, body: bytes, req: dict[str, Any]
    ) -> Translated:
        return passthrough_or_error(status, body, translate_error)


ADAPTER = AzureAdapter()
