"""The admin API's shared store: PostgreSQL, for several gateway nodes (cluster mode).

Every revision is a row; a save is one transaction that takes an advisory lock, checks the
base revision, inserts the document and its audit entries and sends a NOTIFY with the new
revision, so a notification is only ever seen for a committed change. Each node LISTENs on
its own connection (``RevisionWatcher``) and also polls the latest revision, as a safety net
for notifications lost while that connection was down.

The store never needs the database to start: the last document it read or wrote is cached
on local disk, and a node that starts while the database is unreachable serves that.
"""

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from ferrogate.admin_store import (
    AuditEntry,
    RevisionConflict,
    Snapshot,
    StoreUnavailable,
    audit_query,
)
from ferrogate.events import emit
from ferrogate.runtime_files import write_atomic

__all__ = ["CHANNEL", "SCHEMA_VERSION", "PostgresStore", "RevisionWatcher"]

CHANNEL = "ferrogate_config"
SCHEMA_VERSION = 1
# pg_advisory_xact_lock key serializing schema creation and saves across nodes ("fgadmin").
_LOCK_KEY = 0x6667_6164_6D69_6E
_KEEP_REVISIONS = 100
_CONNECT: dict[str, Any] = {
    "connect_timeout": 3,
    # A database host that vanishes (no RST) is noticed in seconds, not at the TCP timeout.
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 2,
}
_FIRST_BACKOFF = 0.25
_MAX_BACKOFF = 5.0

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS ferrogate_schema (version integer NOT NULL)",
    """CREATE TABLE IF NOT EXISTS ferrogate_documents (
        revision bigint PRIMARY KEY,
        created double precision NOT NULL,
        body text NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS ferrogate_audit (
        id bigserial PRIMARY KEY,
        at double precision NOT NULL,
        who text NOT NULL,
        role text NOT NULL,
        method text NOT NULL,
        entity text NOT NULL,
        before text,
        after text,
        revision bigint NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS ferrogate_audit_entity ON ferrogate_audit (entity, at)",
]


def _reason(e: BaseException) -> str:
    # libpq messages can span lines ("connection refused\n\tIs the server running...").
    return " ".join(str(e).split()) or type(e).__name__


def _connect(dsn: str, application_name: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True, application_name=application_name, **_CONNECT)


def _ensure_schema(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        for statement in _SCHEMA:
            conn.execute(statement)
        row = conn.execute("SELECT max(version) FROM ferrogate_schema").fetchone()
        version = row[0] if row else None
        if version is None:
            conn.execute("INSERT INTO ferrogate_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
        elif version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"the database has schema version {version}; this ferrogate knows "
                f"{SCHEMA_VERSION} (upgrade ferrogate)"
            )


class PostgresStore:
    """A ``ConfigStore`` on PostgreSQL; every call raises StoreUnavailable while the database
    cannot be reached, and reconnects on the next call."""

    writable = True

    def __init__(self, dsn: str, cache_path: str | Path | None) -> None:
        self.dsn = dsn
        # None: no cache (a one-off reader such as `ferrogate config export`).
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._cached_revision = -1

    # --- connection --------------------------------------------------------------------

    def _run(self, work: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        with self._lock:
            for attempt in (1, 2):
                reused = self._conn is not None and not self._conn.closed
                if not reused:
                    self._open()
                assert self._conn is not None
                try:
                    return work(self._conn)
                except psycopg.OperationalError as e:
                    self._drop()
                    # A connection that broke while idle (the database restarted) gets one
                    # retry on a fresh one; a fresh one failing means the database is down.
                    if not reused or attempt == 2:
                        raise StoreUnavailable(_reason(e)) from None
            raise AssertionError("unreachable")

    def _open(self) -> None:
        try:
            conn = _connect(self.dsn, "ferrogate")
        except psycopg.Error as e:
            raise StoreUnavailable(_reason(e)) from None
        try:
            _ensure_schema(conn)
        except psycopg.Error as e:
            conn.close()
            raise StoreUnavailable(_reason(e)) from None
        except StoreUnavailable:
            conn.close()
            raise
        self._conn = conn

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None

    # --- the cache on local disk --------------------------------------------------------

    def _remember(self, snapshot: Snapshot) -> None:
        if self.cache_path is None or snapshot.revision == self._cached_revision:
            return
        text = json.dumps(
            {"revision": snapshot.revision, "document": snapshot.document}, separators=(",", ":")
        )
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            # It holds credentials (HMAC and JWT secrets, key hashes): ours only.
            write_atomic(self.cache_path, text, mode=0o600)
            self._cached_revision = snapshot.revision
        except OSError as e:
            emit("warning", "admin_cache_write_failed", path=str(self.cache_path), error=str(e))

    def cached(self) -> Snapshot | None:
        """The last document this node read or wrote, or None."""
        if self.cache_path is None:
            return None
        try:
            data = json.loads(self.cache_path.read_text(encoding="utf-8"))
            return Snapshot(int(data["revision"]), dict(data["document"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # --- ConfigStore -------------------------------------------------------------------

    def latest_revision(self) -> int:
        def work(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute("SELECT COALESCE(max(revision), 0) FROM ferrogate_documents")
            return int(row.fetchone()[0])  # type: ignore[index]

        return int(self._run(work))

    def load(self) -> Snapshot | None:
        def work(conn: psycopg.Connection[Any]) -> Any:
            return conn.execute(
                "SELECT revision, body FROM ferrogate_documents ORDER BY revision DESC LIMIT 1"
            ).fetchone()

        row = self._run(work)
        if row is None:
            return None
        snapshot = Snapshot(int(row[0]), json.loads(row[1]))
        self._remember(snapshot)
        return snapshot

    def save(
        self, document: dict[str, Any], base_revision: int, audit: list[AuditEntry]
    ) -> Snapshot:
        body = json.dumps(document, separators=(",", ":"))

        def work(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                row = conn.execute(
                    "SELECT COALESCE(max(revision), 0) FROM ferrogate_documents"
                ).fetchone()
                latest = int(row[0]) if row else 0
                if latest != base_revision:
                    raise RevisionConflict(f"revision {latest} is newer than {base_revision}")
                revision = latest + 1
                conn.execute(
                    "INSERT INTO ferrogate_documents (revision, created, body) VALUES (%s, %s, %s)",
                    (revision, time.time(), body),
                )
                conn.execute(
                    "DELETE FROM ferrogate_documents WHERE revision <= %s",
                    (revision - _KEEP_REVISIONS,),
                )
                self._insert_audit(conn, audit, revision)
                # Delivered at commit, and only if it commits.
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(revision)))
            return revision

        snapshot = Snapshot(int(self._run(work)), document)
        self._remember(snapshot)
        return snapshot

    @staticmethod
    def _insert_audit(
        conn: psycopg.Connection[Any], audit: list[AuditEntry], revision: int
    ) -> None:
        if not audit:
            return
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO ferrogate_audit "
                "(at, who, role, method, entity, before, after, revision) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                [e.row(revision) for e in audit],
            )

    def record(self, audit: list[AuditEntry]) -> None:
        def work(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                row = conn.execute(
                    "SELECT COALESCE(max(revision), 0) FROM ferrogate_documents"
                ).fetchone()
                self._insert_audit(conn, audit, int(row[0]) if row else 0)

        self._run(work)

    def audit(
        self, *, entity: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[AuditEntry]:
        sql, args = audit_query("ferrogate_audit", "%s", entity=entity, since=since, limit=limit)
        rows = self._run(lambda conn: conn.execute(sql, args).fetchall())
        return [
            AuditEntry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), json.loads(r[6]), int(r[7]))
            for r in rows
        ]

    def watcher(
        self, poll_interval: float, on_revision: Callable[[int], None]
    ) -> "RevisionWatcher":
        return RevisionWatcher(self.dsn, poll_interval, on_revision)

    def close(self) -> None:
        with self._lock:
            self._drop()


class RevisionWatcher:
    """A thread that calls ``on_revision(latest)`` when a NOTIFY arrives, every
    ``poll_interval`` and after every reconnect; it reconnects with backoff."""

    def __init__(self, dsn: str, poll_interval: float, on_revision: Callable[[int], None]) -> None:
        self.dsn = dsn
        self.poll_interval = poll_interval
        self.on_revision = on_revision
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="admin-store-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = _FIRST_BACKOFF
        lost: str | None = None
        while not self._stop.is_set():
            try:
                conn = _connect(self.dsn, f"ferrogate-watch-{os.getpid()}")
            except psycopg.Error as e:
                if lost is None:
                    lost = _reason(e)
                    emit("warning", "admin_store_unreachable", error=lost)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            if lost is not None:
                emit("info", "admin_store_reconnected")
                lost = None
            backoff = _FIRST_BACKOFF
            try:
                with conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    # Whatever changed while this node was not listening.
                    self._check(conn)
                    next_poll = time.monotonic() + self.poll_interval
                    while not self._stop.is_set():
                        notified = False
                        # Short waits, so that stop() is prompt.
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            notified = True
                        if notified or time.monotonic() >= next_poll:
                            self._check(conn)
                            next_poll = time.monotonic() + self.poll_interval
            except psycopg.Error as e:
                if not self._stop.is_set():
                    lost = _reason(e)
                    emit("warning", "admin_store_unreachable", error=lost)
                    self._stop.wait(backoff)

    def _check(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute("SELECT COALESCE(max(revision), 0) FROM ferrogate_documents").fetchone()
        latest = int(row[0]) if row else 0
        try:
            self.on_revision(latest)
        except Exception as e:  # the watcher must outlive any one failure
            emit("error", "admin_revision_apply_failed", revision=latest, error=_reason(e))
