"""Errors the gateway answers itself: upstream failures, timeouts and size limits."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx

from gateway import GatewayFactory
from rawhttp import RawResponse, exchange
from upstreams import Upstream, closed_port


def one_route(target: str, **extra: Any) -> dict[str, Any]:
    return {
        "upstreams": {"backend": {"targets": [target]}},
        "routes": [{"name": "all", "paths": ["/*"], "upstream": "backend"}],
        **extra,
    }


def assert_gateway_error(resp: httpx.Response | RawResponse, status: int, code: str) -> None:
    if isinstance(resp, httpx.Response):
        got_status, headers_id, body = (
            resp.status_code,
            resp.headers.get("x-request-id"),
            resp.json(),
        )
    else:
        got_status, headers_id, body = resp.status, resp.header("x-request-id"), resp.json()
    assert got_status == status
    assert isinstance(body, dict)
    error = body["error"]
    assert error["status"] == status
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["request_id"]
    assert headers_id == error["request_id"]


def test_refused_upstream_is_502_upstream_unreachable(gateway: GatewayFactory) -> None:
    gw = gateway(one_route(f"127.0.0.1:{closed_port()}"))
    resp = gw.get("/x")
    assert_gateway_error(resp, 502, "upstream_unreachable")


def test_upstream_closing_without_answer_is_502(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream.address))
    resp = gw.get("/x", headers={"X-Up-Drop": "1"})
    assert_gateway_error(resp, 502, "upstream_unreachable")
    assert upstream.count >= 1


def test_silent_upstream_is_504_after_the_read_timeout(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream.address, timeouts={"read": 0.5}))
    t0 = time.monotonic()
    resp = gw.get("/x", headers={"X-Up-Sleep": "10"})
    elapsed = time.monotonic() - t0
    assert_gateway_error(resp, 504, "upstream_timeout")
    assert 0.4 <= elapsed < 3, elapsed


def test_connect_timeout_is_504(gateway: GatewayFactory) -> None:
    # a listener whose accept queue is full: the kernel drops further SYNs, so a connect
    # to it neither succeeds nor fails until the client gives up
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        fillers = []
        try:
            for _ in range(3):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(full.getsockname())
                fillers.append(s)
            time.sleep(0.1)
            address = f"127.0.0.1:{full.getsockname()[1]}"
            gw = gateway(one_route(address, timeouts={"connect": "300ms", "read": "30s"}))
            t0 = time.monotonic()
            resp = gw.get("/x")
            elapsed = time.monotonic() - t0
        finally:
            for s in fillers:
                s.close()
    assert_gateway_error(resp, 504, "upstream_timeout")
    assert elapsed < 3, elapsed


def test_upstream_read_timeout_overrides_the_global_one(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    config = one_route(upstream.address, timeouts={"read": "30s"})
    config["upstreams"]["backend"]["timeouts"] = {"read": "300ms"}
    gw = gateway(config)
    t0 = time.monotonic()
    resp = gw.get("/x", headers={"X-Up-Sleep": "10"})
    assert_gateway_error(resp, 504, "upstream_timeout")
    assert time.monotonic() - t0 < 3
    # an answer within the timeout passes
    assert gw.get("/x", headers={"X-Up-Sleep": "0.05"}).status_code == 200


def test_headers_above_the_limit_are_431(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(one_route(upstream.address, limits={"max_header_bytes": "16KiB"}))
    big = b"X-Big: " + b"a" * (24 * 1024) + b"\r\n"
    resp, _ = exchange(gw.port, b"GET /x HTTP/1.1\r\nHost: t\r\n" + big + b"\r\n")
    assert resp.status == 431
    assert upstream.count == 0


def test_headers_below_the_limit_pass(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(one_route(upstream.address, limits={"max_header_bytes": "16KiB"}))
    resp = gw.get("/x", headers={"X-Big": "a" * (10 * 1024)})
    assert resp.status_code == 200
    assert upstream.last().header("X-Big") == "a" * (10 * 1024)


def test_body_above_the_limit_with_content_length_is_413(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream.address, limits={"max_body_bytes": 1024}))
    body = b"z" * 2000
    resp, _ = exchange(
        gw.port,
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2000\r\n\r\n" + body,
        method="POST",
    )
    assert_gateway_error(resp, 413, "body_too_large")
    assert all(r.body_len <= 1024 for r in upstream.requests)


def test_body_above_the_limit_when_chunked_is_413(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream.address, limits={"max_body_bytes": 1024}))
    chunk = b"400\r\n" + b"z" * 1024 + b"\r\n"  # 1 KiB per chunk
    resp, _ = exchange(
        gw.port,
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunk * 3
        + b"0\r\n\r\n",
        method="POST",
    )
    assert_gateway_error(resp, 413, "body_too_large")
    assert all(r.body_len <= 1024 for r in upstream.requests)


def test_body_at_the_limit_passes(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(one_route(upstream.address, limits={"max_body_bytes": 1024}))
    assert gw.request("POST", "/x", content=b"z" * 1024).status_code == 200
    assert gw.request("POST", "/x", content=iter([b"z" * 512, b"z" * 512])).status_code == 200
    assert [r.body_len for r in upstream.requests] == [1024, 1024]
