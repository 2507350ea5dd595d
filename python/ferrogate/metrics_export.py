"""Prometheus exposition of the whole gateway: every worker's snapshot summed.

Each worker counts in its own memory and rewrites a cumulative snapshot beside the runtime
file every ``metrics.publish_interval`` (``rust/engine/src/metrics.rs``: JSON with ``pid``,
``worker``, ``buckets``, per-route ``requests`` / ``duration`` / ``upstream`` / bytes /
``rate_limited`` / ``errors``, ``connections``, ``targets``, ``access_log_dropped``). The
plugin host writes per-plugin timings beside it (``plugin_host.publish_stats``). On each
scrape of ``/metrics`` the master reads them all and renders their sum with
``prometheus_client``.

Counters never go back: when a worker exits, its last snapshot is folded into a retired
total (and its files removed) before its replacement, which starts from zero, publishes.
Gauges (connections, target health, breakers) come from live workers only.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from ferrogate.events import emit
from ferrogate.runtime_files import (
    metrics_snapshot_files,
    remove_quietly,
    worker_plugin_stats_files,
)
from ferrogate.status_server import Reply, Request, Route, error_reply

__all__ = ["MetricsExport", "Source", "rebucket"]

Source = Callable[[], Iterable[Metric]]
"""Something else to export: called on every scrape, returns metric families."""

_PLUGIN_FIELDS = ("calls", "total_ns", "errors", "over_budget")
_BREAKER_STATES = ("closed", "open", "half_open")


def rebucket(counts: list[float], old: tuple[float, ...], new: tuple[float, ...]) -> list[float]:
    """Per-bucket ``counts`` over bounds ``old`` (the last above every bound) moved to bounds
    ``new``: a new bucket gets what the old buckets up to its bound held, never more. The
    same rule as ``Histogram::rebucket`` in ``metrics.rs``, so that a worker that moved its
    histograms after a reload and the master that moves an older snapshot agree."""
    if old == new:
        return list(counts)
    cumulative = []
    running = 0.0
    for c in counts[: len(old)]:
        running += c
        cumulative.append(running)
    out = []
    previous = 0.0
    j = 0
    for bound in new:
        while j < len(old) and old[j] <= bound:
            j += 1
        at = cumulative[j - 1] if j else 0.0
        out.append(at - previous)
        previous = at
    out.append(sum(counts) - previous)
    return out


@dataclass
class _Histogram:
    counts: list[float]
    sum: float = 0.0

    def add(self, counts: list[float], total: float) -> None:
        for i, c in enumerate(counts):
            self.counts[i] += c
        self.sum += total


@dataclass
class _Totals:
    """Counters and histograms summed over snapshots, histograms over ``bounds``."""

    bounds: tuple[float, ...]
    requests: dict[tuple[str, str, str, str | None], float] = field(default_factory=dict)
    duration: dict[str, _Histogram] = field(default_factory=dict)
    upstream: dict[str, _Histogram] = field(default_factory=dict)
    request_bytes: dict[str, float] = field(default_factory=dict)
    response_bytes: dict[str, float] = field(default_factory=dict)
    rate_limited: dict[str, float] = field(default_factory=dict)
    errors: dict[tuple[str, str], float] = field(default_factory=dict)
    access_log_dropped: float = 0.0
    # (plugin, phase) -> calls, total_ns, errors, over_budget
    plugins: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def add_totals(self, other: _Totals) -> None:
        """Add ``other`` (histograms over the same bounds)."""
        for key, n in other.requests.items():
            self.requests[key] = self.requests.get(key, 0.0) + n
        for mine, theirs in ((self.duration, other.duration), (self.upstream, other.upstream)):
            for route, h in theirs.items():
                self._histogram(mine, route).add(h.counts, h.sum)
        for mine_c, theirs_c in (
            (self.request_bytes, other.request_bytes),
            (self.response_bytes, other.response_bytes),
            (self.rate_limited, other.rate_limited),
        ):
            for route, n in theirs_c.items():
                mine_c[route] = mine_c.get(route, 0.0) + n
        for key_e, n in other.errors.items():
            self.errors[key_e] = self.errors.get(key_e, 0.0) + n
        self.access_log_dropped += other.access_log_dropped
        for key_p, values in other.plugins.items():
            self.add_plugin(key_p, values)

    def _histogram(self, table: dict[str, _Histogram], route: str) -> _Histogram:
        h = table.get(route)
        if h is None:
            h = table[route] = _Histogram([0.0] * (len(self.bounds) + 1))
        return h

    def add_snapshot(self, snap: dict[str, Any]) -> None:
        bounds = tuple(float(b) for b in snap.get("buckets", ()))
        for route, r in snap.get("routes", {}).items():
            for method, status_class, consumer, n in r.get("requests", ()):
                key = (route, method, status_class, consumer)
                self.requests[key] = self.requests.get(key, 0.0) + n
            for table, name in ((self.duration, "duration"), (self.upstream, "upstream")):
                if name in r:
                    counts, total = r[name]
                    self._histogram(table, route).add(rebucket(counts, bounds, self.bounds), total)
            for table_c, name in (
                (self.request_bytes, "request_bytes"),
                (self.response_bytes, "response_bytes"),
                (self.rate_limited, "rate_limited"),
            ):
                table_c[route] = table_c.get(route, 0.0) + r.get(name, 0)
            for code, n in r.get("errors", {}).items():
                self.errors[(route, code)] = self.errors.get((route, code), 0.0) + n
        self.access_log_dropped += snap.get("access_log_dropped", 0)

    def add_plugin(self, key: tuple[str, str], values: list[float]) -> None:
        total = self.plugins.setdefault(key, [0.0] * len(_PLUGIN_FIELDS))
        for i, v in enumerate(values):
            total[i] += v

    def move_to(self, bounds: tuple[float, ...]) -> None:
        """Re-express the histograms over other bucket bounds."""
        for table in (self.duration, self.upstream):
            for h in table.values():
                h.counts = rebucket(h.counts, self.bounds, bounds)
        self.bounds = bounds


def _plugin_rows(record: dict[str, Any]) -> dict[tuple[str, str, str], list[float]]:
    """(route, plugin, phase) -> counters, from a plugin host's stats file."""
    rows = {}
    for route, plugins in record.get("routes", {}).items():
        for plugin, phases in plugins.items():
            for phase, counts in phases.items():
                rows[(route, plugin, phase)] = [float(counts.get(f, 0)) for f in _PLUGIN_FIELDS]
    return rows


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None  # gone meanwhile (the worker exited), or not one of ours
    return value if isinstance(value, dict) else None


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Collector(Collector):
    def __init__(self, export: MetricsExport) -> None:
        self.export = export

    def collect(self) -> Iterator[Metric]:
        yield from self.export.families()


class MetricsExport:
    def __init__(self, runtime: Path, normalized: dict[str, Any]) -> None:
        self.runtime = runtime
        self._lock = threading.Lock()
        self._settings: dict[str, Any] | None = normalized["observe"]["metrics"]
        self._retired = _Totals(self._bounds())
        # Per worker id: the pid and plugin counters last read from its stats file, so
        # that counters of a route a reload removed are kept, not lost.
        self._plugins_seen: dict[int, tuple[int, dict[tuple[str, str, str], list[float]]]] = {}
        self._restarts = 0
        self._reloads = {"ok": 0, "failed": 0}
        self._sources: list[Source] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def _bounds(self) -> tuple[float, ...]:
        if self._settings is None:
            return ()
        return tuple(float(b) for b in self._settings["latency_buckets"])

    # --- the status listener's side ----------------------------------------------------

    def routes(self) -> list[Route]:
        return [Route("/metrics", self._serve, auth=False)]

    def _serve(self, req: Request) -> Reply:
        if self._settings is None:
            return error_reply(404, "metrics_off", "metrics are turned off (metrics.enabled)")
        return Reply(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)

    def add_source(self, source: Source) -> None:
        """Export what ``source()`` returns on every scrape, beside the gateway's metrics."""
        with self._lock:
            self._sources.append(source)

    # --- the master's side -------------------------------------------------------------

    def reconfigure(self, normalized: dict[str, Any]) -> None:
        with self._lock:
            self._settings = normalized["observe"]["metrics"]
            bounds = self._bounds()
            if bounds and bounds != self._retired.bounds:
                self._retired.move_to(bounds)

    def worker_exited(self, worker_id: int) -> None:
        """Keep what worker ``worker_id`` counted: its replacement starts from zero."""
        if worker_id < 0:
            return
        with self._lock:
            for path in metrics_snapshot_files(self.runtime):
                snap = _read_json(path)
                # A file written by a live process belongs to another worker of that id
                # (one retired by a resize may still be draining beside its successor).
                if snap is None or snap.get("worker") != worker_id or _alive(snap.get("pid")):
                    continue
                self._retired.add_snapshot(snap)
                remove_quietly(path)
            seen = self._plugins_seen.get(worker_id)
            rows = {}
            if seen is not None and not _alive(seen[0]):
                del self._plugins_seen[worker_id]
                rows = seen[1]
            for path in worker_plugin_stats_files(self.runtime):
                record = _read_json(path)
                if record is None or record.get("worker") != worker_id:
                    continue
                if _alive(record.get("pid")):
                    continue
                # The file is at least as recent as what a scrape saw.
                rows = _plugin_rows(record)
                remove_quietly(path)
            for (_, plugin, phase), values in rows.items():
                self._retired.add_plugin((plugin, phase), values)

    def note_worker_restart(self) -> None:
        """A worker died and is being replaced (a resize retiring one is not a restart)."""
        with self._lock:
            self._restarts += 1

    def note_reload(self, ok: bool) -> None:
        with self._lock:
            self._reloads["ok" if ok else "failed"] += 1

    def stop(self) -> None:
        pass

    # --- the exposition ----------------------------------------------------------------

    def _read_plugins(self) -> list[dict[tuple[str, str, str], list[float]]]:
        """Every live worker's plugin counters; those that vanished from a file since the
        last read are moved to the retired total."""
        found = []
        for path in worker_plugin_stats_files(self.runtime):
            record = _read_json(path)
            if record is None or not isinstance(record.get("worker"), int):
                continue
            worker, pid = record["worker"], int(record.get("pid") or 0)
            rows = _plugin_rows(record)
            seen = self._plugins_seen.get(worker)
            if seen is not None:
                # Counters that vanished from a live worker's file (a reload removed the
                # route, or the process is a new one) are kept as retired.
                old_pid, old_rows = seen
                for key, values in old_rows.items():
                    if old_pid != pid or key not in rows:
                        self._retired.add_plugin((key[1], key[2]), values)
            self._plugins_seen[worker] = (pid, rows)
            found.append(rows)
        return found

    def _gather(
        self,
    ) -> tuple[_Totals, list[dict[str, Any]], int, dict[str, int], list[Source]]:
        with self._lock:
            plugins = self._read_plugins()
            totals = _Totals(self._retired.bounds)
            totals.add_totals(self._retired)
            for rows in plugins:
                for (_, plugin, phase), values in rows.items():
                    totals.add_plugin((plugin, phase), values)
            live = []
            for path in metrics_snapshot_files(self.runtime):
                snap = _read_json(path)
                if snap is not None:
                    totals.add_snapshot(snap)
                    live.append(snap)
            return totals, live, self._restarts, dict(self._reloads), list(self._sources)

    def families(self) -> Iterator[Metric]:
        totals, live, restarts, reloads, sources = self._gather()
        yield from _request_families(totals)
        yield from _gauge_families(live)
        yield from _plugin_families(totals)
        r = CounterMetricFamily(
            "ferrogate_worker_restarts",
            "Worker processes that died and were replaced by the master.",
        )
        r.add_metric([], restarts)
        yield r
        c = CounterMetricFamily(
            "ferrogate_config_reloads",
            "Config reloads the master attempted, by result (ok, failed).",
            labels=["result"],
        )
        for result in ("ok", "failed"):
            c.add_metric([result], reloads.get(result, 0))
        yield c
        d = CounterMetricFamily(
            "ferrogate_access_log_dropped",
            "Access log lines dropped because the writer could not keep up.",
        )
        d.add_metric([], totals.access_log_dropped)
        yield d
        for source in sources:
            try:
                yield from source()
            except Exception as e:
                emit("error", "metrics_source_failed", source=repr(source), error=repr(e))


def _request_families(t: _Totals) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "ferrogate_requests",
        "Requests by route, method and status class (and consumer, when "
        "metrics.consumer_labels is on).",
    )
    for (route, method, status_class, consumer), n in sorted(
        t.requests.items(), key=lambda kv: tuple(str(x) for x in kv[0])
    ):
        labels = {"route": route, "method": method, "status_class": status_class}
        if consumer is not None:
            labels["consumer"] = consumer
        requests.add_sample("ferrogate_requests_total", labels, n)
    yield requests
    les = [*(floatToGoString(b) for b in t.bounds), "+Inf"]  # type: ignore[no-untyped-call]
    for name, doc, table in (
        (
            "ferrogate_request_duration_seconds",
            "Time from the request's arrival to the end of its response body, by route.",
            t.duration,
        ),
        (
            "ferrogate_upstream_duration_seconds",
            "Time from the first upstream attempt to the upstream's response head, by route "
            "(retries included).",
            t.upstream,
        ),
    ):
        h = HistogramMetricFamily(name, doc, labels=["route"])
        for route, hist in sorted(table.items()):
            cumulative, running = [], 0.0
            for le, c in zip(les, hist.counts, strict=True):
                running += c
                cumulative.append((le, running))
            h.add_metric([route], cumulative, hist.sum)
        yield h
    for name, doc, table_c in (
        (
            "ferrogate_request_bytes",
            "Request body bytes read from clients, by route.",
            t.request_bytes,
        ),
        (
            "ferrogate_response_bytes",
            "Response body bytes sent to clients, by route.",
            t.response_bytes,
        ),
        (
            "ferrogate_rate_limited",
            "Requests refused by a rate limit or quota (429), by route.",
            t.rate_limited,
        ),
    ):
        counter = CounterMetricFamily(name, doc, labels=["route"])
        for route, n in sorted(table_c.items()):
            counter.add_metric([route], n)
        yield counter
    errors = CounterMetricFamily(
        "ferrogate_errors",
        "Errors the gateway answered itself, by route and error code (docs/config.md).",
        labels=["route", "code"],
    )
    for (route, code), n in sorted(t.errors.items()):
        errors.add_metric([route, code], n)
    yield errors


def _gauge_families(live: list[dict[str, Any]]) -> Iterator[Metric]:
    workers = GaugeMetricFamily("ferrogate_workers", "Worker processes publishing metrics.")
    workers.add_metric([], len(live))
    yield workers
    conns = GaugeMetricFamily(
        "ferrogate_connections_active", "Client connections open, over all workers."
    )
    conns.add_metric([], sum(s.get("connections", 0) for s in live))
    yield conns
    up: dict[tuple[str, str], list[int]] = {}
    breakers: dict[tuple[str, str], dict[str, int]] = {}
    for snap in live:
        for upstream, target, healthy, breaker in snap.get("targets", ()):
            seen = up.setdefault((upstream, target), [0, 0])
            seen[0] += 1 if healthy else 0
            seen[1] += 1
            if breaker is not None:
                states = breakers.setdefault((upstream, target), dict.fromkeys(_BREAKER_STATES, 0))
                states[breaker] = states.get(breaker, 0) + 1
    healthy = GaugeMetricFamily(
        "ferrogate_upstream_target_healthy",
        "Share of workers that send the target traffic (1: all, 0: none): active checks, "
        "passive marks and open breakers taken into account.",
        labels=["upstream", "target"],
    )
    for (upstream, target), (n_up, n) in sorted(up.items()):
        healthy.add_metric([upstream, target], n_up / n)
    yield healthy
    state = GaugeMetricFamily(
        "ferrogate_upstream_breaker_state",
        "Workers whose circuit breaker for the target is in each state.",
        labels=["upstream", "target", "state"],
    )
    for (upstream, target), states in sorted(breakers.items()):
        for s, n in states.items():
            state.add_metric([upstream, target, s], n)
    yield state


def _plugin_families(t: _Totals) -> Iterator[Metric]:
    duration = SummaryMetricFamily(
        "ferrogate_plugin_duration_seconds",
        "Time spent in each plugin's hooks, by plugin and phase (on_request, on_response, "
        "on_response_body, on_log).",
        labels=["plugin", "phase"],
    )
    errors = CounterMetricFamily(
        "ferrogate_plugin_errors",
        "Plugin hook calls that raised or timed out, by plugin and phase.",
        labels=["plugin", "phase"],
    )
    over = CounterMetricFamily(
        "ferrogate_plugin_over_budget",
        "Sync plugin hook calls that took longer than their budget, by plugin and phase.",
        labels=["plugin", "phase"],
    )
    for (plugin, phase), (calls, total_ns, errs, over_budget) in sorted(t.plugins.items()):
        duration.add_metric([plugin, phase], int(calls), total_ns / 1e9)
        errors.add_metric([plugin, phase], errs)
        over.add_metric([plugin, phase], over_budget)
    yield duration
    yield errors
    yield over
