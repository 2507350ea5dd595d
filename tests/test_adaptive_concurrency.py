"""Adaptive concurrency: when an upstream slows down, fewer requests go to it at once and the
excess is shed with 503 at once; when it recovers, the limit grows back."""

from __future__ import annotations

import threading
from typing import Any

import httpx

from gateway import Gateway, GatewayFactory
from upstreams import Upstream


def wave(gw: Gateway, n: int) -> list[httpx.Response]:
    """``n`` requests at the same moment, each on its own connection."""
    out: list[httpx.Response] = []
    lock = threading.Lock()
    start = threading.Barrier(n)

    def one() -> None:
        with httpx.Client(timeout=10) as c:
            start.wait()
            r = c.get(gw.url + "/a")
            with lock:
                out.append(r)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def statuses(answers: list[httpx.Response]) -> list[int]:
    return sorted(r.status_code for r in answers)


def test_a_slow_upstream_gets_fewer_requests_and_recovers(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    cfg: dict[str, Any] = {
        "upstreams": {
            "b": {
                "targets": [upstream.address],
                # Loopback answers take well under a millisecond, and a busy machine's
                # scheduling alone can double that for a while: a tolerance of 2 would read
                # it as congestion. 200 ms against that baseline is far past 10x.
                "adaptive_concurrency": {"min": 2, "max": 50, "initial": 20, "tolerance": 10},
            }
        },
        "routes": [{"paths": ["/a"], "upstream": "b"}],
    }
    gw = gateway(cfg, workers=1)
    with gw.client() as client:
        assert {client.get("/a").status_code for _ in range(50)} == {200}
    assert statuses(wave(gw, 10)) == [200] * 10  # fast: ten at once are fine

    upstream.sleep = 0.2
    shed_at_the_end = 0
    for _ in range(6):
        answers = wave(gw, 10)
        shed = [r for r in answers if r.status_code == 503]
        assert {r.json()["error"]["code"] for r in shed} <= {"overloaded"}
        shed_at_the_end = len(shed)
    # the limit came down from 20 to a few: most of a wave of ten is now shed at once
    assert shed_at_the_end >= 5
    sent = upstream.count

    upstream.sleep = 0.0
    with gw.client() as client:
        assert {client.get("/a").status_code for _ in range(300)} == {200}
    assert statuses(wave(gw, 8)) == [200] * 8  # grown back
    assert upstream.count == sent + 308
