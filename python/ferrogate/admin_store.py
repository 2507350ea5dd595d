"""Entity stores behind the admin API: the whole entity document with a revision, and the
audit log.

A store holds one document (``{kind: section}``, see ``admin_entities``) at a time; a
change writes a whole new document together with its audit entries, and only if the
revision it was based on is still the latest (optimistic concurrency). Whole-document
get/put is what declarative sync (export, import, diff) needs too, and what a shared
database store implements the same way.
"""

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "AuditEntry",
    "ConfigStore",
    "FileStore",
    "ReadOnlyStore",
    "RevisionConflict",
    "Snapshot",
    "SqliteStore",
    "StoreUnavailable",
    "audit_query",
    "open_store",
]


def audit_query(
    table: str, mark: str, *, entity: str | None, since: float | None, limit: int
) -> tuple[str, list[Any]]:
    """The audit log query of every SQL store: ``mark`` is the driver's placeholder."""
    sql = f"SELECT at, who, role, method, entity, before, after, revision FROM {table}"
    where: list[str] = []
    args: list[Any] = []
    if entity:
        # kind, or kind/name
        where.append(f"(entity = {mark} OR entity LIKE {mark} ESCAPE '\\')")
        escaped = entity.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        args += [entity, escaped + "/%"]
    if since is not None:
        where.append(f"at >= {mark}")
        args.append(since)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY id DESC LIMIT {mark}"
    args.append(limit)
    return sql, args


@dataclass(frozen=True, slots=True)
class Snapshot:
    revision: int
    document: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: float
    who: str
    role: str
    method: str
    entity: str
    """``kind/name``"""
    before: Any
    after: Any
    """Both with secrets masked."""
    revision: int = 0

    def row(self, revision: int) -> tuple[Any, ...]:
        """The audit table's columns, in the stores' insert order."""
        return (
            self.at,
            self.who,
            self.role,
            self.method,
            self.entity,
            json.dumps(self.before),
            json.dumps(self.after),
            revision,
        )


class RevisionConflict(Exception):
    """The document changed since the revision a change was based on."""


class ReadOnlyStore(Exception):
    """DB-less mode: the config file is the source of truth."""


class StoreUnavailable(Exception):
    """A shared store (the database) cannot be reached now."""


class ConfigStore(Protocol):
    writable: bool

    def load(self) -> Snapshot | None:
        """The latest document, or None if the store was never written."""
        ...

    def save(
        self, document: dict[str, Any], base_revision: int, audit: list[AuditEntry]
    ) -> Snapshot:
        """Store ``document`` as the next revision if ``base_revision`` is the latest."""
        ...

    def record(self, audit: list[AuditEntry]) -> None:
        """Audit entries of changes made outside the API (a reloaded file)."""
        ...

    def audit(
        self, *, entity: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[AuditEntry]:
        """Newest first."""
        ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    revision INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    who TEXT NOT NULL,
    role TEXT NOT NULL,
    method TEXT NOT NULL,
    entity TEXT NOT NULL,
    before TEXT,
    after TEXT,
    revision INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_entity ON audit (entity, at);
"""

# Older document revisions kept for inspection; the audit log keeps every change anyway.
_KEEP_REVISIONS = 100


class SqliteStore:
    """The embedded store: one SQLite file, every revision a row."""

    writable = True

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection guarded by a lock: the admin API is low traffic.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def load(self) -> Snapshot | None:
        with self._lock:
            row = self._db.execute(
                "SELECT revision, body FROM documents ORDER BY revision DESC LIMIT 1"
            ).fetchone()
        return None if row is None else Snapshot(int(row[0]), json.loads(row[1]))

    def save(
        self, document: dict[str, Any], base_revision: int, audit: list[AuditEntry]
    ) -> Snapshot:
        body = json.dumps(document, separators=(",", ":"))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT MAX(revision) FROM documents").fetchone()
                latest = int(row[0] or 0)
                if latest != base_revision:
                    raise RevisionConflict(f"revision {latest} is newer than {base_revision}")
                revision = latest + 1
                self._db.execute(
                    "INSERT INTO documents (revision, created, body) VALUES (?, ?, ?)",
                    (revision, time.time(), body),
                )
                self._db.execute(
                    "DELETE FROM documents WHERE revision <= ?", (revision - _KEEP_REVISIONS,)
                )
                self._insert_audit(audit, revision)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return Snapshot(revision, document)

    def _insert_audit(self, audit: list[AuditEntry], revision: int) -> None:
        self._db.executemany(
            "INSERT INTO audit (at, who, role, method, entity, before, after, revision) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [e.row(revision) for e in audit],
        )

    def record(self, audit: list[AuditEntry]) -> None:
        with self._lock:
            row = self._db.execute("SELECT MAX(revision) FROM documents").fetchone()
            self._insert_audit(audit, int(row[0] or 0))

    def audit(
        self, *, entity: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[AuditEntry]:
        sql, args = audit_query("audit", "?", entity=entity, since=since, limit=limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [
            AuditEntry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), json.loads(r[6]), r[7])
            for r in rows
        ]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class FileStore:
    """DB-less mode: the document is the config file's (``load`` gives what the master last
    loaded); the audit log is a JSON-lines file of the changes reloads brought."""

    writable = False

    def __init__(self, audit_path: str | Path) -> None:
        self.audit_path = Path(audit_path)
        self.snapshot: Snapshot | None = None
        self._lock = threading.Lock()

    def load(self) -> Snapshot | None:
        return self.snapshot

    def save(
        self, document: dict[str, Any], base_revision: int, audit: list[AuditEntry]
    ) -> Snapshot:
        raise ReadOnlyStore("the config file is the source of truth (admin.store.type: file)")

    def record(self, audit: list[AuditEntry]) -> None:
        if not audit:
            return
        with self._lock, self.audit_path.open("a", encoding="utf-8") as f:
            for e in audit:
                f.write(json.dumps(asdict(e), separators=(",", ":")) + "\n")

    def audit(
        self, *, entity: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[AuditEntry]:
        try:
            with self._lock:
                lines = self.audit_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out: list[AuditEntry] = []
        for line in reversed(lines):
            e = AuditEntry(**json.loads(line))
            if entity and e.entity != entity and not e.entity.startswith(entity + "/"):
                continue
            if since is not None and e.at < since:
                continue
            out.append(e)
            if len(out) >= limit:
                break
        return out

    def close(self) -> None:
        pass


def open_store(settings: dict[str, Any]) -> ConfigStore:
    """The store of a normalized ``admin.store`` section."""
    if settings["type"] == "file":
        return FileStore(settings["path"])
    if settings["type"] == "postgres":
        # Imported here: psycopg is needed by cluster mode only.
        from ferrogate.admin_pgstore import PostgresStore

        return PostgresStore(settings["dsn"], settings["cache"])
    return SqliteStore(settings["path"])
