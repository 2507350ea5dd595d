"""The `admin:` section: the admin API's listener, its tokens and roles, and its store."""

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ferrogate.consumers import SecretFile, read_secret
from ferrogate.problems import DataPath
from ferrogate.units import parse_duration

__all__ = ["ROLES", "Admin", "AdminPostgres", "AdminStore", "AdminToken", "normalize_admin"]

Role = Literal["read-only", "operator", "admin"]
ROLES: tuple[str, ...] = ("read-only", "operator", "admin")


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class AdminToken(_Section, kw_only=True, frozen=True):
    """A bearer token of the admin API and the role it carries."""

    token: Annotated[
        str | SecretFile,
        Meta(description="The token inline (${VAR} for an environment variable) or {file: PATH}."),
    ]
    role: Annotated[
        Role,
        Meta(
            description="read-only: GET only | operator: also changes routes, upstreams, "
            "plugins and the other entities except consumers | admin: everything."
        ),
    ]


class AdminPostgres(_Section, kw_only=True, frozen=True):
    """A PostgreSQL database that several gateway nodes share (cluster mode)."""

    dsn: Annotated[
        str | SecretFile,
        Meta(
            description="A libpq connection string or URI (${VAR} for an environment "
            "variable) or {file: PATH}."
        ),
    ]
    poll_interval: Annotated[
        str | float,
        Meta(
            description="How often the latest revision is checked besides LISTEN/NOTIFY "
            "(a safety net for lost notifications), e.g. 5s."
        ),
    ] = "5s"
    cache: Annotated[
        str | None,
        Meta(
            description="The last document read from the database, served when a node starts "
            "while the database is unreachable (default ferrogate-admin-cache.json; relative "
            "to the config file)."
        ),
    ] = None


class AdminStore(_Section, kw_only=True, frozen=True):
    """Where the entities (routes, upstreams, ...) live."""

    type: Annotated[
        Literal["sqlite", "file", "postgres"] | None,
        Meta(
            description="sqlite (the default): an embedded database, seeded from this file on "
            "first start, changed through the API | file: this file is the source of truth "
            "and the API is read-only | postgres: a database nodes share (implied by a "
            "postgres section)."
        ),
    ] = None
    path: Annotated[
        str | None,
        Meta(
            description="The SQLite database (default ferrogate-admin.db), or with type: file "
            "the JSON-lines audit log (default ferrogate-admin-audit.jsonl); relative to the "
            "config file."
        ),
    ] = None
    postgres: Annotated[
        AdminPostgres | None, Meta(description="The shared database of cluster mode.")
    ] = None


class Admin(_Section, kw_only=True, frozen=True):
    """The admin REST API, on its own listener (never a proxy port)."""

    listen: Annotated[str, Meta(description="host:port of the admin API.")]
    tokens: Annotated[
        dict[str, AdminToken],
        Meta(description="Tokens by name; the name is who the audit log records."),
    ] = {}
    store: Annotated[AdminStore, Meta(description="The entity store.")] = msgspec.field(
        default_factory=AdminStore
    )


def normalize_admin(
    admin: Admin | None,
    base_dir: Path,
    taken: list[str],
    address: Callable[[str, DataPath], str],
    report: Callable[[DataPath, str], None],
) -> dict[str, Any] | None:
    """The normalized `admin` section; ``taken`` are the addresses other listeners use."""
    if admin is None:
        return None
    where = address(admin.listen, ("admin", "listen"))
    if where in taken:
        report(("admin", "listen"), "the admin API needs its own address (not a proxy port)")
    tokens: dict[str, dict[str, str]] = {}
    seen: Mapping[str, str] = {}
    for name, spec in admin.tokens.items():
        at: DataPath = ("admin", "tokens", name, "token")
        value = read_secret(spec.token, base_dir, report, at, "token")
        if len(value) < 16:
            report(at, "an admin token needs at least 16 characters")
        elif value in seen:
            report(at, f"the same token as '{seen[value]}'")
        seen = {**seen, value: name}
        tokens[name] = {"token": value, "role": spec.role}
    store = admin.store
    kind = store.type or ("postgres" if store.postgres is not None else "sqlite")
    settings: dict[str, Any] = {"type": kind}
    if kind == "postgres":
        if store.postgres is None:
            report(("admin", "store", "postgres"), "type: postgres needs a postgres section")
            return None
        pg = store.postgres
        at_pg: DataPath = ("admin", "store", "postgres")
        try:
            poll = parse_duration(pg.poll_interval)
        except ValueError as e:
            report((*at_pg, "poll_interval"), str(e))
            poll = 5.0
        if poll <= 0:
            report((*at_pg, "poll_interval"), "must be more than 0")
        settings |= {
            "dsn": read_secret(pg.dsn, base_dir, report, (*at_pg, "dsn"), "DSN"),
            "poll_interval": poll,
            "cache": str(base_dir / (pg.cache or "ferrogate-admin-cache.json")),
            # Shown in messages and events: never the DSN (it may hold a password).
            "path": "postgres",
        }
    else:
        if store.postgres is not None:
            report(("admin", "store", "postgres"), f"not used with type: {kind}")
        default = "ferrogate-admin.db" if kind == "sqlite" else "ferrogate-admin-audit.jsonl"
        settings["path"] = str(base_dir / (store.path or default))
    return {"listen": where, "tokens": tokens, "store": settings}
