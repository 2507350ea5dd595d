"""Anomaly alerts: error-rate spikes, latency regressions and traffic drops, judged against
a baseline each series learns from the analytics store.

A series is the whole gateway (``"*"``) or one route. Per series and per bucket of the
store three values are judged: the request count, the error rate (errors as the store
counts them: 5xx and the gateway's own error answers) and the p95 latency. Each keeps an
EWMA mean and variance; a bucket's z-score against them says how unusual it is. The EWMA
follows slow drifts (daily cycles, growth), so no seasonal model is needed. Only normal
buckets teach the baseline, so an incident does not become the new normal while it lasts.
A bucket beyond the threshold opens an alert when the one before it was beyond it too, or
at once when it is twice as far out: a lone blip (a scheduling hiccup, a short burst of
retries) is no incident. The first normal bucket closes it.

Steady traffic must stay quiet, so each value is judged on a scale where its noise is
roughly normal, with a floor under the standard deviation (a constant series has none):
counts as they are, at least Poisson-wide (sd >= sqrt(mean)); error rates on the
arcsine-square-root scale, where a binomial share of n requests has sd 1/(2 sqrt n) whatever
the rate (a few errors in a clean series are noise, and small counts' long right tail does
not read as a spike); latencies on a log scale (a regression is a ratio), at least 5% wide,
and a regression must also be slower by z_threshold x 5 ms.

:class:`Detector` is the pure part (buckets in, opened and resolved alerts out).
:class:`AlertService` feeds it from the store after each ingest and surfaces the alerts:
``anomaly_detected`` / ``anomaly_resolved`` log events, ``GET /api/alerts``, the
``ferrogate_anomaly_active`` gauge on /metrics and an optional webhook.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import queue
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ferrogate.analytics_store import Query
from ferrogate.events import emit
from ferrogate.status_server import Reply, Request, Route, json_reply

__all__ = [
    "GATEWAY",
    "Alert",
    "AlertService",
    "Baseline",
    "Bucket",
    "Change",
    "Detector",
    "Settings",
    "Webhook",
]

Kind = Literal["error_rate", "latency", "traffic_drop"]
KINDS: tuple[Kind, ...] = ("traffic_drop", "error_rate", "latency")
GATEWAY = "*"
"""The series of the whole gateway (every route, and requests that matched none)."""

RELATIVE_FLOOR = 0.05
"""A latency is never taken to vary by less than this share of its level."""
LATENCY_FLOOR = 0.005
"""Nor by less than this many seconds: a regression is at least z_threshold times this much
slower (20 ms at the default threshold); a few milliseconds' wobble of a fast upstream is
no incident."""
RECENT = 100
"""Resolved alerts kept for /api/alerts and the gauge."""


@dataclass(frozen=True, slots=True)
class Settings:
    z_threshold: float = 4.0
    warmup: int = 30
    alpha: float = 0.1
    min_requests: int = 20

    @classmethod
    def from_normalized(cls, alerts: Mapping[str, Any]) -> Settings:
        return cls(
            z_threshold=float(alerts["z_threshold"]),
            warmup=int(alerts["warmup"]),
            alpha=float(alerts["alpha"]),
            min_requests=int(alerts["min_requests"]),
        )


@dataclass(frozen=True, slots=True)
class Bucket:
    """One series' numbers for one bucket of time."""

    requests: int
    errors: int = 0
    p95: float | None = None
    """Seconds; None when the bucket had no request."""


class Baseline:
    """Exponentially weighted mean and variance of a value (incremental form)."""

    __slots__ = ("mean", "n", "var")

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 0.0
        self.n = 0

    def learn(self, x: float, alpha: float) -> None:
        self.n += 1
        # The first buckets take a plain running mean (weight 1/n) until 1/n falls under
        # alpha; with alpha alone the very first bucket would weigh on the mean for ages.
        a = max(alpha, 1.0 / self.n)
        d = x - self.mean
        self.mean += a * d
        self.var = (1.0 - a) * (self.var + a * d * d)


@dataclass(slots=True)
class Alert:
    id: str
    kind: Kind
    series: str
    started: float
    """Start of the first anomalous bucket (Unix seconds)."""
    value: float
    """The latest anomalous bucket's value (requests, error share, or seconds)."""
    baseline: float
    """The usual value, in the same unit."""
    z: float
    """How many standard deviations from the baseline, on the value's judging scale."""
    message: str
    ended: float | None = None
    """Start of the first normal bucket after it; None while the alert is active."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("value", "baseline", "z"):
            out[k] = round(out[k], 6)
        return out


@dataclass(frozen=True, slots=True)
class Change:
    event: Literal["anomaly_detected", "anomaly_resolved"]
    alert: Alert


@dataclass(slots=True)
class _Track:
    """One value of one series: its baseline and its open alert, if any."""

    baseline: Baseline = field(default_factory=Baseline)
    open: Alert | None = None
    suspect: float | None = None
    """Start of the last bucket, when it was beyond the threshold but opened nothing."""


def _scale(kind: Kind, value: float) -> float:
    """``value`` on the scale its baseline is kept in (see the module doc)."""
    if kind == "error_rate":
        return math.asin(math.sqrt(min(max(value, 0.0), 1.0)))
    if kind == "latency":
        return math.log(max(value, 1e-6))
    return value


def _unscale(kind: Kind, y: float) -> float:
    if kind == "error_rate":
        return math.sin(y) ** 2
    if kind == "latency":
        return math.exp(y)
    return y


def _describe(kind: Kind, series: str, value: float, mean: float, z: float) -> str:
    where = "the gateway" if series == GATEWAY else f"route {series}"
    if kind == "error_rate":
        what = f"error rate {value:.1%} on {where} (baseline {mean:.1%}"
    elif kind == "latency":
        what = f"p95 latency {value * 1000:.1f} ms on {where} (baseline {mean * 1000:.1f} ms"
    else:
        what = f"{value:.0f} requests per bucket on {where} (baseline {mean:.1f}"
    return f"{what}, z={z:+.1f})"


class Detector:
    """Judges buckets series by series; returns the alerts each bucket opened or resolved.

    Pure: no clock, no I/O. A series starts at its first bucket with requests; after that a
    bucket it is missing from counts as one without requests (a traffic drop to zero is the
    loudest drop of all).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._tracks: dict[tuple[str, Kind], _Track] = {}
        self._series: set[str] = set()
        self._recent: deque[Alert] = deque(maxlen=RECENT)

    # -- reading -------------------------------------------------------------------------------
    def active(self) -> list[Alert]:
        return [t.open for t in self._tracks.values() if t.open is not None]

    def recent(self) -> list[Alert]:
        """Resolved alerts, newest first."""
        return list(reversed(self._recent))

    def baseline(self, series: str, kind: Kind) -> float | None:
        """The usual value of ``kind`` for ``series``, None before its first bucket."""
        track = self._tracks.get((series, kind))
        return _unscale(kind, track.baseline.mean) if track else None

    # -- feeding -------------------------------------------------------------------------------
    def observe(
        self, start: float, buckets: Mapping[str, Bucket], *, quiet: bool = False
    ) -> list[Change]:
        """Judge the bucket that starts at ``start``. ``quiet``: learn from it, alert on
        nothing (history read before the detector was running)."""
        changes: list[Change] = []
        for series in sorted(self._series | {s for s, b in buckets.items() if b.requests > 0}):
            self._series.add(series)
            b = buckets.get(series) or Bucket(0)
            for kind in KINDS:
                self._judge(start, series, kind, b, quiet, changes)
        return changes

    def retain(self, series: Collection[str], at: float) -> list[Change]:
        """Forget every series not in ``series`` (removed routes); their alerts resolve."""
        changes: list[Change] = []
        for key in [k for k in self._tracks if k[0] not in series]:
            track = self._tracks.pop(key)
            if track.open is not None:
                changes.append(self._close(track, at))
        self._series &= set(series)
        return changes

    def _judge(
        self, start: float, series: str, kind: Kind, b: Bucket, quiet: bool, out: list[Change]
    ) -> None:
        s = self.settings
        if kind == "traffic_drop":
            value: float = b.requests
        elif b.requests < max(s.min_requests, 1):
            return  # too few requests to say anything about their errors or latency
        elif kind == "error_rate":
            value = b.errors / b.requests
        elif b.p95 is None:
            return
        else:
            value = b.p95
        track = self._tracks.setdefault((series, kind), _Track())
        base = track.baseline
        y = _scale(kind, value)
        z = (y - base.mean) / self._spread(kind, base, b.requests)
        if kind == "traffic_drop":
            z = min(z, 0.0)  # a surge is not an incident (it still teaches the baseline)
        elif kind == "latency":
            # and on the linear scale, at least LATENCY_FLOOR wide: 0.2 ms to 2 ms is ten
            # times slower, but no incident
            z = min(z, (value - _unscale(kind, base.mean)) / LATENCY_FLOOR)
        anomalous = base.n >= s.warmup and (
            z <= -s.z_threshold if kind == "traffic_drop" else z >= s.z_threshold
        )
        if not anomalous:
            base.learn(y, s.alpha)
            track.suspect = None
            if track.open is not None:
                out.append(self._close(track, start))
            return
        usual = _unscale(kind, base.mean)
        if track.open is not None:
            track.open.value, track.open.z = value, z
            track.open.message = _describe(kind, series, value, usual, z)
        elif quiet:
            pass
        elif track.suspect is None and abs(z) < 2 * s.z_threshold:
            track.suspect = start
        else:
            started = start if track.suspect is None else track.suspect
            track.suspect = None
            track.open = Alert(
                id=f"{kind}:{series}:{round(started * 1000)}",
                kind=kind,
                series=series,
                started=started,
                value=value,
                baseline=usual,
                z=z,
                message=_describe(kind, series, value, usual, z),
            )
            out.append(Change("anomaly_detected", track.open))

    @staticmethod
    def _spread(kind: Kind, base: Baseline, requests: int) -> float:
        sd = math.sqrt(base.var)
        if kind == "traffic_drop":
            floor = math.sqrt(max(base.mean, 1.0))
        elif kind == "error_rate":
            floor = 0.5 / math.sqrt(requests)
        else:
            floor = math.log1p(RELATIVE_FLOOR)
        return max(sd, floor, 1e-9)

    def _close(self, track: _Track, at: float) -> Change:
        alert = track.open
        assert alert is not None
        alert.ended = at
        track.open = None
        self._recent.append(alert)
        return Change("anomaly_resolved", alert)


class Webhook:
    """POSTs each change as JSON from a thread of its own, with a timeout and a few retries;
    a full queue drops (and logs) rather than waits, so ingestion never blocks on it."""

    TIMEOUT = 5.0
    ATTEMPTS = 4
    BACKOFF = 0.5

    def __init__(self, url: str) -> None:
        self.url = url
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=1000)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alerts-webhook", daemon=True)
        self._thread.start()

    def send(self, payload: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            emit("warning", "alert_webhook_dropped", url=self.url, reason="queue full")

    def stop(self, wait: float = 0.0) -> None:
        """No more retries; what is queued is tried once. ``wait``: seconds to give it."""
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        if wait:
            self._thread.join(timeout=wait)

    def _run(self) -> None:
        while True:
            payload = self._queue.get()
            if payload is None:
                return
            self._post(payload)

    def _post(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        error = ""
        for attempt in range(self.ATTEMPTS):
            if attempt and self._stopping.wait(self.BACKOFF * 2 ** (attempt - 1)):
                break
            req = urllib.request.Request(
                self.url,
                data=data,
                method="POST",
                headers={"Content-Type": "application/json", "User-Agent": "ferrogate-alerts"},
            )
            try:
                with urllib.request.urlopen(req, timeout=self.TIMEOUT) as resp:
                    resp.read()
                return
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code}"
                if 400 <= e.code < 500 and e.code not in (408, 429):
                    break  # the receiver refuses this payload; sending it again will not help
            except (OSError, ValueError) as e:
                error = repr(e)
        emit(
            "warning",
            "alert_webhook_failed",
            url=self.url,
            alert=payload["alert"]["id"],
            error=error,
        )


class AlertService:
    """The master's alerting component: judges each bucket the analytics store completes.

    Off (``/api/alerts`` answers an empty list) unless the config has ``alerts``.
    """

    MAX_CATCH_UP = 500
    """Buckets judged at most in one go after a stall; older ones are skipped."""
    HISTORY = 3
    """On start, this many times ``warmup`` buckets of history are read (quietly): past the
    warmup, an incident in them is not learned as normal."""

    def __init__(self, analytics: Any, normalized: dict[str, Any], metrics: Any = None) -> None:
        self.analytics = analytics
        self._lock = threading.Lock()
        """Guards the detector and what the surfaces read."""
        self._judging = threading.Lock()
        """One judging pass at a time (ingest callbacks may come from more than one thread)."""
        self.detector: Detector | None = None
        self.webhook: Webhook | None = None
        self.resolution = 10.0
        self.routes_known: list[str] = []
        self._next: int | None = None
        """Start of the next bucket to judge (Unix milliseconds)."""
        self._opened = dict.fromkeys(KINDS, 0)
        self.reconfigure(normalized)
        hooks = getattr(analytics, "on_ingest", None)
        if hooks is not None:
            hooks.append(self.bucket_completed)
        add_source = getattr(metrics, "add_source", None)
        if add_source is not None:
            add_source(self.metric_families)

    # -- component -----------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        return [Route("/api/alerts", self._list)]

    def reconfigure(self, normalized: dict[str, Any]) -> None:
        observe = normalized.get("observe") or {}
        settings = observe.get("alerts")
        analytics = observe.get("analytics")
        routes = [r["name"] for r in normalized.get("routes", [])]
        url = settings.get("webhook") if settings else None
        changes: list[Change] = []
        retired: Webhook | None = None
        with self._lock:
            self.routes_known = routes
            if settings is None or analytics is None:
                self.detector, self._next = None, None
            else:
                parsed = Settings.from_normalized(settings)
                resolution = float(analytics["resolution"])
                if self.detector is None or resolution != self.resolution:
                    # counts per bucket mean something else at another resolution
                    self.detector, self._next = Detector(parsed), None
                else:
                    # baselines carry over a reload; only the judging changes
                    self.detector.settings = parsed
                    changes = self.detector.retain({GATEWAY, *routes}, time.time())
                self.resolution = resolution
            if (self.webhook.url if self.webhook else None) != url:
                retired = self.webhook
                self.webhook = Webhook(url) if url else None
        if retired is not None:
            retired.stop()
        self._publish(changes)

    def worker_exited(self, worker_id: int) -> None:
        pass

    def stop(self) -> None:
        with self._lock:
            hook, self.webhook = self.webhook, None
        if hook is not None:
            hook.stop(wait=2.0)

    # -- judging -------------------------------------------------------------------------------
    def bucket_completed(self, end: float) -> None:
        """The store holds every bucket ending at or before ``end`` (an ingest callback).

        Judges the buckets completed since the last call, one bucket behind: a worker that
        hands its counts over late is still counted, not read as a traffic drop. The first
        call also reads some history (``HISTORY``), quietly, so a restarted master need not
        learn everything again.
        """
        with self._judging:
            with self._lock:
                if self.detector is None:
                    return
                res = round(self.resolution * 1000)
                warmup, next_start = self.detector.settings.warmup, self._next
            # the last bucket to judge: the one before the newest complete one
            last = (round(end * 1000) // res - 2) * res
            history = min(self.HISTORY * warmup, self.MAX_CATCH_UP)
            start = last - res * (history if next_start is None else self.MAX_CATCH_UP)
            if next_start is not None:
                start = max(start, next_start)
            while start <= last:
                try:
                    buckets = self._read_bucket(start, start + res)
                except Exception as e:  # a failing query must not stop the store's ingest
                    emit("error", "alerts_query_failed", error=repr(e))
                    return
                if buckets is None:
                    return  # the store is not there (yet, or any more)
                with self._lock:
                    if self.detector is None or round(self.resolution * 1000) != res:
                        return
                    quiet = next_start is None and start < last
                    changes = self.detector.observe(start / 1000, buckets, quiet=quiet)
                    start += res
                    self._next = start
                self._publish(changes)

    def _read_bucket(self, start_ms: int, end_ms: int) -> dict[str, Bucket] | None:
        """The gateway's and each configured route's numbers for one bucket."""
        store = self.analytics.store
        if store is None:
            return None
        # Half a millisecond inside the bucket's bounds: the store rounds them to its grid.
        q = Query((start_ms + 0.5) / 1000, (end_ms - 0.5) / 1000, (end_ms - start_ms) / 1000)
        known = set(self.routes_known)
        total = store.summary(q)
        out = {GATEWAY: Bucket(int(total["requests"]), int(total["errors"]), total["p95"])}
        for row in store.top(q, "route", len(known) + 1):
            if row["key"] in known:
                out[row["key"]] = Bucket(int(row["requests"]), int(row["errors"]), row["p95"])
        return out

    def _publish(self, changes: list[Change]) -> None:
        if not changes:
            return
        with self._lock:
            hook = self.webhook
            for c in changes:
                if c.event == "anomaly_detected":
                    self._opened[c.alert.kind] += 1
        for c in changes:
            alert = c.alert.to_json()
            level = "warning" if c.event == "anomaly_detected" else "info"
            emit(level, c.event, **alert)
            if hook is not None:
                hook.send({"event": c.event, "text": alert["message"], "alert": alert})

    # -- surfaces ------------------------------------------------------------------------------
    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (newest first), then recently resolved ones."""
        with self._lock:
            if self.detector is None:
                return []
            active = sorted(self.detector.active(), key=lambda a: -a.started)
            return [a.to_json() for a in itertools.chain(active, self.detector.recent())]

    def _list(self, req: Request) -> Reply:
        with self._lock:
            enabled = self.detector is not None
            until = None if self._next is None else self._next / 1000
        return json_reply({"enabled": enabled, "judged_until": until, "alerts": self.alerts()})

    def metric_families(self) -> list[Metric]:
        """``ferrogate_anomaly_active`` and ``ferrogate_anomalies_total``; none when off."""
        with self._lock:
            if self.detector is None:
                return []
            state: dict[tuple[str, str], float] = {}
            for a in self.detector.recent():
                state.setdefault((a.kind, a.series), 0.0)
            for a in self.detector.active():
                state[(a.kind, a.series)] = 1.0
            opened_by_kind = dict(self._opened)
        active = GaugeMetricFamily(
            "ferrogate_anomaly_active",
            "1 while an anomaly alert is open for the series (a route, or * for the gateway).",
            labels=["kind", "series"],
        )
        for (kind, series), v in sorted(state.items()):
            active.add_metric([kind, series], v)
        opened = CounterMetricFamily(
            "ferrogate_anomalies",
            "Anomaly alerts opened since the master started.",
            labels=["kind"],
        )
        for kind, n in opened_by_kind.items():
            opened.add_metric([kind], n)
        return [active, opened]
