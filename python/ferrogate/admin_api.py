"""The admin REST API: entities of the config over HTTP, checked and applied like a reload.

A change is a whole new entity document: it is validated by ``load_config_text`` together
with the node-local settings of the YAML file (the same code as ``ferrogate check``), stored
with its audit entries, then handed to the master, which writes the runtime file and sends
SIGHUP to the workers as for any reload. An invalid change is refused and changes nothing.
Served by the status listener's threaded server on the admin's own address.
"""

import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ferrogate import admin_entities as ent
from ferrogate.admin_store import (
    AuditEntry,
    ReadOnlyStore,
    RevisionConflict,
    Snapshot,
    StoreUnavailable,
    open_store,
)
from ferrogate.config import ConfigError, LoadedConfig, load_config_text
from ferrogate.events import emit
from ferrogate.status_server import Reply, Request, Route, StatusServer
from ferrogate.units import parse_duration
from ferrogate.yaml_source import parse_source

__all__ = ["AdminApi", "problem_path"]

_WRITES = ("POST", "PUT", "PATCH", "DELETE")
_ALL_METHODS = ("GET", "HEAD", *_WRITES)
# Kinds an operator may not change (consumers hold credentials, certificates private keys);
# admins change everything.
_ADMIN_ONLY_KINDS = frozenset({"consumers", "certificates"})
_PAGE_DEFAULT = 100
_PAGE_MAX = 1000
_APPLY_TIMEOUT = 30.0
_SEGMENT = re.compile(r'\.?([^.\[\]"]+)|\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]')


def problem_path(formatted: str) -> str:
    """``routes[3].upstream`` (a problem's path) -> ``routes/3/upstream``."""
    if formatted == "$":
        return ""
    parts: list[str] = []
    for m in _SEGMENT.finditer(formatted):
        if m.group(1) is not None:
            parts.append(m.group(1))
        elif m.group(2) is not None:
            parts.append(m.group(2))
        else:
            parts.append(str(json.loads(m.group(3))))
    return "/".join(parts)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        problems: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.problems = problems
        self.headers = headers or {}

    def reply(self) -> Reply:
        body: dict[str, Any] = {"status": self.status, "code": self.code, "message": self.message}
        if self.problems is not None:
            body["problems"] = self.problems
        out = _json(self.status, {"error": body})
        out.headers.update(self.headers)
        return out


def _json(status: int, value: Any, headers: dict[str, str] | None = None) -> Reply:
    body = json.dumps(value, separators=(",", ":")).encode() + b"\n"
    return Reply(status, body, headers=headers or {})


class AdminApi:
    """The API's state: the store, the tokens, the node-local settings; and its handler."""

    def __init__(
        self,
        config_path: str,
        settings: dict[str, Any],
        apply: Callable[[LoadedConfig, int], None],
    ) -> None:
        self.config_path = config_path
        self.settings = settings
        self.apply = apply
        self.store = open_store(settings["store"])
        self.local: dict[str, Any] = {}
        self.snapshot = Snapshot(0, {})
        # One change at a time: read, validate, store. Applying happens after the lock is
        # released (a reload in the master takes it too); the master applies only the newest
        # revision, so changes cannot overtake each other.
        self._lock = threading.Lock()
        self._pending = threading.local()
        self._openapi: bytes | None = None
        self.server: StatusServer | None = None
        # A shared store: revisions other nodes made arrive through a watcher.
        self._watcher: Any = None
        self._rejected = 0

    # --- the config in force -----------------------------------------------------------

    def effective(self, from_file: LoadedConfig) -> LoadedConfig:
        """The config to run: the file's, or its node-local settings with the store's
        entities (seeding the store from the file the first time). Raises ConfigError."""
        text = Path(self.config_path).read_text(encoding="utf-8")
        data = parse_source(text, self.config_path).data
        local, file_doc = ent.split_document(data if isinstance(data, dict) else {})
        with self._lock:
            self.local = local
            if not self.store.writable:
                old = self.snapshot
                self.snapshot = Snapshot(old.revision + 1, file_doc)
                if old.revision:
                    self.store.record(self._audit("file", "file", "RELOAD", old.document, file_doc))
                return from_file
            try:
                current = self.store.load()
                if current is None:
                    seeded = ent.protect_secrets(file_doc)
                    audit = self._audit("file", "file", "SEED", {}, seeded)
                    try:
                        current = self.store.save(seeded, 0, audit)
                        emit("info", "admin_store_seeded", path=self.settings["store"]["path"])
                    except RevisionConflict:
                        # Another node seeded it first.
                        current = self.store.load()
                        assert current is not None
            except StoreUnavailable as e:
                current = self._last_good(str(e))
            self.snapshot = current
            return self._validate(current.document)

    def _last_good(self, reason: str) -> Snapshot:
        """The database is unreachable: the revision in force, else the one cached on disk
        (a start); StoreUnavailable without either."""
        if self.snapshot.revision:
            emit(
                "warning",
                "admin_store_unavailable",
                error=reason,
                serving="current",
                revision=self.snapshot.revision,
            )
            return self.snapshot
        cached_of = getattr(self.store, "cached", None)
        cached: Snapshot | None = cached_of() if cached_of is not None else None
        if cached is None:
            raise StoreUnavailable(
                f"{reason}; and there is no cached config at "
                f"{self.settings['store'].get('cache')} to start from"
            )
        emit(
            "warning",
            "admin_store_unavailable",
            error=reason,
            serving="cache",
            cache=self.settings["store"].get("cache"),
            revision=cached.revision,
        )
        return cached

    def sync(self, latest_revision: int) -> None:
        """A revision another node stored: applied here like a local change."""
        if latest_revision <= self.snapshot.revision or latest_revision == self._rejected:
            return
        with self._lock:
            latest = self.store.load()
            if latest is None or latest.revision <= self.snapshot.revision:
                return
            try:
                loaded = self._validate(latest.document)
            except ConfigError as e:
                # Valid where it was made, not with this node's local settings: keep serving.
                self._rejected = latest.revision
                emit(
                    "error",
                    "admin_revision_rejected",
                    revision=latest.revision,
                    problems=[str(p) for p in e.problems],
                )
                return
            self.snapshot = latest
        emit("info", "admin_revision_received", revision=latest.revision)
        self.apply(loaded, latest.revision)

    def update_settings(self, settings: dict[str, Any]) -> None:
        """Tokens may change on reload; the listener and store need a restart."""
        self.settings = {**self.settings, "tokens": settings["tokens"]}

    def _validate(self, doc: dict[str, Any]) -> LoadedConfig:
        # Everything here was interpolated when it was read (the file) or is data (the
        # API's bodies): a ${VAR} in a body must not read the master's environment.
        text = json.dumps({**self.local, **doc}, separators=(",", ":"))
        return load_config_text(text, self.config_path, env={})

    def _audit(
        self, who: str, role: str, method: str, before: dict[str, Any], after: dict[str, Any]
    ) -> list[AuditEntry]:
        now = time.time()
        return [
            AuditEntry(
                now,
                who,
                role,
                method,
                f"{c.kind}/{c.key}",
                None if c.before is None else ent.shown(ent.KINDS[c.kind], c.before),
                None if c.after is None else ent.shown(ent.KINDS[c.kind], c.after),
            )
            for c in ent.diff(before, after)
        ]

    # --- serving -----------------------------------------------------------------------

    def start(self) -> None:
        self.server = StatusServer(
            self.settings["listen"],
            None,
            [Route("/", self.handle, auth=False, methods=_ALL_METHODS, prefix=True)],
        )
        self.server.start()
        watcher = getattr(self.store, "watcher", None)
        if watcher is not None:
            self._watcher = watcher(self.settings["store"]["poll_interval"], self.sync)
            self._watcher.start()

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        if self.server is not None:
            self.server.stop()
        self.store.close()

    def _who(self, req: Request) -> tuple[str, str]:
        auth = req.headers.get("authorization", "")
        if auth[:7].lower() != "bearer ":
            raise ApiError(
                401,
                "unauthorized",
                "an admin token is needed (Authorization: Bearer TOKEN)",
                headers={"WWW-Authenticate": 'Bearer realm="ferrogate-admin"'},
            )
        given = auth[7:].strip().encode()
        found: tuple[str, str] | None = None
        for name, t in self.settings["tokens"].items():
            # Every token is compared, so timing does not tell which one came close.
            if hmac.compare_digest(given, t["token"].encode()) and found is None:
                found = (name, t["role"])
        if found is None:
            raise ApiError(
                401,
                "unauthorized",
                "the admin token is not valid",
                headers={"WWW-Authenticate": 'Bearer realm="ferrogate-admin"'},
            )
        return found

    def handle(self, req: Request) -> Reply:
        self._pending.change = None
        try:
            reply = self._route(req)
        except ApiError as e:
            reply = e.reply()
        if self._pending.change is not None:
            loaded, revision = self._pending.change
            self._pending.change = None
            self.apply(loaded, revision)
        return reply

    def _route(self, req: Request) -> Reply:
        parts = [unquote(p) for p in req.path.strip("/").split("/") if p]
        method = "GET" if req.method == "HEAD" else req.method
        if parts == ["openapi.json"] and method == "GET":
            return self._openapi_reply()
        who, role = self._who(req)
        if not parts:
            _allow(method, ("GET",))
            return _json(200, self._info())
        head, rest = parts[0], parts[1:]
        if head == "config" and not rest:
            _allow(method, ("GET", "PUT"))
            if role != "admin":
                # The whole document holds the secrets verification needs (HMAC, JWT).
                raise ApiError(403, "forbidden", "the whole config needs the admin role")
            return self._document(req) if method == "GET" else self._import(req, who, role)
        if head == "audit" and not rest:
            _allow(method, ("GET",))
            if role != "admin":
                raise ApiError(403, "forbidden", "the audit log needs the admin role")
            return self._audit_reply(req)
        kind = ent.KINDS.get(head)
        if kind is None or len(rest) > 3:
            raise ApiError(404, "not_found", f"nothing at {req.path}")
        sub = ent.SUB_RESOURCES.get(kind.name)
        if len(rest) >= 2 and (sub is None or rest[1] != sub.field):
            raise ApiError(404, "not_found", f"nothing at {req.path}")
        allowed = (
            ("GET", "POST")
            if len(rest) in (0, 2)
            else ("GET", "PUT", "PATCH", "DELETE")
            if len(rest) == 1
            else ("GET", "DELETE")
        )
        _allow(method, allowed)
        if method != "GET":
            self._may_write(kind, role)
        if not rest:
            return self._list(req, kind) if method == "GET" else self._create(req, kind, who, role)
        key = rest[0]
        if len(rest) == 1:
            if method == "GET":
                return self._get(kind, key)
            return self._write(req, kind, key, who, role)
        assert sub is not None
        if len(rest) == 2:
            if method == "GET":
                return self._sub_list(kind, key, sub)
            return self._sub_add(req, kind, key, sub, who, role)
        if method == "GET":
            return self._sub_get(kind, key, sub, rest[2])
        return self._sub_delete(req, kind, key, sub, rest[2], who, role)

    def _may_write(self, kind: ent.EntityKind, role: str) -> None:
        if role == "read-only" or (role == "operator" and kind.name in _ADMIN_ONLY_KINDS):
            raise ApiError(403, "forbidden", f"the {role} role may not change {kind.name}")
        if not self.store.writable:
            raise ApiError(
                405,
                "read_only",
                "the admin API is read-only: the config file is the source of truth "
                "(admin.store.type: file); edit it and reload",
                headers={"Allow": "GET, HEAD"},
            )

    def _info(self) -> dict[str, Any]:
        return {
            "store": self.settings["store"]["type"],
            "writable": self.store.writable,
            "revision": self.snapshot.revision,
            "kinds": list(ent.KINDS),
        }

    # --- reads -------------------------------------------------------------------------

    def _entity(self, kind: ent.EntityKind, key: str) -> dict[str, Any]:
        found = ent.get_entity(self.snapshot.document, kind, key)
        if found is None:
            raise ApiError(404, "not_found", f"no {kind.name} entity named '{key}'")
        return found

    def _headers(self, entity: dict[str, Any] | None) -> dict[str, str]:
        headers = {"X-Ferrogate-Revision": str(self.snapshot.revision)}
        if entity is not None:
            headers["ETag"] = ent.entity_etag(entity)
        return headers

    def _get(self, kind: ent.EntityKind, key: str) -> Reply:
        entity = self._entity(kind, key)
        return _json(200, ent.shown(kind, entity), self._headers(entity))

    def _list(self, req: Request, kind: ent.EntityKind) -> Reply:
        limit = _int_param(req, "limit", _PAGE_DEFAULT, 1, _PAGE_MAX)
        offset = _int_param(req, "offset", 0, 0, None)
        fields = set(kind.type.__struct_fields__) | {"name"}
        filters = {k: v for k, v in req.query.items() if k not in ("limit", "offset")}
        bad = [
            {"path": k, "message": f"not a filter of {kind.name}; use name_prefix, tag or a field"}
            for k in filters
            if k not in ("name_prefix", "tag") and k not in fields
        ]
        if bad:
            raise ApiError(400, "invalid_query", "unknown filters", bad)
        matched = [e for _, e in ent.entities(self.snapshot.document, kind) if _matches(e, filters)]
        page = matched[offset : offset + limit]
        return _json(
            200,
            {
                "data": [ent.shown(kind, e) for e in page],
                "total": len(matched),
                "offset": offset,
                "limit": limit,
                "next_offset": offset + limit if offset + limit < len(matched) else None,
            },
            self._headers(None),
        )

    def _sub_items(self, kind: ent.EntityKind, key: str, sub: ent.SubResource) -> list[Any]:
        return list(self._entity(kind, key).get(sub.field) or [])

    def _sub_list(self, kind: ent.EntityKind, key: str, sub: ent.SubResource) -> Reply:
        items = self._sub_items(kind, key, sub)
        data = [ent.shown_item(kind.name, i) for i in items]
        return _json(200, {"data": data, "total": len(data)}, self._headers(None))

    def _sub_get(self, kind: ent.EntityKind, key: str, sub: ent.SubResource, item: str) -> Reply:
        for i in self._sub_items(kind, key, sub):
            if ent.sub_key(kind.name, i) == item:
                return _json(200, ent.shown_item(kind.name, i), self._headers(None))
        raise ApiError(404, "not_found", f"no {sub.field} item '{item}' in {kind.name}/{key}")

    def _audit_reply(self, req: Request) -> Reply:
        limit = _int_param(req, "limit", _PAGE_DEFAULT, 1, _PAGE_MAX)
        since: float | None = None
        if req.query.get("since"):
            text = req.query["since"]
            try:
                since = float(text)
            except ValueError:
                try:
                    since = time.time() - parse_duration(text)
                except ValueError:
                    raise ApiError(
                        400,
                        "invalid_query",
                        "since: epoch seconds or a duration such as 15m",
                        [{"path": "since", "message": "not epoch seconds or a duration"}],
                    ) from None
        try:
            entries = self.store.audit(
                entity=req.query.get("entity") or None, since=since, limit=limit
            )
        except StoreUnavailable as e:
            raise _unavailable(e) from None
        return _json(
            200,
            {
                "data": [
                    {
                        "at": e.at,
                        "time": datetime.fromtimestamp(e.at, UTC).isoformat(),
                        "who": e.who,
                        "role": e.role,
                        "method": e.method,
                        "entity": e.entity,
                        "before": e.before,
                        "after": e.after,
                        "revision": e.revision,
                    }
                    for e in entries
                ]
            },
        )

    # --- writes ------------------------------------------------------------------------

    def _body(self, req: Request) -> Any:
        try:
            return json.loads(req.body or b"null")
        except ValueError as e:
            raise ApiError(400, "invalid_json", f"the body is not JSON: {e}") from None

    def _object(self, req: Request, kind: ent.EntityKind) -> dict[str, Any]:
        body = self._body(req)
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_body", "the body must be a JSON object")
        sub = ent.SUB_RESOURCES.get(kind.name)
        if sub is not None and sub.field == "credentials" and "credentials" in body:
            raise ApiError(
                400,
                "invalid_body",
                "credentials are managed at /consumers/{name}/credentials",
                [{"path": f"{kind.name}/credentials", "message": "not allowed here"}],
            )
        return body

    def _check_if_match(self, req: Request, entity: dict[str, Any] | None) -> None:
        wanted = req.headers.get("if-match")
        if wanted is None:
            return
        if entity is not None and (
            wanted.strip() == "*"
            or ent.entity_etag(entity) in (t.strip() for t in wanted.split(","))
        ):
            return
        raise ApiError(
            412, "precondition_failed", "the entity changed (If-Match does not match its ETag)"
        )

    def _create(self, req: Request, kind: ent.EntityKind, who: str, role: str) -> Reply:
        body = self._object(req, kind)
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(
                400,
                "invalid_body",
                "a new entity needs a name",
                [{"path": f"{kind.name}/name", "message": "required"}],
            )
        with self._lock:
            if ent.get_entity(self.snapshot.document, kind, name) is not None:
                raise ApiError(409, "conflict", f"{kind.name}/{name} exists already; use PUT")
            new = ent.put_entity(self.snapshot.document, kind, name, body)
            self._commit(new, who, role, "POST", kind, name)
            entity = self._entity(kind, name)
            return _json(201, ent.shown(kind, entity), self._headers(entity))

    def _write(self, req: Request, kind: ent.EntityKind, key: str, who: str, role: str) -> Reply:
        with self._lock:
            before = ent.get_entity(self.snapshot.document, kind, key)
            self._check_if_match(req, before)
            if req.method == "DELETE":
                if before is None:
                    raise ApiError(404, "not_found", f"no {kind.name} entity named '{key}'")
                new = ent.delete_entity(self.snapshot.document, kind, key)
                self._commit(new, who, role, "DELETE", kind, key)
                return Reply(204, b"", headers=self._headers(None))
            body = self._object(req, kind)
            if req.method == "PATCH":
                if before is None:
                    raise ApiError(404, "not_found", f"no {kind.name} entity named '{key}'")
                body = _merge_patch(before, body)
            if body.get("name", key) != key:
                raise ApiError(
                    400,
                    "invalid_body",
                    "the name in the body differs from the one in the URL",
                    [{"path": f"{kind.name}/{key}/name", "message": "must be the URL's name"}],
                )
            sub = ent.SUB_RESOURCES.get(kind.name)
            if sub is not None and sub.field == "credentials" and before is not None:
                body = {**body, "credentials": before.get("credentials", [])}
            body = ent.keep_secrets(kind, before, body)
            new = ent.put_entity(self.snapshot.document, kind, key, body)
            self._commit(new, who, role, req.method, kind, key)
            entity = self._entity(kind, key)
            return _json(200 if before else 201, ent.shown(kind, entity), self._headers(entity))

    def _sub_add(
        self,
        req: Request,
        kind: ent.EntityKind,
        key: str,
        sub: ent.SubResource,
        who: str,
        role: str,
    ) -> Reply:
        item = self._body(req)
        issued: str | None = None
        if kind.name == "consumers":
            if role != "admin":
                raise ApiError(403, "forbidden", "credentials need the admin role")
            if not isinstance(item, dict):
                raise ApiError(400, "invalid_body", "a credential is a JSON object")
            if item.get("type") == "key-auth" and "key" not in item and "key_sha256" not in item:
                # The key is made here and shown this once; the store keeps its hash.
                issued = secrets.token_urlsafe(32)
                item = {**item, "key": issued}
        elif not isinstance(item, (str, dict)):
            raise ApiError(400, "invalid_body", "a target is host:port or {address, weight}")
        with self._lock:
            parent = self._entity(kind, key)
            self._check_if_match(req, parent)
            item_key = ent.sub_key(kind.name, item)
            if any(ent.sub_key(kind.name, i) == item_key for i in parent.get(sub.field) or []):
                raise ApiError(409, "conflict", f"{kind.name}/{key} has '{item_key}' already")
            changed = {**parent, sub.field: [*(parent.get(sub.field) or []), item]}
            new = ent.put_entity(self.snapshot.document, kind, key, changed)
            self._commit(new, who, role, "POST", kind, key)
            out = ent.shown_item(kind.name, ent.protect_credential(item))
            if issued is not None:
                out["key"] = issued
            return _json(201, out, self._headers(self._entity(kind, key)))

    def _sub_delete(
        self,
        req: Request,
        kind: ent.EntityKind,
        key: str,
        sub: ent.SubResource,
        item_key: str,
        who: str,
        role: str,
    ) -> Reply:
        with self._lock:
            parent = self._entity(kind, key)
            self._check_if_match(req, parent)
            items = parent.get(sub.field) or []
            kept = [i for i in items if ent.sub_key(kind.name, i) != item_key]
            if len(kept) == len(items):
                raise ApiError(
                    404, "not_found", f"no {sub.field} item '{item_key}' in {kind.name}/{key}"
                )
            new = ent.put_entity(self.snapshot.document, kind, key, {**parent, sub.field: kept})
            self._commit(new, who, role, "DELETE", kind, key)
            return Reply(204, b"", headers=self._headers(None))

    def _commit(
        self,
        new: dict[str, Any],
        who: str,
        role: str,
        method: str,
        kind: ent.EntityKind,
        key: str,
    ) -> None:
        """Validate and store ``new`` (with the lock held), to be applied once the lock is
        released; ApiError if refused."""
        try:
            loaded = self._validate(new)
        except ConfigError as e:
            problems = [{"path": problem_path(p.path), "message": p.message} for p in e.problems]
            own = f"{kind.name}/{key}"
            elsewhere = sorted(
                {
                    "/".join(p["path"].split("/")[:2])
                    for p in problems
                    if not p["path"].startswith(own) and p["path"].split("/")[0] in ent.KINDS
                }
            )
            if method == "DELETE" and elsewhere:
                raise ApiError(
                    409,
                    "in_use",
                    f"{own} is still used by "
                    + ", ".join(_names(self.snapshot.document, elsewhere)),
                    problems,
                ) from None
            raise ApiError(
                400, "invalid_config", "the change makes the config invalid", problems
            ) from None
        stored = ent.protect_secrets(new)
        audit = self._audit(who, role, method, self.snapshot.document, stored)
        try:
            self.snapshot = self.store.save(stored, self.snapshot.revision, audit)
        except RevisionConflict as e:
            self._catch_up()
            raise ApiError(409, "conflict", f"the store changed meanwhile ({e}); retry") from None
        except ReadOnlyStore as e:
            raise ApiError(405, "read_only", str(e)) from None
        except StoreUnavailable as e:
            raise _unavailable(e, self.snapshot.revision) from None
        self._pending.change = (loaded, self.snapshot.revision)

    def _document(self, req: Request) -> Reply:
        return _json(
            200,
            {"revision": self.snapshot.revision, "document": self.snapshot.document},
            self._headers(None),
        )

    def _import(self, req: Request, who: str, role: str) -> Reply:
        """The whole entity document replaced: one revision, one audit entry."""
        body = self._body(req)
        if not isinstance(body, dict) or not isinstance(body.get("document"), dict):
            raise ApiError(400, "invalid_body", "the body is {document: {...}, base_revision?}")
        local, doc = ent.split_document(body["document"])
        if local:
            raise ApiError(
                400,
                "invalid_body",
                "only entities can be imported; node-local settings stay in the config file",
                [{"path": k, "message": "not an entity kind"} for k in local],
            )
        base = body.get("base_revision")
        with self._lock:
            if base is not None and base != self.snapshot.revision:
                raise ApiError(
                    409,
                    "conflict",
                    f"the config is at revision {self.snapshot.revision}, not {base}; diff again",
                )
            stored = ent.protect_secrets(doc)
            changes = ent.diff(self.snapshot.document, stored)
            if not changes and stored == self.snapshot.document:
                nothing: dict[str, list[str]] = {"added": [], "changed": [], "removed": []}
                return _json(200, {"revision": self.snapshot.revision, "changes": nothing})
            try:
                loaded = self._validate(stored)
            except ConfigError as e:
                problems = [
                    {"path": problem_path(p.path), "message": p.message} for p in e.problems
                ]
                raise ApiError(
                    400, "invalid_config", "the imported config is not valid", problems
                ) from None
            summary = {
                verb: [f"{c.kind}/{c.key}" for c in changes if test(c)]
                for verb, test in (
                    ("added", _added),
                    ("changed", _changed),
                    ("removed", _removed),
                )
            }
            audit = [AuditEntry(time.time(), who, role, "IMPORT", "config", None, summary)]
            try:
                self.snapshot = self.store.save(stored, self.snapshot.revision, audit)
            except RevisionConflict as e:
                self._catch_up()
                raise ApiError(409, "conflict", f"the store changed meanwhile ({e})") from None
            except ReadOnlyStore as e:
                raise ApiError(405, "read_only", str(e)) from None
            except StoreUnavailable as e:
                raise _unavailable(e, self.snapshot.revision) from None
            self._pending.change = (loaded, self.snapshot.revision)
            return _json(200, {"revision": self.snapshot.revision, "changes": summary})

    def _catch_up(self) -> None:
        """After a conflict (with the lock held): take the store's latest revision, and
        apply it here too (another node made it and this node had not seen it yet)."""
        try:
            latest = self.store.load()
        except StoreUnavailable:
            return
        if latest is None or latest.revision <= self.snapshot.revision:
            return
        try:
            loaded = self._validate(latest.document)
        except ConfigError:
            self.snapshot = latest
            return
        self.snapshot = latest
        self._pending.change = (loaded, latest.revision)

    # --- the OpenAPI document ------------------------------------------------------------

    def _openapi_reply(self) -> Reply:
        if self._openapi is None:
            from ferrogate.admin_openapi import openapi_document

            self._openapi = json.dumps(openapi_document()).encode()
        return Reply(200, self._openapi)


def _added(c: ent.Change) -> bool:
    return c.before is None


def _changed(c: ent.Change) -> bool:
    return c.before is not None and c.after is not None


def _removed(c: ent.Change) -> bool:
    return c.after is None


def _unavailable(e: StoreUnavailable, serving: int | None = None) -> ApiError:
    still = f"; this node keeps serving revision {serving}" if serving is not None else ""
    return ApiError(
        503,
        "store_unavailable",
        f"the config database cannot be reached ({e}){still}; retry later",
        headers={"Retry-After": "5"},
    )


def _names(doc: dict[str, Any], paths: list[str]) -> list[str]:
    """``routes/3`` -> ``routes/<name of the 4th route>`` (problems index lists)."""
    out = []
    for p in paths:
        kind, _, index = p.partition("/")
        section = doc.get(kind)
        if isinstance(section, list) and index.isdigit() and int(index) < len(section):
            out.append(f"{kind}/{section[int(index)].get('name')}")
        else:
            out.append(p)
    return out


def _allow(method: str, allowed: tuple[str, ...]) -> None:
    if method not in allowed:
        raise ApiError(
            405,
            "method_not_allowed",
            f"{method} is not allowed here",
            headers={"Allow": ", ".join(allowed)},
        )


def _int_param(req: Request, name: str, default: int, low: int, high: int | None) -> int:
    text = req.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        limit = f"{low}..{high}" if high is not None else f"at least {low}"
        raise ApiError(
            400,
            "invalid_query",
            f"{name}: a whole number, {limit}",
            [{"path": name, "message": f"a whole number, {limit}"}],
        )
    return value


def _matches(entity: dict[str, Any], filters: dict[str, str]) -> bool:
    for k, want in filters.items():
        if k == "name_prefix":
            if not str(entity.get("name", "")).startswith(want):
                return False
        elif k == "tag":
            tags = entity.get("tags")
            name, sep, value = want.partition("=")
            if isinstance(tags, dict):
                if name not in tags or (sep and str(tags[name]) != value):
                    return False
            elif not isinstance(tags, list) or want not in tags:
                return False
        else:
            got = entity.get(k)
            text = got if isinstance(got, str) else json.dumps(got)
            if text != want:
                return False
    return True


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out
