"""What a provider adapter is: the bridge between the gateway's canonical form and one
provider's wire format.

The canonical form is OpenAI's: Chat Completions and Embeddings request and response JSON, as
plain dicts (and, streamed, ``chat.completion.chunk`` dicts). Every client-facing endpoint
speaks it or translates to it (the Anthropic-compatible endpoint does), so an adapter only
knows its own provider. Adapters do no I/O: the data plane sends what ``chat_request`` builds
and hands the answer back, whole or chunk by chunk, which keeps them pure and cheap to test.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, Protocol

import msgspec

__all__ = [
    "Adapter",
    "Deployment",
    "ProviderRequest",
    "StreamTranslator",
    "Translated",
    "Unsupported",
    "Usage",
    "error_body",
    "error_type_for",
]


class Deployment(msgspec.Struct, frozen=True, kw_only=True):
    """One model at one provider, as the config resolved it."""

    name: str
    provider: str
    upstream: str
    """The gateway upstream that carries its traffic (built from the deployment's URL)."""
    base_path: str
    """The URL's path prefix, "" or e.g. "/openai"; request paths are appended to it."""
    url: str = ""
    """The deployment's base URL as configured (Bedrock signs the Host it names)."""
    model: str
    """The provider's model id."""
    api_key: str | None = None
    options: dict[str, Any] = {}
    """Provider-specific settings (Azure's api_version, Bedrock's region and keys, ...)."""


class ProviderRequest(NamedTuple):
    method: str
    path: str
    """Path and query, the deployment's ``base_path`` included."""
    headers: list[tuple[str, str]]
    """Every header the provider gets (credentials included; the client's are not carried)."""
    body: bytes


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False
    """True when the provider did not say and the gateway counted with its tokenizer."""


class Translated(NamedTuple):
    status: int
    """The status the client gets (a provider's error status mapped as OpenAI would answer)."""
    body: dict[str, Any] | None
    """The canonical answer (a completion, or an OpenAI error body); None when the provider's
    bytes already are canonical and pass through unchanged."""
    usage: Usage | None


class Unsupported(Exception):
    """The provider has no such operation (e.g. embeddings at Anthropic): a 400 to the client."""


class StreamTranslator(Protocol):
    """Turns one streamed answer into canonical chunks, fed as the bytes arrive (split anywhere)."""

    usage: Usage | None
    """The usage the stream reported, once it did."""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Canonical ``chat.completion.chunk`` dicts completed by these bytes; a provider error
        in the stream becomes one ``{"error": {...}}`` dict (OpenAI's streamed error shape)."""
        ...

    def close(self) -> list[dict[str, Any]]:
        """The end of the stream: whatever is still pending."""
        ...


class Adapter:
    """Base of the adapters; one instance serves every deployment of its provider."""

    provider: ClassVar[str]
    passthrough: ClassVar[bool] = False
    """True when the provider speaks the canonical form itself (answers need no translation)."""
    stream_content_type: ClassVar[str] = "text/event-stream"
    """What the provider's streamed answers are (Bedrock's are AWS event streams)."""

    def chat_request(self, dep: Deployment, req: dict[str, Any], stream: bool) -> ProviderRequest:
        raise NotImplementedError

    def chat_response(
        self, dep: Deployment, status: int, body: bytes, req: dict[str, Any]
    ) -> Translated:
        raise NotImplementedError

    def chat_stream(self, dep: Deployment, req: dict[str, Any]) -> StreamTranslator:
        raise NotImplementedError

    def embeddings_request(self, dep: Deployment, req: dict[str, Any]) -> ProviderRequest:
        raise Unsupported(f"{self.provider} deployments do not serve embeddings")

    def embeddings_response(
        self, dep: Deployment, status: int, body: bytes, req: dict[str, Any]
    ) -> Translated:
        raise Unsupported(f"{self.provider} deployments do not serve embeddings")


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type_for(status: int) -> str:
    """OpenAI's error ``type`` for a status (5xx and unknown: ``api_error``)."""
    return _ERROR_TYPES.get(status, "api_error")


def error_body(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """An error in OpenAI's shape, which the SDKs' retry logic and exceptions read."""
    return {
        "error": {
            "message": message,
            "type": error_type_for(status),
            "param": param,
            "code": code,
        }
    }
