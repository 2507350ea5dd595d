"""The policy plugin through a real gateway: rules over method, path (normalized), headers,
consumer, groups, claims and scopes; first match wins; default deny or allow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import Gateway, GatewayFactory, run_cli
from rawhttp import RawConnection
from upstreams import Upstream

PLUGINS = str(Path(__file__).parent / "policy_plugins")

RULES: list[dict[str, Any]] = [
    {"deny": {"path": "/orders/*/refund", "claim": {"tier": "trial"}}},
    {"allow": {"method": ["GET"], "path": "/orders/*", "scope": ["orders:read"]}},
    {"allow": {"method": ["POST", "DELETE"], "path": "/orders/**", "scope": ["orders:write"]}},
    {"allow": {"path": "/admin/*", "group": ["admins"]}},
    {"allow": {"path": "/reports/*", "claim": {"realm.roles": "auditor"}}},
    {"allow": {"path": "/beta/*", "header": {"x-beta": "^(yes|1)$"}, "consumer": ["carol"]}},
]


@pytest.fixture
def gw(gateway: GatewayFactory, upstream: Upstream) -> Gateway:
    return gateway(
        {
            "plugins_dir": PLUGINS,
            "consumers": {"alice": {"groups": ["admins"]}, "bob": {"groups": ["staff"]}},
            "routes": [
                {
                    "paths": ["/*"],
                    "upstream": upstream.url,
                    "plugins": [
                        {"name": "t-identity"},
                        {"name": "policy", "config": {"rules": RULES}},
                    ],
                },
                {
                    "paths": ["/open/*"],
                    "upstream": upstream.url,
                    "plugins": [
                        {"name": "t-identity"},
                        {
                            "name": "policy",
                            "config": {
                                "default": "allow",
                                "rules": [{"deny": {"method": ["DELETE"]}}],
                            },
                        },
                    ],
                },
            ],
        },
        workers=1,
    )


def call(
    gw: Gateway,
    method: str,
    path: str,
    *,
    consumer: str | None = None,
    claims: dict[str, Any] | None = None,
    scopes: str | None = None,
    headers: dict[str, str] | None = None,
) -> int:
    h = dict(headers or {})
    if consumer is not None:
        h["x-t-consumer"] = consumer
    if claims is not None:
        h["x-t-claims"] = json.dumps(claims)
    if scopes is not None:
        h["x-t-scopes"] = scopes
    resp = httpx.request(method, gw.url + path, headers=h, timeout=10)
    if resp.status_code == 403:
        err = resp.json()["error"]
        assert err["code"] == "forbidden"
        assert err["request_id"] == resp.headers["x-request-id"]
        assert "rule" not in err["message"]
    return resp.status_code


def test_scopes_methods_and_paths(gw: Gateway, upstream: Upstream) -> None:
    assert call(gw, "GET", "/orders/7", scopes="orders:read") == 200
    assert call(gw, "GET", "/orders/7/items", scopes="orders:read orders:write") == 200
    assert call(gw, "GET", "/orders", scopes="orders:read,x") == 200
    assert call(gw, "GET", "/orders/7", scopes="orders:write") == 403
    assert call(gw, "GET", "/orders/7") == 403
    assert call(gw, "POST", "/orders/7", scopes="orders:read") == 403
    assert call(gw, "POST", "/orders/7/refund", scopes="orders:write") == 200
    # "**" spans segments but needs the "/orders/" before it
    assert call(gw, "DELETE", "/orders", scopes="orders:write") == 403
    # default deny
    assert call(gw, "GET", "/elsewhere", scopes="orders:read") == 403
    assert upstream.count == 4


def test_first_match_wins_and_claims(gw: Gateway) -> None:
    trial = {"tier": "trial"}
    assert call(gw, "POST", "/orders/7/refund", scopes="orders:write", claims=trial) == 403
    assert call(gw, "POST", "/orders/7/refund", scopes="orders:write", claims={"tier": 1}) == 200
    auditor = {"realm": {"roles": ["viewer", "auditor"]}}
    assert call(gw, "GET", "/reports/q1", claims=auditor) == 200
    assert call(gw, "GET", "/reports/q1", claims={"realm": {"roles": ["viewer"]}}) == 403
    assert call(gw, "GET", "/reports/q1", claims={"realm": "auditor"}) == 403


def test_consumers_groups_and_headers(gw: Gateway) -> None:
    assert call(gw, "GET", "/admin/x", consumer="alice") == 200
    assert call(gw, "GET", "/admin/x", consumer="bob") == 403
    assert call(gw, "GET", "/admin/x", consumer="mallory") == 403
    assert call(gw, "GET", "/admin/x") == 403
    assert call(gw, "GET", "/beta/x", consumer="carol", headers={"x-beta": "yes"}) == 200
    assert call(gw, "GET", "/beta/x", consumer="carol", headers={"x-beta": "yes!"}) == 403
    assert call(gw, "GET", "/beta/x", consumer="carol") == 403
    assert call(gw, "GET", "/beta/x", consumer="dave", headers={"x-beta": "1"}) == 403


def test_the_policy_judges_the_normalized_path(gw: Gateway) -> None:
    # Allowed for /orders with orders:read; /admin needs the admins group.
    for target in ["/orders/../admin/x", "/orders/%2e%2e/admin/x", "//admin/x"]:
        with RawConnection(gw.port) as conn:
            conn.send(
                f"GET {target} HTTP/1.1\r\nHost: t\r\nx-t-scopes: orders:read\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            assert conn.read_response().status == 403, target


def test_default_allow(gw: Gateway) -> None:
    assert call(gw, "GET", "/open/x") == 200
    assert call(gw, "DELETE", "/open/x") == 403


def test_bad_rules_are_reported(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "listen: ['127.0.0.1:1']\n"
        "routes:\n"
        "  - paths: ['/*']\n"
        "    upstream: http://127.0.0.1:9\n"
        "    plugins:\n"
        "      - name: policy\n"
        "        config:\n"
        "          rules:\n"
        "            - {allow: {path: orders}}\n"
    )
    out = run_cli("check", str(cfg))
    assert out.returncode != 0
    assert "a path glob starts with '/'" in out.stdout + out.stderr
    cfg.write_text(cfg.read_text().replace("{allow: {path: orders}}", "{allow: {}, deny: {}}"))
    out = run_cli("check", str(cfg))
    assert "give exactly one of 'allow' or 'deny'" in out.stdout + out.stderr
