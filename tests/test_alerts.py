"""Anomaly alerts: the detector on synthetic series, the webhook against a real receiver, and
a real gateway whose upstream starts failing."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ferrogate.alerts import GATEWAY, AlertService, Bucket, Change, Detector, Settings, Webhook
from ferrogate.analytics_store import Row, SqliteStore, bin_of
from gateway import Gateway, GatewayFactory, free_port
from steady import SteadyTraffic, poll
from upstreams import Upstream

STEP = 10.0
SETTINGS = Settings(z_threshold=4.0, warmup=30, alpha=0.1, min_requests=20)


class Traffic:
    """Steady, noisy traffic of one route: Poisson-like counts, binomial errors, a p95 that
    wobbles by ~10% around its level."""

    def __init__(self, seed: int, rate: float = 200, error_rate: float = 0.01, p95: float = 0.05):
        self.rng = random.Random(seed)
        self.rate, self.error_rate, self.p95 = rate, error_rate, p95

    def bucket(self) -> Bucket:
        n = max(0, round(self.rng.gauss(self.rate, math.sqrt(self.rate))))
        errors = sum(self.rng.random() < self.error_rate for _ in range(n))
        p95 = self.p95 * self.rng.lognormvariate(0, 0.1) if n else None
        return Bucket(n, errors, p95)


def feed(det: Detector, t: int, buckets: dict[str, Bucket], **kw: bool) -> tuple[int, list[Change]]:
    changes = det.observe(t * STEP, buckets, **kw)
    return t + 1, changes


def gateway_and(route: str, b: Bucket) -> dict[str, Bucket]:
    return {GATEWAY: b, route: b}


def steady(det: Detector, traffic: Traffic, t: int, n: int, gateway: bool = False) -> int:
    for _ in range(n):
        b = traffic.bucket()
        t, changes = feed(det, t, gateway_and("api", b) if gateway else {"api": b})
        assert changes == [], (t, changes)
    return t


def kinds(changes: list[Change]) -> set[tuple[str, str, str]]:
    return {(c.event, c.alert.kind, c.alert.series) for c in changes}


@pytest.mark.parametrize("seed", range(5))
def test_steady_noisy_traffic_raises_nothing(seed: int) -> None:
    det = Detector(SETTINGS)
    busy, quiet = Traffic(seed, rate=300), Traffic(seed + 100, rate=40, error_rate=0.05, p95=0.2)
    for t in range(1000):
        a, b = busy.bucket(), quiet.bucket()
        total = Bucket(a.requests + b.requests, a.errors + b.errors, max(a.p95 or 0, b.p95 or 0))
        assert det.observe(t * STEP, {GATEWAY: total, "busy": a, "quiet": b}) == [], t
    assert det.active() == [] and det.recent() == []
    base = det.baseline("busy", "traffic_drop")
    assert base is not None and abs(base - 300) < 30


def test_constant_traffic_has_no_zero_variance_trap() -> None:
    """Exactly the same numbers every bucket: the variance is zero, and the floors keep a
    small wobble from looking infinitely unusual."""
    det = Detector(SETTINGS)
    for t in range(100):
        assert det.observe(t * STEP, {"api": Bucket(100, 0, 0.050)}) == []
    for t, b in enumerate([Bucket(88, 2, 0.055), Bucket(112, 0, 0.045), Bucket(100, 3, 0.052)]):
        assert det.observe((100 + t) * STEP, {"api": b}) == [], b


def test_error_spike_opens_at_once_and_closes_on_recovery() -> None:
    det = Detector(SETTINGS)
    traffic = Traffic(1)
    t = steady(det, traffic, 0, 100, gateway=True)
    b = traffic.bucket()
    t, changes = feed(det, t, gateway_and("api", Bucket(b.requests, b.requests // 3, b.p95)))
    assert kinds(changes) == {
        ("anomaly_detected", "error_rate", "api"),
        ("anomaly_detected", "error_rate", GATEWAY),
    }
    alert = next(c.alert for c in changes if c.alert.series == "api")
    assert alert.ended is None and alert.started == (t - 1) * STEP
    assert alert.value == pytest.approx(1 / 3, abs=0.01)
    assert alert.baseline < 0.03 and alert.z > SETTINGS.z_threshold
    assert "error rate 33" in alert.message and "route api" in alert.message
    assert {a.id for a in det.active()} == {c.alert.id for c in changes}
    # it goes on: the same alerts stay open, no new ones
    for _ in range(5):
        b = traffic.bucket()
        t, changes = feed(det, t, gateway_and("api", Bucket(b.requests, b.requests // 2, b.p95)))
        assert changes == []
    assert alert.value == pytest.approx(0.5, abs=0.01)
    t, changes = feed(det, t, gateway_and("api", traffic.bucket()))
    assert kinds(changes) == {
        ("anomaly_resolved", "error_rate", "api"),
        ("anomaly_resolved", "error_rate", GATEWAY),
    }
    assert alert.ended == (t - 1) * STEP
    assert det.active() == [] and alert in det.recent()


def test_latency_step_is_a_regression() -> None:
    det = Detector(SETTINGS)
    traffic = Traffic(2)
    t = steady(det, traffic, 0, 60)
    traffic.p95 = 0.150
    t, changes = feed(det, t, {"api": traffic.bucket()})
    assert kinds(changes) == {("anomaly_detected", "latency", "api")}
    assert "p95 latency" in changes[0].alert.message
    traffic.p95 = 0.05
    t, changes = feed(det, t, {"api": traffic.bucket()})
    assert kinds(changes) == {("anomaly_resolved", "latency", "api")}


def test_traffic_drop_and_silence() -> None:
    det = Detector(SETTINGS)
    traffic = Traffic(3)
    t = steady(det, traffic, 0, 60)
    traffic.rate = 60
    t, changes = feed(det, t, {"api": traffic.bucket()})
    assert kinds(changes) == {("anomaly_detected", "traffic_drop", "api")}
    assert changes[0].alert.z < -SETTINGS.z_threshold
    traffic.rate = 200
    t, changes = feed(det, t, {"api": traffic.bucket()})
    assert kinds(changes) == {("anomaly_resolved", "traffic_drop", "api")}
    # a route that gets nothing at all is missing from the buckets: still a drop, to zero
    t, changes = feed(det, t, {"other": Bucket(5)})
    assert kinds(changes) == {("anomaly_detected", "traffic_drop", "api")}
    assert changes[0].alert.value == 0


def test_a_fast_upstream_getting_a_few_ms_slower_is_no_regression() -> None:
    det = Detector(SETTINGS)
    traffic = Traffic(9, p95=0.0002)
    t = steady(det, traffic, 0, 60)
    traffic.p95 = 0.003  # 15 times slower, still 3 ms
    for _ in range(3):
        t, changes = feed(det, t, {"api": traffic.bucket()})
        assert changes == []
    # those buckets were normal, so they widened the baseline: a real regression still
    # shows, within two buckets
    traffic.p95 = 0.060
    t, first = feed(det, t, {"api": traffic.bucket()})
    t, second = feed(det, t, {"api": traffic.bucket()})
    assert kinds(first + second) == {("anomaly_detected", "latency", "api")}


def test_a_moderate_anomaly_needs_two_buckets_in_a_row() -> None:
    det = Detector(SETTINGS)
    for t in range(100):
        assert det.observe(t * STEP, {"api": Bucket(400, 0, 0.05)}) == []
    # 7 errors in 400 where there were none: z about 5, under twice the threshold
    odd = Bucket(400, 7, 0.05)
    assert det.observe(100 * STEP, {"api": odd}) == []  # a lone blip
    assert det.observe(101 * STEP, {"api": Bucket(400, 0, 0.05)}) == []
    assert det.observe(102 * STEP, {"api": odd}) == []
    changes = det.observe(103 * STEP, {"api": odd})
    assert kinds(changes) == {("anomaly_detected", "error_rate", "api")}
    assert changes[0].alert.started == 102 * STEP
    assert 4 < changes[0].alert.z < 8


def test_a_surge_is_no_alert() -> None:
    det = Detector(SETTINGS)
    traffic = Traffic(4)
    t = steady(det, traffic, 0, 60)
    traffic.rate = 2000
    for _ in range(3):
        t, changes = feed(det, t, {"api": traffic.bucket()})
        assert changes == []


def test_nothing_before_warmup() -> None:
    det = Detector(Settings(warmup=30, min_requests=20))
    traffic = Traffic(5)
    t = 0
    for _ in range(25):
        t, _changes = feed(det, t, {"api": traffic.bucket()})
    t, changes = feed(det, t, {"api": Bucket(200, 150, 1.0)})
    assert changes == []


def test_a_long_incident_does_not_become_the_baseline() -> None:
    det = Detector(SETTINGS)
    traffic = Traffic(6)
    t = steady(det, traffic, 0, 60, gateway=True)
    before = det.baseline("api", "error_rate")
    assert before is not None and before < 0.03
    opened = []
    for _ in range(300):
        b = traffic.bucket()
        t, changes = feed(det, t, gateway_and("api", Bucket(b.requests, b.requests // 2, b.p95)))
        opened += changes
    assert len(opened) == 2  # the route's and the gateway's, once each
    assert len(det.active()) == 2
    assert det.baseline("api", "error_rate") == before


def test_small_buckets_are_not_judged_for_errors_or_latency() -> None:
    det = Detector(Settings(warmup=10, min_requests=20))
    t = 0
    for _ in range(30):
        t, _changes = feed(det, t, {"api": Bucket(30, 0, 0.01)})
    t, changes = feed(det, t, {"api": Bucket(19, 19, 5.0)})
    assert changes == []
    t, changes = feed(det, t, {"api": Bucket(20, 20, 5.0)})
    assert kinds(changes) == {
        ("anomaly_detected", "error_rate", "api"),
        ("anomaly_detected", "latency", "api"),
    }


def test_a_few_errors_in_a_clean_series_are_noise() -> None:
    det = Detector(SETTINGS)
    for t in range(100):
        assert det.observe(t * STEP, {"api": Bucket(100, 0, 0.02)}) == []
    assert det.observe(100 * STEP, {"api": Bucket(100, 2, 0.02)}) == []
    changes = det.observe(101 * STEP, {"api": Bucket(100, 25, 0.02)})
    assert kinds(changes) == {("anomaly_detected", "error_rate", "api")}


def test_quiet_buckets_teach_but_never_alert() -> None:
    det = Detector(SETTINGS)
    traffic = Traffic(7)
    for t in range(40):
        assert det.observe(t * STEP, {"api": traffic.bucket()}, quiet=True) == []
    assert det.observe(40 * STEP, {"api": Bucket(200, 100, 0.05)}, quiet=True) == []
    # the anomalous bucket was not learned
    base = det.baseline("api", "error_rate")
    assert base is not None and base < 0.03
    changes = det.observe(41 * STEP, {"api": Bucket(200, 100, 0.05)})
    assert kinds(changes) == {("anomaly_detected", "error_rate", "api")}


def test_removed_routes_are_forgotten_and_their_alerts_resolved() -> None:
    det = Detector(SETTINGS)
    traffic = Traffic(8)
    t = steady(det, traffic, 0, 60, gateway=True)
    t, changes = feed(det, t, gateway_and("api", Bucket(0)))
    assert ("anomaly_detected", "traffic_drop", "api") in kinds(changes)
    changes = det.retain({GATEWAY}, at=t * STEP)
    assert kinds(changes) == {("anomaly_resolved", "traffic_drop", "api")}
    assert det.baseline("api", "traffic_drop") is None
    assert [a.series for a in det.active()] == [GATEWAY]


# ---- the service on a real store ----------------------------------------------------------------

T0 = 1_700_000_000_000  # ms, on the grid of any resolution that divides a second


class StoreHolder:
    """What AlertService reads of the analytics service: its store and its callbacks."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.on_ingest: list[Any] = []


def normalized(routes: list[str], **alerts: Any) -> dict[str, Any]:
    settings = {"z_threshold": 4.0, "warmup": 5, "alpha": 0.1, "min_requests": 5}
    settings["webhook"] = None
    settings.update(alerts)
    return {
        "observe": {"analytics": {"resolution": 1.0}, "alerts": settings},
        "routes": [{"name": r} for r in routes],
    }


def rows(bucket: int, route: str, requests: int, errors: int = 0, worker: int = 0) -> list[Row]:
    """One bucket (of 1 s) of a route's traffic, 10 ms each, as one worker hands it over."""
    ok = Row(
        t=T0 + bucket * 1000,
        span=1000,
        route=route,
        consumer="",
        upstream=f"w{worker}",
        status=200,
        requests=requests - errors,
        hist=[(bin_of(0.01), requests - errors)],
    )
    bad = Row(
        t=ok.t,
        span=1000,
        route=route,
        consumer="",
        upstream=f"w{worker}",
        status=500,
        requests=errors,
        errors=errors,
        hist=[(bin_of(0.01), errors)],
    )
    return [ok, bad] if errors else [ok]


@pytest.fixture
def service(tmp_path: Any) -> Iterator[tuple[AlertService, SqliteStore]]:
    store = SqliteStore(tmp_path / "a.db", retention=10**9)
    holder = StoreHolder(store)
    svc = AlertService(holder, normalized(["api", "web"]))
    assert holder.on_ingest == [svc.bucket_completed]
    yield svc, store
    svc.stop()
    store.close()


def end_of(bucket: int) -> float:
    return (T0 + (bucket + 1) * 1000) / 1000


def test_the_service_judges_store_buckets_one_behind(
    service: tuple[AlertService, SqliteStore], capsys: pytest.CaptureFixture[str]
) -> None:
    svc, store = service
    # history from before the master started, with an outage in it: learned (but not the
    # outage), never alerted
    for b in range(20):
        store.ingest(rows(b, "api", 100, errors=60 if b == 15 else 1) + rows(b, "web", 50))
    svc.bucket_completed(end_of(19))
    assert svc.alerts() == []
    assert svc.detector is not None
    assert svc.detector.baseline("api", "error_rate") < 0.05  # type: ignore[operator]
    assert svc._next == T0 + 19 * 1000  # bucket 19 is judged when bucket 20 is complete

    # a worker hands bucket 20 over late, after the master saw bucket 20 complete
    store.ingest(rows(20, "web", 50) + rows(20, "api", 50, worker=0))
    svc.bucket_completed(end_of(20))
    store.ingest(rows(20, "api", 50, worker=1))
    # a stall: three buckets come at once, one with a spike on api, and a route that is
    # not in the config
    for b in (21, 22, 23):
        store.ingest(rows(b, "api", 100, errors=50 if b == 22 else 1) + rows(b, "web", 50))
    store.ingest(rows(22, "unknown", 1000))
    svc.bucket_completed(end_of(23))
    active = svc.alerts()
    assert {(a["kind"], a["series"]) for a in active} == {("error_rate", "api")}, active
    assert active[0]["started"] == (T0 + 22 * 1000) / 1000
    assert svc.detector.baseline("unknown", "traffic_drop") is None
    assert '"event":"anomaly_detected"' in capsys.readouterr().err
    families = {f.name: f for f in svc.metric_families()}
    assert [(s.labels, s.value) for s in families["ferrogate_anomaly_active"].samples] == [
        ({"kind": "error_rate", "series": "api"}, 1.0)
    ]

    # a reload that drops the route resolves its alert and forgets it
    svc.reconfigure(normalized(["web"]))
    assert [a["ended"] is not None for a in svc.alerts()] == [True]
    assert svc.detector.baseline("api", "error_rate") is None
    assert svc.detector.baseline("web", "traffic_drop") is not None  # kept over the reload
    # alerts turned off: nothing judged, nothing exported
    svc.reconfigure({"observe": {"analytics": {"resolution": 1.0}, "alerts": None}})
    svc.bucket_completed(end_of(24))
    assert svc.alerts() == [] and svc.metric_families() == []


# ---- the webhook -------------------------------------------------------------------------------


class Receiver:
    """A real HTTP server that records JSON POSTs; the first ``fail`` answers are 503."""

    def __init__(self, fail: int = 0) -> None:
        self.posts: list[dict[str, Any]] = []
        self.attempts = 0
        self.fail = fail
        self.got = threading.Condition()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with owner.got:
                    owner.attempts += 1
                    failing = owner.attempts <= owner.fail
                    if not failing:
                        owner.posts.append(json.loads(body))
                    owner.got.notify_all()
                self.send_response(503 if failing else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        with self.got:
            assert self.got.wait_for(lambda: len(self.posts) >= n, timeout), self.posts
            return list(self.posts)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_webhook_retries_until_the_receiver_takes_it(receiver: Receiver) -> None:
    receiver.fail = 2
    hook = Webhook(receiver.url)
    try:
        hook.send({"event": "anomaly_detected", "alert": {"id": "a"}})
        hook.send({"event": "anomaly_resolved", "alert": {"id": "a"}})
        posts = receiver.wait_for(2)
    finally:
        hook.stop(wait=5)
    assert [p["event"] for p in posts] == ["anomaly_detected", "anomaly_resolved"]
    assert receiver.attempts == 4


def test_webhook_gives_up_and_says_so(
    receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    receiver.fail = 100
    hook = Webhook(receiver.url)
    hook.BACKOFF = 0.01
    try:
        hook.send({"event": "anomaly_detected", "alert": {"id": "x"}})
        poll(
            lambda: "alert_webhook_failed" in capsys.readouterr().err,
            timeout=10,
            message="no alert_webhook_failed event",
        )
    finally:
        hook.stop(wait=5)
    assert receiver.attempts == Webhook.ATTEMPTS


# ---- a real gateway ------------------------------------------------------------------------------

TOKEN = "alerts-test-token"
RESOLUTION = 0.25
WARMUP = 8


def alerts_config(up: Upstream, status_port: int, webhook: str) -> dict[str, Any]:
    return {
        "status": {"listen": f"127.0.0.1:{status_port}", "admin_token": TOKEN},
        "analytics": {"resolution": f"{int(RESOLUTION * 1000)}ms"},
        # a higher threshold than the default: this machine's scheduling noise is not the
        # subject here (the synthetic series above test the defaults)
        "alerts": {"warmup": WARMUP, "min_requests": 5, "z_threshold": 6, "webhook": webhook},
        "upstreams": {"orders": {"targets": [up.address]}},
        "routes": [{"name": "orders", "paths": ["/orders"], "upstream": "orders"}],
    }


def gauge(status: str, kind: str, series: str) -> float | None:
    text = httpx.get(f"{status}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "ferrogate_anomaly_active":
            for sample in family.samples:
                if sample.labels == {"kind": kind, "series": series}:
                    return sample.value
    return None


def log_events(gw: Gateway, event: str) -> list[dict[str, Any]]:
    out = []
    for line in gw.stderr_text().splitlines():
        if f'"{event}"' in line:
            record = json.loads(line)
            if record.get("event") == event:
                out.append(record)
    return out


def test_an_upstream_that_starts_failing_is_flagged_everywhere(
    gateway: GatewayFactory, upstream: Upstream, receiver: Receiver
) -> None:
    status_port = free_port()
    status = f"http://127.0.0.1:{status_port}"
    gw = gateway(alerts_config(upstream, status_port, receiver.url), workers=2)
    api = httpx.Client(base_url=status, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)

    def alerts() -> dict[str, Any]:
        r = api.get("/api/alerts")
        assert r.status_code == 200, r.text
        return dict(r.json())

    assert httpx.get(f"{status}/api/alerts", timeout=5).status_code == 401
    traffic = SteadyTraffic(gw, "/orders")
    try:
        # steady traffic, well past the warmup: nothing
        steady_until = traffic.started + (WARMUP + 16) * RESOLUTION
        poll(
            lambda: (alerts()["judged_until"] or 0) >= steady_until,
            timeout=30,
            message="the alerts never judged the steady buckets",
        )
        quiet = alerts()
        assert quiet["enabled"] is True
        assert quiet["alerts"] == [], quiet
        assert log_events(gw, "anomaly_detected") == []
        assert receiver.posts == []
        assert traffic.statuses.keys() == {200}

        upstream.status = 500
        failing_since = time.time()
        active = poll(
            lambda: [
                a
                for a in alerts()["alerts"]
                if a["series"] == "orders" and a["kind"] == "error_rate" and a["ended"] is None
            ],
            timeout=10,
            message=f"no error_rate alert for the route: {alerts()}",
        )
        flagged_after = time.time() - failing_since
        alert = active[0]
        assert alert["value"] > 0.9 and alert["baseline"] < 0.05, alert
        assert alert["z"] >= 6 and alert["started"] >= failing_since - 2 * RESOLUTION
        assert "error rate" in alert["message"] and "route orders" in alert["message"]
        # judged one bucket after the one that filled up, read after the store's lag
        assert flagged_after < 10 * RESOLUTION + 2, flagged_after

        detected = poll(
            lambda: [e for e in log_events(gw, "anomaly_detected") if e["series"] == "orders"],
            timeout=5,
            message="no anomaly_detected event in the log",
        )
        assert detected[0]["kind"] == "error_rate" and detected[0]["id"] == alert["id"]
        post = poll(
            lambda: [
                p
                for p in receiver.posts
                if p["event"] == "anomaly_detected" and p["alert"]["id"] == alert["id"]
            ],
            timeout=10,
            message=f"the webhook got no anomaly_detected: {receiver.posts}",
        )[0]
        assert post["alert"]["kind"] == "error_rate" and "route orders" in post["text"]
        assert gauge(status, "error_rate", "orders") == 1.0

        upstream.status = None  # recovery
        poll(
            lambda: any(a["id"] == alert["id"] and a["ended"] for a in alerts()["alerts"]),
            timeout=10,
            message=f"the alert did not close: {alerts()}",
        )
        resolved = poll(
            lambda: [e for e in log_events(gw, "anomaly_resolved") if e["id"] == alert["id"]],
            timeout=5,
            message="no anomaly_resolved event in the log",
        )
        assert resolved[0]["ended"] >= alert["started"]
        poll(
            lambda: any(
                p["event"] == "anomaly_resolved" and p["alert"]["id"] == alert["id"]
                for p in receiver.posts
            ),
            timeout=10,
            message=f"the webhook got no anomaly_resolved: {receiver.posts}",
        )
        assert gauge(status, "error_rate", "orders") == 0.0
    finally:
        traffic.stop()
        api.close()
    # the failure was about errors, and only errors: nothing else was flagged
    seen = {(a["kind"], a["series"]) for a in log_events(gw, "anomaly_detected")}
    assert seen <= {("error_rate", "orders"), ("error_rate", GATEWAY)}, seen
