"""The master's side of AI usage: Prometheus counters and the analytics store.

Workers publish cumulative counters as ``<stem>.ai-usage.<worker id>.json`` and spool
per-bucket rows under ``<stem>.ai-analytics/`` (``ai/usage.py``). On each scrape the
counters of live workers are summed with those of exited ones (kept, like the gateway's own
counters, so that nothing goes back); the spool is merged into the ``ai_usage`` table of the
analytics store's SQLite file on the analytics ingest thread, right after each ingest of
the gateway's rows, and answered at ``/api/analytics/ai``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from ferrogate.ai.usage import SPOOL_FORMAT, spool_dir
from ferrogate.events import emit
from ferrogate.metrics_export import rebucket
from ferrogate.status_server import Reply, Request, Route, error_reply, json_reply

__all__ = ["AiUsageExport", "AiUsageStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ai_usage (
    t INTEGER NOT NULL,
    consumer TEXT NOT NULL,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    span INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    latency_ms REAL NOT NULL,
    estimated INTEGER NOT NULL,
    cached INTEGER NOT NULL,
    PRIMARY KEY (t, consumer, model, provider)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ai_usage_sources (
    name TEXT PRIMARY KEY,
    at REAL NOT NULL
) WITHOUT ROWID;
"""
_UPSERT = """
INSERT INTO ai_usage (t, consumer, model, provider, span, requests, errors, prompt_tokens,
                      completion_tokens, cost_usd, latency_ms, estimated, cached)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (t, consumer, model, provider) DO UPDATE SET
    span = max(span, excluded.span),
    requests = requests + excluded.requests,
    errors = errors + excluded.errors,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    cost_usd = cost_usd + excluded.cost_usd,
    latency_ms = latency_ms + excluded.latency_ms,
    estimated = estimated + excluded.estimated,
    cached = cached + excluded.cached
"""
_SUMS = (
    "sum(requests), sum(errors), sum(prompt_tokens), sum(completion_tokens), sum(cost_usd), "
    "sum(latency_ms), sum(estimated), sum(cached)"
)
_FIELDS = (
    "consumer",
    "model",
    "provider",
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "latency_ms",
    "estimated",
    "cached",
)
_BY = ("consumer", "model", "provider")
_SOURCES_KEPT = 7 * 86400.0


class AiUsageStore:
    """The ``ai_usage`` table in the analytics SQLite file. One writer (the ingest thread);
    readers get a connection per thread."""

    def __init__(self, path: str | Path, retention: float) -> None:
        self.path = Path(path)
        self.retention = retention
        self._writer = sqlite3.connect(
            self.path, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        self._writer.executescript(_SCHEMA)
        self._local = threading.local()

    def close(self) -> None:
        self._writer.close()

    def ingest_dir(self, folder: Path) -> int:
        """Merge every spool file in ``folder`` and delete it; the number of rows merged."""
        try:
            names = sorted(
                n for n in os.listdir(folder) if n.endswith(".jsonl") and not n.startswith(".")
            )
        except FileNotFoundError:
            return 0
        if not names:
            return 0
        w = self._writer
        marks = ",".join("?" * len(names))
        done = {
            r[0]
            for r in w.execute(f"SELECT name FROM ai_usage_sources WHERE name IN ({marks})", names)
        }
        values = []
        sources = []
        for name in names:
            path = folder / name
            if name in done:
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            try:
                values += _read_spool(path)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:
                emit("error", "ai_usage_spool_rejected", file=str(path), error=str(e))
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(name + ".rejected"))
                continue
            sources.append(name)
        w.execute("BEGIN IMMEDIATE")
        try:
            w.executemany(_UPSERT, values)
            now = time.time()
            w.executemany(
                "INSERT OR IGNORE INTO ai_usage_sources (name, at) VALUES (?, ?)",
                [(s, now) for s in sources],
            )
            w.execute("COMMIT")
        except BaseException:
            w.execute("ROLLBACK")
            raise
        for name in sources:
            with contextlib.suppress(OSError):
                (folder / name).unlink()
        return len(values)

    def prune(self, now: float) -> None:
        w = self._writer
        w.execute("DELETE FROM ai_usage WHERE t < ?", (math.floor((now - self.retention) * 1000),))
        w.execute("DELETE FROM ai_usage_sources WHERE at < ?", (now - _SOURCES_KEPT,))

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
        return conn

    def totals(
        self, start: float, end: float, filters: Mapping[str, str], by: str | None
    ) -> list[dict[str, Any]]:
        """Sums over [start, end), grouped by ``by`` (one of consumer, model, provider, or
        None for the grand total), busiest first."""
        sql = f"SELECT {by or 'NULL'}, {_SUMS} FROM ai_usage WHERE t >= ? AND t < ?"
        params: list[Any] = [math.floor(start * 1000), math.ceil(end * 1000)]
        for d, v in filters.items():
            sql += f" AND {d} = ?"
            params.append(v)
        if by:
            sql += f" GROUP BY {by}"
        out = []
        for row in self._reader().execute(sql, params):
            requests = row[1] or 0
            entry: dict[str, Any] = {by: row[0]} if by else {}
            entry.update(
                requests=requests,
                errors=row[2] or 0,
                prompt_tokens=row[3] or 0,
                completion_tokens=row[4] or 0,
                total_tokens=(row[3] or 0) + (row[4] or 0),
                cost_usd=round(row[5] or 0.0, 9),
                mean_latency_ms=round(row[6] / requests, 3) if requests else None,
                estimated=row[7] or 0,
                cached=row[8] or 0,
            )
            out.append(entry)
        out.sort(key=lambda e: (-e["cost_usd"], -e["requests"], str(e.get(by or "", ""))))
        return out


def _read_spool(path: Path) -> list[tuple[Any, ...]]:
    lines = path.read_bytes().splitlines()
    if not lines:
        raise ValueError("empty file")
    header = json.loads(lines[0])
    if not isinstance(header, dict) or header.get("format") != SPOOL_FORMAT:
        raise ValueError("not an AI usage spool file")
    if header.get("version") != 1:
        raise ValueError(f"spool format version {header.get('version')!r} is not supported")
    out = []
    for line in lines[1:]:
        if not line:
            continue
        r = json.loads(line)
        out.append(
            (
                int(r["t"]),
                str(r["consumer"]),
                str(r["model"]),
                str(r["provider"]),
                int(r["span"]),
                int(r["requests"]),
                int(r["errors"]),
                int(r["prompt_tokens"]),
                int(r["completion_tokens"]),
                float(r["cost_usd"]),
                float(r["latency_ms"]),
                int(r["estimated"]),
                int(r["cached"]),
            )
        )
    return out


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


class _Counters:
    def __init__(self) -> None:
        self.series: dict[tuple[Any, ...], list[float]] = {}
        # (model, provider) -> (counts over self.bounds, sum)
        self.latency: dict[tuple[str, str], list[Any]] = {}
        self.ttft: dict[tuple[str, str], list[Any]] = {}

    def add(self, snap: Mapping[str, Any], bounds: tuple[float, ...]) -> None:
        for row in snap.get("series", ()):
            key, values = tuple(row[:5]), row[5:]
            total = self.series.setdefault(key, [0.0] * len(values))
            for i, v in enumerate(values):
                total[i] += v
        old = tuple(float(b) for b in snap.get("buckets", ()))
        for table, name in ((self.latency, "latency"), (self.ttft, "ttft")):
            for model, provider, counts, total_s in snap.get(name, ()):
                h = table.setdefault((model, provider), [[0.0] * (len(bounds) + 1), 0.0])
                for i, c in enumerate(rebucket(counts, old, bounds)):
                    h[0][i] += c
                h[1] += total_s


class AiUsageExport:
    """A status listener component: AI counters on /metrics, the AI analytics API."""

    def __init__(self, runtime: Path, normalized: dict[str, Any], metrics: Any, analytics: Any):
        self.runtime = runtime
        self.analytics = analytics
        self.spool = spool_dir(runtime)
        self._lock = threading.Lock()
        self._retired: list[dict[str, Any]] = []
        self._bounds = self._bounds_of(normalized)
        self.store: AiUsageStore | None = None
        self._store_key: tuple[str, float] | None = None
        self._next_prune = 0.0
        if metrics is not None:
            metrics.add_source(self.families)
        if analytics is not None:
            analytics.on_ingest.append(self._ingest)

    @staticmethod
    def _bounds_of(normalized: Mapping[str, Any]) -> tuple[float, ...]:
        m = (normalized.get("observe") or {}).get("metrics")
        return tuple(float(b) for b in m["latency_buckets"]) if m else ()

    def _files(self) -> list[Path]:
        stem = self.runtime.name.removesuffix(".runtime.json")
        return sorted(self.runtime.parent.glob(f"{stem}.ai-usage.*.json"))

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            value = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    # --- Component --------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [Route("/api/analytics/ai", self._api)]

    def reconfigure(self, normalized: dict[str, Any]) -> None:
        with self._lock:
            self._bounds = self._bounds_of(normalized)

    def worker_exited(self, worker_id: int) -> None:
        with self._lock:
            for path in self._files():
                snap = self._read(path)
                if snap is None or snap.get("worker") != worker_id or _alive(snap.get("pid")):
                    continue
                self._retired.append(snap)
                with contextlib.suppress(OSError):
                    path.unlink()

    def stop(self) -> None:
        # The store stays open: the analytics thread may be inside an ingest of ours until
        # its own stop, which comes after this one; the process is ending anyway.
        with contextlib.suppress(OSError):
            self.spool.rmdir()

    # --- analytics --------------------------------------------------------------------

    def _ingest(self, complete: float) -> None:
        settings = getattr(self.analytics, "settings", None)
        if settings is None:
            return
        key = (str(settings.path), float(settings.retention))
        if self.store is None or key != self._store_key:
            if self.store is not None:
                self.store.close()
            self.store = AiUsageStore(*key)
            self._store_key = key
        self.store.ingest_dir(self.spool)
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + 60.0
            self.store.prune(time.time())

    def _api(self, req: Request) -> Reply:
        from ferrogate.analytics_service import parse_time

        if getattr(self.analytics, "settings", None) is None:
            return error_reply(
                404, "analytics_off", "analytics are off: add 'analytics' to the config"
            )
        store = self.store
        if store is None:
            return json_reply(
                {
                    "error": {
                        "code": "store_unavailable",
                        "message": "no AI usage has been stored yet",
                    }
                },
                status=503,
            )
        now = time.time()
        params = req.query
        times = {}
        for name, default in (("from", "-24h"), ("to", "now")):
            try:
                times[name] = parse_time(params.get(name) or default, now)
            except ValueError as e:
                return json_reply(
                    {"error": {"code": "bad_param", "message": f"{name}: {e}", "param": name}},
                    status=400,
                )
        if times["from"] >= times["to"]:
            return json_reply(
                {
                    "error": {
                        "code": "bad_param",
                        "message": "from: must be before 'to'",
                        "param": "from",
                    }
                },
                status=400,
            )
        filters = {d: params[d] for d in _BY if params.get(d)}
        start, end = times["from"], times["to"]
        total = store.totals(start, end, filters, None)
        return json_reply(
            {
                "from": start,
                "to": end,
                "filters": filters,
                "total": total[0] if total else {},
                "by_consumer": store.totals(start, end, filters, "consumer"),
                "by_model": store.totals(start, end, filters, "model"),
                "by_provider": store.totals(start, end, filters, "provider"),
            }
        )

    # --- metrics ----------------------------------------------------------------------

    def families(self) -> Iterator[Metric]:
        with self._lock:
            bounds = self._bounds
            totals = _Counters()
            for snap in self._retired:
                totals.add(snap, bounds)
            for path in self._files():
                found = self._read(path)
                if found is not None:
                    totals.add(found, bounds)
        labels = ["model", "provider", "deployment", "consumer"]
        requests = CounterMetricFamily(
            "ferrogate_ai_requests",
            "AI requests by model alias, provider, deployment, consumer and status.",
            labels=[*labels, "status"],
        )
        tokens = CounterMetricFamily(
            "ferrogate_ai_tokens",
            "Tokens by model alias, provider, deployment, consumer and kind (prompt, "
            "completion); estimated ones included.",
            labels=[*labels, "kind"],
        )
        cost = CounterMetricFamily(
            "ferrogate_ai_cost_usd",
            "Cost in US dollars from ai.prices, by model alias, provider, deployment, consumer.",
            labels=labels,
        )
        cached = CounterMetricFamily(
            "ferrogate_ai_cache_hits", "AI requests answered from the cache.", labels=labels
        )
        fallbacks = CounterMetricFamily(
            "ferrogate_ai_fallbacks",
            "Deployments given up on (429, 5xx, unreachable) before one answered.",
            labels=labels,
        )
        estimated = CounterMetricFamily(
            "ferrogate_ai_estimated_usage",
            "AI requests whose usage the gateway counted itself (the provider did not say).",
            labels=labels,
        )
        per_key: dict[tuple[Any, ...], list[float]] = {}
        for (model, provider, deployment, consumer, status), v in sorted(
            totals.series.items(), key=lambda kv: tuple(str(x) for x in kv[0])
        ):
            labels_of = (model, provider, deployment, consumer)
            requests.add_metric([*labels_of, str(status)], v[0])
            s = per_key.setdefault(labels_of, [0.0] * 6)
            for i in range(6):
                s[i] += v[i + 1]
        for key, (prompt, completion, usd, hits, fb, est) in per_key.items():
            tokens.add_metric([*key, "prompt"], prompt)
            tokens.add_metric([*key, "completion"], completion)
            cost.add_metric(list(key), usd)
            cached.add_metric(list(key), hits)
            fallbacks.add_metric(list(key), fb)
            estimated.add_metric(list(key), est)
        yield from (requests, tokens, cost, cached, fallbacks, estimated)
        les = [*(floatToGoString(b) for b in bounds), "+Inf"]  # type: ignore[no-untyped-call]
        for name, doc, table in (
            (
                "ferrogate_ai_request_duration_seconds",
                "AI request latency to the end of the answer, by model alias and provider.",
                totals.latency,
            ),
            (
                "ferrogate_ai_time_to_first_token_seconds",
                "Streamed AI answers: time to the first byte, by model alias and provider.",
                totals.ttft,
            ),
        ):
            h = HistogramMetricFamily(name, doc, labels=["model", "provider"])
            for (model, provider), (counts, total_s) in sorted(table.items()):
                cumulative, running = [], 0.0
                for le, c in zip(les, counts, strict=True):
                    running += c
                    cumulative.append((le, running))
                h.add_metric([model, provider], cumulative, total_s)
            yield h
