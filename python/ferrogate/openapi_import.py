"""``ferrogate import openapi``: a gateway config with one API made from an OpenAPI 3 document.

The document is validated first (openapi-spec-validator). Every operation becomes a route
template of the API (named by its operationId, limited to its method); the API has one
version, routed by path (``/<base path>/<version>/...``), whose upstream is the document's
first server unless one is given. With ``validate``, the API carries the
``request-validation`` plugin with the document, so requests are checked before they leave.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


class OpenApiImportError(ValueError):
    """The document cannot be turned into a config (the message says why)."""


@dataclass(frozen=True)
class Options:
    api: str | None = None
    upstream: str | None = None
    version: str | None = None
    base_path: str | None = None
    validate: bool = False
    listen: str = "127.0.0.1:8080"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _version_name(info_version: Any) -> str:
    match = re.match(r"v?(\d+)", str(info_version or "").strip())
    return f"v{match.group(1)}" if match else "v1"


def _server_url(doc: dict[str, Any]) -> str | None:
    servers = doc.get("servers") or []
    if not servers or not isinstance(servers[0], dict):
        return None
    url = str(servers[0].get("url", ""))
    for name, var in (servers[0].get("variables") or {}).items():
        url = url.replace("{" + name + "}", str(var.get("default", "")))
    return url if re.match(r"^https?://", url) else None


def _route_path(path: str) -> str:
    """The document's path template in route syntax: a segment with more than one
    parameter (``{name}.{ext}``) becomes one parameter, passed on as it is."""
    segments = []
    for segment in path.split("/"):
        params = re.findall(r"\{([^}/]+)\}", segment)
        if len(params) > 1:
            segment = "{" + "_".join(params) + "}"
        segments.append(segment)
    return "/".join(segments)


def load_document(path: str) -> dict[str, Any]:
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OpenApiImportError(f"{path}: cannot read the file: {e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise OpenApiImportError(f"{path}: not YAML or JSON: {e}") from None
    if not isinstance(doc, dict) or not str(doc.get("openapi", "")).startswith("3."):
        raise OpenApiImportError(f"{path}: not an OpenAPI 3.0 or 3.1 document (no 'openapi: 3.x')")
    try:
        validate(doc)
    except OpenAPIValidationError as e:
        where = "/".join(str(p) for p in getattr(e, "path", ()) or ())
        at = f" at {where}" if where else ""
        message = getattr(e, "message", e)
        raise OpenApiImportError(f"{path}: invalid OpenAPI document{at}: {message}") from None
    return doc


def build_config(spec_path: str, doc: dict[str, Any], options: Options) -> dict[str, Any]:
    """The config (as data) for ``doc``, read from ``spec_path``."""
    info = doc.get("info") or {}
    name = options.api or _slug(str(info.get("title", ""))) or "api"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise OpenApiImportError(f"'{name}' cannot name an API: use letters, digits, '.', '_', '-'")
    version = options.version or _version_name(info.get("version"))
    upstream = options.upstream or _server_url(doc)
    if upstream is None:
        raise OpenApiImportError(
            "the document's first server is not an http(s) URL: give the upstream with --upstream"
        )
    base_path = options.base_path or f"/{name}"
    routes: list[dict[str, Any]] = []
    names: set[str] = set()
    for path, item in (doc.get("paths") or {}).items():
        if not isinstance(item, dict):
            continue
        for method in METHODS:
            operation = item.get(method)
            if not isinstance(operation, dict):
                continue
            op_name = str(operation.get("operationId") or f"{method}-{_slug(path) or 'root'}")
            label, n = op_name, 2
            while label in names:
                label, n = f"{op_name}-{n}", n + 1
            names.add(label)
            routes.append(
                {"name": label, "paths": [_route_path(path)], "methods": [method.upper()]}
            )
    if not routes:
        raise OpenApiImportError("the document has no operations")
    api: dict[str, Any] = {
        "base_path": base_path,
        "versions": {version: {"upstream": upstream}},
    }
    if options.validate:
        api["plugins"] = [
            {
                "name": "request-validation",
                "config": {
                    # The plugin reads the document relative to where the gateway starts.
                    "openapi": str(Path(spec_path).resolve()),
                    "base_path": f"{base_path.rstrip('/')}/{version}",
                },
            }
        ]
    api["routes"] = routes
    return {"listen": [options.listen], "apis": {name: api}}


def import_openapi(spec_path: str, options: Options) -> str:
    """The config as YAML text."""
    config = build_config(spec_path, load_document(spec_path), options)
    title = f"# From {Path(spec_path).name} by `ferrogate import openapi`.\n"
    return title + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100)
