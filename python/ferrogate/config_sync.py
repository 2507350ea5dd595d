"""``ferrogate config export|diff|import``: the entity document as a YAML file (declarative
sync, GitOps).

Everything goes through a running gateway's admin API (``GET``/``PUT /config``), so it
works the same for every store and an import is validated with that node's local settings
like any change: one revision, one audit entry. ``export`` and ``diff`` can also read a
store directly (``--store sqlite:PATH`` or ``--store postgres:DSN``), e.g. for backups.

The file holds exactly what the store holds: credentials as their hashes (``key_sha256``,
``password_hash``), so export -> import -> export is byte-identical.
"""

import argparse
import difflib
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml

from ferrogate import admin_entities as ent
from ferrogate.admin_cli import DEFAULT_URL
from ferrogate.problems import ConfigError, DataPath, Problem
from ferrogate.yaml_source import SourceDocument, parse_source

__all__ = ["add_parser", "dump_document", "read_document"]

Document = dict[str, Any]


class SyncError(Exception):
    """Printed as is; exit status 2."""


def add_parser(commands: Any) -> None:
    config = commands.add_parser(
        "config", help="export, diff and import the entities (routes, upstreams, ...) as YAML"
    )
    config.add_argument(
        "--admin-url",
        default=os.environ.get("FERROGATE_ADMIN_URL", DEFAULT_URL),
        help=f"the admin API (else $FERROGATE_ADMIN_URL, else {DEFAULT_URL})",
    )
    config.add_argument("--token", help="an admin token (else $FERROGATE_ADMIN_TOKEN)")
    verbs = config.add_subparsers(dest="verb", required=True, metavar="VERB")
    export = verbs.add_parser("export", help="write the entities to a YAML file")
    export.add_argument("-o", "--output", default="-", help="the file (default stdout)")
    _store_option(export)
    _api_options(export)
    export.set_defaults(handler=run_config, sync=_export)
    diff = verbs.add_parser(
        "diff", help="what importing FILE would change (exit 0: nothing, 1: something)"
    )
    diff.add_argument("file")
    _store_option(diff)
    _api_options(diff)
    diff.set_defaults(handler=run_config, sync=_diff)
    imp = verbs.add_parser("import", help="make the entities those of FILE, as one change")
    imp.add_argument("file")
    imp.add_argument("--dry-run", action="store_true", help="print the diff, change nothing")
    _api_options(imp)
    imp.set_defaults(handler=run_config, sync=_import)


def _api_options(parser: argparse.ArgumentParser) -> None:
    # Also after the verb; SUPPRESS keeps what was given before it.
    parser.add_argument("--admin-url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--token", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        metavar="sqlite:PATH|postgres:DSN",
        help="read this store directly instead of the admin API",
    )


# --- the file ------------------------------------------------------------------------------


def dump_document(doc: Document) -> str:
    """The canonical YAML of a document: kinds in a fixed order, entities in theirs."""
    ordered = {kind: doc[kind] for kind in ent.KINDS if kind in doc}
    return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, width=100)


def read_document(path: str) -> tuple[Document, SourceDocument]:
    """The entity document of a sync file; SyncError with file:line problems if it is not
    one. (The entities themselves are checked where they are imported.)"""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SyncError(f"{path}: cannot read the file: {e}") from None
    # No ${VAR} interpolation: the file is data, like the API's bodies.
    try:
        source = parse_source(text, path, env={})
    except ConfigError as e:
        raise SyncError(str(e)) from None
    if source.problems:
        raise SyncError("\n".join(str(p) for p in source.problems))
    data = source.data if source.data is not None else {}
    if not isinstance(data, dict):
        raise SyncError(str(source.problem((), "a sync file is a mapping of entity kinds")))
    local, doc = ent.split_document(data)
    if local:
        raise SyncError(
            "\n".join(
                str(
                    source.problem(
                        (k,),
                        f"not an entity kind ({', '.join(ent.KINDS)}); node-local settings "
                        "stay in the config file",
                        key=True,
                    )
                )
                for k in local
            )
        )
    return doc, source


def _position(source: SourceDocument, api_path: str, message: str) -> Problem:
    # The API's problem paths (``routes/3/upstream``) name where in the file it is.
    path: DataPath = tuple(int(p) if p.isdigit() else p for p in api_path.split("/") if p)
    return source.problem(path, message)


# --- where the current document comes from -------------------------------------------------


class _Api:
    def __init__(self, args: argparse.Namespace) -> None:
        token = args.token or os.environ.get("FERROGATE_ADMIN_TOKEN")
        if not token:
            raise SyncError("ferrogate config: give --token or set FERROGATE_ADMIN_TOKEN")
        self.url = args.admin_url
        self.client = httpx.Client(
            base_url=args.admin_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.client.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise SyncError(f"ferrogate config: cannot reach {self.url}: {e}") from None

    def current(self) -> tuple[int, Document]:
        r = self.request("GET", "/config")
        _raise_for(r)
        body = r.json()
        return int(body["revision"]), dict(body["document"])


def _raise_for(r: httpx.Response, source: SourceDocument | None = None) -> None:
    if r.is_success:
        return
    try:
        error = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        raise SyncError(f"ferrogate config: {r.status_code} {r.text.strip()}") from None
    lines = [f"ferrogate config: {r.status_code} {error['message']}"]
    for p in error.get("problems") or []:
        if source is not None:
            lines.append(str(_position(source, p["path"], p["message"])))
        else:
            lines.append(f"  {p['path']}: {p['message']}")
    raise SyncError("\n".join(lines))


def _from_store(spec: str) -> Document:
    kind, sep, where = spec.partition(":")
    if not sep or not where:
        raise SyncError("--store: sqlite:PATH or postgres:DSN")
    if kind == "sqlite":
        if not Path(where).is_file():
            raise SyncError(f"--store: no SQLite store at {where}")
        from ferrogate.admin_store import SqliteStore

        store: Any = SqliteStore(where)
    elif kind == "postgres":
        from ferrogate.admin_pgstore import PostgresStore

        store = PostgresStore(where, None)
    else:
        raise SyncError(f"--store: unknown store type {kind!r} (sqlite or postgres)")
    from ferrogate.admin_store import StoreUnavailable

    try:
        snapshot = store.load()
    except StoreUnavailable as e:
        raise SyncError(f"--store: cannot reach the database: {e}") from None
    finally:
        store.close()
    return dict(snapshot.document) if snapshot is not None else {}


# --- diff ----------------------------------------------------------------------------------


def changes_text(current: Document, wanted: Document) -> list[str]:
    """Per entity: ``+ kind/name`` added, ``- kind/name`` removed, ``~ kind/name`` changed
    followed by a unified diff of its YAML."""
    out: list[str] = []
    for c in ent.diff(current, wanted):
        name = f"{c.kind}/{c.key}"
        if c.before is None:
            out.append(f"+ {name}")
        elif c.after is None:
            out.append(f"- {name}")
        else:
            out.append(f"~ {name}")
            before = yaml.safe_dump(c.before, sort_keys=False).splitlines(keepends=True)
            after = yaml.safe_dump(c.after, sort_keys=False).splitlines(keepends=True)
            out += [
                line.rstrip("\n")
                for line in difflib.unified_diff(
                    before, after, f"current/{name}", f"file/{name}", n=3
                )
            ]
    return out


# --- the commands --------------------------------------------------------------------------


def run_config(args: argparse.Namespace) -> int:
    try:
        status: int = args.sync(args)
        return status
    except SyncError as e:
        print(e, file=sys.stderr)
        return 2


def _export(args: argparse.Namespace) -> int:
    doc = _from_store(args.store) if args.store else _Api(args).current()[1]
    text = dump_document(doc)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        out = Path(args.output)
        tmp = out.with_name(f".{out.name}.tmp")
        # The file holds HMAC and JWT secrets and credential hashes.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        tmp.replace(out)
    return 0


def _diff(args: argparse.Namespace) -> int:
    wanted, _ = read_document(args.file)
    current = _from_store(args.store) if args.store else _Api(args).current()[1]
    lines = changes_text(current, ent.protect_secrets(wanted))
    if lines:
        print("\n".join(lines))
    return 1 if lines else 0


def _import(args: argparse.Namespace) -> int:
    wanted, source = read_document(args.file)
    api = _Api(args)
    revision, current = api.current()
    lines = changes_text(current, ent.protect_secrets(wanted))
    if args.dry_run:
        if lines:
            print("\n".join(lines))
        print(f"(dry run: nothing changed; the config is at revision {revision})")
        return 0
    r = api.request("PUT", "/config", json={"document": wanted, "base_revision": revision})
    _raise_for(r, source)
    result = r.json()
    if lines:
        print("\n".join(lines))
    if any(result["changes"].values()):
        print(f"imported as revision {result['revision']}")
    else:
        print(f"nothing to change (revision {result['revision']})")
    return 0
