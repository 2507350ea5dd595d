"""Traffic splitting: version rules by header or cookie, weighted canaries, sticky splits."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gateway import GatewayFactory, run_cli
from upstreams import Upstream, UpstreamFactory


def split_config(v1: Upstream, v2: Upstream, **route: Any) -> dict[str, Any]:
    return {
        "upstreams": {"v1": {"targets": [v1.address]}, "v2": {"targets": [v2.address]}},
        "routes": [{"name": "api", "paths": ["/*"], "upstream": "v1", **route}],
    }


def test_a_weighted_canary(gateway: GatewayFactory, upstream_factory: UpstreamFactory) -> None:
    v1, v2 = upstream_factory("v1"), upstream_factory("v2")
    gw = gateway(
        split_config(v1, v2, split={"targets": [{"upstream": "v2", "weight": 25}, {"weight": 75}]}),
        workers=2,
    )
    with gw.client() as client:
        served = [client.get("/c").headers["x-upstream"] for _ in range(400)]
    share = served.count("v2") / len(served)
    assert 0.15 < share < 0.35, share
    assert set(served) == {"v1", "v2"}


def test_version_rules_pick_an_upstream_by_header_or_cookie(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    v1, v2 = upstream_factory("v1"), upstream_factory("v2")
    gw = gateway(
        split_config(
            v1,
            v2,
            versions=[
                {"header": "X-Version", "value": "beta", "upstream": "v2"},
                {"cookie": "canary", "value": "yes", "upstream": "v2"},
            ],
        ),
        workers=1,
    )

    def served(**kw: Any) -> set[str]:
        return {gw.get("/v", **kw).headers["x-upstream"] for _ in range(10)}

    assert served() == {"v1"}
    assert served(headers={"x-version": "beta"}) == {"v2"}
    assert served(headers={"x-version": "stable"}) == {"v1"}
    assert served(headers={"cookie": "a=1; canary=yes"}) == {"v2"}
    assert served(headers={"cookie": "canary=no"}) == {"v1"}


def test_a_sticky_split_keeps_each_client_on_its_side(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    v1, v2 = upstream_factory("v1"), upstream_factory("v2")
    gw = gateway(
        split_config(
            v1,
            v2,
            split={
                "targets": [{"upstream": "v2", "weight": 50}, {"weight": 50}],
                "hash_on": "cookie:session",
            },
        ),
        workers=2,
    )
    sides = {}
    for user in range(30):
        seen = {
            gw.get("/s", headers={"cookie": f"session=u{user}"}).headers["x-upstream"]
            for _ in range(5)
        }
        assert len(seen) == 1, (user, seen)
        sides[user] = seen.pop()
    assert set(sides.values()) == {"v1", "v2"}


def test_split_config_problems(tmp_path: Path, upstream: Upstream) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(
        "listen: [127.0.0.1:0]\n"
        f"upstreams: {{stable: {{targets: [{upstream.address}]}}}}\n"
        "routes:\n"
        "  - paths: [/x]\n"
        "    upstream: stable\n"
        "    versions: [{header: x-v, cookie: c, value: b, upstream: stable}]\n"
        "    split: {targets: [{upstream: stabel, weight: 5}], hash_on: 'ip:x'}\n"
    )
    out = run_cli("check", str(path))
    assert out.returncode == 2
    text = out.stdout
    assert "routes[0].versions[0]: give exactly one of 'header' or 'cookie'" in text
    assert "routes[0].split.targets[0].upstream: unknown upstream 'stabel'" in text
    assert "did you mean 'stable'?" in text
    assert "routes[0].split.hash_on: invalid hash_on" in text


def test_mirrored_requests_reach_the_shadow_and_never_slow_the_client(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    live = upstream_factory("live")
    shadow = upstream_factory("shadow", sleep=1.0)  # a slow shadow
    gw = gateway(
        {
            "upstreams": {
                "live": {"targets": [live.address]},
                "shadow": {"targets": [shadow.address]},
            },
            "routes": [
                {
                    "paths": ["/m/*"],
                    "upstream": "live",
                    "mirror": {"upstream": "shadow", "max_body": "1KiB"},
                }
            ],
        },
        workers=1,
    )
    started = time.monotonic()
    r = gw.request("POST", "/m/order?id=7", content=b'{"qty": 2}', headers={"x-trace": "t1"})
    elapsed = time.monotonic() - started
    assert r.status_code == 200
    assert r.headers["x-upstream"] == "live"
    assert elapsed < 0.9  # the client did not wait for the slow shadow
    shadow.wait_for_arrivals(1, timeout=5)
    copy = shadow.arrivals[0]
    assert (copy.method, copy.target) == ("POST", "/m/order?id=7")
    assert copy.header("x-trace") == "t1"
    assert live.last().body_len == 10
    # bodies above max_body go to the live upstream only
    big = gw.request("POST", "/m/big", content=b"x" * 2048)
    assert big.status_code == 200
    time.sleep(0.3)
    assert [a.target for a in shadow.arrivals] == ["/m/order?id=7"]
