"""Proxying: bodies pass through both ways; upstream connections are reused."""

from __future__ import annotations

import zlib

import httpx

from gateway import GatewayFactory
from upstreams import Upstream, UpstreamFactory, pattern_bytes, pattern_crc


def one_route(up: Upstream, path: str = "/*") -> dict[str, object]:
    return {
        "upstreams": {"backend": {"targets": [up.address]}},
        "routes": [{"name": "all", "paths": [path], "upstream": "backend"}],
    }


def test_get_returns_the_upstream_body(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(one_route(upstream))
    resp = gw.get("/files/a.bin", headers={"X-Up-Size": "100000"})
    assert resp.status_code == 200
    assert len(resp.content) == 100000
    assert resp.content == pattern_bytes(100000)
    assert upstream.last().method == "GET"
    assert upstream.last().target == "/files/a.bin"


def test_post_body_reaches_the_upstream(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(one_route(upstream))
    body = pattern_bytes(300_000)
    resp = gw.request("POST", "/submit?x=1", content=body)
    assert resp.status_code == 200
    seen = upstream.last()
    assert seen.method == "POST"
    assert seen.target == "/submit?x=1"
    assert seen.body_len == len(body)
    assert seen.body_crc == zlib.crc32(body)
    assert resp.json()["body_len"] == len(body)


def test_chunked_request_body_reaches_the_upstream(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream))
    parts = [pattern_bytes(70_000)[i : i + 7000] for i in range(0, 70_000, 7000)]
    resp = gw.request("PUT", "/chunked", content=iter(parts))
    assert resp.status_code == 200
    seen = upstream.last()
    assert seen.method == "PUT"
    assert seen.body_len == 70_000
    assert seen.body_crc == pattern_crc(70_000)


def test_upstream_status_and_headers_reach_the_client(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream))
    resp = gw.request("POST", "/create", content=b"{}", headers={"X-Up-Status": "201"})
    assert resp.status_code == 201
    assert resp.headers["x-upstream"] == "up"
    assert resp.headers["content-type"] == "application/json"


def test_keepalive_reuses_upstream_connections(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(one_route(upstream))
    # a fresh client connection for every request, so both workers take part
    with gw.client(limits=httpx.Limits(max_keepalive_connections=0)) as fresh:
        for i in range(50):
            assert fresh.get(f"/fresh/{i}").status_code == 200
    with gw.client() as kept:
        for i in range(150):
            assert kept.get(f"/kept/{i}").status_code == 200
    assert upstream.count == 200
    # two workers, each with a pool: a handful of connections, not one per request
    assert upstream.connections <= 4, (
        f"{upstream.connections} upstream connections for 200 requests"
    )


def test_requests_for_different_targets_use_one_pool_each(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    a, b = upstream_factory("a"), upstream_factory("b")
    gw = gateway(
        {
            "upstreams": {"ua": {"targets": [a.address]}, "ub": {"targets": [b.address]}},
            "routes": [
                {"name": "a", "paths": ["/a/*"], "upstream": "ua"},
                {"name": "b", "paths": ["/b/*"], "upstream": "ub"},
            ],
        }
    )
    with gw.client() as client:
        for i in range(40):
            assert client.get(f"/a/{i}").json()["upstream"] == "a"
            assert client.get(f"/b/{i}").json()["upstream"] == "b"
    assert (a.count, b.count) == (40, 40)
    assert a.connections <= 2
    assert b.connections <= 2
