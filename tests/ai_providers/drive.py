"""Driving a provider adapter against a provider test server over real HTTP, without the
gateway: what the adapter builds is sent as is, and the answer goes back through it."""

from __future__ import annotations

from typing import Any

import httpx

from ferrogate.ai.adapters.base import Adapter, Deployment, ProviderRequest, Translated


def deployment(provider: str, url: str, model: str, **options: Any) -> Deployment:
    return Deployment(
        name=f"{provider}-test",
        provider=provider,
        upstream=f"ai:{provider}-test",
        base_path="",
        model=model,
        api_key="test-key",
        options=options,
    )


def send(url: str, preq: ProviderRequest, timeout: float = 10) -> httpx.Response:
    return httpx.request(
        preq.method, url + preq.path, headers=preq.headers, content=preq.body, timeout=timeout
    )


def chat(adapter: Adapter, dep: Deployment, url: str, req: dict[str, Any]) -> Translated:
    resp = send(url, adapter.chat_request(dep, req, stream=False))
    return adapter.chat_response(dep, resp.status_code, resp.content, req)


def stream_bytes(adapter: Adapter, dep: Deployment, url: str, req: dict[str, Any]) -> bytes:
    preq = adapter.chat_request(dep, req, stream=True)
    with httpx.stream(
        preq.method, url + preq.path, headers=preq.headers, content=preq.body, timeout=10
    ) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        return b"".join(resp.iter_raw())


def translate(
    adapter: Adapter, dep: Deployment, req: dict[str, Any], pieces: list[bytes]
) -> list[dict[str, Any]]:
    """The chunks of a stream fed in these pieces, without the per-instance ``created``."""
    tr = adapter.chat_stream(dep, req)
    out: list[dict[str, Any]] = []
    for piece in pieces:
        out += tr.feed(piece)
    out += tr.close()
    for chunk in out:
        chunk.pop("created", None)
    return out


def splits(data: bytes) -> list[list[bytes]]:
    """The stream cut in two at every byte boundary, and byte by byte."""
    return [[data[:i], data[i:]] for i in range(len(data) + 1)] + [
        [data[i : i + 1] for i in range(len(data))]
    ]


def content_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )
