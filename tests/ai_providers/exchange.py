"""Sending an adapter's provider request to a test server with a real HTTP client, and feeding
the answer back through the adapter, so each adapter is checked against its provider's wire."""

from __future__ import annotations

from typing import Any

import httpx

from ferrogate.ai.adapters.base import Adapter, Deployment, ProviderRequest, Translated


def send(url: str, preq: ProviderRequest) -> tuple[int, bytes, str]:
    with httpx.Client(base_url=url, timeout=10) as client:
        r = client.request(preq.method, preq.path, headers=preq.headers, content=preq.body)
        return r.status_code, r.content, r.headers.get("content-type", "")


def chat(adapter: Adapter, dep: Deployment, url: str, req: dict[str, Any]) -> Translated:
    status, body, _ = send(url, adapter.chat_request(dep, req, False))
    return adapter.chat_response(dep, status, body, req)


def embeddings(adapter: Adapter, dep: Deployment, url: str, req: dict[str, Any]) -> Translated:
    status, body, _ = send(url, adapter.embeddings_request(dep, req))
    return adapter.embeddings_response(dep, status, body, req)


def stream_bytes(adapter: Adapter, dep: Deployment, url: str, req: dict[str, Any]) -> bytes:
    status, body, ctype = send(url, adapter.chat_request(dep, req, True))
    assert status == 200, body
    assert ctype.startswith(adapter.stream_content_type)
    return body


def translate_stream(
    adapter: Adapter, dep: Deployment, req: dict[str, Any], data: bytes, split: int = 0
) -> tuple[list[dict[str, Any]], Any]:
    """The canonical chunks of a streamed answer fed whole, or in pieces of ``split`` bytes."""
    translator = adapter.chat_stream(dep, req)
    out: list[dict[str, Any]] = []
    step = split or len(data) or 1
    for i in range(0, len(data), step):
        out.extend(translator.feed(data[i : i + step]))
    out.extend(translator.close())
    return out, translator.usage


def split_everywhere(
    adapter: Adapter, dep: Deployment, req: dict[str, Any], data: bytes
) -> list[list[dict[str, Any]]]:
    """The chunks of ``data`` fed as two pieces, for every split point: all must be equal."""
    results = []
    for cut in range(len(data) + 1):
        translator = adapter.chat_stream(dep, req)
        chunks = translator.feed(data[:cut]) + translator.feed(data[cut:]) + translator.close()
        results.append(chunks)
    return results


def contents(chunks: list[dict[str, Any]]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )


def stable(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chunks without what differs between two translations of one stream (ids, times)."""
    out = []
    for c in chunks:
        c = dict(c)
        c.pop("created", None)
        c.pop("id", None)
        if c.get("choices"):
            ch = dict(c["choices"][0])
            delta = dict(ch.get("delta") or {})
            if delta.get("tool_calls"):
                delta["tool_calls"] = [
                    {k: v for k, v in t.items() if k != "id" or not v.startswith("call_")}
                    for t in delta["tool_calls"]
                ]
            ch["delta"] = delta
            c["choices"] = [ch]
        out.append(c)
    return out
