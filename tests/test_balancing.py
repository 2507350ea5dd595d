"""Load balancing across several real upstream servers."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import httpx

from gateway import Gateway, GatewayFactory
from upstreams import UpstreamFactory


def balanced(targets: list[Any], **upstream: Any) -> dict[str, Any]:
    return {
        "upstreams": {"pool": {"targets": targets, **upstream}},
        "routes": [{"name": "all", "paths": ["/*"], "upstream": "pool"}],
    }


def fresh_client(gw: Gateway, **kwargs: Any) -> httpx.Client:
    """A client that opens a new connection per request, so every worker takes part."""
    return gw.client(limits=httpx.Limits(max_keepalive_connections=0), **kwargs)


def spread(gw: Gateway, n: int, **kwargs: Any) -> Counter[str]:
    seen: Counter[str] = Counter()
    with fresh_client(gw) as client:
        for i in range(n):
            resp = client.get(f"/item/{i}", **kwargs)
            assert resp.status_code == 200
            seen[resp.headers["x-upstream"]] += 1
    return seen


def test_round_robin_splits_evenly(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    ups = [upstream_factory(n) for n in ("a", "b", "c")]
    gw = gateway(balanced([u.address for u in ups], balance="round_robin"))
    seen = spread(gw, 300)
    for name in ("a", "b", "c"):
        assert 96 <= seen[name] <= 104, seen


def test_weighted_round_robin_is_proportional(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    light, heavy = upstream_factory("light"), upstream_factory("heavy")
    gw = gateway(
        balanced(
            [
                {"address": light.address, "weight": 1},
                {"address": heavy.address, "weight": 3},
            ],
            balance="round_robin",
        )
    )
    seen = spread(gw, 400)
    assert 85 <= seen["light"] <= 115, seen
    assert 285 <= seen["heavy"] <= 315, seen
    assert light.count + heavy.count == 400


def test_least_conn_prefers_the_idle_target(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    slow = upstream_factory("slow", sleep=0.5)
    fast = upstream_factory("fast")
    gw = gateway(balanced([slow.address, fast.address], balance="least_conn"))
    seen: Counter[str] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 2.5

    def client_loop() -> None:
        try:
            with fresh_client(gw) as client:
                while time.monotonic() < stop_at:
                    resp = client.get("/work")
                    assert resp.status_code == 200
                    with lock:
                        seen[resp.headers["x-upstream"]] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors, errors
    # round robin would send every second request to the slow target and block on it;
    # least_conn keeps sending to the fast one while the slow one holds requests open
    total = seen["slow"] + seen["fast"]
    assert seen["fast"] >= 100, seen
    assert seen["slow"] / total < 0.1, seen


def test_hash_on_header_is_sticky(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    ups = [upstream_factory(n) for n in ("a", "b", "c")]
    gw = gateway(balanced([u.address for u in ups], balance="hash", hash_on="header:X-User"))
    owners = {}
    for user in range(30):
        seen = spread(gw, 6, headers={"X-User": f"user-{user}"})
        assert len(seen) == 1, f"user-{user} went to {seen}"
        owners[user] = next(iter(seen))
    assert len(set(owners.values())) >= 2, owners


def test_hash_on_cookie_is_sticky(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    ups = [upstream_factory(n) for n in ("a", "b", "c")]
    gw = gateway(balanced([u.address for u in ups], balance="hash", hash_on="cookie:session"))
    owners = {}
    for sid in range(30):
        cookie = f"theme=dark; session=s{sid}x; lang=en"
        seen = spread(gw, 6, headers={"Cookie": cookie})
        assert len(seen) == 1, f"session s{sid}x went to {seen}"
        owners[sid] = next(iter(seen))
    assert len(set(owners.values())) >= 2, owners
    # other cookies do not change the choice
    again = spread(gw, 4, headers={"Cookie": "session=s0x; theme=light"})
    assert set(again) == {owners[0]}


def test_hash_on_ip_is_sticky(gateway: GatewayFactory, upstream_factory: UpstreamFactory) -> None:
    ups = [upstream_factory(n) for n in ("a", "b", "c")]
    gw = gateway(balanced([u.address for u in ups], balance="hash", hash_on="ip"))
    owners = {}
    # every address of 127.0.0.0/8 is loopback: each client below has its own source IP
    for host in range(2, 32):
        ip = f"127.0.0.{host}"
        transport = httpx.HTTPTransport(local_address=ip)
        seen: Counter[str] = Counter()
        with httpx.Client(
            base_url=gw.url,
            transport=transport,
            headers={"Connection": "close"},
            timeout=15,
        ) as client:
            for _ in range(6):
                resp = client.get("/sticky")
                assert resp.status_code == 200
                seen[resp.headers["x-upstream"]] += 1
        assert len(seen) == 1, f"{ip} went to {seen}"
        owners[ip] = next(iter(seen))
    assert len(set(owners.values())) >= 2, owners
