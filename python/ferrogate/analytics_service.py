"""The analytics store's service in the master: ingest worker buckets, answer queries.

Workers write a spool file per finished bucket into ``<stem>.analytics/`` beside the
runtime file (``rust/engine/src/analytics.rs``). A thread here merges them into the store
(``analytics_store.py``) shortly after each bucket boundary, deletes them, applies the
retention now and then, and runs the ``on_ingest`` callbacks (the alerts). The status
listener's threads answer ``/api/analytics/*`` from the same store, each with a reader of
its own.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from ferrogate.analytics_store import (
    DIMENSIONS,
    HIST_BINS,
    HIST_MIN,
    HIST_PER_DECADE,
    PERIODS,
    AnalyticsStore,
    Dimension,
    Query,
    Row,
    SqliteStore,
)
from ferrogate.events import emit
from ferrogate.status_server import Reply, Request, Route, error_reply, json_reply

__all__ = [
    "MAX_POINTS",
    "AnalyticsService",
    "BadParam",
    "parse_query",
    "parse_time",
    "read_spool",
    "spool_dir",
]

# Points a timeseries may have (an explicit step may ask for fewer, not more).
MAX_POINTS = 10_000
# Points a timeseries has when no step is given, at most.
DEFAULT_POINTS = 120
# Spool files merged per transaction.
_FILES_PER_INGEST = 256
# How often old rows are deleted (seconds).
_PRUNE_EVERY = 60.0
# The shortest pause between two ingests.
_MIN_INTERVAL = 0.2
_HOUR_MS = 3_600_000

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_RELATIVE = re.compile(r"^-\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)?$")
_FORMAT = "ferrogate-analytics"
_ROW = msgspec.json.Decoder(Row)


class BadParam(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def spool_dir(runtime: Path) -> Path:
    """Where the workers of the master using ``runtime`` put their buckets."""
    stem = runtime.name.removesuffix(".runtime.json")
    return runtime.with_name(f"{stem}.analytics")


def parse_time(text: str, now: float) -> float:
    """Unix seconds, ``now``, or a time relative to now such as ``-15m``, ``-1h``, ``-7d``."""
    text = text.strip()
    if text == "now":
        return now
    m = _RELATIVE.match(text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2) or "s"]
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"expected Unix seconds, 'now' or a relative time like -15m, -1h, -7d; got {text!r}"
        )
    return value


def parse_query(
    params: Mapping[str, str],
    *,
    now: float,
    resolution: float,
    default_from: str = "-1h",
) -> Query:
    """The range, step and filters of an API request; :class:`BadParam` names what is
    wrong."""

    def when(name: str, default: str) -> float:
        try:
            return parse_time(params.get(name) or default, now)
        except ValueError as e:
            raise BadParam(name, str(e)) from None

    start, end = when("from", default_from), when("to", "now")
    if start >= end:
        raise BadParam("from", "must be before 'to'")
    res_ms = max(1, round(resolution * 1000))
    given = params.get("step")
    if given:
        try:
            step = float(given)
        except ValueError:
            step = math.nan
        if not math.isfinite(step) or step <= 0:
            raise BadParam("step", f"expected seconds > 0, got {given!r}")
    else:
        step = (end - start) / (DEFAULT_POINTS - 1)
    # A multiple of the resolution, rounded up.
    step_ms = max(1, math.ceil(step * 1000 / res_ms - 1e-9)) * res_ms
    if not given and step_ms > _HOUR_MS and _HOUR_MS % res_ms == 0:
        # Whole hours: the store answers those from its hourly rollup.
        step_ms = math.ceil(step_ms / _HOUR_MS) * _HOUR_MS
    start_ms = math.floor(start * 1000)
    points = math.ceil((end * 1000 - (start_ms - start_ms % step_ms)) / step_ms)
    if points > MAX_POINTS:
        raise BadParam(
            "step", f"{points} points is too many (at most {MAX_POINTS}): a larger step please"
        )
    filters: dict[str, str | None] = {}
    for d in DIMENSIONS:
        value = params.get(d)
        filters[d] = value if value else None
    return Query(start, end, step_ms / 1000, **filters)


def read_spool(path: Path) -> list[Row]:
    """The rows of one spool file; ValueError when it is not one we can read."""
    with path.open("rb") as f:
        lines = f.read().splitlines()
    if not lines:
        raise ValueError("empty file")
    try:
        header = msgspec.json.decode(lines[0])
    except msgspec.DecodeError as e:
        raise ValueError(f"bad header: {e}") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise ValueError("not an analytics spool file")
    if header.get("version") != 1:
        raise ValueError(f"spool format version {header.get('version')!r} is not supported")
    scheme = header.get("hist") or {}
    if (scheme.get("min"), scheme.get("per_decade"), scheme.get("bins")) != (
        HIST_MIN,
        HIST_PER_DECADE,
        HIST_BINS,
    ):
        raise ValueError(f"the worker's latency bins differ from the store's: {scheme}")
    rows = []
    for line in lines[1:]:
        if line:
            try:
                rows.append(_ROW.decode(line))
            except msgspec.DecodeError as e:
                raise ValueError(f"bad row: {e}") from None
    return rows


@dataclass(frozen=True)
class _Settings:
    path: str
    resolution: float
    retention: float

    @classmethod
    def of(cls, normalized: Mapping[str, Any]) -> _Settings | None:
        a = (normalized.get("observe") or {}).get("analytics")
        if a is None:
            return None
        return cls(str(a["path"]), float(a["resolution"]), float(a["retention"]))

    @property
    def lag(self) -> float:
        """How long after a bucket's end the master reads it: workers write theirs at a
        tenth of a resolution past the boundary (at most 250 ms)."""
        return min(0.5 * self.resolution, 1.0)


def _bad_param(e: BadParam) -> Reply:
    return json_reply(
        {"error": {"code": "bad_param", "message": str(e), "param": e.param}}, status=400
    )


class AnalyticsService:
    """The store, its ingest thread, and the query API. ``on_ingest`` callbacks run on the
    ingest thread after each ingest (about once per resolution, traffic or not) with the
    end (Unix seconds) of the newest bucket that all workers should have handed over."""

    def __init__(self, runtime: Path, normalized: dict[str, Any], metrics: Any) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.spool = spool_dir(runtime)
        self.on_ingest: list[Callable[[float], None]] = []
        self.settings: _Settings | None = None
        self.store: AnalyticsStore | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_open_complaint = 0.0
        self._start(_Settings.of(normalized))

    # --- lifecycle ------------------------------------------------------------------------

    def _start(self, settings: _Settings | None) -> None:
        self.settings = settings
        if settings is None:
            return
        self._open_store(settings)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(settings, self._stop), name="analytics-ingest", daemon=True
        )
        self._thread.start()

    def _open_store(self, settings: _Settings) -> None:
        """Open the store; on failure, say so (at most once a minute) and try again at the
        next ingest. The workers' files wait in the spool meanwhile."""
        try:
            self.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.store = SqliteStore(settings.path, retention=settings.retention)
        except Exception as e:  # sqlite3.Error, OSError: the gateway serves on without
            if time.monotonic() >= self._next_open_complaint:
                self._next_open_complaint = time.monotonic() + 60.0
                emit("error", "analytics_store_failed", path=settings.path, error=str(e))

    def _halt(self) -> None:
        """Stop the thread after a last ingest, and close the store."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def reconfigure(self, normalized: dict[str, Any]) -> None:
        wanted = _Settings.of(normalized)
        if wanted == self.settings:
            return
        self._halt()
        self._start(wanted)

    def worker_exited(self, worker_id: int) -> None:
        pass  # its spool files are read like any other's

    def stop(self) -> None:
        self._halt()
        with contextlib.suppress(OSError):
            self.spool.rmdir()  # only when empty

    # --- ingest ---------------------------------------------------------------------------

    def _run(self, settings: _Settings, stop: threading.Event) -> None:
        res, lag = settings.resolution, settings.lag
        last = 0.0
        next_prune = time.monotonic()
        while True:
            now = time.time()
            # The next boundary plus the lag, at least _MIN_INTERVAL after the last ingest.
            due = (math.floor((now - lag) / res) + 1) * res + lag
            while due < last + _MIN_INTERVAL:
                due += res
            if stop.wait(max(0.0, due - now)):
                break
            last = time.time()
            if self.store is None:
                self._open_store(settings)
            self._ingest()
            complete = math.floor((last - lag) / res) * res
            for callback in list(self.on_ingest):
                try:
                    callback(complete)
                except Exception as e:
                    emit(
                        "error", "analytics_callback_failed", callback=repr(callback), error=repr(e)
                    )
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + _PRUNE_EVERY
                self._prune()
        # The workers are gone or going: what they wrote last.
        self._ingest()

    def _prune(self) -> None:
        store = self.store
        if store is None:
            return
        try:
            deleted = store.prune(time.time())
        except Exception as e:
            emit("error", "analytics_prune_failed", error=repr(e))
            return
        if deleted:
            emit("info", "analytics_pruned", rows=deleted)

    def _ingest(self) -> int:
        """Merge every spool file there is; returns the number of rows merged. Only on the
        ingest thread (the store's writer is its)."""
        store = self.store
        if store is None:
            return 0
        try:
            names = sorted(
                n for n in os.listdir(self.spool) if n.endswith(".jsonl") and not n.startswith(".")
            )
        except FileNotFoundError:
            return 0
        merged = 0
        for i in range(0, len(names), _FILES_PER_INGEST):
            chunk = names[i : i + _FILES_PER_INGEST]
            try:
                done = store.ingested(chunk)
            except Exception as e:
                emit("error", "analytics_ingest_failed", error=repr(e))
                return merged
            for name in done:
                with contextlib.suppress(OSError):
                    (self.spool / name).unlink()
            rows: list[Row] = []
            sources = []
            for name in chunk:
                if name in done:
                    continue
                path = self.spool / name
                try:
                    rows += read_spool(path)
                except FileNotFoundError:
                    continue
                except (OSError, ValueError) as e:
                    emit("error", "analytics_spool_rejected", file=str(path), error=str(e))
                    with contextlib.suppress(OSError):
                        path.rename(path.with_name(name + ".rejected"))
                    continue
                sources.append(name)
            try:
                store.ingest(rows, sources)
            except Exception as e:
                # The files stay; the next ingest tries again.
                emit("error", "analytics_ingest_failed", error=repr(e), files=len(sources))
                return merged
            for name in sources:
                with contextlib.suppress(OSError):
                    (self.spool / name).unlink()
            merged += len(rows)
        return merged

    # --- the API --------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route("/api/analytics/timeseries", self._api(self._timeseries)),
            Route("/api/analytics/top", self._api(self._top)),
            Route("/api/analytics/statuses", self._api(self._statuses)),
            Route("/api/analytics/trends", self._api(self._trends)),
            Route("/api/analytics/summary", self._api(self._summary)),
        ]

    def _api(
        self, answer: Callable[[AnalyticsStore, _Settings, Mapping[str, str]], Any]
    ) -> Callable[[Request], Reply]:
        def handler(req: Request) -> Reply:
            store, settings = self.store, self.settings
            if settings is None:
                return error_reply(
                    404, "analytics_off", "analytics are off: add 'analytics' to the config"
                )
            if store is None:
                return error_reply(
                    503, "store_unavailable", "the analytics store cannot be opened; see the log"
                )
            try:
                return json_reply(answer(store, settings, req.query))
            except BadParam as e:
                return _bad_param(e)

        return handler

    @staticmethod
    def _query(settings: _Settings, params: Mapping[str, str], default_from: str = "-1h") -> Query:
        return parse_query(
            params, now=time.time(), resolution=settings.resolution, default_from=default_from
        )

    def _timeseries(
        self, store: AnalyticsStore, settings: _Settings, params: Mapping[str, str]
    ) -> dict[str, Any]:
        q = self._query(settings, params)
        points = store.timeseries(q)
        start = points[0]["t"] if points else q.start
        return {"from": start, "to": q.end, "step": q.step, "points": points}

    def _top(
        self, store: AnalyticsStore, settings: _Settings, params: Mapping[str, str]
    ) -> dict[str, Any]:
        q = self._query(settings, params)
        by = params.get("by") or "route"
        if by not in DIMENSIONS:
            raise BadParam("by", f"expected one of {', '.join(DIMENSIONS)}; got {by!r}")
        limit_text = params.get("limit") or "10"
        try:
            limit = int(limit_text)
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            raise BadParam("limit", f"expected a whole number from 1 to 1000, got {limit_text!r}")
        dim: Dimension = by
        return {"from": q.start, "to": q.end, "by": by, "rows": store.top(q, dim, limit)}

    def _statuses(
        self, store: AnalyticsStore, settings: _Settings, params: Mapping[str, str]
    ) -> dict[str, Any]:
        q = self._query(settings, params)
        rows = store.statuses(q)
        classes = {f"{c}xx": 0 for c in range(1, 6)}
        for r in rows:
            name = f"{r['status'] // 100}xx"
            if name in classes:
                classes[name] += r["requests"]
        return {"from": q.start, "to": q.end, "rows": rows, "classes": classes}

    def _trends(
        self, store: AnalyticsStore, settings: _Settings, params: Mapping[str, str]
    ) -> dict[str, Any]:
        period = params.get("period") or "hour"
        if period not in PERIODS:
            raise BadParam("period", f"expected hour or day, got {period!r}")
        # Trends are about weeks and months: a longer default range than the other views.
        q = self._query(settings, params, "-7d" if period == "hour" else "-90d")
        if (q.end - q.start) / PERIODS[period] > MAX_POINTS:
            raise BadParam("from", f"more than {MAX_POINTS} {period}s: a shorter range please")
        return {"from": q.start, "to": q.end, "period": period, "rows": store.trends(q, period)}

    def _summary(
        self, store: AnalyticsStore, settings: _Settings, params: Mapping[str, str]
    ) -> dict[str, Any]:
        q = self._query(settings, params)
        return {"from": q.start, "to": q.end, **store.summary(q)}
