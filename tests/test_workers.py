"""Worker processes: a dead worker is replaced; SIGTERM drains in-flight requests."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx

from ferrogate.master import worker_environment
from gateway import Gateway, GatewayFactory, is_alive
from rawhttp import RawConnection
from upstreams import Upstream


def start(gateway: GatewayFactory, up: Upstream, **extra: object) -> Gateway:
    return gateway(
        {
            "upstreams": {"backend": {"targets": [up.address]}},
            "routes": [{"name": "all", "paths": ["/*"], "upstream": "backend"}],
            **extra,
        },
        workers=2,
    )


def test_runs_the_requested_number_of_workers(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = start(gateway, upstream)
    time.sleep(0.5)
    assert len(gw.worker_pids()) == 2


def test_killed_worker_is_replaced_and_the_gateway_keeps_answering(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = start(gateway, upstream)
    before = gw.worker_pids()
    assert len(before) == 2
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    while is_alive(victim):  # a response the victim had begun is lost with it
        assert time.monotonic() - t0 < 2, "SIGKILL did not end the worker"
        time.sleep(0.01)
    # the surviving worker answers at once
    with gw.client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for i in range(10):
            assert client.get(f"/during/{i}").status_code == 200
    replaced_after = None
    while time.monotonic() - t0 < 5:
        now = gw.worker_pids()
        if len(now) == 2 and victim not in now and set(now) != set(before):
            replaced_after = time.monotonic() - t0
            break
        time.sleep(0.02)
    assert replaced_after is not None, f"no new worker; workers now {gw.worker_pids()}"
    assert replaced_after < 2.0, f"replacement took {replaced_after:.2f}s"
    assert before[1] in gw.worker_pids()
    with gw.client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for i in range(20):
            assert client.get(f"/after/{i}").status_code == 200
    assert gw.proc is not None
    assert gw.proc.poll() is None


def test_sigterm_lets_in_flight_request_finish_then_exits_zero(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = start(gateway, upstream, grace_period="5s")
    workers = gw.worker_pids()
    result: dict[str, object] = {}

    def slow_request() -> None:
        try:
            resp = gw.get("/slow", headers={"X-Up-Sleep": "1"}, timeout=15)
            result["status"] = resp.status_code
            result["body"] = resp.json()
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=slow_request)
    thread.start()
    upstream.wait_for_arrivals(1)
    t0 = time.monotonic()
    gw.signal(signal.SIGTERM)
    thread.join(timeout=15)
    assert "error" not in result, result
    assert result["status"] == 200
    assert gw.proc is not None
    rc = gw.proc.wait(timeout=10)
    took = time.monotonic() - t0
    assert rc == 0
    assert took < 5 + 1, f"master exited {took:.1f}s after SIGTERM (grace period 5s)"
    deadline = time.monotonic() + 3
    while any(is_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(is_alive(p) for p in workers), "workers outlived the master"


def test_sigterm_stops_accepting_new_connections(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = start(gateway, upstream, grace_period="5s")
    assert gw.get("/ok").status_code == 200
    gw.signal(signal.SIGTERM)
    assert gw.proc is not None
    assert gw.proc.wait(timeout=10) == 0
    try:
        httpx.get(gw.url + "/late", timeout=2)
    except httpx.ConnectError:
        pass
    else:
        raise AssertionError("a new connection was accepted after the master exited")


def test_sigterm_does_not_wait_for_connections_that_never_sent_a_request(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = start(gateway, upstream, grace_period="30s")
    assert gw.get("/ok").status_code == 200
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    silent = socket.create_connection((host, int(port)), timeout=5)
    try:
        time.sleep(0.2)  # accepted by a worker, which is now waiting for its first bytes
        t0 = time.monotonic()
        gw.signal(signal.SIGTERM)
        assert gw.proc is not None
        assert gw.proc.wait(timeout=20) == 0
        assert time.monotonic() - t0 < 10, "shutdown waited on a silent connection"
    finally:
        silent.close()


def test_sigterm_closes_kept_alive_connections_between_requests(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = start(gateway, upstream, grace_period="30s")
    with RawConnection(gw.port) as conn:
        # A few requests on one connection: it now waits for the next one, idle.
        for path in ("/one", "/two", "/three"):
            conn.send(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            assert conn.read_response().status == 200
        t0 = time.monotonic()
        gw.signal(signal.SIGTERM)
        # The worker closes it at once instead of waiting out the grace period.
        assert conn.is_closed(timeout=10)
        assert gw.proc is not None
        assert gw.proc.wait(timeout=20) == 0
        assert time.monotonic() - t0 < 10, "shutdown waited on an idle kept-alive connection"


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_worker_environment_adds_the_allocator_tuning_unless_the_operator_set_it() -> None:
    assert worker_environment({"HOME": "/h"}) == {
        "HOME": "/h",
        "GLIBC_TUNABLES": "glibc.malloc.tcache_count=256",
    }
    merged = worker_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert merged["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=256:glibc.malloc.arena_max=2"
    own = worker_environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=16"})
    assert own["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=16"


def test_workers_start_with_the_allocator_tuning(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    plain = start(gateway, upstream)
    assert plain.get("/x").status_code == 200
    for pid in plain.worker_pids():
        assert _environ(pid)["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=256"
    # The operator's own cache size wins. (glibc cuts the variable at its first ':' in
    # the process's original environment once it has read it, so only single settings
    # can be checked from outside.)
    own = gateway(
        {
            "upstreams": {"backend": {"targets": [upstream.address]}},
            "routes": [{"name": "all", "paths": ["/*"], "upstream": "backend"}],
        },
        workers=1,
        env={"GLIBC_TUNABLES": "glibc.malloc.tcache_count=16"},
    )
    assert own.get("/x").status_code == 200
    (pid,) = own.worker_pids()
    assert _environ(pid)["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=16"
