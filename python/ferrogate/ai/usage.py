"""Where the AI gateway's usage goes: a JSON-lines log, Prometheus counters, the analytics
store.

``UsageRecorder.record`` is called from the plugin's ``on_log`` and only queues the record;
one thread per worker process drains the queue about twice a second and

- appends one JSON line per request to ``ai.usage.log`` (never a credential or prompt text:
  a :class:`UsageRecord` has no field that could hold one), and/or emits an ``ai_usage``
  event;
- adds the record to cumulative counters that it publishes as
  ``<stem>.ai-usage.<worker id>.json`` beside the runtime file, which the master sums into
  ``/metrics`` (``ai/usage_export.py``);
- adds it to per-bucket rows (bucket, consumer, model alias, provider) that it spools as
  files under ``<stem>.ai-analytics/``, which the master merges into the analytics store.

Counters and the thread belong to the process, not to a recorder: a reload builds a new
plugin (and recorder) while the counters go on. Metrics and the spool are only written when
the config has metrics or analytics on (both need a status listener, the master's reader).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from ferrogate.events import emit

__all__ = [
    "SPOOL_FORMAT",
    "UsageRecord",
    "UsageRecorder",
    "UsageSettings",
    "metrics_file",
    "spool_dir",
]

SPOOL_FORMAT = "ferrogate-ai-usage"
NO_CONSUMER = "(none)"
OTHER_CONSUMER = "other"
# Records waiting for the thread at most; more are dropped (and counted in the log).
MAX_QUEUED = 100_000
FLUSH_INTERVAL = 0.5


class UsageSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """``ai.usage``: where the usage of each AI request goes."""

    log: Annotated[
        str | None,
        Meta(description="A JSON-lines file: one line per AI request (no prompt, no key)."),
    ] = None
    events: Annotated[
        bool, Meta(description="Also emit an `ai_usage` event per request on the event log.")
    ] = False
    metrics: Annotated[
        bool,
        Meta(
            description="Count tokens, cost, requests and latency on the status listener's "
            "/metrics (needs `status:` and metrics on)."
        ),
    ] = True
    analytics: Annotated[
        bool,
        Meta(
            description="Keep per-consumer/model totals in the analytics store, served at "
            "/api/analytics/ai (needs `status:` and `analytics:`)."
        ),
    ] = True


class UsageRecord(msgspec.Struct, kw_only=True):
    """One AI request's usage (a line of the usage log)."""

    time: float
    """Unix seconds when the request arrived."""
    request_id: str
    route: str
    consumer: str | None
    model: str
    """The alias the client asked for."""
    deployment: str | None = None
    provider: str | None = None
    provider_model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False
    """True when the provider did not report usage and the gateway counted it."""
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    """Streams: time to the first byte of the answer."""
    status: int = 0
    stream: bool = False
    cached: bool = False
    fallbacks: int = 0
    """Deployments given up on before the one that answered."""


def metrics_file(runtime: Path, worker_id: int) -> Path:
    stem = runtime.name.removesuffix(".runtime.json")
    return runtime.with_name(f"{stem}.ai-usage.{worker_id}.json")


def spool_dir(runtime: Path) -> Path:
    stem = runtime.name.removesuffix(".runtime.json")
    return runtime.with_name(f"{stem}.ai-analytics")


class _Targets(msgspec.Struct, frozen=True):
    """What the process's config says about where counters go (None: nowhere)."""

    runtime: Path | None = None
    worker_id: int = 0
    buckets: tuple[float, ...] | None = None
    max_consumers: int = 100
    resolution: float | None = None


def _targets(runtime: Path | None, worker_id: int) -> _Targets:
    if runtime is None:
        return _Targets()
    try:
        normalized = json.loads(runtime.read_bytes())
    except (OSError, ValueError):
        return _Targets()
    if not isinstance(normalized, dict):
        return _Targets()
    # Metrics and analytics are only set when there is a status listener (the runtime file
    # has no `status` of its own: the workers never see the admin token).
    observe = normalized.get("observe") or {}
    metrics = observe.get("metrics")
    analytics = observe.get("analytics")
    return _Targets(
        runtime=runtime,
        worker_id=worker_id,
        buckets=tuple(float(b) for b in metrics["latency_buckets"]) if metrics else None,
        max_consumers=int(metrics["max_consumers"]) if metrics else 100,
        resolution=float(analytics["resolution"]) if analytics else None,
    )


_ENCODE = msgspec.json.Encoder().encode


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self, n: int) -> None:
        self.counts = [0] * n
        self.sum = 0.0


class _Sink:
    """The process's queue, writer thread and cumulative counters."""

    def __init__(self) -> None:
        self.queue: deque[tuple[UsageSettings, _Targets, UsageRecord]] = deque()
        self.dropped = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._logs: dict[str, Any] = {}
        # (model, provider, deployment, consumer, status) ->
        # [requests, prompt, completion, cost, cached, fallbacks, estimated]
        self.series: dict[tuple[str, str, str, str, int], list[float]] = {}
        self.latency: dict[tuple[str, str], _Histogram] = {}
        self.ttft: dict[tuple[str, str], _Histogram] = {}
        self.buckets: tuple[float, ...] = ()
        self.consumers: set[str] = set()
        self.dirty = False
        self.spool_seq = 0
        self._flush_lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="ferrogate-ai-usage", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        targets: _Targets | None = None
        while True:
            time.sleep(FLUSH_INTERVAL)
            targets = self.flush(targets)

    def flush(self, targets: _Targets | None = None) -> _Targets | None:
        """Drain the queue: log lines, counters, spool rows; publish. Returns the targets of
        the newest record seen (the counters are published there)."""
        with self._flush_lock:
            return self._flush(targets)

    def _flush(self, targets: _Targets | None) -> _Targets | None:
        # The rows of requests the data plane passed through join the queue first.
        from ferrogate.ai import fast

        passed = fast.drain()
        rows: dict[tuple[int, int, str, str, str], list[float]] = {}
        spool_at: _Targets | None = None
        queue = self.queue
        batch = []
        while queue:
            batch.append(queue.popleft())
        if passed:
            # Both paths' records, in the order their requests finished.
            batch.sort(key=lambda q: q[2].time + q[2].latency_ms / 1000.0)
        for settings, where, rec in batch:
            targets = where
            if settings.log is not None:
                self._log(settings.log, rec)
            if settings.events:
                emit("info", "ai_usage", **msgspec.structs.asdict(rec))
            if settings.metrics and where.buckets is not None:
                self._count(where, rec)
            if settings.analytics and where.resolution is not None:
                spool_at = where
                span = max(1, round(where.resolution * 1000))
                t = math.floor(rec.time * 1000)
                key = (
                    t - t % span,
                    span,
                    rec.consumer or NO_CONSUMER,
                    rec.model,
                    rec.provider or "",
                )
                row = rows.get(key)
                if row is None:
                    row = rows[key] = [0, 0, 0, 0, 0.0, 0.0, 0, 0]
                row[0] += 1
                row[1] += 1 if rec.status >= 400 else 0
                row[2] += rec.prompt_tokens
                row[3] += rec.completion_tokens
                row[4] += rec.cost_usd
                row[5] += rec.latency_ms
                row[6] += 1 if rec.estimated else 0
                row[7] += 1 if rec.cached else 0
        for f in self._logs.values():
            with contextlib.suppress(OSError):
                f.flush()
        if self.dropped:
            emit("warning", "ai_usage_dropped", records=self.dropped)
            self.dropped = 0
        if rows and spool_at is not None and spool_at.runtime is not None:
            self._spool(spool_at, rows)
        if self.dirty and targets is not None and targets.runtime is not None:
            self._publish(targets)
        return targets

    def _log(self, path: str, rec: UsageRecord) -> None:
        f = self._logs.get(path)
        if f is None:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                f = self._logs[path] = open(path, "ab")  # noqa: SIM115 (kept open)
            except OSError as e:
                emit("error", "ai_usage_log_failed", path=path, error=str(e))
                return
        try:
            f.write(_ENCODE(rec) + b"\n")
        except OSError as e:
            emit("error", "ai_usage_log_failed", path=path, error=str(e))

    def _count(self, where: _Targets, rec: UsageRecord) -> None:
        assert where.buckets is not None
        if where.buckets != self.buckets:
            # A reload changed the bounds: start the histograms over (the master keeps what
            # it had by summing per snapshot; a changed scheme is rare).
            self.buckets = where.buckets
            self.latency.clear()
            self.ttft.clear()
        consumer = rec.consumer
        if consumer is None:
            consumer = NO_CONSUMER
        elif consumer not in self.consumers:
            if len(self.consumers) >= where.max_consumers:
                consumer = OTHER_CONSUMER
            else:
                self.consumers.add(consumer)
        provider = rec.provider or ""
        key = (rec.model, provider, rec.deployment or "", consumer, rec.status)
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = [0, 0, 0, 0.0, 0, 0, 0]
        s[0] += 1
        s[1] += rec.prompt_tokens
        s[2] += rec.completion_tokens
        s[3] += rec.cost_usd
        s[4] += 1 if rec.cached else 0
        s[5] += rec.fallbacks
        s[6] += 1 if rec.estimated else 0
        for table, ms in ((self.latency, rec.latency_ms), (self.ttft, rec.ttft_ms)):
            if ms is None:
                continue
            h = table.get((rec.model, provider))
            if h is None:
                h = table[(rec.model, provider)] = _Histogram(len(self.buckets) + 1)
            seconds = ms / 1000
            i = 0
            for bound in self.buckets:
                if seconds <= bound:
                    break
                i += 1
            h.counts[i] += 1
            h.sum += seconds
        self.dirty = True

    def _publish(self, where: _Targets) -> None:
        assert where.runtime is not None
        snapshot = {
            "pid": os.getpid(),
            "worker": where.worker_id,
            "buckets": list(self.buckets),
            "series": [[*k, *v] for k, v in self.series.items()],
            "latency": [[*k, h.counts, h.sum] for k, h in self.latency.items()],
            "ttft": [[*k, h.counts, h.sum] for k, h in self.ttft.items()],
        }
        path = metrics_file(where.runtime, where.worker_id)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_bytes(_ENCODE(snapshot))
            os.replace(tmp, path)
            self.dirty = False
        except OSError:
            pass  # the master's directory is gone: it is shutting down

    def _spool(
        self, where: _Targets, rows: dict[tuple[int, int, str, str, str], list[float]]
    ) -> None:
        assert where.runtime is not None
        folder = spool_dir(where.runtime)
        self.spool_seq += 1
        name = f"{int(time.time() * 1000)}-{where.worker_id}-{os.getpid()}-{self.spool_seq}.jsonl"
        lines = [_ENCODE({"format": SPOOL_FORMAT, "version": 1})]
        for (t, span, consumer, model, provider), v in rows.items():
            lines.append(
                _ENCODE(
                    {
                        "t": t,
                        "span": span,
                        "consumer": consumer,
                        "model": model,
                        "provider": provider,
                        "requests": v[0],
                        "errors": v[1],
                        "prompt_tokens": v[2],
                        "completion_tokens": v[3],
                        "cost_usd": v[4],
                        "latency_ms": v[5],
                        "estimated": v[6],
                        "cached": v[7],
                    }
                )
            )
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(b"\n".join(lines) + b"\n")
            os.replace(tmp, folder / name)
        except OSError as e:
            emit("error", "ai_usage_spool_failed", dir=str(folder), error=str(e))


_sink = _Sink()


class UsageRecorder:
    """Made once per plugin build; :meth:`record` from ``on_log``."""

    def __init__(
        self, settings: UsageSettings, *, runtime: Path | None = None, worker_id: int | None = None
    ) -> None:
        if runtime is None:
            from ferrogate import plugin_host

            identity = plugin_host.worker_identity()
            if identity is not None:
                runtime, worker_id = identity
        self.settings = settings
        self._targets = _targets(runtime, worker_id or 0)
        _sink.start()

    def record(self, rec: UsageRecord) -> None:
        """Queue ``rec`` (cheap: the thread does the rest)."""
        if len(_sink.queue) >= MAX_QUEUED:
            _sink.dropped += 1
            return
        _sink.queue.append((self.settings, self._targets, rec))

    def flush(self) -> None:
        """Write what is queued now (tests, shutdown); the thread does it anyway."""
        _sink.flush()
