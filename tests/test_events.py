"""Gateway events: one JSON object per line on stderr, for config reloads, worker restarts,
health and breaker transitions, plugin failures and the access log's own troubles."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from gateway import Gateway, GatewayFactory, is_alive
from test_health import HEALTH_PATH, events, pool, probed, wait_for
from upstreams import Upstream, UpstreamFactory

PLUGINS_DIR = str(Path(__file__).parent / "plugins_dir")


def simple(up: Upstream, **top: Any) -> dict[str, Any]:
    return {
        "upstreams": {"backend": {"targets": [up.address]}},
        "routes": [{"name": "api", "paths": ["/api/*"], "upstream": "backend"}],
        **top,
    }


def all_events(gw: Gateway) -> list[dict[str, Any]]:
    """Every event line; each must be a whole JSON object with a time, level and name."""
    found = []
    for line in gw.stderr_text().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            assert isinstance(event["ts"], float) and event["ts"] > 1e9
            assert event["level"] in ("debug", "info", "warning", "warn", "error")
            assert isinstance(event["event"], str)
            found.append(event)
    return found


def test_reloads_good_and_bad(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(simple(upstream), workers=2)
    # A worker still starting reads the new file as its first config (and applies nothing).
    wait_for(lambda: len(events(gw, "worker_started")) == 2, what="both workers to start")
    changed = simple(upstream)
    changed["routes"].append({"name": "more", "paths": ["/more"], "upstream": "backend"})
    gw.write_config(changed)
    gw.signal(signal.SIGHUP)
    wait_for(lambda: len(events(gw, "config_applied")) == 2, what="both workers to apply it")
    [reloaded] = events(gw, "config_reloaded")
    assert (reloaded["routes"], reloaded["upstreams"], reloaded["workers"]) == (2, 1, 2)
    assert reloaded["config"] == str(gw.config_path)
    assert {e["worker"] for e in events(gw, "config_applied")} == {0, 1}

    broken = simple(upstream)
    broken["routes"][0]["upstream"] = "nowhere"
    gw.write_config(broken)
    gw.signal(signal.SIGHUP)
    wait_for(lambda: events(gw, "config_reload_failed"), what="the failure to be logged")
    [failed] = events(gw, "config_reload_failed")
    assert failed["level"] == "error"
    [problem] = failed["problems"]
    # Where, and what: FILE:LINE:COL: PATH: reason
    assert str(gw.config_path) in problem and "routes[0].upstream" in problem, problem
    assert "nowhere" in problem
    # The workers were not asked to apply anything.
    assert len(events(gw, "config_applied")) == 2
    all_events(gw)


def test_a_killed_worker_is_reported_and_replaced(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(simple(upstream), workers=2)
    spawned = {e["worker_id"]: e["pid"] for e in events(gw, "child_spawned")}
    assert set(spawned) == {0, 1}
    victim = spawned[1]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(events(gw, "child_spawned")) == 3, what="the worker to be replaced")
    [exited] = events(gw, "worker_exited")
    assert (exited["pid"], exited["worker_id"], exited["signal"]) == (victim, 1, "SIGKILL")
    assert exited["child"] == "worker-1" and exited["restart_in"] == 0
    replacement = events(gw, "child_spawned")[-1]
    assert replacement["worker_id"] == 1 and replacement["pid"] != victim
    wait_for(
        lambda: any(e["pid"] == replacement["pid"] for e in events(gw, "worker_started")),
        what="the replacement to start",
    )
    assert not is_alive(victim)
    all_events(gw)


def test_an_active_health_transition_is_logged_once_per_node(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    good, flaky = upstream_factory("good"), upstream_factory("flaky")
    gw = gateway(pool([good.address, flaky.address], health=probed()), workers=3)
    flaky.status_for[HEALTH_PATH] = 503
    wait_for(lambda: events(gw, "target_down"), what="the target to be marked down")
    time.sleep(0.5)  # five more probe intervals, seen by three workers
    [down] = events(gw, "target_down")
    assert (down["upstream"], down["target"], down["reason"]) == ("pool", flaky.address, "active")
    assert down["probe"] == "status 503" and down["level"] == "warn"
    del flaky.status_for[HEALTH_PATH]
    wait_for(lambda: events(gw, "target_up"), what="the target to come back")
    time.sleep(0.5)
    [up] = events(gw, "target_up")
    assert (up["target"], up["reason"]) == (flaky.address, "active")
    assert [e for e in events(gw, "target_down") if e["target"] == good.address] == []


def test_breaker_transitions(gateway: GatewayFactory, upstream: Upstream) -> None:
    breaker = {
        "failure_ratio": 0.5,
        "min_requests": 4,
        "window": "10s",
        "open_for": "300ms",
        "half_open_requests": 1,
        "statuses": [503],
    }
    config = simple(upstream)
    config["upstreams"]["backend"].update(
        breaker=breaker, health={"passive": {"enabled": False}}, retries={"count": 0}
    )
    gw = gateway(config, workers=1)
    upstream.status = 503
    with gw.client() as client:
        codes = [client.get("/api/x").status_code for _ in range(6)]
        assert codes[-1] == 503 and client.get("/api/x").json()["error"]["code"] == "circuit_open"
        upstream.status = None
        time.sleep(0.4)
        assert client.get("/api/x").status_code == 200
    moves = [(e["from"], e["to"]) for e in events(gw, "circuit_breaker")]
    assert moves == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    opened = events(gw, "circuit_breaker")[0]
    assert (opened["upstream"], opened["target"]) == ("backend", upstream.address)
    assert opened["failures"] >= 2 and opened["level"] == "warn"


def test_a_plugin_failure(gateway: GatewayFactory, upstream: Upstream) -> None:
    config = simple(upstream, plugins_dir=PLUGINS_DIR)
    config["routes"][0]["plugins"] = [{"name": "t-boom"}]
    gw = gateway(config, workers=1)
    resp = gw.get("/api/x", headers={"x-boom": "request"})
    assert resp.status_code == 500
    wait_for(lambda: events(gw, "plugin_failed"), what="the failure to be logged")
    [failed] = events(gw, "plugin_failed")
    assert failed["plugin"] == "t-boom" and failed["request_id"] == resp.headers["x-request-id"]


def test_an_access_log_that_cannot_be_reopened_keeps_the_old_file(
    gateway: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    gw = gateway(simple(upstream, access_log={"path": str(logs / "access.log")}), workers=1)
    logs.rename(tmp_path / "gone")
    gw.signal(signal.SIGUSR1)
    wait_for(lambda: events(gw, "access_log_reopen_failed"), what="the failure to be logged")
    [failed] = events(gw, "access_log_reopen_failed")
    assert failed["path"] == str(logs / "access.log") and "No such file" in failed["error"]
    # Lines go on to the file it had open.
    rid = gw.get("/api/x").headers["x-request-id"]
    moved = tmp_path / "gone" / "access.log"
    wait_for(lambda: rid in moved.read_text(), what="the line in the old file")
    assert len(gw.worker_pids()) == 1
