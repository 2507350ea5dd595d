"""Cluster-wide rate limits: several gateway nodes count in one real Redis server."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gateway import Gateway, GatewayFactory, free_port
from upstreams import Upstream


class Redis:
    """A private redis-server on a free port, no persistence."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (apt-get install redis-server)"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


@pytest.fixture
def redis() -> Iterator[Redis]:
    r = Redis()
    r.start()
    yield r
    r.stop()


def cluster_config(
    up: Upstream, redis: Redis, limit: dict[str, Any], **store: Any
) -> dict[str, Any]:
    return {
        "upstreams": {"b": {"targets": [up.address]}},
        "rate_limiting": {"redis": {"url": redis.url, **store}},
        "routes": [
            {
                "name": "api",
                "paths": ["/api/*"],
                "upstream": "b",
                "rate_limits": [{"scope": "cluster", **limit}],
            }
        ],
    }


def avoid_window_edge(per: int) -> None:
    """Fixed windows: make sure a test's requests all fall in one window."""
    left = per - time.time() % per
    if left < 40:
        time.sleep(left + 0.5)


def test_two_nodes_admit_the_limit_within_two_percent(
    gateway: GatewayFactory, upstream: Upstream, redis: Redis
) -> None:
    limit = 400
    cfg = cluster_config(upstream, redis, {"limit": limit, "per": "1h", "key": "route"})
    nodes = [gateway(cfg, workers=2), gateway(cfg, workers=2)]
    avoid_window_edge(3600)
    admitted = {0: 0, 1: 0}
    other: list[int] = []
    lock = threading.Lock()

    def load(node: int, n: int) -> None:
        with nodes[node].client() as client:
            for _ in range(n):
                status = client.get("/api/x").status_code
                with lock:
                    if status == 200:
                        admitted[node] += 1
                    elif status != 429:
                        other.append(status)

    # a known offered load: 1000 requests, twice the limit, from 8 clients over both nodes
    threads = [threading.Thread(target=load, args=(i % 2, 125)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = admitted[0] + admitted[1]
    assert not other, other
    assert limit * 0.98 <= total <= limit * 1.02, admitted
    assert admitted[0] > 50 and admitted[1] > 50, admitted
    assert upstream.count == total


def stderr_events(gw: Gateway, event: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in gw.stderr_text().splitlines() if f'"{event}"' in x]


def test_redis_outage_fails_open_and_counting_resumes(
    gateway: GatewayFactory, upstream: Upstream, redis: Redis
) -> None:
    cfg = cluster_config(
        upstream, redis, {"limit": 3, "per": "1h", "key": "header:x-client"}, on_failure="open"
    )
    gw = gateway(cfg, workers=1)
    avoid_window_edge(3600)

    def status(client: str) -> int:
        return gw.get("/api/x", headers={"x-client": client}).status_code

    assert [status("a") for _ in range(4)] == [200, 200, 200, 429]
    redis.stop()
    # a key that needs Redis: passes while Redis is down (fail-open), never 401/403
    assert [status("b") for _ in range(5)] == [200] * 5
    events = stderr_events(gw, "rate_limit_store_unavailable")
    assert events and events[0]["policy"] == "open"
    assert "***" not in events[0]["url"] and str(redis.port) in events[0]["url"]
    redis.start()  # same port, empty: counting starts over by itself
    deadline = time.monotonic() + 10
    statuses: list[int] = []
    attempt = 0
    while time.monotonic() < deadline:
        # A fresh key per attempt: while the worker reconnects, an attempt may pass some
        # requests open and count others, which would spend the next attempt's allowance.
        attempt += 1
        statuses = [status(f"c{attempt}") for _ in range(4)]
        if statuses == [200, 200, 200, 429]:
            break
        time.sleep(0.3)
    assert statuses == [200, 200, 200, 429]


def test_redis_outage_fails_closed_with_503(
    gateway: GatewayFactory, upstream: Upstream, redis: Redis
) -> None:
    cfg = cluster_config(
        upstream,
        redis,
        {"limit": 100, "per": "1h", "key": "header:x-k"},
        on_failure="closed",
        timeout="100ms",
    )
    gw = gateway(cfg, workers=1)
    assert gw.get("/api/x", headers={"x-k": "before"}).status_code == 200
    assert upstream.count == 1
    redis.stop()
    refused = gw.get("/api/x", headers={"x-k": "during"})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "rate_limit_store_unavailable"
    assert upstream.count == 1
    assert stderr_events(gw, "rate_limit_store_unavailable")[0]["policy"] == "closed"


def test_cluster_scope_needs_a_store(tmp_path: Any, upstream: Upstream) -> None:
    from gateway import run_cli

    path = tmp_path / "g.yaml"
    path.write_text(
        "listen: [127.0.0.1:0]\n"
        "routes:\n"
        f"  - {{paths: [/x], upstream: {upstream.url},\n"
        "      rate_limits: [{limit: 5, per: 1.5s, scope: cluster}]}\n"
    )
    out = run_cli("check", str(path))
    assert out.returncode == 2
    assert "rate_limits[0].scope: scope: cluster needs rate_limiting.redis" in out.stdout
    assert "rate_limits[0].per: a cluster-wide limit counts in whole seconds" in out.stdout
