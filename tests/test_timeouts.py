"""Timeouts per upstream and per route: connect, read, write and total."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway import GatewayFactory
from test_errors import assert_gateway_error
from upstreams import UpstreamFactory

NO_PASSIVE = {"passive": {"enabled": False}}


def config(
    targets: list[str], route: dict[str, Any] | None = None, **upstream: Any
) -> dict[str, Any]:
    return {
        "upstreams": {"pool": {"targets": targets, "health": NO_PASSIVE, **upstream}},
        "routes": [{"name": "all", "paths": ["/*"], "upstream": "pool", **(route or {})}],
    }


@pytest.fixture
def unaccepting() -> Iterator[str]:
    """An address whose accept queue is full: connecting neither succeeds nor fails."""
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
            yield f"127.0.0.1:{full.getsockname()[1]}"
        finally:
            for s in fillers:
                s.close()


@pytest.fixture
def deaf() -> Iterator[str]:
    """An upstream that reads a request head and then nothing more, and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            conn.recv(1024)
            conns.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    for c in conns:
        c.close()
    server.close()


def test_a_route_read_timeout_overrides_the_upstreams(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    up = upstream_factory("up")
    cfg = config([up.address], route={"timeouts": {"read": "300ms"}}, timeouts={"read": "30s"})
    cfg["routes"].append({"name": "patient", "paths": ["/patient/*"], "upstream": "pool"})
    gw = gateway(cfg)
    t0 = time.monotonic()
    resp = gw.get("/x", headers={"X-Up-Sleep": "5"})
    assert_gateway_error(resp, 504, "upstream_timeout")
    assert time.monotonic() - t0 < 2
    assert gw.get("/patient/x", headers={"X-Up-Sleep": "0.6"}).status_code == 200


def test_a_route_connect_timeout_overrides_the_upstreams(
    gateway: GatewayFactory, unaccepting: str
) -> None:
    cfg = config(
        [unaccepting], route={"timeouts": {"connect": "200ms"}}, timeouts={"connect": "30s"}
    )
    gw = gateway(cfg)
    t0 = time.monotonic()
    resp = gw.get("/x")
    # a connect timeout is a connect failure: retried once (on the only target), then 504
    assert_gateway_error(resp, 504, "upstream_timeout")
    assert time.monotonic() - t0 < 2


def test_the_total_timeout_bounds_the_exchange_retries_included(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    ups = [upstream_factory(n) for n in ("a", "b", "c")]
    retries = {"count": 2, "on": ["timeout"], "backoff": 0}
    cfg = config(
        [u.address for u in ups], timeouts={"read": "1s", "total": "1.5s"}, retries=retries
    )
    gw = gateway(cfg, workers=1)
    t0 = time.monotonic()
    resp = gw.get("/x", headers={"X-Up-Sleep": "10"})
    elapsed = time.monotonic() - t0
    assert_gateway_error(resp, 504, "upstream_timeout")
    assert "total timeout" in resp.json()["error"]["message"]
    assert 1.4 <= elapsed < 2.5, elapsed
    assert sum(len(u.arrivals) for u in ups) == 2  # the second attempt was cut short


def test_a_read_timeout_is_retried_on_another_target_when_configured(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    slow, fast = upstream_factory("slow", sleep=5), upstream_factory("fast")
    retries = {"count": 1, "on": ["timeout"], "backoff": 0}
    gw = gateway(config([slow.address, fast.address], timeouts={"read": "300ms"}, retries=retries))
    with gw.client() as client:
        for _ in range(4):
            t0 = time.monotonic()
            resp = client.get("/x")
            assert resp.status_code == 200 and resp.headers["x-upstream"] == "fast"
            assert time.monotonic() - t0 < 2


def test_the_read_timeout_also_bounds_each_wait_for_the_body(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    up = upstream_factory("up")
    gw = gateway(config([up.address], timeouts={"read": "500ms"}, retries={"count": 3}))
    t0 = time.monotonic()
    # the head and 1000 bytes of a 100 kB body, then silence
    stall = {"X-Up-Size": "100000", "X-Up-Stall": "1000"}
    with (
        pytest.raises(httpx.HTTPError),
        gw.client() as client,
        client.stream("GET", "/x", headers=stall) as r,
    ):
        assert r.status_code == 200
        for _ in r.iter_bytes():
            pass
    assert 0.4 <= time.monotonic() - t0 < 3
    assert up.count == 1


def test_a_write_timeout_ends_an_upload_the_upstream_does_not_read(
    gateway: GatewayFactory, deaf: str
) -> None:
    cfg = config([deaf], timeouts={"write": "300ms", "read": "30s"}, retries={"count": 0})
    cfg["routes"][0]["paths"] = ["/upload"]  # the readiness probe must not reach it
    gw = gateway(cfg)
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    size = 256 << 20

    def upload() -> None:
        chunk = b"x" * (1 << 20)
        try:
            sock.sendall(
                f"PUT /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n".encode()
            )
            for _ in range(size >> 20):
                sock.sendall(chunk)
        except OSError:
            pass  # the gateway answered and closed

    t0 = time.monotonic()
    writer = threading.Thread(target=upload, daemon=True)
    writer.start()
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        assert data, "the gateway closed without answering"
        head += data
    elapsed = time.monotonic() - t0
    sock.close()
    writer.join(timeout=10)
    assert head.startswith(b"HTTP/1.1 504"), head[:200]
    assert elapsed < 8, elapsed
