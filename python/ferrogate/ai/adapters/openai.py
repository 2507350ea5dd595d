"""OpenAI and OpenAI-compatible servers (vLLM, llama.cpp, TGI): the canonical form is their
own, so requests go out as the client wrote them (the model id swapped for the deployment's)
and answers pass through; only usage is read, without decoding the rest of the answer."""

from __future__ import annotations

from typing import Any

import msgspec

from ferrogate.ai.adapters.base import (
    Adapter,
    Deployment,
    ProviderRequest,
    Translated,
    Usage,
    error_body,
)
from ferrogate.ai.adapters.sse import SseParser

__all__ = ["ADAPTER", "OpenAIAdapter", "usage_of"]


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _WithUsage(msgspec.Struct):
    # Only `usage` is decoded; msgspec skips the rest of the answer without building it.
    usage: _Usage | None = None


_usage_decoder = msgspec.json.Decoder(_WithUsage)
_encode = msgspec.json.encode
_decode = msgspec.json.decode


def usage_of(body: bytes) -> Usage | None:
    """The usage of a completion, embeddings answer or final stream chunk, if it has one."""
    try:
        u = _usage_decoder.decode(body).usage
    except msgspec.DecodeError:
        return None
    if u is None:
        return None
    return Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens)


def _headers(dep: Deployment) -> list[tuple[str, str]]:
    headers = [("content-type", "application/json"), ("accept", "application/json")]
    if dep.api_key:
        headers.append(("authorization", f"Bearer {dep.api_key}"))
    org = dep.options.get("organization")
    if org:
        headers.append(("openai-organization", str(org)))
    return headers


def _error(status: int, body: bytes) -> dict[str, Any]:
    """An OpenAI-shaped error from what a compatible server said (some answer their own way)."""
    try:
        doc = _decode(body)
    except msgspec.DecodeError:
        doc = None
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict) and "message" in err:
            return {"error": {"type": None, "param": None, "code": None, **err}}
        message = doc.get("message") or doc.get("detail") or err
        if isinstance(message, str):
            return error_body(status, message)
    return error_body(status, f"the provider answered {status}")


class _Stream:
    """Passthrough streams are handled by the plugin without decoding; this translator serves
    callers that want canonical chunks from an OpenAI stream."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self._sse = SseParser()

    def _chunks(self, events: list[Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for ev in events:
            if ev.data == "[DONE]" or not ev.data:
                continue
            try:
                chunk = _decode(ev.data)
            except msgspec.DecodeError:
                continue
            if not isinstance(chunk, dict):
                continue
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                self.usage = Usage(
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0),
                )
            out.append(chunk)
        return out

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        return self._chunks(self._sse.feed(data))

    def close(self) -> list[dict[str, Any]]:
        return self._chunks(self._sse.close())


def _api_base(dep: Deployment) -> str:
    """The deployment URL is an API base as the OpenAI SDK's ``base_url`` is
    (``https://host/v1``, ``http://vllm:8000/v1``); a URL without a path means ``/v1``."""
    return dep.base_path or "/v1"


class OpenAIAdapter(Adapter):
    provider = "openai"
    passthrough = True

    def chat_request(self, dep: Deployment, req: dict[str, Any], stream: bool) -> ProviderRequest:
        body = dict(req)
        body["model"] = dep.model
        if stream:
            # Usage comes only in a last chunk the client may not have asked for; the plugin
            # removes that chunk again when it did not.
            opts = dict(body.get("stream_options") or {})
            opts["include_usage"] = True
            body["stream_options"] = opts
        return ProviderRequest(
            "POST", f"{_api_base(dep)}/chat/completions", _headers(dep), _encode(body)
        )

    def chat_response(
        self, dep: Deployment, status: int, body: bytes, req: dict[str, Any]
    ) -> Translated:
        if 200 <= status < 300:
            return Translated(status, None, usage_of(body))
        return Translated(status, _error(status, body), None)

    def chat_stream(self, dep: Deployment, req: dict[str, Any]) -> _Stream:
        return _Stream()

    def embeddings_request(self, dep: Deployment, req: dict[str, Any]) -> ProviderRequest:
        body = dict(req)
        body["model"] = dep.model
        return ProviderRequest("POST", f"{_api_base(dep)}/embeddings", _headers(dep), _encode(body))

    def embeddings_response(
        self, dep: Deployment, status: int, body: bytes, req: dict[str, Any]
    ) -> Translated:
        return self.chat_response(dep, status, body, req)


ADAPTER = OpenAIAdapter()
