"""Plugins per consumer on a real gateway: run after the route's authentication, for that
consumer only; a consumer's plugin replaces the route's plugin of the same name; async hooks;
what the config refuses; and the admin API managing them as part of the consumer."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from admin_gateway import AdminGateway, served_within
from gateway import GatewayFactory, run_cli
from upstreams import Upstream

PLUGINS = str(Path(__file__).parent / "consumer_plugins")
KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-0123456789", "carol": "carol-key-012345"}


def config(up: Upstream) -> dict[str, Any]:
    return {
        "plugins_dir": PLUGINS,
        "upstreams": {"backend": {"targets": [up.address]}},
        "routes": [
            {
                "name": "api",
                "paths": ["/api/*"],
                "upstream": "backend",
                "plugins": [
                    {"name": "key-auth"},
                    {
                        "name": "request-transformer",
                        "config": {"add": {"headers": {"x-tier": "route"}}},
                    },
                ],
            },
        ],
        "consumers": {
            "alice": {
                "credentials": [{"type": "key-auth", "key": KEYS["alice"]}],
                "plugins": [
                    # Replaces the route's transformer for alice.
                    {
                        "name": "request-transformer",
                        "config": {"add": {"headers": {"x-tier": "gold", "x-who": "$(consumer)"}}},
                    },
                    {"name": "t-async-tag", "config": {"value": "alice"}},
                ],
            },
            "bob": {"credentials": [{"type": "key-auth", "key": KEYS["bob"]}]},
            "carol": {
                "credentials": [{"type": "key-auth", "key": KEYS["carol"]}],
                "plugins": [{"name": "t-cap", "config": {"limit": 2}}],
            },
        },
    }


def test_a_consumers_plugins_run_for_that_consumer_only(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(config(upstream), workers=1)

    def call(who: str | None) -> Any:
        headers = {"apikey": KEYS[who]} if who else {}
        return gw.get("/api/x", headers=headers)

    r = call("alice")
    assert r.status_code == 200, r.text
    seen = upstream.last()
    assert seen.header("x-tier") == "gold"
    assert seen.header("x-who") == "alice"
    assert seen.header("x-async-tag") == "alice"

    r = call("bob")
    assert r.status_code == 200
    seen = upstream.last()
    assert seen.header("x-tier") == "route"
    assert seen.header("x-who") is None and seen.header("x-async-tag") is None

    # carol's cap answers early, after authentication; others are not counted by it.
    for left in ("1", "0"):
        assert call("carol").status_code == 200
        assert upstream.last().header("x-cap-left") == left
        assert upstream.last().header("x-tier") == "route"
    over = call("carol")
    assert over.status_code == 429
    assert over.json()["error"]["code"] == "capped"
    for _ in range(3):
        assert call("bob").status_code == 200
        assert upstream.last().header("x-cap-left") is None

    # Authentication still comes first: no key, no consumer plugin.
    assert call(None).status_code == 401


def test_consumer_plugins_are_checked(tmp_path: Path, upstream: Upstream) -> None:
    data = config(upstream)
    data["consumers"]["bob"]["plugins"] = [
        {"name": "t-stamp"},
        {"name": "t-cap", "config": {"limit": "many"}},
        {"name": "no-such-plugin"},
    ]
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"listen": ["127.0.0.1:1"], **data}, sort_keys=False))
    done: subprocess.CompletedProcess[str] = run_cli("check", str(path))
    assert done.returncode != 0
    out = done.stdout
    assert "consumers.bob.plugins[0].name" in out and "access phase only" in out, out
    assert "consumers.bob.plugins[1].config.limit" in out, out
    assert "consumers.bob.plugins[2].name" in out and "unknown plugin" in out, out


def test_the_admin_api_manages_a_consumers_plugins(tmp_path: Path, upstream: Upstream) -> None:
    data = config(upstream)
    ag = AdminGateway(tmp_path / "gw", data)
    ag.start()
    try:
        with ag.api() as api:
            r = api.patch(
                "/consumers/bob",
                json={"plugins": [{"name": "t-cap", "config": {"limit": 0}}]},
            )
            assert r.status_code == 200, r.text
            assert r.json()["plugins"][0]["name"] == "t-cap"
        served_within(ag.gw, "/api/x", 429, 1.0, headers={"apikey": KEYS["bob"]})
        assert ag.gw.get("/api/x", headers={"apikey": KEYS["alice"]}).status_code == 200

        with ag.api() as api:
            r = api.patch("/consumers/bob", json={"plugins": [{"name": "t-stamp"}]})
            assert r.status_code == 400
            [problem] = r.json()["error"]["problems"]
            assert problem["path"] == "consumers/bob/plugins/0/name"
            assert api.patch("/consumers/bob", json={"plugins": None}).status_code == 200
        served_within(ag.gw, "/api/x", 200, 1.0, headers={"apikey": KEYS["bob"]})
    finally:
        ag.stop()
