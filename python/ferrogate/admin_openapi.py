"""The admin API's OpenAPI 3.1 document, generated from the config's msgspec Structs so the
API cannot describe entities differently from the config file."""

import copy
from typing import Any

import msgspec

from ferrogate import __version__
from ferrogate.admin_entities import KINDS, SUB_RESOURCES
from ferrogate.config import Target

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{name}"
_ERRORS = {
    "400": "The request or the change is invalid (problems name the fields).",
    "401": "No valid admin token.",
    "403": "The token's role may not do this.",
    "404": "No such entity.",
    "405": "Not allowed here, or the store is read-only.",
    "409": "Exists already, still in use, or the store changed meanwhile.",
    "412": "If-Match does not match the entity's ETag.",
    "503": "The shared store (PostgreSQL) cannot be reached; the node keeps serving.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _responses(ok: dict[str, Any], codes: tuple[str, ...]) -> dict[str, Any]:
    out = dict(ok)
    for code in codes:
        out[code] = {
            "description": _ERRORS[code],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
    return out


def _json_body(schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {
        "required": True,
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


def _ok(status: str, schema: dict[str, Any] | None, description: str) -> dict[str, Any]:
    if schema is None:
        return {status: {"description": description}}
    return {
        status: {"description": description, "content": {"application/json": {"schema": schema}}}
    }


def openapi_document() -> dict[str, Any]:
    types: list[Any] = [k.type for k in KINDS.values()] + [Target]
    _, components = msgspec.json.schema_components(types, ref_template=_REF)
    schemas: dict[str, Any] = dict(components)
    name_prop = {"type": "string", "minLength": 1, "description": "The entity's name."}
    for kind in KINDS.values():
        entity = copy.deepcopy(schemas[kind.type.__name__])
        entity.setdefault("properties", {})["name"] = name_prop
        # What the API returns: credentials with ids and masked secrets.
        if SUB_RESOURCES.get(kind.name) and SUB_RESOURCES[kind.name].field == "credentials":
            entity["properties"]["credentials"] = {"type": "array", "items": _ref("Credential")}
        schemas[f"{kind.type.__name__}Entity"] = entity
    schemas["Credential"] = {
        "type": "object",
        "properties": {"type": {"type": "string"}, "id": {"type": "string"}},
        "required": ["type", "id"],
        "description": "A credential as returned: secrets masked, `key` only when just issued.",
    }
    schemas["Problem"] = {
        "type": "object",
        "properties": {"path": {"type": "string"}, "message": {"type": "string"}},
        "required": ["path", "message"],
    }
    schemas["Error"] = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "status": {"type": "integer"},
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "problems": {"type": "array", "items": _ref("Problem")},
                },
                "required": ["status", "code", "message"],
            }
        },
        "required": ["error"],
    }
    schemas["AuditEntry"] = {
        "type": "object",
        "properties": {
            "at": {"type": "number"},
            "time": {"type": "string"},
            "who": {"type": "string"},
            "role": {"type": "string"},
            "method": {"type": "string"},
            "entity": {"type": "string"},
            "before": {},
            "after": {},
            "revision": {"type": "integer"},
        },
        "required": ["at", "who", "role", "method", "entity", "before", "after"],
    }
    name_param = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    if_match = {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}}
    paths: dict[str, Any] = {}
    for kind in KINDS.values():
        entity_ref = _ref(f"{kind.type.__name__}Entity")
        page = {
            "type": "object",
            "properties": {
                "data": {"type": "array", "items": entity_ref},
                "total": {"type": "integer"},
                "offset": {"type": "integer"},
                "limit": {"type": "integer"},
                "next_offset": {"type": ["integer", "null"]},
            },
            "required": ["data", "total", "offset", "limit", "next_offset"],
        }
        list_params = [
            {
                "name": "limit",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
            },
            {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
            {"name": "name_prefix", "in": "query", "schema": {"type": "string"}},
            {"name": "tag", "in": "query", "schema": {"type": "string"}},
        ]
        tag = [kind.name]
        paths[f"/{kind.name}"] = {
            "get": {
                "tags": tag,
                "summary": f"List {kind.name} (filters: name_prefix, tag, FIELD=value)",
                "parameters": list_params,
                "responses": _responses(_ok("200", page, "A page"), ("400", "401")),
            },
            "post": {
                "tags": tag,
                "summary": f"Create one of {kind.name}",
                "requestBody": _json_body(entity_ref),
                "responses": _responses(
                    _ok("201", entity_ref, "Created and applied"),
                    ("400", "401", "403", "405", "409"),
                ),
            },
        }
        paths[f"/{kind.name}/{{name}}"] = {
            "parameters": [name_param],
            "get": {
                "tags": tag,
                "responses": _responses(_ok("200", entity_ref, "The entity"), ("401", "404")),
            },
            "put": {
                "tags": tag,
                "summary": "Create or replace",
                "parameters": [if_match],
                "requestBody": _json_body(entity_ref),
                "responses": _responses(
                    {**_ok("200", entity_ref, "Replaced"), **_ok("201", entity_ref, "Created")},
                    ("400", "401", "403", "405", "409", "412"),
                ),
            },
            "patch": {
                "tags": tag,
                "summary": "JSON merge patch (RFC 7396)",
                "parameters": [if_match],
                "requestBody": _json_body({"type": "object"}),
                "responses": _responses(
                    _ok("200", entity_ref, "Changed"),
                    ("400", "401", "403", "404", "405", "409", "412"),
                ),
            },
            "delete": {
                "tags": tag,
                "parameters": [if_match],
                "responses": _responses(
                    _ok("204", None, "Deleted"), ("401", "403", "404", "405", "409", "412")
                ),
            },
        }
        sub = SUB_RESOURCES.get(kind.name)
        if sub is None:
            continue
        item_ref = _ref("Target") if sub.field == "targets" else _ref("Credential")
        item_in: dict[str, Any] = (
            {"anyOf": [{"type": "string"}, _ref("Target")]}
            if sub.field == "targets"
            else {
                "type": "object",
                "properties": {"type": {"type": "string"}},
                "required": ["type"],
            }
        )
        paths[f"/{kind.name}/{{name}}/{sub.field}"] = {
            "parameters": [name_param],
            "get": {
                "tags": tag,
                "responses": _responses(
                    _ok(
                        "200",
                        {
                            "type": "object",
                            "properties": {
                                "data": {"type": "array", "items": item_ref},
                                "total": {"type": "integer"},
                            },
                            "required": ["data", "total"],
                        },
                        "The items",
                    ),
                    ("401", "404"),
                ),
            },
            "post": {
                "tags": tag,
                "parameters": [if_match],
                "requestBody": _json_body(item_in),
                "responses": _responses(
                    _ok("201", item_ref, "Added and applied"),
                    ("400", "401", "403", "404", "405", "409", "412"),
                ),
            },
        }
        paths[f"/{kind.name}/{{name}}/{sub.field}/{{{sub.key}}}"] = {
            "parameters": [
                name_param,
                {"name": sub.key, "in": "path", "required": True, "schema": {"type": "string"}},
            ],
            "get": {
                "tags": tag,
                "responses": _responses(_ok("200", item_ref, "The item"), ("401", "404")),
            },
            "delete": {
                "tags": tag,
                "parameters": [if_match],
                "responses": _responses(
                    _ok("204", None, "Removed"), ("401", "403", "404", "405", "409", "412")
                ),
            },
        }
    paths["/audit"] = {
        "get": {
            "tags": ["audit"],
            "parameters": [
                {"name": "entity", "in": "query", "schema": {"type": "string"}},
                {"name": "since", "in": "query", "schema": {"type": "string"}},
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                },
            ],
            "responses": _responses(
                _ok(
                    "200",
                    {
                        "type": "object",
                        "properties": {"data": {"type": "array", "items": _ref("AuditEntry")}},
                        "required": ["data"],
                    },
                    "Newest first",
                ),
                ("400", "401", "403"),
            ),
        }
    }
    document = {"type": "object", "description": "Entity kind -> its section, as stored."}
    paths["/config"] = {
        "get": {
            "tags": ["config"],
            "responses": _responses(
                _ok(
                    "200",
                    {
                        "type": "object",
                        "properties": {"revision": {"type": "integer"}, "document": document},
                        "required": ["revision", "document"],
                    },
                    "The whole entity document (admin role)",
                ),
                ("401", "403"),
            ),
        },
        "put": {
            "tags": ["config"],
            "requestBody": _json_body(
                {
                    "type": "object",
                    "properties": {
                        "document": document,
                        "base_revision": {"type": "integer"},
                    },
                    "required": ["document"],
                },
                "Every entity replaced as one change (declarative import).",
            ),
            "responses": _responses(
                _ok(
                    "200",
                    {
                        "type": "object",
                        "properties": {
                            "revision": {"type": "integer"},
                            "changes": {
                                "type": "object",
                                "description": "added, changed, removed: kind/name lists",
                            },
                        },
                        "required": ["revision", "changes"],
                    },
                    "Imported (or nothing to change)",
                ),
                ("400", "401", "403", "405", "409", "503"),
            ),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "ferrogate admin API", "version": __version__},
        "components": {
            "schemas": schemas,
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"token": []}],
        "paths": paths,
    }
