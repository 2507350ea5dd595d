"""HTTP/2 cleartext (h2c) with prior knowledge on the same listener as HTTP/1.1."""

from __future__ import annotations

import asyncio
import time

import httpx

from gateway import Gateway, GatewayFactory
from upstreams import Upstream, pattern_bytes


def start(gateway: GatewayFactory, up: Upstream) -> Gateway:
    return gateway(
        {
            "upstreams": {"backend": {"targets": [up.address]}},
            "routes": [{"name": "all", "paths": ["/*"], "upstream": "backend"}],
        }
    )


def test_h2c_prior_knowledge_returns_the_upstream_body(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = start(gateway, upstream)
    with httpx.Client(http1=False, http2=True, base_url=gw.url, timeout=15) as client:
        resp = client.get("/h2/data", headers={"X-Up-Size": "50000"})
        posted = client.post("/h2/post", content=b"p" * 30000)
    assert resp.http_version == "HTTP/2"
    assert resp.status_code == 200
    assert resp.content == pattern_bytes(50000)
    assert posted.status_code == 200
    assert posted.json()["body_len"] == 30000
    # the upstream still speaks HTTP/1.1 and sees the usual forwarding headers
    seen = upstream.last()
    assert seen.target == "/h2/post"
    assert seen.header("X-Forwarded-For") == "127.0.0.1"


def test_h2c_serves_concurrent_streams_on_one_connection(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = start(gateway, upstream)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            http1=False, http2=True, base_url=gw.url, timeout=15
        ) as client:
            return await asyncio.gather(
                *(client.get(f"/stream/{i}", headers={"X-Up-Sleep": "0.5"}) for i in range(10))
            )

    t0 = time.monotonic()
    responses = asyncio.run(run())
    elapsed = time.monotonic() - t0
    assert [r.status_code for r in responses] == [200] * 10
    assert all(r.http_version == "HTTP/2" for r in responses)
    assert sorted(r.json()["path"] for r in responses) == sorted(f"/stream/{i}" for i in range(10))
    # one after another this would take 5 s
    assert elapsed < 2.5, elapsed


def test_h2c_request_bodies_of_every_size_reach_the_upstream_whole(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    # HTTP/2 clients may end a body with an empty DATA frame; it must not end the
    # upstream request early or be written as an empty chunk.
    gw = start(gateway, upstream)
    with httpx.Client(http1=False, http2=True, base_url=gw.url, timeout=15) as client:
        for size in (1, 10, 16384, 70000):
            posted = client.post("/h2/sizes", content=b"s" * size)
            assert posted.status_code == 200, posted.text
            assert posted.json()["body_len"] == size
