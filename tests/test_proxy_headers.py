"""Proxy semantics: hop-by-hop headers, forwarding headers, Host, request ids, 100-continue."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from gateway import Gateway, GatewayFactory
from rawhttp import RawConnection
from upstreams import Upstream

HOP_BY_HOP = ["connection", "keep-alive", "te", "trailer", "upgrade", "proxy-authorization"]
HOP_BY_HOP += ["proxy-connection"]


def one_route(target: Upstream | str, **route: object) -> dict[str, object]:
    upstream = target if isinstance(target, str) else "backend"
    config: dict[str, object] = {
        "routes": [{"name": "all", "paths": ["/*"], "upstream": upstream, **route}]
    }
    if isinstance(target, Upstream):
        config["upstreams"] = {"backend": {"targets": [target.address]}}
    return config


def connection_tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in (value or "").split(",") if t.strip()}


def test_hop_by_hop_request_headers_do_not_reach_the_upstream(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream))
    with RawConnection(gw.port) as conn:
        conn.send(
            b"GET /hop HTTP/1.1\r\n"
            b"Host: example.test\r\n"
            b"Connection: keep-alive, X-Remove-Me\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"TE: trailers, deflate\r\n"
            b"Trailer: X-Checksum\r\n"
            b"Upgrade: foo/1\r\n"
            b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"X-Remove-Me: secret\r\n"
            b"X-Keep-Me: yes\r\n"
            b"\r\n"
        )
        resp = conn.read_response()
    assert resp.status == 200
    seen = upstream.last()
    assert seen.header("X-Keep-Me") == "yes"
    for name in [*HOP_BY_HOP, "x-remove-me"]:
        if name == "connection":
            # the gateway may speak for its own hop, but never pass on the client's tokens
            assert connection_tokens(seen.header(name)) <= {"keep-alive", "close"}, seen.headers
        else:
            assert not seen.has_header(name), f"{name} reached the upstream: {seen.headers}"


def test_hop_by_hop_response_headers_do_not_reach_the_client(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream))
    with RawConnection(gw.port) as conn:
        conn.send(b"GET /hop HTTP/1.1\r\nHost: example.test\r\nX-Up-Hop: 1\r\n\r\n")
        resp = conn.read_response()
    assert resp.status == 200
    assert resp.header("X-End-To-End") == "kept"
    for name in ["keep-alive", "proxy-connection", "upgrade", "x-custom-hop"]:
        assert resp.header(name) is None, f"{name} reached the client: {resp.headers}"
    assert connection_tokens(resp.header("connection")) <= {"keep-alive", "close"}


def test_x_forwarded_for_appends_the_client_address(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream))
    assert gw.get("/", headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 200
    assert upstream.last().header("X-Forwarded-For") == "203.0.113.7, 127.0.0.1"
    assert gw.get("/").status_code == 200
    assert upstream.last().header("X-Forwarded-For") == "127.0.0.1"


def test_x_forwarded_proto_and_host_describe_the_client_request(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream))
    assert gw.get("/", headers={"Host": "shop.example.test"}).status_code == 200
    seen = upstream.last()
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("X-Forwarded-Host") == "shop.example.test"


def test_via_names_the_gateway(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(one_route(upstream))
    assert gw.get("/").status_code == 200
    via = upstream.last().header("Via")
    assert via is not None
    assert "ferrogate" in via.lower()


def test_host_is_preserved_by_default(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(one_route(upstream))
    assert gw.get("/", headers={"Host": "api.example.test"}).status_code == 200
    assert upstream.last().header_all("Host") == ["api.example.test"]


def test_host_is_the_target_without_preserve_host(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream, preserve_host=False))
    assert gw.get("/", headers={"Host": "api.example.test"}).status_code == 200
    assert upstream.last().header_all("Host") == [upstream.address]


def test_request_id_is_generated_and_returned(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(one_route(upstream))
    first = gw.get("/")
    second = gw.get("/")
    sent_first = upstream.requests[0].header("X-Request-Id")
    sent_second = upstream.requests[1].header("X-Request-Id")
    assert sent_first
    assert sent_second
    assert first.headers["x-request-id"] == sent_first
    assert second.headers["x-request-id"] == sent_second
    assert sent_first != sent_second


def test_client_request_id_is_kept(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(one_route(upstream))
    resp = gw.get("/", headers={"X-Request-Id": "client-chosen-42"})
    assert upstream.last().header_all("X-Request-Id") == ["client-chosen-42"]
    assert resp.headers.get_list("x-request-id") == ["client-chosen-42"]


def test_expect_100_continue_gets_interim_response_before_body(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream))
    body = b"x" * 4096
    with RawConnection(gw.port) as conn:
        conn.send(
            b"POST /upload HTTP/1.1\r\nHost: example.test\r\n"
            b"Content-Length: 4096\r\nExpect: 100-continue\r\n\r\n"
        )
        # nothing of the body is sent until the gateway says so
        status, _, _, _ = conn.read_head()
        assert status == 100
        conn.send(body)
        resp = conn.read_response(method="POST")
    assert resp.status == 200
    assert upstream.last().body_len == 4096


def test_curl_post_with_expect_100_continue_is_not_delayed(
    gateway: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> None:
    gw: Gateway = gateway(one_route(upstream))
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"y" * 8192)
    t0 = time.monotonic()
    out = subprocess.run(
        [
            "curl", "-sS", "-v", "--max-time", "20", "--expect100-timeout", "10",
            "-H", "Expect: 100-continue", "--data-binary", f"@{payload}",
            f"{gw.url}/upload",
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    assert re.search(r"< HTTP/1\.1 100", out.stderr), out.stderr
    assert '"body_len": 8192' in out.stdout
    assert upstream.last().body_len == 8192
    # curl waits --expect100-timeout (10 s) when no 100 Continue comes
    assert elapsed < 5
