"""Versioned APIs (`apis:`): path, header and query versioning, lifecycle states, problems."""

from __future__ import annotations

import calendar
import datetime
import re
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import yaml

from gateway import GatewayFactory, run_cli
from upstreams import UpstreamFactory


def _unix(day: str) -> int:
    return calendar.timegm(datetime.date.fromisoformat(day).timetuple())


def test_path_versions_route_to_their_upstreams_with_their_lifecycle(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    v0, v1, v2, v3 = (upstream_factory(n) for n in ("v0", "v1", "v2", "v3"))
    gw = gateway(
        {
            "upstreams": {"orders-v1": {"targets": [v1.address]}},
            "apis": {
                "orders": {
                    "versions": {
                        "v0": {"upstream": v0.url, "state": "retired", "successor": "v2"},
                        "v1": {
                            "upstream": "orders-v1",
                            "state": "deprecated",
                            "deprecation": "2026-01-01",
                            "sunset": "2027-06-30",
                            "successor": "v2",
                            "deprecation_link": "https://example.com/orders-v1",
                        },
                        "v2": {"upstream": v2.url},
                        "v3": {"upstream": v3.url, "state": "draft"},
                    }
                }
            },
        },
        workers=1,
    )
    # published: forwarded below the version's prefix, no lifecycle headers
    r = gw.get("/orders/v2/items/7?x=1")
    assert r.status_code == 200, r.text
    assert r.headers["x-upstream"] == "v2"
    assert r.json()["target"] == "/items/7?x=1"
    for name in ("deprecation", "sunset", "link"):
        assert name not in r.headers

    # deprecated: served, with RFC 9745 Deprecation, RFC 8594 Sunset and the successor link
    r = gw.get("/orders/v1/items")
    assert r.status_code == 200 and r.headers["x-upstream"] == "v1"
    assert r.json()["target"] == "/items"
    assert r.headers["deprecation"] == f"@{_unix('2026-01-01')}"
    assert re.fullmatch(r"@\d+", r.headers["deprecation"])
    assert r.headers["sunset"] == "Wed, 30 Jun 2027 00:00:00 GMT"
    assert parsedate_to_datetime(r.headers["sunset"]).timestamp() == _unix("2027-06-30")
    links = r.headers.get_list("link")
    assert '<https://example.com/orders-v1>; rel="deprecation"' in links
    assert '</orders/v2>; rel="successor-version"' in links
    assert v1.count == 1

    # retired: 410 in the gateway's error shape, pointing at the successor; never forwarded
    r = gw.get("/orders/v0/items", headers={"x-request-id": "retired-1"})
    assert r.status_code == 410
    assert r.headers["content-type"] == "application/json"
    assert r.headers.get_list("link") == ['</orders/v2>; rel="successor-version"']
    error = r.json()["error"]
    assert error["code"] == "version_retired"
    assert error["status"] == 410
    assert error["request_id"] == "retired-1"
    assert error["successor"] == {"version": "v2", "link": "/orders/v2"}
    assert "v0" in error["message"]
    assert v0.count == 0

    # draft: not routed at all
    r = gw.get("/orders/v3/items")
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_route"
    assert v3.count == 0


def test_header_versioning_with_a_default_version(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    v1, v2, v3 = (upstream_factory(n) for n in ("v1", "v2", "v3"))
    gw = gateway(
        {
            "apis": {
                "users": {
                    "versioning": {"by": "header", "name": "X-Api-Version"},
                    "default_version": "v2",
                    "versions": {
                        "v1": {
                            "upstream": v1.url,
                            "state": "deprecated",
                            "deprecation": "2025-03-01",
                            "successor": "v2",
                        },
                        "v2": {"upstream": v2.url},
                        "v3": {"upstream": v3.url, "state": "draft"},
                    },
                    "routes": [{"name": "one", "paths": ["/{id}"], "methods": ["GET"]}],
                }
            }
        },
        workers=1,
    )
    r = gw.get("/users/5", headers={"x-api-version": "v1"})
    assert r.headers["x-upstream"] == "v1" and r.json()["target"] == "/5"
    assert r.headers["deprecation"] == f"@{_unix('2025-03-01')}"
    assert "sunset" not in r.headers
    assert r.headers["link"] == '</users>; rel="successor-version"'
    r = gw.get("/users/5", headers={"x-api-version": "v2"})
    assert r.headers["x-upstream"] == "v2" and "deprecation" not in r.headers
    # no version named: the default
    r = gw.get("/users/5")
    assert r.status_code == 200 and r.headers["x-upstream"] == "v2"
    # a draft or unknown version is not served, and never falls back to the default
    for named in ("v3", "v9"):
        r = gw.get("/users/5", headers={"x-api-version": named})
        assert r.status_code == 404, named
        assert r.json()["error"]["code"] == "unknown_version"
    # the template's method applies to every version
    assert gw.request("POST", "/users/5").status_code == 404
    assert v3.count == 0


def test_query_versioning_without_a_default(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    v1, v2 = upstream_factory("v1"), upstream_factory("v2")
    gw = gateway(
        {
            "apis": {
                "search": {
                    "versioning": {"by": "query"},
                    "base_path": "/search",
                    "versions": {
                        "2024-01": {"upstream": v1.url, "state": "retired", "successor": "2025-01"},
                        "2025-01": {"upstream": v2.url},
                    },
                }
            }
        },
        workers=1,
    )
    r = gw.get("/search/q?api-version=2025-01&term=a")
    assert r.headers["x-upstream"] == "v2"
    assert r.json()["target"] == "/q?api-version=2025-01&term=a"
    r = gw.get("/search/q?api-version=2024-01")
    assert r.status_code == 410
    assert r.json()["error"]["successor"] == {
        "version": "2025-01",
        "link": "/search?api-version=2025-01",
        "query": "api-version",
    }
    assert gw.get("/search/q").json()["error"]["code"] == "no_route"
    assert v1.count == 0


def _problems(tmp_path: Path, text: str) -> str:
    path = tmp_path / "apis.yaml"
    path.write_text(text)
    out = run_cli("check", str(path))
    assert out.returncode == 2, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_problems_are_reported_with_their_line(tmp_path: Path) -> None:
    text = """\
listen: [127.0.0.1:8080]
upstreams:
  u: {targets: [127.0.0.1:9001]}
routes:
  - {name: taken, paths: [/orders/v2/*], upstream: u}
apis:
  orders:
    default_version: v2
    versions:
      v1: {upstream: nope, state: deprecated, sunset: 2027-06-30, successor: v7}
      v2: {upstream: u}
      v3: {upstream: u, state: published, sunset: soon}
  users:
    versioning: {by: header}
    default_version: v1
    versions:
      v1: {upstream: u, state: retired}
      v2: {upstream: u, state: deprecated, deprecation: 2026-02-01, sunset: 2026-01-01}
"""
    err = _problems(tmp_path, text)
    expected = {
        8: "apis.orders.default_version: path versioning has no default version",
        10: "apis.orders.versions.v1.upstream: unknown upstream 'nope'",
        12: "apis.orders.versions.v3.sunset",
        15: "apis.users.default_version: the default version cannot be retired",
        18: "apis.users.versions.v2.sunset: the sunset is before the deprecation",
    }
    for line, message in expected.items():
        assert any(
            ln.startswith(f"{tmp_path / 'apis.yaml'}:{line}:") and message in ln
            for ln in err.splitlines()
        ), f"line {line}: {message}\n{err}"
    assert "apis.orders.versions.v1.successor: 'v7' is not a version" in err
    assert "apis.orders.versions.v1.deprecation: a deprecated version needs" in err

    conflict = """\
listen: [127.0.0.1:8080]
upstreams:
  u: {targets: [127.0.0.1:9001]}
routes:
  - {name: taken, paths: ["/orders/v2/*"], upstream: u}
apis:
  orders:
    versions:
      v2: {upstream: u}
"""
    err = _problems(tmp_path, conflict)
    assert re.search(r"apis\.yaml:9:\d+: apis\.orders\.versions\.v2: .*same host, path", err), err


def test_routes_lists_the_compiled_version_routes(tmp_path: Path) -> None:
    config: dict[str, Any] = {
        "listen": ["127.0.0.1:8080"],
        "apis": {
            "orders": {
                "versioning": {"by": "header"},
                "default_version": "v1",
                "versions": {
                    "v1": {"upstream": "http://127.0.0.1:9001"},
                    "v2": {"upstream": "http://127.0.0.1:9002", "state": "draft"},
                },
            }
        },
    }
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(config))
    assert run_cli("check", str(path)).returncode == 0
    out = run_cli("routes", "-c", str(path))
    assert out.returncode == 0, out.stderr
    rows = {}
    for line in out.stdout.splitlines()[1:]:
        found = re.search(r"\s(orders\.[\w-]+)\s", line)
        assert found, line
        rows[found.group(1)] = line
    assert set(rows) == {"orders.v1", "orders.unknown-version", "orders.default"}
    assert "header api-version=v1" in rows["orders.v1"]
    assert "route:orders.v1" in rows["orders.default"]
