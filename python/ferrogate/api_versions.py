"""Versioned APIs (``apis:``) compiled into ordinary routes.

Every routed version of an API becomes one route per route template (one catch-all route
without templates), so the data plane needs nothing new to route them: path versioning is
a path prefix, header and query versioning are the routes' header and query predicates.
The lifecycle rides on two plain route fields of the normalized config that keep such
routes off the GIL (``lifecycle.rs``): ``response_headers`` (Deprecation, Sunset, Link) and
``refuse`` (410 ``version_retired``; 404 ``unknown_version`` for a version named in a
header or query parameter that the API does not serve, drafts included).
"""

from __future__ import annotations

import calendar
import datetime
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, cast

from ferrogate.addresses import looks_like_url, parse_upstream_url
from ferrogate.problems import DataPath
from ferrogate.structcheck import did_you_mean

if TYPE_CHECKING:
    # The config normalizer compiles `apis` through this module (a cycle only for types).
    from ferrogate.config import Api, ApiVersion, Route, Upstream
    from ferrogate.config import _Normalizer as Normalizer

DEFAULT_NAMES = {"header": "Api-Version", "query": "api-version"}
ROUTED = ("published", "deprecated", "retired")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]*")


@dataclass(frozen=True)
class _Planned:
    """One route to compile, with where its parts are in the user's file."""

    route: Route
    at: DataPath
    paths_at: DataPath
    extras: dict[str, Any]


def uses_plugins(apis: Mapping[str, Api]) -> bool:
    return any(api.plugins or any(t.plugins for t in api.routes) for api in apis.values())


def compile_apis(
    n: Normalizer,
    apis: Mapping[str, Api],
    upstreams: Mapping[str, Upstream],
    names: dict[str, int],
    out_routes: list[dict[str, Any]],
    out_upstreams: dict[str, Any],
    timeouts: Mapping[str, float],
) -> None:
    """Append the routes of every API to ``out_routes`` (after the config's own routes)."""
    seen = {_route_key(r, p): k for k, r in enumerate(out_routes) for p in r["paths"]}
    for name, api in apis.items():
        at: DataPath = ("apis", name)
        known = dict(upstreams)
        upstream_of: dict[str, str] = {}
        for v, version in api.versions.items():
            target = _version_upstream(n, name, v, version, upstreams, out_upstreams, timeouts)
            if target is not None:
                upstream_of[v] = target
                known.setdefault(target, cast("Upstream", None))
        planned = _plan(n, name, api, upstream_of)
        if planned is None:
            continue
        inherited = [
            n.plugin_use(use, (*at, "plugins", j), f"api '{name}'")
            for j, use in enumerate(api.plugins)
        ]
        for p in planned:
            i = len(out_routes)
            n.route_origins[i] = (p.at, p.paths_at)
            out = n.route(i, p.route, names, known, out_upstreams, timeouts, p.at, inherited)
            out.update(p.extras)
            key = _route_key(out, out["paths"][0])
            if key in seen:
                other = out_routes[seen[key]]["name"]
                n.report(
                    p.paths_at,
                    f"'{out['paths'][0]}' of route '{out['name']}' has the same host, path, "
                    f"methods, headers and query as route '{other}': one would never match",
                )
            else:
                seen[key] = i
            out_routes.append(out)


def _route_key(route: Mapping[str, Any], path: str) -> str:
    return json.dumps(
        [
            sorted(route["hosts"]),
            path,
            sorted(route["methods"]),
            route["headers"],
            route["query"],
        ],
        sort_keys=True,
    )


def _version_upstream(
    n: Normalizer,
    api: str,
    v: str,
    version: ApiVersion,
    upstreams: Mapping[str, Upstream],
    out_upstreams: dict[str, Any],
    timeouts: Mapping[str, float],
) -> str | None:
    at: DataPath = ("apis", api, "versions", v, "upstream")
    if looks_like_url(version.upstream):
        if version.state == "draft":
            try:
                parse_upstream_url(version.upstream)
            except ValueError as e:
                n.report(at, str(e))
            return None
        # One upstream (and connection pool) per version, shared by all its routes.
        return n.url_upstream(-1, f"{api}.{v}", version.upstream, out_upstreams, timeouts, at)
    if version.upstream not in upstreams:
        hint = did_you_mean(version.upstream, upstreams) or (
            " (define it under 'upstreams:' or use a URL like http://127.0.0.1:9000)"
        )
        n.report(at, f"unknown upstream '{version.upstream}'{hint}")
        return None
    return version.upstream


def _day_seconds(day: datetime.date) -> int:
    return calendar.timegm(day.timetuple())


def _join(prefix: str, path: str) -> str:
    return (prefix + path) if path != "/" or not prefix else prefix


def _plan(
    n: Normalizer, name: str, api: Api, upstream_of: Mapping[str, str]
) -> list[_Planned] | None:
    """The routes of one API, or None when its settings have problems (reported)."""
    from ferrogate.config import ApiRoute, Predicate, Route

    at: DataPath = ("apis", name)
    problems = 0

    def report(path: DataPath, message: str) -> None:
        nonlocal problems
        problems += 1
        n.report(path, message)

    by = api.versioning.by
    base = f"/{name}" if api.base_path is None else api.base_path
    if not base.startswith("/") or "{" in base or "*" in base:
        report((*at, "base_path"), "a base path is a plain path starting with '/': /orders")
    base = base.rstrip("/")
    selector = api.versioning.name
    if by == "path":
        if selector is not None:
            report((*at, "versioning", "name"), "only header and query versioning take a name")
        if api.default_version is not None:
            report(
                (*at, "default_version"),
                "path versioning has no default version: every path names its version",
            )
    else:
        selector = selector or DEFAULT_NAMES[by]
        if by == "header" and not _TOKEN.fullmatch(selector):
            report((*at, "versioning", "name"), f"invalid header name {selector!r}")
        if not selector:
            report((*at, "versioning", "name"), "the name cannot be empty")
    if not api.versions:
        report((*at, "versions"), "an API needs at least one version")
    prefixes: dict[str, str] = {}
    for v, version in api.versions.items():
        vat: DataPath = (*at, "versions", v)
        if not _VERSION_NAME.fullmatch(v):
            report(vat, f"'{v}' cannot name a version: use letters, digits, '.', '_', '~', '-'")
        if version.prefix is not None and by != "path":
            report((*vat, "prefix"), "a version prefix is for path versioning")
        prefix = version.prefix.rstrip("/") if version.prefix is not None else f"{base}/{v}"
        if not prefix.startswith("/") or "{" in prefix or "*" in prefix:
            report((*vat, "prefix"), "a prefix is a plain path starting with '/': /legacy/orders")
        if by == "path" and version.state in ROUTED:
            for other, taken in prefixes.items():
                if taken == prefix:
                    report((*vat, "prefix"), f"the same prefix as version '{other}' ({prefix})")
            prefixes[v] = prefix
        if version.successor is not None:
            successor = api.versions.get(version.successor)
            if successor is None:
                hint = did_you_mean(version.successor, api.versions)
                report((*vat, "successor"), f"'{version.successor}' is not a version{hint}")
            elif version.successor == v:
                report((*vat, "successor"), "a version cannot succeed itself")
            elif successor.state not in ("published", "deprecated"):
                report(
                    (*vat, "successor"),
                    f"the successor '{version.successor}' is {successor.state}: clients "
                    "cannot move to it",
                )
        if version.state == "deprecated" and version.deprecation is None:
            report(
                (*vat, "deprecation"),
                "a deprecated version needs `deprecation:`, the day it was deprecated "
                "(the Deprecation header, RFC 9745)",
            )
        if version.state != "deprecated":
            for field in ("deprecation", "sunset", "deprecation_link"):
                if getattr(version, field) is not None:
                    report((*vat, field), f"only a deprecated version has a {field}")
        if (
            version.deprecation is not None
            and version.sunset is not None
            and version.sunset < version.deprecation
        ):
            report((*vat, "sunset"), "the sunset is before the deprecation (RFC 9745 §4)")
    if api.default_version is not None:
        default = api.versions.get(api.default_version)
        if default is None:
            hint = did_you_mean(api.default_version, api.versions)
            report(
                (*at, "default_version"),
                f"unknown version '{api.default_version}'{hint}",
            )
        elif default.state not in ("published", "deprecated"):
            report(
                (*at, "default_version"),
                f"the default version cannot be {default.state}: requests naming no version "
                "would never be served",
            )
    templates = list(api.routes)
    for t, template in enumerate(templates):
        for j, path in enumerate(template.paths):
            if not path.startswith("/"):
                report((*at, "routes", t, "paths", j), "a path must start with '/'")
            elif api.strip_prefix and path != "/*" and path.endswith("/*"):
                report(
                    (*at, "routes", t, "paths", j),
                    f"with strip_prefix, write '{path[:-2]}' and '{path[:-2]}/{{*rest}}' "
                    f"instead of '{path}'",
                )
    if problems or any(v not in upstream_of for v, x in api.versions.items() if x.state in ROUTED):
        return None

    def link(v: str) -> str:
        if by == "path":
            return prefixes[v]
        if by == "query":
            return f"{base or '/'}?{selector}={v}"
        return base or "/"

    def pointer(v: str) -> dict[str, str]:
        out = {"version": v, "link": link(v)}
        if selector is not None:
            out[by] = selector
        return out

    def extras(v: str) -> dict[str, Any]:
        version = api.versions[v]
        headers: list[dict[str, Any]] = []
        if version.state == "deprecated":
            assert version.deprecation is not None
            headers.append(
                {"name": "Deprecation", "value": f"@{_day_seconds(version.deprecation)}"}
            )
            if version.sunset is not None:
                sunset = formatdate(_day_seconds(version.sunset), usegmt=True)
                headers.append({"name": "Sunset", "value": sunset})
            if version.deprecation_link is not None:
                headers.append(
                    {
                        "name": "Link",
                        "value": f'<{version.deprecation_link}>; rel="deprecation"',
                        "append": True,
                    }
                )
        if version.successor is not None:
            headers.append(
                {
                    "name": "Link",
                    "value": f'<{link(version.successor)}>; rel="successor-version"',
                    "append": True,
                }
            )
        out: dict[str, Any] = {"response_headers": headers}
        if version.state == "retired":
            message = f"version {v} of API '{name}' is retired"
            if version.successor is not None:
                message += f"; its successor is {version.successor}"
            out["refuse"] = {
                "code": "version_retired",
                "message": message,
                "successor": None if version.successor is None else pointer(version.successor),
            }
        return out

    catch_all = ApiRoute(paths=["/*"])
    plans: list[_Planned] = []

    def add(
        route_name: str,
        prefix: str,
        version_pred: Predicate | None,
        upstream: str,
        extra: dict[str, Any],
        vat: DataPath,
    ) -> None:
        for t, template in enumerate(templates or [catch_all]):
            tat: DataPath = (*at, "routes", t) if templates else vat
            label = route_name if not templates else f"{route_name}.{template.name or t}"
            for j, path in enumerate(template.paths):
                full = _join(prefix, path) if path != "/*" else f"{prefix}/*"
                strip = api.strip_prefix and bool(prefix)
                rewrite = None
                if strip and path != "/*":
                    rewrite = re.sub(r"\{\*([^}]*)\}", r"{\1}", path)
                route = Route(
                    name=label if len(template.paths) == 1 else f"{label}.{j}",
                    paths=[full],
                    hosts=list(api.hosts),
                    methods=list(template.methods),
                    headers=[
                        *template.headers,
                        *([version_pred] if by == "header" and version_pred else []),
                    ],
                    query=[
                        *template.query,
                        *([version_pred] if by == "query" and version_pred else []),
                    ],
                    upstream=upstream,
                    strip_prefix=strip and path == "/*",
                    rewrite=rewrite,
                    preserve_host=api.preserve_host,
                    priority=template.priority,
                    plugins=list(template.plugins),
                )
                paths_at: DataPath = (*tat, "paths", j) if templates else vat
                plans.append(_Planned(route, tat, paths_at, extra))

    routed = [v for v, x in api.versions.items() if x.state in ROUTED]
    for v in routed:
        vat = (*at, "versions", v)
        if by == "path":
            where = (*vat, "prefix") if api.versions[v].prefix is not None else vat
            add(f"{name}.{v}", prefixes[v], None, upstream_of[v], extras(v), where)
        else:
            assert selector is not None
            pred = Predicate(name=selector, value=v)
            add(f"{name}.{v}", base, pred, upstream_of[v], extras(v), vat)
    if by != "path" and routed:
        assert selector is not None
        serves = ", ".join(v for v in routed if api.versions[v].state != "retired")
        unknown = {
            "response_headers": [],
            "refuse": {
                "code": "unknown_version",
                "message": f"API '{name}' has no version by that {by} {selector} "
                f"(it serves {serves or 'none'})",
                "successor": None,
            },
        }
        any_version = Predicate(name=selector, regex="")
        add(
            f"{name}.unknown-version",
            base,
            any_version,
            upstream_of[routed[0]],
            unknown,
            (*at, "versioning"),
        )
        if api.default_version is not None:
            d = api.default_version
            add(
                f"{name}.default",
                base,
                None,
                upstream_of[d],
                extras(d),
                (*at, "default_version"),
            )
    return plans
