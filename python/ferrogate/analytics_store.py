"""The analytics store: per-bucket request counts and latency histograms, and the queries
the status listener answers from them.

Rows arrive from the workers (``rust/engine/src/analytics.rs``): one per time bucket and
(route, consumer, upstream target, status), with counts, byte and duration sums and a
sparse latency histogram. :class:`AnalyticsStore` is what the rest of the master relies
on; :class:`SqliteStore` is the embedded default (one file, no server). A store for a
cluster (PostgreSQL, ClickHouse, ...) implements the same protocol: rows merge by adding
(counts, sums and histogram bins), so any store with an upsert-add can hold them.

Latency percentiles come from merged histograms: bin 0 holds durations up to 10 µs, bin
``i`` holds (10 µs·g^(i-1), 10 µs·g^i] with g = 10^(1/40), up to about 60 s (the last
bin takes everything longer). A percentile is reported as its bin's geometric midpoint,
so for durations between 10 µs and 60 s it is within ``HIST_ERROR`` (2.9%) of the exact
nearest-rank value; below 10 µs it reads 10 µs.
"""

from __future__ import annotations

import math
import sqlite3
import sys
import threading
import time
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec

__all__ = [
    "DIMENSIONS",
    "HIST_BINS",
    "HIST_ERROR",
    "HIST_MIN",
    "HIST_PER_DECADE",
    "PERIODS",
    "ROLLUP_MIN_RETENTION",
    "AnalyticsStore",
    "Dimension",
    "Query",
    "Row",
    "SqliteStore",
    "bin_of",
    "bin_value",
    "decode_hist",
    "encode_hist",
    "percentiles",
]

# Must match rust/engine/src/analytics.rs (spool files carry them; the reader checks).
HIST_MIN = 1e-5
HIST_PER_DECADE = 40
HIST_BINS = 273
HIST_ERROR = 10 ** (1 / (2 * HIST_PER_DECADE)) - 1

# Hourly rollups are kept at least this long (seconds), for capacity planning.
ROLLUP_MIN_RETENTION = 400 * 86400.0

Dimension = Literal["route", "consumer", "upstream"]
DIMENSIONS: tuple[Dimension, ...] = ("route", "consumer", "upstream")
PERIODS = {"hour": 3600, "day": 86400}

_HOUR_MS = 3_600_000
# Old rows are deleted this much time at a time (one transaction each).
_PRUNE_SLICE_MS = 6 * _HOUR_MS
# Names of ingested spool files are remembered this long (exactly-once after a crash).
_SOURCES_KEPT = 7 * 86400.0


def bin_of(seconds: float) -> int:
    """The histogram bin of a duration (as the workers compute it)."""
    if not seconds > HIST_MIN:
        return 0
    b = math.ceil(math.log10(seconds / HIST_MIN) * HIST_PER_DECADE)
    return min(b, HIST_BINS - 1)


def bin_value(b: int) -> float:
    """The duration a bin stands for: its geometric midpoint (bin 0: ``HIST_MIN``)."""
    if b <= 0:
        return HIST_MIN
    return float(HIST_MIN * 10 ** ((b - 0.5) / HIST_PER_DECADE))


def percentiles(
    hist: Mapping[int, int] | Sequence[int], qs: Sequence[float] = (0.5, 0.95, 0.99)
) -> list[float | None]:
    """Nearest-rank percentiles of a histogram ({bin: count}, or counts indexed by bin);
    None when it is empty."""
    pairs = sorted(hist.items()) if isinstance(hist, Mapping) else list(enumerate(hist))
    total = sum(n for _, n in pairs)
    if total <= 0:
        return [None for _ in qs]
    out: list[float | None] = []
    for q in qs:
        rank = max(1, math.ceil(q * total))
        seen = 0
        for b, n in pairs:
            seen += n
            if seen >= rank:
                out.append(round(bin_value(b), 7))
                break
    return out


# A histogram in the store: one byte (the width of the counts, 4 or 8), the non-empty bins
# (u16), then their counts, little-endian. Far smaller than a row per bin, and decoded by
# the array module rather than a Python loop.
_LITTLE = sys.byteorder == "little"


def encode_hist(pairs: Iterable[tuple[int, int]]) -> bytes:
    kept = sorted((b, n) for b, n in pairs if n > 0)
    bins = array("H", (b for b, _ in kept))
    wide = any(n >= 1 << 32 for _, n in kept)
    counts = array("Q" if wide else "I", (n for _, n in kept))
    if not _LITTLE:
        bins.byteswap()
        counts.byteswap()
    return bytes([counts.itemsize]) + bins.tobytes() + counts.tobytes()


def decode_hist(blob: bytes | None) -> Iterator[tuple[int, int]]:
    if not blob:
        return iter(())
    width = blob[0]
    n = (len(blob) - 1) // (2 + width)
    bins = array("H")
    bins.frombytes(blob[1 : 1 + 2 * n])
    counts = array("Q" if width == 8 else "I")
    counts.frombytes(blob[1 + 2 * n :])
    if not _LITTLE:
        bins.byteswap()
        counts.byteswap()
    return zip(bins, counts, strict=True)


def _merge_hists(a: bytes | None, b: bytes | None) -> bytes:
    merged = dict(decode_hist(a))
    for k, n in decode_hist(b):
        merged[k] = merged.get(k, 0) + n
    return encode_hist(merged.items())


assert array("H").itemsize == 2 and array("I").itemsize == 4 and array("Q").itemsize == 8


class Row(msgspec.Struct, frozen=True, kw_only=True):
    """One worker's counts for one bucket and key (a spool file line)."""

    t: int
    """Bucket start, milliseconds since the Unix epoch."""
    span: int
    """Bucket length, milliseconds (the resolution it was counted at)."""
    route: str
    consumer: str
    upstream: str
    status: int
    requests: int
    errors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    duration: float = 0.0
    upstream_duration: float = 0.0
    hist: list[tuple[int, int]] = []
    """Non-empty latency bins as (bin, count)."""


@dataclass(frozen=True, slots=True)
class Query:
    """A time range (Unix seconds, ``start`` <= t < ``end``), a step, and exact-match
    filters."""

    start: float
    end: float
    step: float
    route: str | None = None
    consumer: str | None = None
    upstream: str | None = None

    def filters(self) -> dict[str, str]:
        return {
            d: v
            for d, v in (
                ("route", self.route),
                ("consumer", self.consumer),
                ("upstream", self.upstream),
            )
            if v is not None
        }


class AnalyticsStore(Protocol):
    """What the master needs of a store. Query methods are called from several threads;
    ``ingest`` and ``prune`` only from the ingesting one."""

    def ingest(self, rows: Sequence[Row], sources: Sequence[str] = ()) -> None:
        """Merge ``rows`` (adding to rows of the same bucket and key). ``sources`` (spool
        file names) are recorded in the same transaction, for :meth:`ingested`."""

    def ingested(self, sources: Iterable[str]) -> set[str]:
        """Those of ``sources`` already merged (a crash between the merge and the files'
        removal must not count them twice)."""

    def timeseries(self, q: Query) -> list[dict[str, Any]]: ...

    def top(self, q: Query, by: Dimension, limit: int) -> list[dict[str, Any]]: ...

    def statuses(self, q: Query) -> list[dict[str, int]]: ...

    def summary(self, q: Query) -> dict[str, Any]: ...

    def trends(self, q: Query, period: str) -> list[dict[str, Any]]:
        """From the hourly rollups: one row per hour or UTC day."""

    def prune(self, now: float) -> int:
        """Delete what is past retention; returns the number of bucket rows deleted."""

    def close(self) -> None: ...


# The columns of `buckets` and of its hourly rollup.
_BUCKET_COLUMNS = """    t INTEGER NOT NULL,
    series INTEGER NOT NULL,
    span INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    bytes_in INTEGER NOT NULL,
    bytes_out INTEGER NOT NULL,
    duration REAL NOT NULL,
    upstream_duration REAL NOT NULL,
    hist BLOB NOT NULL,
    PRIMARY KEY (t, series)
"""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    route TEXT NOT NULL,
    consumer TEXT NOT NULL,
    upstream TEXT NOT NULL,
    status INTEGER NOT NULL,
    UNIQUE (route, consumer, upstream, status)
);
-- One row per bucket and series; hist: see encode_hist.
CREATE TABLE IF NOT EXISTS buckets (
{columns}) WITHOUT ROWID;
-- The same per hour (span: 3600000), kept longer.
CREATE TABLE IF NOT EXISTS hourly (
{columns}) WITHOUT ROWID;
-- The busiest bucket's request rate per hour: for the whole gateway (dim '') and for
-- each route, consumer and upstream target.
CREATE TABLE IF NOT EXISTS hourly_peak (
    t INTEGER NOT NULL,
    dim TEXT NOT NULL,
    key TEXT NOT NULL,
    peak REAL NOT NULL,
    PRIMARY KEY (t, dim, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sources (
    name TEXT PRIMARY KEY,
    at REAL NOT NULL
) WITHOUT ROWID;
""".replace("{columns}", _BUCKET_COLUMNS)

_UPSERT = """
INSERT INTO {table} (t, series, span, requests, errors, bytes_in, bytes_out, duration,
                     upstream_duration, hist)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (t, series) DO UPDATE SET
    span = max(span, excluded.span),
    requests = requests + excluded.requests,
    errors = errors + excluded.errors,
    bytes_in = bytes_in + excluded.bytes_in,
    bytes_out = bytes_out + excluded.bytes_out,
    duration = duration + excluded.duration,
    upstream_duration = upstream_duration + excluded.upstream_duration,
    hist = hist_merge(hist, excluded.hist)
"""
_RAISE_PEAK = """
INSERT INTO hourly_peak (t, dim, key, peak) VALUES (?, ?, ?, ?)
ON CONFLICT (t, dim, key) DO UPDATE SET peak = max(peak, excluded.peak)
"""
_COLUMNS = "b.requests, b.errors, b.bytes_in, b.bytes_out, b.duration, b.upstream_duration, b.hist"


def _ms(seconds: float) -> int:
    return math.floor(seconds * 1000)


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 0.0


class _Sums:
    """Counts, sums and a histogram (counts indexed by bin) added up from stored rows."""

    __slots__ = ("bytes_in", "bytes_out", "duration", "errors", "hist", "requests", "upstream")

    def __init__(self) -> None:
        self.requests = self.errors = self.bytes_in = self.bytes_out = 0
        self.duration = self.upstream = 0.0
        self.hist = [0] * HIST_BINS

    def add(self, row: Sequence[Any]) -> None:
        """``row``: the values of ``_COLUMNS``."""
        self.requests += row[0]
        self.errors += row[1]
        self.bytes_in += row[2]
        self.bytes_out += row[3]
        self.duration += row[4]
        self.upstream += row[5]
        hist = self.hist
        for b, n in decode_hist(row[6]):
            hist[b] += n

    def latency(self) -> dict[str, float | None]:
        p50, p95, p99 = percentiles(self.hist)
        return {"p50": p50, "p95": p95, "p99": p99}


class _Pending:
    """Rows of one ingest for one (t, series), merged before they reach the database."""

    __slots__ = ("hist", "span", "sums")

    def __init__(self, span: int) -> None:
        self.span = span
        self.sums = [0, 0, 0, 0, 0.0, 0.0]
        self.hist: dict[int, int] = {}

    def add(self, r: Row) -> None:
        self.span = max(self.span, r.span)
        s = self.sums
        s[0] += r.requests
        s[1] += r.errors
        s[2] += r.bytes_in
        s[3] += r.bytes_out
        s[4] += r.duration
        s[5] += r.upstream_duration
        for b, n in r.hist:
            if 0 <= b < HIST_BINS:
                self.hist[b] = self.hist.get(b, 0) + n

    def values(self, t: int, series: int) -> tuple[Any, ...]:
        return (t, series, self.span, *self.sums, encode_hist(self.hist.items()))


class SqliteStore:
    """The embedded store: one SQLite file in WAL mode. One writer connection (the
    ingesting thread's); every other thread reads through a connection of its own.

    Fine buckets live in ``buckets`` for ``retention``; ``hourly`` holds the same per hour
    for ``rollup_retention`` (by default ``max(retention, 400 days)``). Queries read whole
    hours from ``hourly`` and the rest from ``buckets``, so long ranges stay cheap.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        retention: float,
        rollup_retention: float | None = None,
    ) -> None:
        self.path = Path(path)
        self.retention = retention
        self.rollup_retention = (
            rollup_retention
            if rollup_retention is not None
            else max(retention, ROLLUP_MIN_RETENTION)
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Made here, used by the ingesting thread, closed here again: one at a time.
        self._writer = self._connect(check_same_thread=False)
        self._writer.create_function("hist_merge", 2, _merge_hists, deterministic=True)
        self._writer.execute("PRAGMA journal_mode=WAL")
        # A crash of the machine may lose the last transactions, never corrupt the file.
        self._writer.execute("PRAGMA synchronous=NORMAL")
        self._writer.executescript(_SCHEMA)
        self._series: dict[tuple[str, str, str, int], int] = {}
        self._local = threading.local()

    def _connect(self, check_same_thread: bool = True) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=10.0, isolation_level=None, check_same_thread=check_same_thread
        )
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        self._writer.close()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- writing --------------------------------------------------------------------------

    def _series_id(self, route: str, consumer: str, upstream: str, status: int) -> int:
        key = (route, consumer, upstream, status)
        found = self._series.get(key)
        if found is not None:
            return found
        self._writer.execute(
            "INSERT OR IGNORE INTO series (route, consumer, upstream, status) VALUES (?, ?, ?, ?)",
            key,
        )
        sid = int(
            self._writer.execute(
                "SELECT id FROM series WHERE route = ? AND consumer = ? AND upstream = ? "
                "AND status = ?",
                key,
            ).fetchone()[0]
        )
        self._series[key] = sid
        return sid

    def ingest(self, rows: Sequence[Row], sources: Sequence[str] = ()) -> None:
        w = self._writer
        w.execute("BEGIN IMMEDIATE")
        try:
            # Every worker sends a row per key and bucket: add them up here first, so that
            # the database merges (and re-encodes histograms) once per key.
            fine: dict[tuple[int, int], _Pending] = {}
            hourly: dict[tuple[int, int], _Pending] = {}
            for r in rows:
                sid = self._series_id(r.route, r.consumer, r.upstream, r.status)
                hour = r.t - r.t % _HOUR_MS
                for merged, key, span in (
                    (fine, (r.t, sid), r.span),
                    (hourly, (hour, sid), _HOUR_MS),
                ):
                    pending = merged.get(key)
                    if pending is None:
                        pending = merged[key] = _Pending(span)
                    pending.add(r)
            w.executemany(_UPSERT.format(table="buckets"), [p.values(*k) for k, p in fine.items()])
            w.executemany(_UPSERT.format(table="hourly"), [p.values(*k) for k, p in hourly.items()])
            for t in sorted({t for t, _ in fine}):
                self._raise_peaks(t)
            now = time.time()
            w.executemany(
                "INSERT OR IGNORE INTO sources (name, at) VALUES (?, ?)",
                [(s, now) for s in sources],
            )
            w.execute("COMMIT")
        except BaseException:
            w.execute("ROLLBACK")
            self._series.clear()  # ids made in the rolled-back transaction are gone
            raise

    def _raise_peaks(self, t: int) -> None:
        """The busiest-bucket rates of bucket ``t``'s hour, now that ``t`` has grown."""
        totals: dict[tuple[str, str], int] = {}
        span = 0
        for route, consumer, upstream, requests, row_span in self._writer.execute(
            "SELECT se.route, se.consumer, se.upstream, b.requests, b.span "
            "FROM buckets b JOIN series se ON se.id = b.series WHERE b.t = ?",
            (t,),
        ):
            span = max(span, row_span)
            for key in (("", ""), ("route", route), ("consumer", consumer), ("upstream", upstream)):
                totals[key] = totals.get(key, 0) + requests
        if span <= 0:
            return
        hour = t - t % _HOUR_MS
        self._writer.executemany(
            _RAISE_PEAK,
            [(hour, dim, key, n * 1000.0 / span) for (dim, key), n in totals.items()],
        )

    def ingested(self, sources: Iterable[str]) -> set[str]:
        names = list(sources)
        found: set[str] = set()
        for i in range(0, len(names), 500):
            chunk = names[i : i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                row[0]
                for row in self._writer.execute(
                    f"SELECT name FROM sources WHERE name IN ({marks})", chunk
                )
            )
        return found

    def prune(self, now: float) -> int:
        deleted = self._prune(("buckets",), _ms(now - self.retention))
        rolled = self._prune(("hourly", "hourly_peak"), _ms(now - self.rollup_retention))
        w = self._writer
        w.execute("DELETE FROM sources WHERE at < ?", (now - _SOURCES_KEPT,))
        if rolled:
            # Series no row refers to any more (consumers long gone). Every series with
            # bucket rows has hourly rows too, which are kept at least as long.
            w.execute("DELETE FROM series WHERE id NOT IN (SELECT DISTINCT series FROM hourly)")
            self._series.clear()
        return deleted

    def _prune(self, tables: Sequence[str], cutoff: int) -> int:
        """Delete rows with t < ``cutoff`` from ``tables``, a slice of time per transaction,
        so that no single transaction (and the WAL) grows with the backlog."""
        w = self._writer
        oldest = w.execute(f"SELECT min(t) FROM {tables[0]}").fetchone()[0]
        deleted = 0
        while oldest is not None and oldest < cutoff:
            upto = min(oldest + _PRUNE_SLICE_MS, cutoff)
            w.execute("BEGIN")
            try:
                for i, table in enumerate(tables):
                    n = w.execute(f"DELETE FROM {table} WHERE t < ?", (upto,)).rowcount
                    if i == 0:
                        deleted += n
                w.execute("COMMIT")
            except BaseException:
                w.execute("ROLLBACK")
                raise
            oldest = w.execute(f"SELECT min(t) FROM {tables[0]}").fetchone()[0]
        return deleted

    # --- reading --------------------------------------------------------------------------

    def _rows(self, q: Query, table: str, start: int, end: int, key: str = "NULL") -> Iterator[Any]:
        """``key`` and ``_COLUMNS`` of the rows of ``table`` in [start, end) that match the
        filters; ``key`` may use ``b.t`` and the series' columns as ``se.*``."""
        sql = f"SELECT {key}, {_COLUMNS} FROM {table} b"
        if "se." in key:
            sql += " JOIN series se ON se.id = b.series"
        sql += " WHERE b.t >= ? AND b.t < ?"
        params: list[Any] = [start, end]
        filters = q.filters()
        if filters:
            conds = " AND ".join(f"{d} = ?" for d in filters)
            sql += f" AND b.series IN (SELECT id FROM series WHERE {conds})"
            params += filters.values()
        return iter(self._reader().execute(sql, params))

    @staticmethod
    def _parts(start: int, end: int) -> list[tuple[str, int, int]]:
        """[start, end) as (table, from, to): whole hours from the rollup, the rest from
        the buckets."""
        first = -(-start // _HOUR_MS) * _HOUR_MS
        last = end - end % _HOUR_MS
        if first >= last:
            return [("buckets", start, end)]
        parts = [("hourly", first, last)]
        if start < first:
            parts.append(("buckets", start, first))
        if last < end:
            parts.append(("buckets", last, end))
        return parts

    def _grouped(self, q: Query, key: str) -> dict[Any, _Sums]:
        """Sums over the query's range, grouped by ``key``."""
        groups: dict[Any, _Sums] = {}
        for table, start, end in self._parts(_ms(q.start), math.ceil(q.end * 1000)):
            for row in self._rows(q, table, start, end, key):
                sums = groups.get(row[0])
                if sums is None:
                    sums = groups[row[0]] = _Sums()
                sums.add(row[1:])
        return groups

    def timeseries(self, q: Query) -> list[dict[str, Any]]:
        step = max(1, round(q.step * 1000))
        start = _ms(q.start)
        start -= start % step
        end = math.ceil(q.end * 1000)
        # Steps of whole hours start on hours: the rollup has them.
        table = "hourly" if step % _HOUR_MS == 0 else "buckets"
        groups: dict[int, _Sums] = {}
        for row in self._rows(q, table, start, end, f"b.t - (b.t - {start}) % {step}"):
            sums = groups.get(row[0])
            if sums is None:
                sums = groups[row[0]] = _Sums()
            sums.add(row[1:])
        empty = _Sums()
        points = []
        for s in range(start, end, step):
            g = groups.get(s, empty)
            points.append(
                {
                    "t": s / 1000,
                    "requests": g.requests,
                    "errors": g.errors,
                    "error_rate": _rate(g.errors, g.requests),
                    "rps": round(g.requests * 1000 / step, 6),
                    **g.latency(),
                    "bytes_in": g.bytes_in,
                    "bytes_out": g.bytes_out,
                }
            )
        return points

    def top(self, q: Query, by: Dimension, limit: int) -> list[dict[str, Any]]:
        if by not in DIMENSIONS:
            raise ValueError(f"cannot group by {by!r}")
        groups = self._grouped(q, f"se.{by}")
        ranked = sorted(groups.items(), key=lambda kv: (-kv[1].requests, kv[0]))[:limit]
        return [
            {
                "key": k,
                "requests": g.requests,
                "errors": g.errors,
                "error_rate": _rate(g.errors, g.requests),
                **g.latency(),
                "bytes_out": g.bytes_out,
            }
            for k, g in ranked
        ]

    def statuses(self, q: Query) -> list[dict[str, int]]:
        groups = self._grouped(q, "se.status")
        return [{"status": s, "requests": groups[s].requests} for s in sorted(groups)]

    def summary(self, q: Query) -> dict[str, Any]:
        g = self._grouped(q, "NULL").get(None) or _Sums()
        seconds = max(q.end - q.start, 1e-9)
        return {
            "requests": g.requests,
            "errors": g.errors,
            "error_rate": _rate(g.errors, g.requests),
            "rps": round(g.requests / seconds, 6),
            **g.latency(),
            "mean": round(g.duration / g.requests, 7) if g.requests else None,
            "upstream_mean": round(g.upstream / g.requests, 7) if g.requests else None,
            "bytes_in": g.bytes_in,
            "bytes_out": g.bytes_out,
        }

    def trends(self, q: Query, period: str) -> list[dict[str, Any]]:
        size = PERIODS[period] * 1000
        start = _ms(q.start)
        start -= start % size
        end = math.ceil(q.end * 1000)
        groups: dict[int, _Sums] = {}
        for row in self._rows(q, "hourly", start, end, f"b.t - b.t % {size}"):
            sums = groups.get(row[0])
            if sums is None:
                sums = groups[row[0]] = _Sums()
            sums.add(row[1:])
        peaks = self._peaks(q, start, end, size)
        empty = _Sums()
        rows = []
        for p in range(start, end, size):
            g = groups.get(p, empty)
            rows.append(
                {
                    "t": p / 1000,
                    "requests": g.requests,
                    "errors": g.errors,
                    "error_rate": _rate(g.errors, g.requests),
                    "rps": round(g.requests * 1000 / size, 6),
                    **g.latency(),
                    "peak_rps": round(peaks.get(p, 0.0), 6),
                }
            )
        return rows

    def _peaks(self, q: Query, start: int, end: int, size: int) -> dict[int, float]:
        """Peak rates per period. Kept for the whole gateway and per single dimension;
        with filters on several dimensions, the lowest of their peaks (an upper bound)."""
        filters = q.filters() or {"": ""}
        db = self._reader()
        per_dim: list[dict[int, float]] = []
        for dim, key in filters.items():
            per_dim.append(
                dict(
                    db.execute(
                        "SELECT t - t % ? AS p, max(peak) FROM hourly_peak "
                        "WHERE dim = ? AND key = ? AND t >= ? AND t < ? GROUP BY p",
                        (size, dim, key, start, end),
                    ).fetchall()
                )
            )
        periods = set.intersection(*(set(d) for d in per_dim))
        return {p: min(d[p] for d in per_dim) for p in periods}
