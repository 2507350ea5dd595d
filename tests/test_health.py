"""Health of upstream targets: active probes, passive marks, and what balancers do with them."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import Gateway, GatewayFactory, run_cli
from upstreams import Upstream, UpstreamFactory, UpstreamProcess

HEALTH_PATH = "/healthz"


def events(gw: Gateway, name: str) -> list[dict[str, Any]]:
    """The structured events called ``name`` on the gateway's stderr, in order."""
    found = []
    for line in gw.stderr_text().splitlines():
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                found.append(event)
    return found


def wait_for(check: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def pool(targets: list[str], **upstream: Any) -> dict[str, Any]:
    return {
        "upstreams": {"pool": {"targets": targets, **upstream}},
        "routes": [{"name": "all", "paths": ["/*"], "upstream": "pool"}],
    }


def probed(interval: str = "100ms", **active: Any) -> dict[str, Any]:
    return {
        "active": {
            "path": HEALTH_PATH,
            "interval": interval,
            "timeout": "1s",
            "healthy_threshold": 2,
            "unhealthy_threshold": 2,
            **active,
        }
    }


def served_by(gw: Gateway, n: int, **kwargs: Any) -> Counter[str]:
    seen: Counter[str] = Counter()
    with gw.client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for i in range(n):
            resp = client.get(f"/item/{i}", **kwargs)
            assert resp.status_code == 200, resp.text
            seen[resp.headers["x-upstream"]] += 1
    return seen


@pytest.fixture
def processes() -> Iterator[list[UpstreamProcess]]:
    """Upstreams in processes of their own; killed by PID at teardown."""
    made: list[UpstreamProcess] = []
    yield made
    for p in made:
        p.kill()


def test_one_of_three_targets_dies_under_load_without_client_errors(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory, processes: list[UpstreamProcess]
) -> None:
    a, b = upstream_factory("a"), upstream_factory("b")
    doomed = UpstreamProcess("doomed")
    processes.append(doomed)
    # the defaults: passive checks on, one retry on connect errors and resets
    gw = gateway(pool([a.address, b.address, doomed.address]), workers=2)
    per_thread, threads_n = 300, 4  # the kill at 0.3 s lands well inside the load
    statuses: Counter[int] = Counter()
    seen: Counter[str] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()
    started = threading.Barrier(threads_n + 1)

    def load() -> None:
        try:
            with gw.client() as client:  # keep-alive
                started.wait()
                for i in range(per_thread):
                    resp = client.get(f"/load/{i}")
                    with lock:
                        statuses[resp.status_code] += 1
                        seen[resp.headers.get("x-upstream", "?")] += 1
                    time.sleep(0.002)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(threads_n)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.3)
    doomed.kill()
    with lock:
        done_at_kill = sum(statuses.values())
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert statuses == Counter({200: per_thread * threads_n}), statuses
    assert 50 <= done_at_kill <= per_thread * threads_n - 200, "killed mid-load"
    assert seen["doomed"] > 0, "the target served traffic before it died"
    assert seen["a"] + seen["b"] > seen["doomed"]
    down = [e for e in events(gw, "target_down") if e["target"] == doomed.address]
    assert down and down[0]["reason"] == "passive", down


def test_active_check_takes_a_failing_target_out_and_brings_it_back(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    good, flaky = upstream_factory("good"), upstream_factory("flaky")
    gw = gateway(pool([good.address, flaky.address], health=probed()), workers=2)
    assert set(served_by(gw, 20)) == {"good", "flaky"}

    flaky.status_for[HEALTH_PATH] = 503  # its traffic would still succeed: only probes fail
    wait_for(lambda: events(gw, "target_down"), what="the target to be marked down")
    time.sleep(0.3)  # every worker reads the shared result within an interval
    assert served_by(gw, 30) == Counter({"good": 30})
    [down] = events(gw, "target_down")
    assert down["reason"] == "active" and down["target"] == flaky.address
    assert "503" in down["probe"]

    del flaky.status_for[HEALTH_PATH]
    wait_for(lambda: events(gw, "target_up"), what="the target to come back")
    time.sleep(0.3)
    assert served_by(gw, 30)["flaky"] >= 10


def test_active_checks_run_once_per_node_not_per_worker(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    a = upstream_factory("a")
    gateway(pool([a.address], health=probed(interval="200ms")), workers=4)
    time.sleep(0.2)  # the readiness probe already reset the counters; start counting now
    a.reset()
    time.sleep(3.0)
    probes = [r for r in a.requests if r.path == HEALTH_PATH]
    # 15 intervals; four workers probing on their own would send about 60
    assert 10 <= len(probes) <= 20, len(probes)
    assert all(r.header("user-agent") == "ferrogate-health-check" for r in probes)


def test_every_target_down_gives_503_no_healthy_target(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    ups = [upstream_factory(n) for n in ("a", "b")]
    gw = gateway(pool([u.address for u in ups], health=probed()))
    for u in ups:
        u.status_for[HEALTH_PATH] = 500
    gw.wait_for_status("/x", 503)
    time.sleep(0.3)  # every worker reads the shared result within an interval
    resp = gw.get("/x")
    body = resp.json()["error"]
    assert (body["status"], body["code"]) == (503, "no_healthy_target")
    assert body["request_id"] == resp.headers["x-request-id"]
    for u in ups:
        del u.status_for[HEALTH_PATH]
    gw.wait_for_status("/x", 200)


@pytest.mark.parametrize("balance", ["round_robin", "least_conn", "hash"])
def test_every_balancer_skips_a_down_target(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory, balance: str
) -> None:
    ups = [upstream_factory(n) for n in ("a", "b", "c")]
    extra: dict[str, Any] = {"hash_on": "header:X-User"} if balance == "hash" else {}
    gw = gateway(pool([u.address for u in ups], balance=balance, health=probed(), **extra))
    ups[1].status_for[HEALTH_PATH] = 503
    wait_for(lambda: events(gw, "target_down"), what="b to be marked down")
    time.sleep(0.3)
    seen: Counter[str] = Counter()
    with gw.client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for i in range(60):
            resp = client.get("/x", headers={"X-User": f"user-{i}"})
            assert resp.status_code == 200
            seen[resp.headers["x-upstream"]] += 1
    assert seen["b"] == 0, seen
    assert seen["a"] > 5 and seen["c"] > 5, seen


def test_hash_keys_of_a_down_target_move_deterministically_and_only_they_move(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    ups = [upstream_factory(n) for n in ("a", "b", "c")]
    gw = gateway(
        pool([u.address for u in ups], balance="hash", hash_on="header:X-User", health=probed())
    )

    def owners() -> dict[int, str]:
        out = {}
        for user in range(40):
            seen = served_by(gw, 4, headers={"X-User": f"user-{user}"})
            assert len(seen) == 1, f"user-{user} went to {seen}"  # every worker agrees
            out[user] = next(iter(seen))
        return out

    before = owners()
    assert "c" in before.values()
    ups[2].status_for[HEALTH_PATH] = 503
    wait_for(lambda: events(gw, "target_down"), what="c to be marked down")
    time.sleep(0.3)
    during = owners()
    for user, owner in before.items():
        if owner == "c":
            assert during[user] in ("a", "b")
        else:
            assert during[user] == owner, f"user-{user} moved from {owner} to {during[user]}"
    del ups[2].status_for[HEALTH_PATH]
    wait_for(lambda: events(gw, "target_up"), what="c to come back")
    time.sleep(0.3)
    assert owners() == before


def test_passive_checks_take_out_a_target_that_answers_configured_statuses(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    good, bad = upstream_factory("good"), upstream_factory("bad")
    bad.status = 503
    health = {"passive": {"failures": 2, "down_for": "1s", "statuses": [503]}}
    gw = gateway(pool([good.address, bad.address], health=health), workers=1)
    with gw.client() as client:
        first = [client.get("/x").status_code for _ in range(6)]
        assert first.count(503) == 2, first  # two failures in a row take it out
        later = [client.get("/x") for _ in range(20)]
    assert all(r.status_code == 200 and r.headers["x-upstream"] == "good" for r in later)
    [down] = events(gw, "target_down")
    assert (down["reason"], down["failure"], down["status"]) == ("passive", "status", 503)
    # after down_for it is tried again (on probation)
    bad.status = None
    time.sleep(1.1)
    assert served_by(gw, 10)["bad"] >= 4


def test_passive_marks_never_take_the_last_target_out(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    upstream.status = 503
    health = {"passive": {"failures": 1, "down_for": "30s", "statuses": [503]}}
    gw = gateway(pool([upstream.address], health=health), workers=1)
    for _ in range(5):
        resp = gw.get("/x")
        # the upstream's own answer, not a gateway 503
        assert resp.status_code == 503 and resp.headers["x-upstream"] == "up"
    assert upstream.count == 5


def test_passive_checks_can_be_turned_off(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    good, bad = upstream_factory("good"), upstream_factory("bad")
    bad.status = 503
    health = {"passive": {"enabled": False, "failures": 1, "statuses": [503]}}
    gw = gateway(pool([good.address, bad.address], health=health), workers=1)
    with gw.client() as client:
        codes = [client.get("/x").status_code for _ in range(20)]
    assert codes.count(503) == 10


def test_health_settings_are_checked_with_their_location(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        "listen: [127.0.0.1:8080]\n"
        "upstreams:\n"
        "  a:\n"
        "    targets: [127.0.0.1:9001]\n"
        "    health:\n"
        "      active:\n"
        "        path: healthz\n"
        "        interval: 0s\n"
        '        expected_statuses: [200, "6xx"]\n'
        "    breaker: {failure_ratio: 1.5}\n"
        "    retries: {on: [connect, sometimes], backoff: 1s, backoff_max: 10ms}\n"
        "    fallback: {upstream: bb}\n"
        "  b:\n"
        "    targets: [127.0.0.1:9002]\n"
        "routes:\n"
        "  - paths: ['/*']\n"
        "    upstream: a\n"
        "    timeouts: {read: 0s, total: soon}\n"
    )
    result = run_cli("check", str(config))
    assert result.returncode != 0
    out = result.stdout + result.stderr
    for line, expected in [
        (7, "upstreams.a.health.active.path: the probe path must start with '/'"),
        (8, "upstreams.a.health.active.interval: the interval must be longer than zero"),
        (9, "upstreams.a.health.active.expected_statuses[1]"),
        (10, "upstreams.a.breaker.failure_ratio"),
        (11, "upstreams.a.retries.on[1]: invalid enum value 'sometimes'"),
        (11, "upstreams.a.retries.backoff_max: backoff_max is below backoff"),
        (12, "upstreams.a.fallback.upstream: unknown upstream 'bb' (did you mean 'b'?)"),
        (18, "routes[0].timeouts.read: the read timeout must be longer than zero"),
        (18, "routes[0].timeouts.total"),
    ]:
        assert any(
            text.startswith(f"{config}:{line}:") and expected in text for text in out.splitlines()
        ), f"no problem at line {line} with {expected!r} in:\n{out}"
