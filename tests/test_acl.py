"""acl on a real gateway, after key-auth and basic-auth: groups allowed or denied, 401 for
who is not identified, 403 for who is but may not pass."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway import Gateway, GatewayFactory, run_cli
from upstreams import Upstream

ALICE_KEY = "alice-acl-key-31415926"
BOB_KEY = "bob-acl-key-27182818"
ALICE_PW = "alice-acl-password"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"authorization": f"Basic {token}"}


def config(up: Upstream) -> dict[str, Any]:
    anonymous = {"anonymous": "guest"}
    return {
        "upstreams": {"b": {"targets": [up.address]}},
        "consumers": {
            "alice": {
                "groups": ["admins", "staff"],
                "credentials": [
                    {"type": "key-auth", "key": ALICE_KEY},
                    {"type": "basic-auth", "username": "alice", "password": ALICE_PW},
                ],
            },
            "bob": {"groups": ["users"], "credentials": [{"type": "key-auth", "key": BOB_KEY}]},
            "guest": {"groups": ["visitors"]},
        },
        "routes": [
            {
                "name": "admin",
                "paths": ["/admin/*"],
                "upstream": "b",
                # Listed first, run last: the order comes from the priorities.
                "plugins": [
                    {"name": "acl", "config": {"allow": ["admins"]}},
                    {"name": "basic-auth", "config": anonymous},
                    {"name": "key-auth", "config": anonymous},
                ],
            },
            {
                "name": "public",
                "paths": ["/public/*"],
                "upstream": "b",
                "plugins": [
                    {"name": "key-auth", "config": anonymous},
                    {"name": "acl", "config": {"allow": ["visitors", "users", "admins"]}},
                ],
            },
            {
                "name": "nousers",
                "paths": ["/nousers/*"],
                "upstream": "b",
                "plugins": [
                    {"name": "key-auth"},
                    {"name": "acl", "config": {"deny": ["users"]}},
                ],
            },
            {
                "name": "lone",
                "paths": ["/lone/*"],
                "upstream": "b",
                "plugins": [{"name": "acl", "config": {"allow": ["admins"], "realm": "api"}}],
            },
        ],
    }


def error_of(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    err: dict[str, Any] = resp.json()["error"]
    assert err["status"] == status
    assert err["request_id"] == resp.headers["x-request-id"]
    return err


def test_allow_and_deny_by_group(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw: Gateway = gateway(config(upstream), workers=1)
    assert gw.get("/admin/a", headers={"apikey": ALICE_KEY}).status_code == 200
    assert upstream.last().header("x-consumer-username") == "alice"
    # basic-auth runs after key-auth found no key and fell back to anonymous: it wins.
    assert gw.get("/admin/a", headers=basic("alice", ALICE_PW)).status_code == 200
    assert upstream.last().header("x-consumer-username") == "alice"
    assert not upstream.last().has_header("x-anonymous-consumer")

    denied = gw.get("/admin/a", headers={"apikey": BOB_KEY})
    err = error_of(denied, 403)
    assert err["code"] == "forbidden"
    assert err["message"] == "this consumer may not use this route"
    assert "admins" not in denied.text and "users" not in denied.text
    assert "www-authenticate" not in denied.headers

    assert gw.get("/nousers/a", headers={"apikey": ALICE_KEY}).status_code == 200
    assert error_of(gw.get("/nousers/a", headers={"apikey": BOB_KEY}), 403)["code"] == "forbidden"
    assert upstream.count == 3

    # The anonymous consumer passes where its group is allowed.
    assert gw.get("/public/a").status_code == 200
    assert upstream.last().header("x-consumer-username") == "guest"
    assert gw.get("/public/a", headers={"apikey": BOB_KEY}).status_code == 200
    assert upstream.last().header("x-consumer-username") == "bob"


def test_unidentified_clients_get_401_with_the_ways_to_authenticate(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(config(upstream), workers=1)
    # Anonymous on /admin: the refusal names both plugins' challenges, in run order.
    resp = gw.get("/admin/a")
    err = error_of(resp, 401)
    assert err["code"] == "unauthorized" and err["message"] == "authentication required"
    assert resp.headers.get_list("www-authenticate") == [
        'Key realm="ferrogate"',
        'Basic realm="ferrogate", charset="UTF-8"',
    ]
    # A wrong key is refused by key-auth itself, before acl.
    resp = gw.get("/admin/a", headers={"apikey": "wrong-key-000"})
    assert error_of(resp, 401)["message"] == "invalid API key"
    # No authentication plugin on the route: no consumer, 401.
    resp = gw.get("/lone/a", headers={"apikey": ALICE_KEY})
    assert error_of(resp, 401)["message"] == "authentication required"
    assert resp.headers["www-authenticate"] == 'Key realm="api"'
    assert error_of(gw.get("/nousers/a"), 401)["message"] == "no API key in the request"
    assert upstream.count == 0


def check(tmp_path: Path, cfg: dict[str, Any]) -> str:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({"listen": ["127.0.0.1:0"], **cfg}, sort_keys=False))
    out = run_cli("check", str(path))
    assert out.returncode == 2, out.stdout
    return out.stdout


def test_acl_needs_exactly_one_of_allow_and_deny(tmp_path: Path, upstream: Upstream) -> None:
    cfg = config(upstream)
    cfg["routes"][2]["plugins"][1]["config"] = {"allow": ["a"], "deny": ["b"]}
    cfg["routes"][3]["plugins"][0]["config"] = {}
    out = check(tmp_path, cfg)
    assert "routes[2].plugins[1].config" in out and "exactly one of 'allow' or 'deny'" in out
    assert "routes[3].plugins[0].config" in out
    cfg["routes"][3]["plugins"][0]["config"] = {"allow": []}
    assert "routes[3].plugins[0].config.allow" in check(tmp_path, cfg)
