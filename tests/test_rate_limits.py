"""Rate limits counted node-wide: every worker draws from one shared table."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx

from gateway import Gateway, GatewayFactory, run_cli
from upstreams import Upstream

PLUGINS_DIR = str(Path(__file__).parent / "plugins_dir")


def limited(up: Upstream, *limits: dict[str, Any], **extra: Any) -> dict[str, Any]:
    route = {"name": "api", "paths": ["/*"], "upstream": "b", "rate_limits": list(limits)}
    route.update(extra.pop("route", {}))
    return {"upstreams": {"b": {"targets": [up.address]}}, "routes": [route], **extra}


def fresh_connections(gw: Gateway, n: int, **kwargs: Any) -> list[httpx.Response]:
    """``n`` requests, each on a new connection, so they spread over the workers."""
    with gw.client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        return [client.get("/x", **kwargs) for _ in range(n)]


def test_a_limit_holds_for_the_node_not_per_worker(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(limited(upstream, {"limit": 20, "per": "1m"}), workers=4)
    assert len(gw.worker_pids()) == 4
    upstream.reset()
    answers = fresh_connections(gw, 60)
    statuses = [r.status_code for r in answers]
    # the readiness probe went through the same limit: 19 or 20 left for the test
    assert statuses.count(200) in (19, 20), statuses
    assert statuses.count(429) == 60 - statuses.count(200)
    assert upstream.count == statuses.count(200)
    first, refused = answers[0], answers[-1]
    assert first.headers["ratelimit-limit"] == "20"
    assert int(first.headers["ratelimit-remaining"]) in (18, 19)
    assert int(first.headers["ratelimit-reset"]) > 0
    assert refused.headers["ratelimit-remaining"] == "0"
    assert 0 < int(refused.headers["retry-after"]) <= 3
    err = refused.json()["error"]
    assert err["code"] == "rate_limited" and err["status"] == 429
    assert err["request_id"] == refused.headers["x-request-id"]
    assert "rate limit exceeded: 20 per 60s" in err["message"]


def test_burst_then_steady_rate(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(limited(upstream, {"limit": 10, "per": "1s", "burst": 3}), workers=2)
    time.sleep(1)  # the readiness probe's token is back
    statuses = [r.status_code for r in fresh_connections(gw, 6)]
    assert statuses.count(200) == 3, statuses
    time.sleep(0.35)  # about three more tokens at 10/s
    again = [r.status_code for r in fresh_connections(gw, 6)]
    assert 2 <= again.count(200) <= 4, again


def test_limits_by_consumer_after_authentication(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(
        limited(
            upstream,
            {"limit": 2, "per": "1m", "key": "consumer"},
            route={"plugins": [{"name": "t-consumer"}]},
            plugins_dir=PLUGINS_DIR,
        ),
        workers=2,
    )
    alice = [r.status_code for r in fresh_connections(gw, 3, headers={"x-user": "alice"})]
    bob = [r.status_code for r in fresh_connections(gw, 3, headers={"x-user": "bob"})]
    assert alice == [200, 200, 429]
    assert bob == [200, 200, 429]


def test_limits_by_credential_and_by_header(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(
        {
            "plugins_dir": PLUGINS_DIR,
            "upstreams": {"b": {"targets": [upstream.address]}},
            "routes": [
                {
                    "name": "cred",
                    "paths": ["/cred"],
                    "upstream": "b",
                    "plugins": [{"name": "t-consumer"}],
                    "rate_limits": [{"limit": 1, "per": "1m", "key": "credential"}],
                },
                {
                    "name": "hdr",
                    "paths": ["/hdr"],
                    "upstream": "b",
                    "rate_limits": [{"limit": 1, "per": "1m", "key": ["header:x-tenant", "route"]}],
                },
            ],
        },
        workers=1,
    )

    def status(path: str, **headers: str) -> int:
        return gw.get(path, headers=headers).status_code

    assert status("/cred", **{"x-user": "a", "x-key": "k1"}) == 200
    assert status("/cred", **{"x-user": "a", "x-key": "k2"}) == 200
    assert status("/cred", **{"x-user": "a", "x-key": "k1"}) == 429
    assert status("/hdr", **{"x-tenant": "t1"}) == 200
    assert status("/hdr", **{"x-tenant": "t2"}) == 200
    assert status("/hdr", **{"x-tenant": "t1"}) == 429


def test_the_most_restrictive_of_several_limits_is_shown(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(
        limited(
            upstream,
            {"limit": 100, "per": "1m", "name": "roomy"},
            {"limit": 3, "per": "1m", "name": "tight", "key": "header:x-client"},
        ),
        workers=1,
    )
    answers = [gw.get("/x", headers={"x-client": "c"}) for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert [r.headers["ratelimit-limit"] for r in answers] == ["3"] * 4
    assert [r.headers["ratelimit-remaining"] for r in answers] == ["2", "1", "0", "0"]


def test_a_top_level_limit_spans_routes(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(
        {
            "upstreams": {"b": {"targets": [upstream.address]}},
            "rate_limits": [{"limit": 3, "per": "1m", "key": "header:x-who"}],
            "routes": [
                {"name": "a", "paths": ["/a"], "upstream": "b"},
                {"name": "b", "paths": ["/b"], "upstream": "b"},
            ],
        },
        workers=2,
    )
    who = {"x-who": "me"}
    statuses = [gw.get(p, headers=who).status_code for p in ("/a", "/b", "/a", "/b")]
    assert statuses == [200, 200, 200, 429]


def test_trusted_proxies_tell_the_client_address(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(
        limited(upstream, {"limit": 1, "per": "1m"}, trusted_proxies=["127.0.0.1"]), workers=1
    )

    def via_proxy(client: str) -> int:
        return gw.get("/x", headers={"x-forwarded-for": f"{client}, 127.0.0.1"}).status_code

    assert via_proxy("203.0.113.1") == 200
    assert via_proxy("203.0.113.2") == 200
    assert via_proxy("203.0.113.1") == 429


def test_untrusted_forwarded_for_is_ignored(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(limited(upstream, {"limit": 2, "per": "1m"}), workers=1)
    forged = [
        gw.get("/x", headers={"x-forwarded-for": f"198.51.100.{i}"}).status_code for i in range(3)
    ]
    # the probe used one token of 127.0.0.1; forged addresses do not buy more
    assert forged.count(429) >= 1


def test_counters_survive_a_reload(gateway: GatewayFactory, upstream: Upstream) -> None:
    cfg = limited(upstream, {"limit": 3, "per": "1m", "key": "header:x-c"})
    gw = gateway(cfg, workers=2)
    assert [gw.get("/x", headers={"x-c": "1"}).status_code for _ in range(4)][-1] == 429
    cfg["routes"].append({"name": "other", "paths": ["/other"], "upstream": "b"})
    gw.write_config(cfg)
    gw.signal(signal.SIGHUP)
    gw.wait_for_status("/other", 200, timeout=10)
    assert gw.get("/x", headers={"x-c": "1"}).status_code == 429
    assert gw.get("/x", headers={"x-c": "2"}).status_code == 200


def test_rate_limit_config_problems(tmp_path: Path, upstream: Upstream) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(
        "listen: [127.0.0.1:0]\n"
        "trusted_proxies: [10.0.0.0/8, not-an-address]\n"
        "routes:\n"
        f"  - {{paths: [/x], upstream: {upstream.url},\n"
        "      rate_limits: [{limit: 5, per: 0s}, {limit: 1, per: 1s, key: cookie:sid}]}\n"
    )
    out = run_cli("check", str(path))
    assert out.returncode == 2
    text = out.stdout
    assert f"{path}:2:" in text and "'not-an-address' is not an IP address or CIDR" in text
    assert "routes[0].rate_limits[0].per: the period must be longer than zero" in text
    assert "routes[0].rate_limits[1].key: unknown key 'cookie:sid'" in text


def plans_config(up: Upstream) -> dict[str, Any]:
    return {
        "plugins_dir": PLUGINS_DIR,
        "upstreams": {"b": {"targets": [up.address]}},
        "plans": {
            "gold": {"rate_limits": [{"limit": 3, "per": "1m"}]},
            "free": {
                "rate_limits": [{"limit": 1, "per": "1m"}],
                "quotas": [{"limit": 2, "per": "day"}],
            },
        },
        "consumers": {"alice": {"plan": "gold"}, "bob": {"plan": "free"}},
        "routes": [
            {"name": "api", "paths": ["/*"], "upstream": "b", "plugins": [{"name": "t-consumer"}]}
        ],
    }


def test_a_consumer_plan_sets_its_limits(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(plans_config(upstream), workers=2)

    def statuses(user: str, n: int) -> list[int]:
        return [r.status_code for r in fresh_connections(gw, n, headers={"x-user": user})]

    assert statuses("alice", 4) == [200, 200, 200, 429]
    assert statuses("bob", 2) == [200, 429]
    # a consumer without a plan, and anonymous requests, are not limited by plans
    assert statuses("carol", 5) == [200] * 5
    gold = gw.get("/x", headers={"x-user": "alice"})
    assert gold.headers["ratelimit-limit"] == "3"


def test_a_daily_quota_renews_at_midnight_utc(gateway: GatewayFactory, upstream: Upstream) -> None:
    cfg = plans_config(upstream)
    cfg["plans"]["free"]["rate_limits"] = []
    # the gateway's clock is moved to 4 seconds before midnight UTC
    offset = 86400 - time.time() % 86400 - 4
    gw = gateway(cfg, workers=1, env={"FERROGATE_CLOCK_OFFSET": str(offset)})
    bob = {"x-user": "bob"}
    answers = [gw.get("/q", headers=bob) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429]
    refused = answers[-1]
    assert (
        "quota exceeded: 2 requests per day for consumer 'bob'"
        in refused.json()["error"]["message"]
    )
    assert 1 <= int(refused.headers["retry-after"]) <= 4
    assert refused.headers["ratelimit-limit"] == "2"
    time.sleep(int(refused.headers["retry-after"]) + 0.5)
    assert [gw.get("/q", headers=bob).status_code for _ in range(3)] == [200, 200, 429]


def test_plan_config_problems(tmp_path: Path, upstream: Upstream) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(
        "listen: [127.0.0.1:0]\n"
        "plans: {gold: {quotas: [{limit: 5, per: week}]}}\n"
        "consumers: {alice: {plan: gould}}\n"
        f"routes: [{{paths: [/x], upstream: {upstream.url}}}]\n"
    )
    out = run_cli("check", str(path))
    assert out.returncode == 2
    assert "plans.gold.quotas[0].per" in out.stdout
    assert "consumers.alice.plan: unknown plan 'gould' (did you mean 'gold'?)" in out.stdout


def test_consumer_keyed_limits_apply_on_routes_without_plugins(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    # no authentication plugin: every request is anonymous and counts against its address
    gw = gateway(limited(upstream, {"limit": 2, "per": "1m", "key": "consumer"}), workers=1)
    statuses = [gw.get("/x").status_code for _ in range(3)]
    assert 429 in statuses
