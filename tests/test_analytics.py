"""The analytics store: workers count every request, the master stores the buckets in
SQLite, the status listener answers /api/analytics/*, and ``ferrogate stats`` prints them."""

from __future__ import annotations

import json
import math
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ferrogate.analytics_service import parse_query, read_spool
from ferrogate.analytics_store import (
    HIST_ERROR,
    Query,
    Row,
    SqliteStore,
    bin_of,
    percentiles,
)
from gateway import Gateway, GatewayFactory, free_port, run_cli
from upstreams import Upstream, UpstreamFactory

PLUGINS_DIR = str(Path(__file__).parent / "plugins_dir")
TOKEN = "s3cret-token"


# --- helpers -------------------------------------------------------------------------------


def observed(
    upstreams: dict[str, list[str]],
    routes: list[dict[str, Any]],
    *,
    token: str | None = TOKEN,
    analytics: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    status: dict[str, Any] = {"listen": f"127.0.0.1:{free_port()}"}
    if token is not None:
        status["admin_token"] = token
    return {
        "upstreams": {name: {"targets": targets} for name, targets in upstreams.items()},
        "routes": routes,
        "status": status,
        "analytics": {"path": "analytics.db", "resolution": "0.5s", **(analytics or {})},
        **extra,
    }


def status_url(gw: Gateway) -> str:
    import yaml

    config = yaml.safe_load(gw.config_path.read_text())
    return f"http://{config['status']['listen']}"


def api(gw: Gateway, what: str, token: str | None = TOKEN, **params: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(
        f"{status_url(gw)}/api/analytics/{what}", params=params, headers=headers, timeout=10
    )


def api_json(gw: Gateway, what: str, **params: Any) -> dict[str, Any]:
    resp = api(gw, what, **params)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def poll(read: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 15.0) -> Any:
    """``read()`` until ``done`` says yes; the last value is in the failure message."""
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s; last: {value!r}")
        time.sleep(0.1)
        value = read()
    return value


def requests_of(gw: Gateway, **params: Any) -> int:
    return int(api_json(gw, "summary", **params)["requests"])


def spread(gw: Gateway, path: str, n: int, **kwargs: Any) -> list[httpx.Response]:
    """``n`` requests, each on a new connection, so they spread over the workers."""
    with gw.client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        return [client.get(path, **kwargs) for _ in range(n)]


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


# --- end to end ----------------------------------------------------------------------------


def test_every_request_is_counted_once_across_workers(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    a, b = upstream_factory("a"), upstream_factory("b")
    gw = gateway(
        observed(
            {"ua": [a.address], "ub": [b.address]},
            [
                {"name": "a", "paths": ["/a/*"], "upstream": "ua"},
                {"name": "b", "paths": ["/b/*"], "upstream": "ub"},
            ],
        ),
        workers=2,
    )
    assert len(gw.worker_pids()) == 2
    t0 = time.time()
    assert {r.status_code for r in spread(gw, "/a/x", 40)} == {200}
    assert {r.status_code for r in spread(gw, "/b/x", 20, headers={"X-Up-Status": "404"})} == {404}
    assert {r.status_code for r in spread(gw, "/b/y", 10, headers={"X-Up-Status": "503"})} == {503}
    assert a.count == 40 and b.count == 30

    poll(lambda: (requests_of(gw, route="a"), requests_of(gw, route="b")), lambda v: v == (40, 30))
    # Nothing counted twice: a few more resolutions later, the totals are the same.
    time.sleep(1.6)
    a_sum = api_json(gw, "summary", route="a")
    b_sum = api_json(gw, "summary", route="b")
    assert a_sum["requests"] == 40 and a_sum["errors"] == 0 and a_sum["error_rate"] == 0
    assert b_sum["requests"] == 30 and b_sum["errors"] == 10
    assert b_sum["error_rate"] == pytest.approx(10 / 30, abs=1e-6)
    assert a_sum["bytes_out"] > 0 and a_sum["p50"] is not None
    assert 0 < a_sum["p50"] <= a_sum["p95"] <= a_sum["p99"]

    # Statuses: exact for route b; overall, the readiness probe's 404 (no route) is there too.
    statuses = api_json(gw, "statuses", route="b")
    assert statuses["rows"] == [
        {"status": 404, "requests": 20},
        {"status": 503, "requests": 10},
    ]
    assert statuses["classes"] == {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 20, "5xx": 10}
    everything = api_json(gw, "statuses")
    assert everything["classes"]["2xx"] == 40 and everything["classes"]["5xx"] == 10
    assert everything["classes"]["4xx"] >= 20

    # Top routes: sorted by requests; the probe went to no route (key "").
    top = api_json(gw, "top", by="route")
    assert top["by"] == "route"
    keyed = {r["key"]: r for r in top["rows"]}
    assert [r["key"] for r in top["rows"]][:2] == ["a", "b"]
    assert keyed["b"]["errors"] == 10 and keyed["b"]["requests"] == 30
    assert keyed[""]["requests"] >= 1
    assert sum(r["requests"] for r in top["rows"]) == requests_of(gw)
    assert [r["key"] for r in api_json(gw, "top", by="route", limit=1)["rows"]] == ["a"]

    # The timeseries: every step of the range, zeros where nothing happened.
    start = math.floor(t0) - 5
    series = api_json(gw, "timeseries", route="a", step=1, **{"from": start, "to": start + 30})
    assert series["step"] == 1.0
    times = [p["t"] for p in series["points"]]
    assert times == [float(start + i) for i in range(30)]
    assert sum(p["requests"] for p in series["points"]) == 40
    assert any(p["requests"] == 0 and p["p50"] is None for p in series["points"])
    busy = [p for p in series["points"] if p["requests"]]
    assert all(p["rps"] == p["requests"] and p["error_rate"] == 0 for p in busy)
    # Without a step: at most 120 points, the step a multiple of the resolution.
    default = api_json(gw, "timeseries")
    assert len(default["points"]) <= 120
    assert default["step"] == pytest.approx(round(default["step"] / 0.5) * 0.5)
    assert sum(p["requests"] for p in default["points"]) == requests_of(gw)


def test_consumers_and_upstream_targets(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    one, two = upstream_factory("one"), upstream_factory("two")
    gw = gateway(
        observed(
            {"pool": [one.address, two.address]},
            [
                {
                    "name": "c",
                    "paths": ["/c/*"],
                    "upstream": "pool",
                    "plugins": [{"name": "t-consumer"}],
                }
            ],
            plugins_dir=PLUGINS_DIR,
        ),
        workers=2,
    )
    spread(gw, "/c/x", 12, headers={"x-user": "alice"})
    spread(gw, "/c/x", 6, headers={"x-user": "bob"})
    spread(gw, "/c/x", 3)
    poll(lambda: requests_of(gw, route="c"), lambda n: n == 21)

    consumers = api_json(gw, "top", by="consumer", route="c")["rows"]
    assert [(r["key"], r["requests"]) for r in consumers] == [("alice", 12), ("bob", 6), ("", 3)]
    assert requests_of(gw, consumer="bob") == 6
    assert requests_of(gw, consumer="bob", route="c") == 6
    assert requests_of(gw, consumer="carol") == 0

    targets = api_json(gw, "top", by="upstream", route="c")["rows"]
    assert {r["key"] for r in targets} == {one.address, two.address}
    assert {r["key"]: r["requests"] for r in targets} == {
        one.address: one.count,
        two.address: two.count,
    }
    assert requests_of(gw, upstream=one.address) == one.count > 0


def test_percentiles_are_within_the_histogram_error(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(
        observed({"u": [upstream.address]}, [{"name": "slow", "paths": ["/p"], "upstream": "u"}]),
        workers=2,
    )
    sleeps = [0.05] * 16 + [0.3] * 4
    random.Random(6).shuffle(sleeps)
    took = []
    with gw.client() as client:
        for s in sleeps:
            t = time.perf_counter()
            assert client.get("/p", headers={"X-Up-Sleep": str(s)}).status_code == 200
            took.append(time.perf_counter() - t)
    summary = poll(
        lambda: api_json(gw, "summary", route="slow"), lambda s: s["requests"] == len(sleeps)
    )
    for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        # The gateway's own time lies between the upstream's sleep and what the client saw.
        low, high = nearest_rank(sleeps, q), nearest_rank(took, q)
        assert low * (1 - HIST_ERROR) <= summary[name] <= high * (1 + HIST_ERROR), (name, took)
    assert summary["mean"] == pytest.approx(sum(sleeps) / len(sleeps), rel=0.25)
    assert 0 < summary["upstream_mean"] <= summary["mean"]


def test_trends_come_from_the_hourly_rollup(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(
        observed({"u": [upstream.address]}, [{"name": "r", "paths": ["/t"], "upstream": "u"}]),
        workers=2,
    )
    spread(gw, "/t", 30)
    poll(lambda: requests_of(gw, route="r"), lambda n: n == 30)
    total = requests_of(gw)  # with the readiness probe's
    hour = api_json(gw, "trends", period="hour")
    assert hour["period"] == "hour"
    assert len(hour["rows"]) in (168, 169)  # a week by default, one row per hour
    assert all(r["t"] % 3600 == 0 for r in hour["rows"])
    now = time.time()
    current = [r for r in hour["rows"] if r["t"] <= now < r["t"] + 3600]
    assert len(current) == 1
    row = current[0]
    # The probe found no route: a 404 of the gateway's own, counted as an error.
    assert row["requests"] == total and row["errors"] == total - 30 and row["p95"] is not None
    # The busiest half-second bucket: at least its share of the traffic, at most all of it.
    assert 0 < row["peak_rps"] <= total / 0.5
    assert row["peak_rps"] >= 1 / 0.5
    assert sum(r["requests"] for r in hour["rows"]) == total

    day = api_json(gw, "trends", period="day")
    assert all(r["t"] % 86400 == 0 for r in day["rows"])
    assert sum(r["requests"] for r in day["rows"]) == total
    assert max(r["peak_rps"] for r in day["rows"]) == row["peak_rps"]
    routed = api_json(gw, "trends", period="hour", route="r")
    assert sum(r["requests"] for r in routed["rows"]) == 30


def test_the_api_needs_the_admin_token(gateway: GatewayFactory, upstream: Upstream) -> None:
    routes = [{"name": "r", "paths": ["/*"], "upstream": "u"}]
    gw = gateway(observed({"u": [upstream.address]}, routes), workers=1)
    assert api(gw, "summary", token=None).status_code == 401
    assert api(gw, "summary", token="wrong").status_code == 401
    assert api(gw, "summary").status_code == 200
    cookie = httpx.get(
        f"{status_url(gw)}/api/analytics/summary", cookies={"ferrogate_token": TOKEN}, timeout=10
    )
    assert cookie.status_code == 200

    tokenless = gateway(observed({"u": [upstream.address]}, routes, token=None), workers=1)
    refused = api(tokenless, "summary", token=TOKEN)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "no_admin_token"


BAD_PARAMS = [
    ("summary", {"from": "yesterday"}, "from"),
    ("summary", {"to": "-1x"}, "to"),
    ("summary", {"from": "-1h", "to": "-2h"}, "from"),
    ("timeseries", {"step": "-1"}, "step"),
    ("timeseries", {"step": "abc"}, "step"),
    ("timeseries", {"from": "-30d", "step": "1"}, "step"),
    ("top", {"by": "host"}, "by"),
    ("top", {"limit": "0"}, "limit"),
    ("top", {"limit": "many"}, "limit"),
    ("trends", {"period": "week"}, "period"),
    ("trends", {"from": "0"}, "from"),
]


def test_bad_params_are_named(gateway: GatewayFactory, upstream: Upstream) -> None:
    routes = [{"name": "r", "paths": ["/*"], "upstream": "u"}]
    gw = gateway(observed({"u": [upstream.address]}, routes), workers=1)
    for what, params, param in BAD_PARAMS:
        resp = api(gw, what, **params)
        assert resp.status_code == 400, (what, params, resp.text)
        error = resp.json()["error"]
        assert error["code"] == "bad_param" and error["param"] == param, (what, params, error)
        assert error["message"].startswith(f"{param}: ")
    assert api(gw, "nothing").status_code == 404


def test_counts_survive_a_restart_and_the_last_bucket_is_flushed_at_exit(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    # A long resolution: nothing reaches the store before the stop, except through the
    # workers' flush at exit and the master's last ingest.
    config = observed(
        {"u": [upstream.address]},
        [{"name": "r", "paths": ["/x"], "upstream": "u"}],
        analytics={"resolution": "1h"},
    )
    gw = gateway(config, workers=2)
    assert {r.status_code for r in spread(gw, "/x", 25)} == {200}
    gw.stop()
    assert gw.proc is not None and gw.proc.returncode == 0
    assert (gw.dir / "analytics.db").exists()
    assert not list((gw.dir / "gateway.analytics").glob("*.jsonl"))

    gw.start()
    assert requests_of(gw, route="r", **{"from": "-2h"}) == 25
    spread(gw, "/x", 5)
    gw.signal(signal.SIGTERM)
    assert gw.proc is not None and gw.proc.wait(timeout=15) == 0
    gw.start()
    assert requests_of(gw, route="r", **{"from": "-2h"}) == 30


def test_a_store_that_cannot_be_opened_is_reported(
    gateway: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> None:
    (tmp_path / "blocked").write_text("a file where a directory should be")
    routes = [{"name": "r", "paths": ["/*"], "upstream": "u"}]
    path = str(tmp_path / "blocked" / "a.db")
    gw = gateway(observed({"u": [upstream.address]}, routes, analytics={"path": path}), workers=1)
    assert gw.get("/x").status_code == 200  # the proxy serves on
    resp = api(gw, "summary")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "store_unavailable"
    assert '"analytics_store_failed"' in gw.stderr_text()


def test_a_reload_with_other_analytics_settings_loses_no_request(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    config = observed(
        {"u": [upstream.address]},
        [{"name": "r", "paths": ["/x"], "upstream": "u"}],
        analytics={"resolution": "1h"},
    )
    gw = gateway(config, workers=2)
    assert {r.status_code for r in spread(gw, "/x", 10)} == {200}
    # The workers' counters of the old settings are handed over when they are replaced.
    config["analytics"]["resolution"] = "0.5s"
    gw.write_config(config)
    out = run_cli("reload", "--pid-file", str(gw.pid_file), timeout=20)
    assert out.returncode == 0, out.stdout + out.stderr
    poll(lambda: gw.stderr_text().count('"config_applied"'), lambda n: n >= 2)
    assert {r.status_code for r in spread(gw, "/x", 10)} == {200}
    poll(lambda: requests_of(gw, route="r"), lambda n: n == 20)
    time.sleep(1.1)
    assert requests_of(gw, route="r") == 20


def test_retention_deletes_old_buckets(gateway: GatewayFactory, upstream: Upstream) -> None:
    routes = [{"name": "r", "paths": ["/*"], "upstream": "u"}]
    config = observed({"u": [upstream.address]}, routes, analytics={"retention": "1h"})
    gw = gateway(config, workers=1)
    gw.stop()
    # Rows from three hours ago and from just now, written the way the master writes them.
    now = time.time()
    old_t = (int(now) - 3 * 3600) * 1000
    fresh_t = (int(now) - 60) * 1000
    store = SqliteStore(gw.dir / "analytics.db", retention=3600)
    store.ingest([_row(old_t, 7, route="old"), _row(fresh_t, 3, route="old")])
    store.close()

    gw.start()  # the service prunes as it starts, then every minute

    def around(t: int) -> int:
        return requests_of(gw, route="old", **{"from": t / 1000 - 30, "to": t / 1000 + 30})

    poll(lambda: around(old_t), lambda n: n == 0)
    assert around(fresh_t) == 3
    # The hourly rollup is kept for long-term trends (and ranges of whole hours).
    trends = api_json(gw, "trends", period="hour", route="old", **{"from": "-4h"})
    assert sum(r["requests"] for r in trends["rows"]) == 10
    assert requests_of(gw, route="old", **{"from": "-4h"}) == 10


def test_ferrogate_stats_prints_the_numbers(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    up = upstream_factory("up")
    config = observed(
        {"u": [up.address]},
        [{"name": "shop", "paths": ["/x"], "upstream": "u"}],
        token="${FG_TEST_TOKEN}",
    )
    env = {"FG_TEST_TOKEN": TOKEN}
    gw = gateway(config, workers=2, env=env)
    spread(gw, "/x", 8)
    spread(gw, "/x", 2, headers={"X-Up-Status": "500"})
    poll(lambda: requests_of(gw, route="shop"), lambda n: n == 10)

    out = run_cli("stats", "-c", str(gw.config_path), env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    total = api_json(gw, "summary")  # with the readiness probe's 404
    assert ["requests", str(total["requests"])] in [line.split()[:2] for line in lines]
    assert ["errors", str(total["errors"])] in [line.split()[:2] for line in lines]
    shop = next(line.split() for line in lines if line.startswith("shop "))
    assert shop[1:4] == ["10", "2", "20.00%"]
    assert any(line.split() == ["500", "2"] for line in lines), out.stdout
    assert any(line.split() == ["200", "8"] for line in lines), out.stdout

    as_json = run_cli("stats", "-c", str(gw.config_path), "--json", "--by", "upstream", env=env)
    data = json.loads(as_json.stdout)
    assert data["top"]["by"] == "upstream"
    assert data["top"]["rows"][0] == {**data["top"]["rows"][0], "key": up.address, "requests": 10}
    assert data["statuses"]["classes"]["5xx"] == 2

    url = status_url(gw)
    by_url = run_cli("stats", "--url", url, "--json", env={"FERROGATE_ADMIN_TOKEN": TOKEN})
    assert json.loads(by_url.stdout)["summary"]["errors"] == total["errors"]

    wrong = run_cli("stats", "-c", str(gw.config_path), "--token", "nope", env=env)
    assert wrong.returncode == 1 and "token was refused" in wrong.stderr

    gw.stop()
    gone = run_cli("stats", "-c", str(gw.config_path), env=env)
    assert gone.returncode == 1 and "is the gateway running" in gone.stderr


# --- the store alone ------------------------------------------------------------------------


def _row(t: int, requests: int = 1, **kw: Any) -> Row:
    fields: dict[str, Any] = {
        "span": 1000,
        "route": "r",
        "consumer": "",
        "upstream": "127.0.0.1:1",
        "status": 200,
        "requests": requests,
        "hist": [(bin_of(0.01), requests)],
        **kw,
    }
    return Row(t=t, **fields)


def test_store_merges_rows_and_answers_with_zeros_between(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "a.db", retention=86400)
    t = 1_700_000_000_000
    # Two workers' rows for the same bucket and key, and another key.
    store.ingest([_row(t, 2, errors=1, bytes_out=10), _row(t, 3, bytes_out=5)], ["w0-1"])
    store.ingest([_row(t + 2000, 4, status=502, errors=4, consumer="bob")], ["w1-1"])
    assert store.ingested(["w0-1", "w1-1", "w0-2"]) == {"w0-1", "w1-1"}
    q = Query(t / 1000, t / 1000 + 4, 1.0)
    points = store.timeseries(q)
    assert [p["requests"] for p in points] == [5, 0, 4, 0]
    assert [p["errors"] for p in points] == [1, 0, 4, 0]
    assert points[0]["bytes_out"] == 15 and points[1]["p50"] is None
    assert points[2]["error_rate"] == 1.0
    assert store.summary(q)["requests"] == 9
    assert store.summary(Query(q.start, q.end, 1.0, consumer="bob"))["requests"] == 4
    assert store.statuses(q) == [{"status": 200, "requests": 5}, {"status": 502, "requests": 4}]
    top = store.top(q, "consumer", 10)
    assert [(r["key"], r["requests"]) for r in top] == [("", 5), ("bob", 4)]
    # Steps wider than a bucket add them up.
    assert [p["requests"] for p in store.timeseries(Query(q.start, q.end, 2.0))] == [5, 4]
    store.close()


def test_store_percentiles_are_within_the_bound(tmp_path: Path) -> None:
    rng = random.Random(1)
    values = [10 ** rng.uniform(-4.5, 1.5) for _ in range(5000)]
    hist: dict[int, int] = {}
    for v in values:
        hist[bin_of(v)] = hist.get(bin_of(v), 0) + 1
    for q, got in zip((0.5, 0.95, 0.99), percentiles(hist), strict=True):
        exact = nearest_rank(values, q)
        assert got is not None and abs(got - exact) <= exact * HIST_ERROR, (q, got, exact)
    assert percentiles({}) == [None, None, None]

    # Split over rows (workers, buckets), merged by the store: the same answer.
    store = SqliteStore(tmp_path / "p.db", retention=86400)
    t = 1_700_000_000_000
    rows = []
    for i, chunk in enumerate((values[:2000], values[2000:])):
        h: dict[int, int] = {}
        for v in chunk:
            h[bin_of(v)] = h.get(bin_of(v), 0) + 1
        rows.append(_row(t + i * 1000, len(chunk), hist=sorted(h.items())))
    store.ingest(rows)
    summary = store.summary(Query(t / 1000, t / 1000 + 2, 1.0))
    assert [summary["p50"], summary["p95"], summary["p99"]] == percentiles(hist)
    store.close()


def test_store_prunes_old_rows_in_slices_and_keeps_the_rollup(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "r.db", retention=3600, rollup_retention=86400 * 2)
    now = 1_700_000_000.0
    hours = [int(now - h * 3600) * 1000 for h in (30, 20, 10, 5, 0.5)]
    store.ingest([_row(t, 1, consumer=f"c{i}") for i, t in enumerate(hours)])
    assert store.prune(now) == 4
    # Around an old bucket: gone. Whole hours come from the rollup, which is still there.
    assert store.summary(Query(hours[1] / 1000 - 60, hours[1] / 1000 + 60, 60.0))["requests"] == 0
    assert store.summary(Query(hours[4] / 1000 - 60, hours[4] / 1000 + 60, 60.0))["requests"] == 1
    assert store.summary(Query(now - 40 * 3600, now, 60.0))["requests"] == 5
    trends = store.trends(Query(now - 40 * 3600, now, 60.0), "hour")
    assert sum(r["requests"] for r in trends) == 5
    # Past the rollup's retention too: gone, and so are the series of vanished consumers.
    store.prune(now + 86400 * 2 - 25 * 3600)
    trends = store.trends(Query(now - 40 * 3600, now, 60.0), "hour")
    assert sum(r["requests"] for r in trends) == 4
    store.ingest([_row(hours[-1], 1, consumer="c0")])  # a series made again works
    assert store.top(Query(now - 3600, now, 60.0), "consumer", 5)[0]["requests"] == 1
    store.close()


def test_whole_hours_come_from_the_rollup_and_agree_with_the_buckets(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "h.db", retention=86400)
    h0 = 1_700_000_000_000 - 1_700_000_000_000 % 3_600_000
    rng = random.Random(3)
    rows = []
    for _ in range(300):
        t = h0 + rng.randrange(0, 3 * 3600) * 1000
        ms = rng.choice([2, 20, 200])
        rows.append(_row(t, 1, route=rng.choice("ab"), hist=[(bin_of(ms / 1000), 1)]))
    store.ingest(rows[:150])
    store.ingest(rows[150:])
    start, end = h0 / 1000, h0 / 1000 + 3 * 3600
    hourly = store.timeseries(Query(start, end, 3600.0))
    fine = store.timeseries(Query(start, end, 600.0))
    assert [p["requests"] for p in hourly] == [
        sum(p["requests"] for p in fine[i * 6 : i * 6 + 6]) for i in range(3)
    ]
    assert sum(p["requests"] for p in hourly) == 300
    # A range with partial hours at both ends: rollup in the middle, buckets at the edges.
    q = Query(start + 1234, end - 777, 1.0, route="a")
    expected = [r for r in rows if r.route == "a" and q.start * 1000 <= r.t < q.end * 1000]
    summary = store.summary(q)
    assert summary["requests"] == len(expected)
    exact = {b: 0 for b in range(300)}
    for r in expected:
        exact[r.hist[0][0]] += 1
    assert [summary["p50"], summary["p95"], summary["p99"]] == percentiles(exact)
    assert store.top(q, "route", 5) == [{**store.top(q, "route", 5)[0], "requests": len(expected)}]
    store.close()


def test_trend_peaks_per_dimension(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "t.db", retention=86400)
    t = 1_700_000_000_000 - 1_700_000_000_000 % 3_600_000
    store.ingest(
        [
            _row(t, 10, route="a", consumer="x"),
            _row(t, 4, route="b", consumer="y"),
            _row(t + 1000, 8, route="b", consumer="x"),
        ]
    )
    q = Query(t / 1000, t / 1000 + 3600, 1.0)
    assert store.trends(q, "hour")[0]["peak_rps"] == 14
    assert store.trends(Query(q.start, q.end, 1.0, route="b"), "hour")[0]["peak_rps"] == 8
    assert store.trends(Query(q.start, q.end, 1.0, consumer="x"), "hour")[0]["peak_rps"] == 10
    # Two filters: the lower of their peaks, an upper bound of the true one.
    both = Query(q.start, q.end, 1.0, route="b", consumer="x")
    assert store.trends(both, "hour")[0]["peak_rps"] == 8
    assert store.trends(both, "hour")[0]["requests"] == 8
    store.close()


def test_query_parameters() -> None:
    now = 1_700_000_000.0
    q = parse_query({}, now=now, resolution=10)
    assert (q.start, q.end) == (now - 3600, now)
    assert q.step == 40.0  # 3600 / 119 rounded up to a multiple of 10
    q = parse_query(
        {"from": "-15m", "to": str(now - 60), "step": "7", "route": "a"}, now=now, resolution=0.5
    )
    assert (q.start, q.end, q.step, q.route, q.consumer) == (now - 900, now - 60, 7.0, "a", None)
    assert parse_query({"from": "-2d", "consumer": ""}, now=now, resolution=1).consumer is None
    # Long ranges: whole hours (from the hourly rollup), still at most 120 points.
    assert parse_query({"from": "-7d"}, now=now, resolution=10).step == 7200.0
    assert parse_query({"from": "-7d", "step": "300"}, now=now, resolution=10).step == 300.0


def test_spool_files_with_other_histogram_bins_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "0-1-00000000.jsonl"
    header = {"format": "ferrogate-analytics", "version": 1, "hist": {"min": 1e-4}}
    f.write_text(json.dumps(header) + "\n")
    with pytest.raises(ValueError, match="latency bins differ"):
        read_spool(f)
