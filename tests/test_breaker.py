"""Circuit breakers per target: closed -> open -> half-open -> closed, and fallbacks."""

from __future__ import annotations

import time
from typing import Any

import httpx

from gateway import Gateway, GatewayFactory
from test_health import events
from upstreams import UpstreamFactory

# Opens at 50% failures over at least 4 requests; 1 s open; 2 probes when half-open.
BREAKER = {
    "failure_ratio": 0.5,
    "min_requests": 4,
    "window": "10s",
    "open_for": "1s",
    "half_open_requests": 2,
    "statuses": [503],
}
# Only the breaker decides: no passive marks, no retries.
ISOLATED = {"health": {"passive": {"enabled": False}}, "retries": {"count": 0}}


def config(targets: list[str], **upstream: Any) -> dict[str, Any]:
    return {
        "upstreams": {
            "pool": {"targets": targets, "breaker": BREAKER, **ISOLATED, **upstream},
        },
        "routes": [{"name": "all", "paths": ["/*"], "upstream": "pool"}],
    }


def transitions(gw: Gateway) -> list[tuple[str, str]]:
    return [(e["from"], e["to"]) for e in events(gw, "circuit_breaker")]


def test_breaker_opens_half_opens_and_closes(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    up = upstream_factory("up")
    gw = gateway(config([up.address]), workers=1)
    with gw.client() as client:
        assert client.get("/x").status_code == 200
        up.status = 503
        # closed: failures reach the client as they are, until 2 of 4 failed
        assert [client.get("/x").status_code for _ in range(3)] == [503, 503, 503]
        assert transitions(gw) == [("closed", "open")]
        opened = events(gw, "circuit_breaker")[0]
        assert opened["target"] == up.address and opened["failures"] >= 2
        # open: refused at once, the target sees nothing
        before = up.count
        t0 = time.monotonic()
        resp = client.get("/x")
        assert time.monotonic() - t0 < 0.2
        error = resp.json()["error"]
        assert (resp.status_code, error["code"]) == (503, "circuit_open")
        assert up.count == before
        # after open_for: half-open lets probes through; both succeed: closed
        up.status = None
        time.sleep(1.05)
        assert [client.get("/x").status_code for _ in range(2)] == [200, 200]
        assert transitions(gw) == [
            ("closed", "open"),
            ("open", "half_open"),
            ("half_open", "closed"),
        ]
        assert [client.get("/x").status_code for _ in range(5)] == [200] * 5


def test_a_failed_probe_opens_the_breaker_again(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    up = upstream_factory("up")
    up.status = 503
    gw = gateway(config([up.address]), workers=1)
    with gw.client() as client:
        for _ in range(4):
            client.get("/x")
        assert transitions(gw) == [("closed", "open")]
        time.sleep(1.05)
        assert client.get("/x").status_code == 503  # the probe: the upstream's answer
        assert transitions(gw)[-2:] == [("open", "half_open"), ("half_open", "open")]
        assert client.get("/x").json()["error"]["code"] == "circuit_open"


def test_an_open_breaker_sends_traffic_to_the_other_targets(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    good, bad = upstream_factory("good"), upstream_factory("bad")
    bad.status = 503
    # a retry on 503 hides the failures while the breaker is still closed
    retries = {"count": 1, "statuses": [503], "backoff": 0}
    gw = gateway(config([good.address, bad.address], retries=retries), workers=1)
    with gw.client() as client:
        responses = [client.get("/x") for _ in range(40)]
    assert all(r.status_code == 200 and r.headers["x-upstream"] == "good" for r in responses)
    assert transitions(gw) == [("closed", "open")]
    # once open, the failing target gets nothing more (open_for is 1 s)
    assert bad.count <= 4


def test_fallback_response_when_every_breaker_is_open(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    up = upstream_factory("up")
    up.status = 503
    fallback = {"status": 200, "headers": {"X-Fallback": "static"}, "body": '{"cached": true}'}
    gw = gateway(config([up.address], fallback=fallback), workers=1)
    with gw.client() as client:
        for _ in range(4):
            client.get("/x")
        resp = client.get("/x")
    assert resp.status_code == 200
    assert resp.headers["x-fallback"] == "static"
    assert resp.headers["x-request-id"]
    assert resp.json() == {"cached": True}


def test_fallback_upstream_when_every_breaker_is_open(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    primary, backup = upstream_factory("primary"), upstream_factory("backup")
    primary.status = 503
    cfg = config([primary.address], fallback={"upstream": "backup"})
    cfg["upstreams"]["backup"] = {"targets": [backup.address]}
    gw = gateway(cfg, workers=1)
    with gw.client() as client:
        for _ in range(4):
            client.get("/x")
        resp = client.get("/x/y?z=1")
    assert resp.status_code == 200
    assert resp.headers["x-upstream"] == "backup"
    assert backup.last().target == "/x/y?z=1"


def test_breakers_are_off_unless_configured(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    up = upstream_factory("up")
    up.status = 503
    gw = gateway(
        {
            "upstreams": {"pool": {"targets": [up.address], **ISOLATED}},
            "routes": [{"paths": ["/*"], "upstream": "pool"}],
        },
        workers=1,
    )
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        codes = [client.get("/x").status_code for _ in range(30)]
    assert codes == [503] * 30
    assert up.count == 30
    assert transitions(gw) == []
