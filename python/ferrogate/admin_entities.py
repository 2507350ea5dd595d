"""Admin API entities: the top-level collections of the config, found from its schema.

Every field of ``Config`` that is a mapping of name -> settings (``upstreams``, ``plans``,
``consumers``) or a list of settings that have a ``name`` (``routes``, ``plugins``) is an
entity kind; a section added to the config joins the admin API without code here. All other
settings (listeners, workers, TLS files, the admin section itself, ...) are node-local: they
stay in the node's YAML file.

An entity *document* is ``{kind: section}`` with the sections as a config file writes them;
the functions here are pure operations on such documents (used by the API and the store).
"""

import copy
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
from msgspec import inspect

from ferrogate.config import Config
from ferrogate.consumers import hash_key, hash_password

__all__ = [
    "KINDS",
    "SUB_RESOURCES",
    "Change",
    "EntityKind",
    "SubResource",
    "delete_entity",
    "diff",
    "entities",
    "entity_etag",
    "get_entity",
    "keep_secrets",
    "mask",
    "protect_credential",
    "protect_secrets",
    "put_entity",
    "split_document",
]

Document = dict[str, Any]
REDACTED = "[REDACTED]"
# Keys whose values are secrets wherever they appear (credentials, plugin settings).
_SECRET_KEYS = frozenset(
    {
        "password",
        "password_hash",
        "secret",
        "client_secret",
        "key_sha256",
        "token",
        "api_key",
        "private_key",
    }
)


@dataclass(frozen=True, slots=True)
class EntityKind:
    name: str
    """The config field, which is also the collection's URL path."""
    keyed: bool
    """A mapping name -> settings (else a list of settings carrying ``name``)."""
    type: type[msgspec.Struct]


@dataclass(frozen=True, slots=True)
class SubResource:
    """A list inside an entity with its own URL (``/upstreams/{name}/targets``)."""

    field: str
    key: str
    """What identifies an item in URLs (computed by ``sub_key``)."""


def _unwrap(t: inspect.Type) -> inspect.Type:
    while isinstance(t, inspect.Metadata):
        t = t.type
    return t


def _kinds() -> dict[str, EntityKind]:
    info = inspect.type_info(Config)
    assert isinstance(info, inspect.StructType)
    kinds: dict[str, EntityKind] = {}
    for f in info.fields:
        t = _unwrap(f.type)
        if isinstance(t, inspect.DictType):
            value = _unwrap(t.value_type)
            if isinstance(_unwrap(t.key_type), inspect.StrType) and isinstance(
                value, inspect.StructType
            ):
                kinds[f.name] = EntityKind(f.name, True, value.cls)
        elif isinstance(t, inspect.ListType):
            item = _unwrap(t.item_type)
            if isinstance(item, inspect.StructType) and any(g.name == "name" for g in item.fields):
                kinds[f.name] = EntityKind(f.name, False, item.cls)
    return kinds


KINDS: dict[str, EntityKind] = _kinds()
SUB_RESOURCES: dict[str, SubResource] = {
    k: v
    for k, v in {
        "upstreams": SubResource("targets", "address"),
        "consumers": SubResource("credentials", "id"),
    }.items()
    if k in KINDS
}


def split_document(data: dict[str, Any]) -> tuple[dict[str, Any], Document]:
    """A config's data as (node-local settings, entity document).

    List entities without a name get the name the loader would give them, so that they can
    be addressed (``route-3``)."""
    local = {k: v for k, v in data.items() if k not in KINDS}
    doc: Document = {}
    for kind in KINDS.values():
        section = data.get(kind.name)
        if section is None:
            continue
        if kind.keyed:
            doc[kind.name] = dict(section)
        else:
            singular = kind.name.removesuffix("s")
            doc[kind.name] = [
                item
                if not isinstance(item, dict) or item.get("name") is not None
                else {"name": f"{singular}-{i}", **item}
                for i, item in enumerate(section)
            ]
    return local, doc


def entities(doc: Document, kind: EntityKind) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, entity as the API shows it before masking) of one kind, in document order."""
    section: Any = doc.get(kind.name) or ({} if kind.keyed else [])
    if kind.keyed:
        for key, value in section.items():
            yield key, {"name": key, **(value or {})}
    else:
        for item in section:
            yield str(item.get("name")), dict(item)


def get_entity(doc: Document, kind: EntityKind, key: str) -> dict[str, Any] | None:
    for k, entity in entities(doc, kind):
        if k == key:
            return entity
    return None


def put_entity(doc: Document, kind: EntityKind, key: str, entity: dict[str, Any]) -> Document:
    """A new document with ``entity`` (carrying ``name``) stored under ``key``."""
    new = copy.deepcopy(doc)
    body = dict(entity)
    if kind.keyed:
        body.pop("name", None)
        section = new.setdefault(kind.name, {})
        section[key] = body
    else:
        body["name"] = key
        items = new.setdefault(kind.name, [])
        for i, item in enumerate(items):
            if item.get("name") == key:
                items[i] = body
                break
        else:
            items.append(body)
    return new


def delete_entity(doc: Document, kind: EntityKind, key: str) -> Document:
    new = copy.deepcopy(doc)
    if kind.keyed:
        new.get(kind.name, {}).pop(key, None)
    else:
        new[kind.name] = [i for i in new.get(kind.name, []) if i.get("name") != key]
    return new


def sub_key(kind: str, item: Any) -> str:
    """The URL key of a target (its address) or a credential (the id the consumer registry
    gives it: a key's hash prefix, a username, a key id, a JWT key, a certificate name)."""
    if kind == "upstreams":
        return str(item if isinstance(item, str) else item.get("address"))
    kind_name = item.get("type")
    if kind_name == "key-auth":
        digest = item.get("key_sha256")
        if digest is None and isinstance(item.get("key"), str):
            digest = hash_key(item["key"])
        return str(digest or "")[:12]
    if kind_name == "basic-auth":
        return str(item.get("username"))
    if kind_name == "hmac-auth":
        return str(item.get("key_id"))
    if kind_name == "jwt":
        return str(item.get("key"))
    return str(item.get("subject") or item.get("san"))


def protect_secrets(doc: Document) -> Document:
    """The document as the store keeps it: API keys as their SHA-256, passwords hashed.
    (Secrets that verification needs as they are, HMAC and JWT ones, stay.)"""
    new = copy.deepcopy(doc)
    for consumer in (new.get("consumers") or {}).values():
        if isinstance(consumer, dict) and isinstance(consumer.get("credentials"), list):
            consumer["credentials"] = [protect_credential(c) for c in consumer["credentials"]]
    return new


def protect_credential(cred: Any) -> Any:
    if not isinstance(cred, dict):
        return cred
    out = dict(cred)
    if out.get("type") == "key-auth" and isinstance(out.get("key"), str):
        out["key_sha256"] = hash_key(out.pop("key"))
    if out.get("type") == "basic-auth" and isinstance(out.get("password"), str):
        out["password_hash"] = hash_password(out.pop("password"))
    return out


def mask(value: Any) -> Any:
    """``value`` with every secret replaced by ``[REDACTED]``."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            secret = k in _SECRET_KEYS or (k == "key" and value.get("type") == "key-auth")
            out[k] = REDACTED if secret and v is not None else mask(v)
        return out
    if isinstance(value, list):
        return [mask(v) for v in value]
    return value


def shown(kind: EntityKind, entity: dict[str, Any]) -> dict[str, Any]:
    """An entity as the API returns it: secrets masked, credentials with their ids."""
    out: dict[str, Any] = mask(entity)
    if kind.name == "certificates" and isinstance(out.get("key"), str):
        # A certificate's private key (a {file: PATH} reference is no secret).
        out["key"] = REDACTED
    sub = SUB_RESOURCES.get(kind.name)
    if sub is not None and isinstance(entity.get(sub.field), list):
        out[sub.field] = [shown_item(kind.name, item) for item in entity[sub.field]]
    return out


def shown_item(kind: str, item: Any) -> Any:
    if kind == "upstreams":
        return {"address": item, "weight": 1} if isinstance(item, str) else item
    return {**mask(item), "id": sub_key(kind, item)}


def keep_secrets(kind: EntityKind, before: dict[str, Any] | None, body: dict[str, Any]) -> Any:
    """``body`` with a certificate's key sent back as ``[REDACTED]`` (as read) replaced by
    the stored one, so that a read-modify-write keeps it."""
    if kind.name == "certificates" and before is not None and body.get("key") == REDACTED:
        return {**body, "key": before.get("key")}
    return body


def entity_etag(entity: dict[str, Any] | None) -> str:
    text = json.dumps(entity, sort_keys=True, separators=(",", ":"))
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:24] + '"'


@dataclass(frozen=True, slots=True)
class Change:
    kind: str
    key: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


def diff(old: Document, new: Document) -> list[Change]:
    """Every entity added, changed or removed between two documents."""
    changes: list[Change] = []
    for kind in KINDS.values():
        before = dict(entities(old, kind))
        after = dict(entities(new, kind))
        for key in [*before, *(k for k in after if k not in before)]:
            if before.get(key) != after.get(key):
                changes.append(Change(kind.name, key, before.get(key), after.get(key)))
    return changes
