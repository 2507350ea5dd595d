"""Retries: on what, for which methods and bodies, to which target, and within what budget."""

from __future__ import annotations

import zlib
from typing import Any

import httpx
import pytest

from gateway import GatewayFactory
from test_errors import assert_gateway_error
from upstreams import UpstreamFactory, closed_port, pattern_bytes

NO_PASSIVE = {"passive": {"enabled": False}}


def config(
    targets: list[str], retries: dict[str, Any] | None = None, **upstream: Any
) -> dict[str, Any]:
    up: dict[str, Any] = {"targets": targets, "health": NO_PASSIVE, **upstream}
    if retries is not None:
        up["retries"] = retries
    return {
        "upstreams": {"pool": up},
        "routes": [{"name": "all", "paths": ["/*"], "upstream": "pool"}],
    }


def test_a_connect_failure_is_retried_on_another_target_for_any_method(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    live = upstream_factory("live")
    # the defaults: one retry, on connect failures (and resets of idempotent requests)
    gw = gateway(config([f"127.0.0.1:{closed_port()}", live.address]), workers=1)
    with gw.client() as client:
        for i in range(10):
            method = "POST" if i % 2 else "GET"
            resp = client.request(method, "/x", content=b"payload" if method == "POST" else None)
            assert resp.status_code == 200, resp.text
    assert live.count == 10
    assert [r.body_len for r in live.requests if r.method == "POST"] == [7] * 5


def test_a_reset_before_any_response_byte_is_retried_for_idempotent_methods_only(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    dropper, live = upstream_factory("dropper"), upstream_factory("live")
    dropper.drop = True
    gw = gateway(config([dropper.address, live.address]), workers=1)
    with gw.client() as client:
        gets = [client.get(f"/get/{i}") for i in range(6)]
        posts = [client.post(f"/post/{i}", content=b"x") for i in range(6)]
    assert all(r.status_code == 200 for r in gets)
    # half the POSTs went to the dropping target: it may have acted on them, so no retry
    assert sorted(r.status_code for r in posts) == [200] * 3 + [502] * 3
    assert_gateway_error(
        next(r for r in posts if r.status_code == 502), 502, "upstream_unreachable"
    )


def test_configured_statuses_are_retried(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    busy, live = upstream_factory("busy"), upstream_factory("live")
    busy.status = 503
    retries = {"count": 1, "statuses": ["5xx"]}
    gw = gateway(config([busy.address, live.address], retries), workers=1)
    with gw.client() as client:
        responses = [client.get(f"/{i}") for i in range(10)]
    assert all(r.status_code == 200 and r.headers["x-upstream"] == "live" for r in responses)
    assert busy.count == 5


def test_when_retries_run_out_the_last_upstream_answer_is_passed_on(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    ups = [upstream_factory(n) for n in ("a", "b")]
    for u in ups:
        u.status = 503
    gw = gateway(config([u.address for u in ups], {"count": 1, "statuses": [503]}), workers=1)
    resp = gw.get("/x")
    assert resp.status_code == 503
    assert resp.headers["x-upstream"] in ("a", "b")  # the upstream's body, not a gateway error
    assert sum(u.count for u in ups) == 2


def test_each_retry_goes_to_a_different_target(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    ups = [upstream_factory(n) for n in ("a", "b", "c")]
    for u in ups:
        u.status = 503
    retries = {"count": 2, "statuses": [503], "backoff": 0}
    gw = gateway(config([u.address for u in ups], retries), workers=1)
    with gw.client() as client:
        for i in range(5):
            client.get(f"/{i}", headers={"X-Request-Id": f"req-{i}"})
    for i in range(5):
        seen = [u.name for u in ups for r in u.requests if r.header("x-request-id") == f"req-{i}"]
        assert sorted(seen) == ["a", "b", "c"], seen


def test_a_single_target_is_retried_itself(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    up = upstream_factory("up")
    up.status = 503
    gw = gateway(config([up.address], {"count": 2, "statuses": [503], "backoff": "1ms"}), workers=1)
    assert gw.get("/x").status_code == 503
    assert up.count == 3


def test_the_retry_budget_caps_retries_when_every_target_fails(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    ups = [upstream_factory(n) for n in ("a", "b", "c")]
    for u in ups:
        u.status = 503
    retries = {
        "count": 3,
        "statuses": [503],
        "backoff": 0,
        "budget": {"ratio": 0.1, "window": "30s", "min_per_second": 0},
    }
    gw = gateway(config([u.address for u in ups], retries), workers=1)
    n = 200
    with gw.client() as client:
        assert all(client.get(f"/{i}").status_code == 503 for i in range(n))
    attempts = sum(u.count for u in ups)
    # without a budget: 4 attempts per request (800); with it: at most 10% more than asked
    assert n < attempts <= n + n // 10 + 1, attempts


def test_without_a_budget_every_retry_happens(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    ups = [upstream_factory(n) for n in ("a", "b")]
    for u in ups:
        u.status = 503
    retries = {"count": 1, "statuses": [503], "backoff": 0, "budget": None}
    gw = gateway(config([u.address for u in ups], retries), workers=1)
    with gw.client() as client:
        for i in range(50):
            client.get(f"/{i}")
    assert sum(u.count for u in ups) == 100


@pytest.mark.parametrize("cut", [0, 1000])
def test_nothing_is_retried_after_response_bytes_reached_the_client(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory, cut: int
) -> None:
    ups = [upstream_factory(n) for n in ("a", "b")]
    retries = {"count": 3, "on": ["connect", "reset", "timeout"], "statuses": ["5xx"]}
    gw = gateway(config([u.address for u in ups], retries), workers=1)
    with pytest.raises(httpx.HTTPError), gw.client() as client:
        # the head and `cut` bytes of a 100 kB body, then a reset
        client.get("/x", headers={"X-Up-Size": "100000", "X-Up-Cut": str(cut)}).read()
    assert sum(u.count for u in ups) == 1


def test_a_kept_body_is_sent_again_whole_on_retry(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    dropper, live = upstream_factory("dropper"), upstream_factory("live")
    dropper.drop = True  # reads the whole body, then closes without answering
    gw = gateway(config([dropper.address, live.address], {"body_buffer": "64KiB"}), workers=1)
    body = pattern_bytes(50_000)
    with gw.client() as client:
        for _ in range(4):
            # streamed (chunked) from the client; kept by the gateway as it goes out
            resp = client.put("/x", content=iter([body[:20_000], body[20_000:]]))
            assert resp.status_code == 200, resp.text
    assert dropper.count == 2 and live.count == 4
    assert {(r.body_len, r.body_crc) for r in live.requests} == {(50_000, zlib.crc32(body))}


def test_a_body_above_body_buffer_is_not_retried_once_it_went_out(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    dropper, live = upstream_factory("dropper"), upstream_factory("live")
    dropper.drop = True
    gw = gateway(config([dropper.address, live.address], {"body_buffer": "1KiB"}), workers=1)
    body = pattern_bytes(50_000)
    with gw.client() as client:
        codes = sorted(client.put("/x", content=body).status_code for _ in range(4))
    assert codes == [200, 200, 502, 502]
    assert dropper.count == 2 and live.count == 2


def test_retries_can_be_turned_off_per_route(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    busy, live = upstream_factory("busy"), upstream_factory("live")
    busy.status = 503
    cfg = config([busy.address, live.address], {"count": 1, "statuses": [503]})
    cfg["routes"].insert(
        0, {"name": "raw", "paths": ["/raw/*"], "upstream": "pool", "retries": {"count": 0}}
    )
    gw = gateway(cfg, workers=1)
    with gw.client() as client:
        assert sorted(client.get("/raw/x").status_code for _ in range(4)) == [200, 200, 503, 503]
        assert [client.get("/other").status_code for _ in range(4)] == [200] * 4
