"""Prometheus metrics at /metrics on the status listener: every worker's counts summed,
labels bounded by the config, counters that never go back (worker deaths, reloads), and a
Grafana dashboard that only uses metrics that exist."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ferrogate.metrics_export import rebucket
from gateway import Gateway, GatewayFactory, free_port
from test_health import events, wait_for
from upstreams import Upstream, UpstreamFactory

PLUGINS_DIR = str(Path(__file__).parent / "plugins_dir")
DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana-dashboard.json"
PUBLISH = "100ms"
BREAKER = {
    "failure_ratio": 0.5,
    "min_requests": 2,
    "window": "10s",
    "open_for": "30s",
    "half_open_requests": 1,
    "statuses": [503],
}


# ---- scraping ------------------------------------------------------------------------------


class Scrape:
    """One parsed exposition."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: list[Sample] = [s for f in self.families.values() for s in f.samples]

    @property
    def names(self) -> set[str]:
        return {s.name for s in self.samples}

    def select(self, name: str, **labels: str) -> list[Sample]:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(s.value for s in self.select(name, **labels))


class Status:
    """The status listener of a gateway started by :func:`start`."""

    def __init__(self, gw: Gateway, port: int) -> None:
        self.gw = gw
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str = "/metrics", **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10.0, **kwargs)

    def scrape(self, **kwargs: Any) -> Scrape:
        resp = self.get(**kwargs)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/plain")
        return Scrape(resp.text)

    def until(self, check: Callable[[Scrape], bool], what: str, timeout: float = 8.0) -> Scrape:
        """Scrape until ``check`` holds (the workers publish every 100 ms)."""
        deadline = time.monotonic() + timeout
        while True:
            scrape = self.scrape()
            if check(scrape):
                return scrape
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def settled(self, name: str, **labels: str) -> float:
        """The value of a counter once it stopped moving (nothing in flight any more)."""
        last = self.scrape().value(name, **labels)
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline:
            time.sleep(0.35)
            now = self.scrape().value(name, **labels)
            if now == last:
                return now
            last = now
        raise AssertionError(f"{name} {labels} kept moving")


def start(
    gateway: GatewayFactory,
    config: dict[str, Any],
    *,
    status: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    workers: int = 2,
) -> Status:
    port = free_port()
    full = {
        **config,
        "status": {"listen": f"127.0.0.1:{port}", **(status or {})},
        "metrics": {"publish_interval": PUBLISH, **(metrics or {})},
    }
    gw = gateway(full, workers=workers)
    return Status(gw, port)


def api(up: Upstream, **route: Any) -> dict[str, Any]:
    return {
        "upstreams": {"b": {"targets": [up.address]}},
        "routes": [{"name": "api", "paths": ["/api/*"], "upstream": "b", **route}],
    }


Call = tuple[str, str, dict[str, Any]]


def spread(gw: Gateway, requests: Iterable[Call]) -> list[httpx.Response]:
    """Each request on a new connection, four at a time, so both workers take some."""

    def one(item: Call) -> httpx.Response:
        method, path, kwargs = item
        with gw.client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
            return client.request(method, path, **kwargs)

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, list(requests)))


def at_least(n: float, **labels: str) -> Callable[[Scrape], bool]:
    """Whether ``ferrogate_requests_total`` for ``labels`` reached ``n``."""
    return lambda s: s.value("ferrogate_requests_total", **labels) >= n


def snapshot_counts(gw: Gateway, route: str) -> dict[int, int]:
    """Requests of ``route`` per worker pid, from the snapshots the workers publish."""
    counts = {}
    for path in gw.dir.glob("gateway.metrics.*.json"):
        snap = json.loads(path.read_text())
        rows = snap["routes"].get(route, {}).get("requests", [])
        counts[snap["pid"]] = sum(r[3] for r in rows)
    return counts


# ---- counting -------------------------------------------------------------------------------


def test_requests_bytes_and_latency_are_summed_over_workers(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    st = start(gateway, api(upstream))
    gets = [("GET", f"/api/g/{i}", {"headers": {"x-up-size": str(100 + i)}}) for i in range(30)]
    posts = [("POST", f"/api/p/{i}", {"content": b"x" * (1000 + i)}) for i in range(10)]
    answers = spread(st.gw, gets + posts)
    assert [r.status_code for r in answers] == [200] * 40
    sent = sum(1000 + i for i in range(10))
    received = sum(len(r.content) for r in answers)
    assert sum(len(r.content) for r in answers[:30]) == sum(100 + i for i in range(30))

    n_get = 30
    # the point is the sum over workers: both must have taken some
    for _ in range(20):
        total = n_get + 10
        st.until(at_least(total, route="api"), f"{total} requests to be counted")
        per_worker = snapshot_counts(st.gw, "api")
        if len(per_worker) == 2 and all(per_worker.values()):
            break
        more = spread(st.gw, [("GET", "/api/more", {"headers": {"x-up-size": "10"}})] * 4)
        n_get += 4
        received += sum(len(r.content) for r in more)
    else:
        raise AssertionError(f"one worker took every connection: {per_worker}")
    time.sleep(0.3)  # one more publish: nothing more may come
    s = st.scrape()
    assert s.value("ferrogate_requests_total", route="api", method="GET") == n_get
    assert s.value("ferrogate_requests_total", route="api", method="POST") == 10
    assert s.value("ferrogate_requests_total", route="api", status_class="2xx") == total
    assert s.value("ferrogate_requests_total", route="api") == total
    assert s.value("ferrogate_request_bytes_total", route="api") == sent
    assert s.value("ferrogate_response_bytes_total", route="api") == received
    for hist in ("ferrogate_request_duration_seconds", "ferrogate_upstream_duration_seconds"):
        assert s.value(f"{hist}_count", route="api") == total
        buckets = s.select(f"{hist}_bucket", route="api")
        cumulative = [b.value for b in sorted(buckets, key=lambda b: float(b.labels["le"]))]
        assert cumulative == sorted(cumulative) and cumulative[-1] == total
        assert buckets[-1].labels["le"] == "+Inf"
        # the default buckets: 13 bounds and +Inf
        assert len(buckets) == 14
        assert 0 < s.value(f"{hist}_sum", route="api") < total * 5
    assert s.value("ferrogate_workers") == 2
    assert s.value("ferrogate_rate_limited_total", route="api") == 0
    # nothing is labelled by consumer unless asked for
    assert not [x for x in s.samples if "consumer" in x.labels]


def test_status_classes_gateway_errors_and_requests_without_a_route(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    st = start(gateway, api(upstream))
    # the readiness probe matched no route: count from wherever that settled
    before = st.settled("ferrogate_requests_total", route="(none)")
    answers = spread(
        st.gw,
        [("GET", "/api/a", {"headers": {"x-up-status": "404"}})] * 3
        + [("DELETE", "/api/a", {"headers": {"x-up-status": "503"}})] * 2
        + [("GET", "/api/a", {"headers": {"x-up-status": "302"}})]
        + [("PURGE", "/api/a", {})]
        + [("GET", "/elsewhere", {})] * 4,
    )
    assert sorted(r.status_code for r in answers) == [200, 302] + [404] * 7 + [503] * 2
    s = st.until(
        lambda s: s.value("ferrogate_requests_total", route="api") >= 7, "the api requests"
    )
    s = st.until(
        lambda s: s.value("ferrogate_requests_total", route="(none)") >= before + 4,
        "the requests without a route",
    )
    time.sleep(0.3)
    s = st.scrape()
    assert s.value("ferrogate_requests_total", route="api", status_class="4xx") == 3
    deletes = s.value("ferrogate_requests_total", route="api", method="DELETE")
    assert deletes == s.value("ferrogate_requests_total", route="api", status_class="5xx") == 2
    assert s.value("ferrogate_requests_total", route="api", status_class="3xx") == 1
    # methods outside the standard ones share one label value
    assert s.value("ferrogate_requests_total", route="api", method="OTHER", status_class="2xx") == 1
    assert s.value("ferrogate_requests_total", route="(none)", status_class="4xx") == before + 4
    assert s.value("ferrogate_errors_total", route="(none)", code="no_route") == before + 4
    # upstream answers are not the gateway's errors
    assert s.value("ferrogate_errors_total", route="api") == 0
    methods = {x.labels["method"] for x in s.select("ferrogate_requests_total")}
    assert methods <= {"GET", "DELETE", "OTHER"}


def test_rate_limited_requests_are_counted(gateway: GatewayFactory, upstream: Upstream) -> None:
    st = start(gateway, api(upstream, rate_limits=[{"limit": 2, "per": "1m"}]))
    answers = spread(st.gw, [("GET", "/api/x", {})] * 6)
    assert sorted(r.status_code for r in answers) == [200, 200] + [429] * 4
    s = st.until(lambda s: s.value("ferrogate_requests_total", route="api") >= 6, "six requests")
    assert s.value("ferrogate_rate_limited_total", route="api") == 4
    assert s.value("ferrogate_requests_total", route="api", status_class="4xx") == 4
    assert s.value("ferrogate_errors_total", route="api", code="rate_limited") == 4
    # refused requests never went upstream
    assert s.value("ferrogate_upstream_duration_seconds_count", route="api") == 2


def test_consumer_labels_are_opt_in_and_capped(gateway: GatewayFactory, upstream: Upstream) -> None:
    config = {**api(upstream, plugins=[{"name": "t-consumer"}]), "plugins_dir": PLUGINS_DIR}
    st = start(gateway, config, metrics={"consumer_labels": True, "max_consumers": 3})
    users = [f"user{i}" for i in range(12)]
    answers = spread(
        st.gw,
        [("GET", "/api/x", {"headers": {"x-user": u}}) for u in users] + [("GET", "/api/x", {})],
    )
    assert [r.status_code for r in answers] == [200] * 13
    s = st.until(lambda s: s.value("ferrogate_requests_total", route="api") >= 13, "13 requests")
    series = s.select("ferrogate_requests_total", route="api")
    assert all("consumer" in x.labels for x in series)
    by_consumer: dict[str, float] = {}
    for x in series:
        by_consumer[x.labels["consumer"]] = by_consumer.get(x.labels["consumer"], 0) + x.value
    named = {c for c in by_consumer if c.startswith("user")}
    # at most 3 names per worker; the rest are "other"; the request without one: "(none)"
    assert 3 <= len(named) <= 6, by_consumer
    assert by_consumer["other"] == 12 - len(named)
    assert by_consumer["(none)"] == 1
    assert set(by_consumer) == named | {"other", "(none)"}
    assert sum(by_consumer.values()) == 13


def test_only_routes_with_traffic_have_series(gateway: GatewayFactory, upstream: Upstream) -> None:
    routes = [{"name": f"r{i}", "paths": [f"/r{i}/*"], "upstream": "b"} for i in range(500)]
    st = start(gateway, {"upstreams": {"b": {"targets": [upstream.address]}}, "routes": routes})
    spread(st.gw, [("GET", "/r7/x", {}), ("GET", "/r499/x", {})])

    def routes_seen(s: Scrape) -> set[str]:
        return {x.labels["route"] for x in s.samples if "route" in x.labels}

    # (none): the readiness probe
    st.until(lambda s: len(routes_seen(s)) >= 3, "the requests")
    time.sleep(0.3)
    assert routes_seen(st.scrape()) == {"r7", "r499", "(none)"}


def test_the_master_moves_old_histograms_to_new_buckets_like_the_workers() -> None:
    # the same case as the unit test of Histogram::rebucket in metrics.rs
    old, new = (0.01, 0.1, 1.0), (0.05, 0.1, 2.0)
    assert rebucket([1, 2, 1, 1], old, new) == [1, 2, 1, 1]
    assert rebucket([1, 2, 1, 1], old, (0.001, 10.0)) == [0, 4, 1]
    assert rebucket([3, 0, 0, 2], old, old) == [3, 0, 0, 2]


# ---- counters never go back ----------------------------------------------------------------


def test_a_killed_worker_does_not_take_its_counts_along(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    st = start(gateway, api(upstream))
    gw = st.gw
    spread(gw, [("GET", "/api/x", {})] * 20)
    st.until(lambda s: s.value("ferrogate_requests_total", route="api") == 20, "20 requests")
    per_worker = snapshot_counts(gw, "api")
    assert sorted(per_worker) == sorted(gw.worker_pids()), per_worker
    victim = max(per_worker, key=lambda pid: per_worker[pid])
    assert per_worker[victim] > 0
    os.kill(victim, signal.SIGKILL)
    # the master replaces it; the sum holds meanwhile and after
    deadline = time.monotonic() + 10
    while True:
        pids = gw.worker_pids()
        seen = st.scrape()
        assert seen.value("ferrogate_requests_total", route="api") >= 20
        if len(pids) == 2 and victim not in pids:
            break
        assert time.monotonic() < deadline, "the worker was not replaced"
        time.sleep(0.05)
    s = st.until(lambda s: s.value("ferrogate_workers") == 2, "the new worker to publish")
    assert s.value("ferrogate_requests_total", route="api") == 20
    assert s.value("ferrogate_request_duration_seconds_count", route="api") == 20
    assert s.value("ferrogate_worker_restarts_total") == 1
    spread(gw, [("GET", "/api/x", {})] * 10)
    s = st.until(
        lambda s: s.value("ferrogate_requests_total", route="api") >= 30, "10 more requests"
    )
    assert s.value("ferrogate_requests_total", route="api") == 30
    assert s.value("ferrogate_request_duration_seconds_count", route="api") == 30


def test_a_stopping_worker_hands_over_its_last_counts(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    # publishing once at start and then not for an hour: only the final counts can tell
    st = start(gateway, api(upstream), metrics={"publish_interval": "1h"})
    gw = st.gw
    st.until(lambda s: s.value("ferrogate_workers") == 2, "both workers")
    spread(gw, [("GET", "/api/x", {})] * 12)
    time.sleep(0.3)
    assert st.scrape().value("ferrogate_requests_total", route="api") == 0
    for pid in gw.worker_pids():
        os.kill(pid, signal.SIGTERM)
    s = st.until(
        lambda s: s.value("ferrogate_worker_restarts_total") == 2, "both workers to be replaced"
    )
    assert s.value("ferrogate_requests_total", route="api") == 12
    assert s.value("ferrogate_request_duration_seconds_count", route="api") == 12


def test_counters_survive_reloads_and_new_buckets(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    config = api(upstream)
    st = start(gateway, config, metrics={"latency_buckets": [0.1, 1]})
    gw = st.gw
    spread(gw, [("GET", "/api/x", {})] * 10)
    st.until(lambda s: s.value("ferrogate_requests_total", route="api") == 10, "10 requests")

    # a config change elsewhere: the counters are carried over as they are
    gw.write_config(
        {
            **config,
            "routes": [*config["routes"], {"name": "new", "paths": ["/new"], "upstream": "b"}],
            "status": {"listen": st.url.removeprefix("http://")},
            "metrics": {"publish_interval": PUBLISH, "latency_buckets": [0.05, 0.5, 5]},
        }
    )
    gw.signal(signal.SIGHUP)
    wait_for(lambda: len(events(gw, "config_applied")) >= 2, what="both workers to reload")
    s = st.scrape()
    assert s.value("ferrogate_config_reloads_total", result="ok") == 1
    assert s.value("ferrogate_requests_total", route="api") == 10
    les = {x.labels["le"] for x in s.select("ferrogate_request_duration_seconds_bucket")}
    assert les == {"0.05", "0.5", "5.0", "+Inf"}
    assert s.value("ferrogate_request_duration_seconds_count", route="api") == 10

    spread(gw, [("GET", "/api/x", {})] * 5 + [("GET", "/new", {})] * 2)
    s = st.until(
        lambda s: (
            s.value("ferrogate_requests_total", route="api") >= 15
            and s.value("ferrogate_requests_total", route="new") >= 2
        ),
        "the requests after the reload",
    )
    assert s.value("ferrogate_requests_total", route="api") == 15
    assert s.value("ferrogate_request_duration_seconds_count", route="api") == 15
    assert s.value("ferrogate_request_duration_seconds_bucket", route="api", le="+Inf") == 15

    # a broken config is refused and counted as such; nothing is lost
    gw.write_config_text("routes: [oops\n")
    gw.signal(signal.SIGHUP)
    s = st.until(
        lambda s: s.value("ferrogate_config_reloads_total", result="failed") == 1,
        "the failed reload",
    )
    assert s.value("ferrogate_requests_total", route="api") == 15


# ---- gauges ---------------------------------------------------------------------------------


def test_target_health_and_breaker_state(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    good, flaky, failing = (upstream_factory(n) for n in ("good", "flaky", "failing"))
    probe = {
        "path": "/healthz",
        "interval": "100ms",
        "timeout": "1s",
        "healthy_threshold": 1,
        "unhealthy_threshold": 2,
    }
    config = {
        "upstreams": {
            "pool": {"targets": [good.address, flaky.address], "health": {"active": probe}},
            "fragile": {
                "targets": [failing.address],
                "breaker": BREAKER,
                "health": {"passive": {"enabled": False}},
                "retries": {"count": 0},
            },
        },
        "routes": [
            {"name": "pool", "paths": ["/pool/*"], "upstream": "pool"},
            {"name": "fragile", "paths": ["/fragile/*"], "upstream": "fragile"},
        ],
    }
    st = start(gateway, config)

    def healthy(s: Scrape, up: Upstream, upstream: str = "pool") -> float:
        found = s.select("ferrogate_upstream_target_healthy", upstream=upstream, target=up.address)
        assert len(found) == 1, found
        return found[0].value

    s = st.until(lambda s: s.value("ferrogate_workers") == 2, "both workers")
    assert healthy(s, good) == 1 and healthy(s, flaky) == 1
    assert s.value("ferrogate_upstream_breaker_state", target=failing.address, state="closed") == 2
    assert not s.select("ferrogate_upstream_breaker_state", target=good.address)

    flaky.status_for["/healthz"] = 503
    s = st.until(lambda s: healthy(s, flaky) == 0, "the failing target to be unhealthy")
    assert healthy(s, good) == 1
    flaky.status_for.clear()
    st.until(lambda s: healthy(s, flaky) == 1, "the target to be back")

    # one worker's breaker opens: it counts, and that worker no longer sends it traffic
    failing.status = 503
    with st.gw.client() as client:  # one connection: one worker
        answers = [client.get("/fragile/x").status_code for _ in range(3)]
    assert answers == [503, 503, 503]
    s = st.until(
        lambda s: (
            s.value("ferrogate_upstream_breaker_state", target=failing.address, state="open") == 1
        ),
        "the breaker to open",
    )
    assert s.value("ferrogate_upstream_breaker_state", target=failing.address, state="closed") == 1
    assert healthy(s, failing, "fragile") == 0.5


def test_active_connections(gateway: GatewayFactory, upstream: Upstream) -> None:
    st = start(gateway, api(upstream))
    st.until(lambda s: s.value("ferrogate_workers") == 2, "both workers")
    assert st.settled("ferrogate_connections_active") == 0
    with socket.create_connection(("127.0.0.1", st.gw.port)) as slow:
        slow.sendall(b"GET /api/slow HTTP/1.1\r\nHost: x\r\nX-Up-Sleep: 2\r\n\r\n")
        upstream.wait_for_arrivals(1)
        st.until(lambda s: s.value("ferrogate_connections_active") == 1, "one connection")
        slow.settimeout(10)
        assert slow.recv(12) == b"HTTP/1.1 200"
        # still open (keep-alive) after its response
        assert st.settled("ferrogate_connections_active") == 1
    st.until(lambda s: s.value("ferrogate_connections_active") == 0, "the connection to close")


def test_plugin_time_per_plugin(gateway: GatewayFactory, upstream: Upstream) -> None:
    config = {**api(upstream, plugins=[{"name": "t-stamp"}]), "plugins_dir": PLUGINS_DIR}
    st = start(gateway, config)
    spread(st.gw, [("GET", "/api/x", {})] * 8)

    def calls(s: Scrape, phase: str) -> float:
        return s.value("ferrogate_plugin_duration_seconds_count", plugin="t-stamp", phase=phase)

    # the plugin host publishes its timings every 2 s
    s = st.until(lambda s: calls(s, "on_response") >= 8, "the plugin's timings", timeout=10)
    assert calls(s, "on_request") == 8 and calls(s, "on_response") == 8
    assert s.value("ferrogate_plugin_duration_seconds_sum", plugin="t-stamp") > 0
    assert s.value("ferrogate_plugin_errors_total", plugin="t-stamp") == 0


def test_metrics_can_need_the_admin_token(gateway: GatewayFactory, upstream: Upstream) -> None:
    st = start(gateway, api(upstream), status={"admin_token": "s3cret", "metrics_need_token": True})
    refused = st.get()
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthorized"
    assert st.get(headers={"authorization": "Bearer wrong"}).status_code == 401
    s = st.scrape(headers={"authorization": "Bearer s3cret"})
    assert "ferrogate_workers" in s.names
    # without metrics_need_token, /metrics is open even with an admin token set
    st2 = start(gateway, api(upstream), status={"admin_token": "s3cret"})
    assert "ferrogate_workers" in st2.scrape().names


# ---- the bundled Grafana dashboard ---------------------------------------------------------


def _exprs(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query") and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def test_the_grafana_dashboard_uses_only_metrics_that_exist(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"] and dashboard["title"]
    datasource = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert datasource and datasource[0]["query"] == "prometheus"
    used = {
        name for expr in _exprs(dashboard) for name in re.findall(r"\bferrogate_[a-z0-9_]+", expr)
    }
    assert len(used) >= 12, used

    # a gateway that produces every kind of series
    up, failing = upstream_factory("up"), upstream_factory("failing")
    failing.status = 503
    config = {
        "plugins_dir": PLUGINS_DIR,
        "upstreams": {
            "b": {"targets": [up.address], "health": {"active": {"path": "/h"}}},
            "fragile": {"targets": [failing.address], "breaker": BREAKER},
        },
        "routes": [
            {
                "name": "api",
                "paths": ["/api/*"],
                "upstream": "b",
                "plugins": [{"name": "t-stamp"}],
                "rate_limits": [{"limit": 5, "per": "1m"}],
            },
            {"name": "fragile", "paths": ["/fragile"], "upstream": "fragile"},
        ],
    }
    st = start(gateway, config)
    spread(st.gw, [("POST", "/api/x", {"content": b"abc"})] * 8 + [("GET", "/fragile", {})] * 2)
    s = st.until(
        lambda s: s.value("ferrogate_plugin_duration_seconds_count") >= 5,
        "every series",
        timeout=10,
    )
    present = s.names
    missing = set()
    for name in used:
        if name in present:
            continue
        if any(name + suffix in present for suffix in ("_bucket", "_sum", "_count")):
            continue
        missing.add(name)
    assert not missing, f"the dashboard uses metrics that do not exist: {sorted(missing)}"
