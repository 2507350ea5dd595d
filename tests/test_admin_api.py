"""The admin REST API on a real gateway: entities, validation, propagation, roles, audit,
stores, and the API's contract against its own OpenAPI document."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from admin_gateway import (
    ADMIN_TOKEN,
    OPERATOR_TOKEN,
    READER_TOKEN,
    AdminGateway,
    served_within,
)
from gateway import free_port, run_cli
from steady import SteadyTraffic
from upstreams import Upstream, UpstreamFactory


def base_config(up: Upstream) -> dict[str, Any]:
    return {
        "upstreams": {"backend": {"targets": [up.address]}},
        "routes": [{"name": "base", "paths": ["/base/*"], "upstream": "backend"}],
        "consumers": {"alice": {"tags": {"team": "red"}}},
        "plans": {"free": {"quotas": [{"limit": 1000, "per": "day"}]}},
    }


@pytest.fixture
def admin_gateway(tmp_path: Path) -> Iterator[Any]:
    started: list[AdminGateway] = []

    def start(config: dict[str, Any], store: dict[str, Any] | None = None) -> AdminGateway:
        ag = AdminGateway(tmp_path / f"gw-{len(started)}", config, store=store)
        started.append(ag)
        ag.start()
        return ag

    yield start
    for ag in started:
        ag.stop()


def test_upstreams_and_targets_crud_pagination_filters_etags(
    admin_gateway: Any, upstream: Upstream
) -> None:
    ag = admin_gateway(base_config(upstream))
    with ag.api() as api:
        for i in range(5):
            r = api.post("/upstreams", json={"name": f"pool-{i}", "targets": [upstream.address]})
            assert r.status_code == 201, r.text
        assert api.post("/upstreams", json={"name": "pool-0", "targets": []}).status_code == 409
        page = api.get("/upstreams", params={"limit": 2, "offset": 1}).json()
        assert [u["name"] for u in page["data"]] == ["pool-0", "pool-1"]
        assert (page["total"], page["next_offset"]) == (6, 3)
        last = api.get("/upstreams", params={"limit": 2, "offset": 5}).json()
        assert [u["name"] for u in last["data"]] == ["pool-4"] and last["next_offset"] is None
        prefixed = api.get("/upstreams", params={"name_prefix": "pool-"}).json()
        assert prefixed["total"] == 5
        assert api.get("/upstreams", params={"colour": "red"}).status_code == 400

        # field equality filter, and the target sub-resource
        r = api.put(
            "/upstreams/pool-1", json={"targets": [upstream.address], "balance": "least_conn"}
        )
        assert r.status_code == 200, r.text
        least = api.get("/upstreams", params={"balance": "least_conn"}).json()["data"]
        assert [u["name"] for u in least] == ["pool-1"]
        r = api.post("/upstreams/pool-1/targets", json={"address": "127.0.0.1:1", "weight": 3})
        assert r.status_code == 201, r.text
        targets = api.get("/upstreams/pool-1/targets").json()["data"]
        assert targets == [
            {"address": upstream.address, "weight": 1},
            {"address": "127.0.0.1:1", "weight": 3},
        ]
        assert api.get("/upstreams/pool-1/targets/127.0.0.1:1").json()["weight"] == 3
        assert api.delete("/upstreams/pool-1/targets/127.0.0.1:1").status_code == 204
        assert api.get("/upstreams/pool-1/targets/127.0.0.1:1").status_code == 404

        # optimistic concurrency: a stale ETag is refused and changes nothing
        r = api.get("/upstreams/pool-2")
        etag = r.headers["etag"]
        r = api.patch("/upstreams/pool-2", json={"keepalive": 7}, headers={"If-Match": etag})
        assert r.status_code == 200 and r.json()["keepalive"] == 7
        assert r.headers["etag"] != etag
        stale = api.patch("/upstreams/pool-2", json={"keepalive": 9}, headers={"If-Match": etag})
        assert stale.status_code == 412
        assert api.get("/upstreams/pool-2").json()["keepalive"] == 7

        assert api.delete("/upstreams/pool-3").status_code == 204
        assert api.get("/upstreams/pool-3").status_code == 404
        assert (
            api.put("/upstreams/pool-2", json={"name": "other", "targets": []}).status_code == 400
        )


def test_routes_go_live_within_a_second_and_invalid_changes_change_nothing(
    admin_gateway: Any, upstream: Upstream
) -> None:
    ag = admin_gateway(base_config(upstream))
    gw = ag.gw
    with ag.api() as api:
        assert gw.get("/fresh/x").status_code == 404
        t0 = time.monotonic()
        r = api.post(
            "/routes", json={"name": "fresh", "paths": ["/fresh/*"], "upstream": "backend"}
        )
        assert r.status_code == 201, r.text
        served_within(gw, "/fresh/x", 200, timeout=5)
        assert time.monotonic() - t0 < 1.0

        revision = api.get("/").json()["revision"]
        unknown = api.post(
            "/routes", json={"name": "bad", "paths": ["/bad/*"], "upstream": "nowhere"}
        )
        assert unknown.status_code == 400
        error = unknown.json()["error"]
        assert error["code"] == "invalid_config"
        assert {"path": "routes/2/upstream", "message": error["problems"][0]["message"]} in error[
            "problems"
        ]
        assert "nowhere" in error["problems"][0]["message"]
        regex = api.put(
            "/routes/fresh",
            json={
                "paths": ["/fresh/*"],
                "upstream": "backend",
                "headers": [{"name": "x-v", "regex": "(unclosed"}],
            },
        )
        assert regex.status_code == 400
        assert [p["path"] for p in regex.json()["error"]["problems"]] == [
            "routes/1/headers/0/regex"
        ]
        # the master's environment is not for the API's callers to read
        env = api.patch("/routes/fresh", json={"rewrite": "/${ADMIN_TOKEN}"})
        assert env.status_code == 400
        assert env.json()["error"]["problems"][0]["path"] == "routes/1/rewrite"
        assert ADMIN_TOKEN not in env.text
        wrong_type = api.patch("/routes/fresh", json={"priority": "high"})
        assert wrong_type.status_code == 400
        assert wrong_type.json()["error"]["problems"][0]["path"] == "routes/1/priority"
        # nothing changed: same revision, same route, still served
        assert api.get("/").json()["revision"] == revision
        assert api.get("/routes/fresh").json() == {
            "name": "fresh",
            "paths": ["/fresh/*"],
            "upstream": "backend",
        }
        assert gw.get("/fresh/x").status_code == 200
        assert gw.get("/bad/x").status_code == 404

        t0 = time.monotonic()
        assert api.delete("/routes/fresh").status_code == 204
        served_within(gw, "/fresh/x", 404, timeout=5)
        assert time.monotonic() - t0 < 1.0
        assert gw.get("/base/x").status_code == 200


def test_deleting_an_upstream_in_use_is_refused_naming_the_routes(
    admin_gateway: Any, upstream: Upstream
) -> None:
    ag = admin_gateway(base_config(upstream))
    with ag.api() as api:
        r = api.post("/routes", json={"name": "second", "paths": ["/2/*"], "upstream": "backend"})
        assert r.status_code == 201
        r = api.delete("/upstreams/backend")
        assert r.status_code == 409
        error = r.json()["error"]
        assert error["code"] == "in_use"
        assert "routes/base" in error["message"] and "routes/second" in error["message"]
        assert api.get("/upstreams/backend").status_code == 200
        # a plan a consumer is on cannot go either
        assert api.patch("/consumers/alice", json={"plan": "free"}).status_code == 200
        r = api.delete("/plans/free")
        assert r.status_code == 409 and "consumers/alice" in r.json()["error"]["message"]


def test_no_request_is_dropped_while_changes_are_applied(
    admin_gateway: Any, upstream: Upstream
) -> None:
    ag = admin_gateway(base_config(upstream))
    traffic = SteadyTraffic(ag.gw, "/base/steady", per_second=100)
    try:
        with ag.api() as api:
            for i in range(8):
                body = {"name": f"r{i}", "paths": [f"/r{i}/*"], "upstream": "backend"}
                assert api.post("/routes", json=body).status_code == 201
                assert (
                    api.patch("/upstreams/backend", json={"keepalive": 10 + i}).status_code == 200
                )
            for i in range(8):
                assert api.delete(f"/routes/r{i}").status_code == 204
    finally:
        traffic.stop()
    assert traffic.sent > 20
    assert set(traffic.statuses) == {200}, traffic.statuses


def test_roles(admin_gateway: Any, upstream: Upstream) -> None:
    ag = admin_gateway(base_config(upstream))
    route = {"name": "ops", "paths": ["/ops/*"], "upstream": "backend"}
    with ag.api(None) as anonymous:
        r = anonymous.get("/routes")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"]["code"] == "unauthorized"
        assert anonymous.get("/openapi.json").status_code == 200
    with ag.api("not-a-token-of-ours-at-all") as wrong:
        assert wrong.get("/routes").status_code == 401
    with ag.api(READER_TOKEN) as reader:
        assert reader.get("/routes").status_code == 200
        assert reader.post("/routes", json=route).status_code == 403
        assert reader.delete("/routes/base").status_code == 403
        assert reader.get("/audit").status_code == 403
    with ag.api(OPERATOR_TOKEN) as operator:
        assert operator.post("/routes", json=route).status_code == 201
        assert operator.post("/upstreams/backend/targets", json="127.0.0.1:2").status_code == 201
        r = operator.post("/consumers", json={"name": "bob"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert (
            operator.post("/consumers/alice/credentials", json={"type": "key-auth"}).status_code
            == 403
        )
        assert operator.get("/audit").status_code == 403
    with ag.api(ADMIN_TOKEN) as admin:
        assert admin.post("/consumers", json={"name": "bob"}).status_code == 201
        who = {e["entity"]: e["who"] for e in admin.get("/audit").json()["data"]}
        assert who["routes/ops"] == "ops" and who["consumers/bob"] == "root"


def test_consumers_credentials_and_the_audit_log_mask_secrets(
    admin_gateway: Any, upstream: Upstream
) -> None:
    config = base_config(upstream)
    config["routes"].append(
        {
            "name": "keyed",
            "paths": ["/keyed/*"],
            "upstream": "backend",
            "plugins": [{"name": "key-auth"}],
        }
    )
    ag = admin_gateway(config)
    with ag.api() as api:
        assert api.post("/consumers", json={"name": "carol", "groups": ["g"]}).status_code == 201
        since = time.time()
        r = api.post(
            "/consumers/carol/credentials",
            json={"type": "basic-auth", "username": "carol", "password": "pa55word-carol"},
        )
        assert r.status_code == 201
        t0 = time.monotonic()
        r = api.post("/consumers/carol/credentials", json={"type": "key-auth"})
        assert r.status_code == 201, r.text
        # the config with the new key is in force on every worker within a second
        served_within(ag.gw, "/keyed/x", 200, timeout=5, headers={"apikey": r.json()["key"]})
        assert time.monotonic() - t0 < 1.0
        issued = r.json()
        key = issued["key"]
        assert len(key) >= 32
        consumer = api.get("/consumers/carol").json()
        assert key not in str(consumer) and "pa55word-carol" not in str(consumer)
        assert [c["id"] for c in consumer["credentials"]] == ["carol", issued["id"]]
        assert (
            api.post("/consumers", json={"name": "dave", "credentials": []}).status_code == 400
        )  # credentials have their own resource
        assert api.get("/consumers", params={"tag": "team=red"}).json()["total"] == 1
        assert api.get("/consumers", params={"tag": "team=blue"}).json()["total"] == 0

        audit = api.get("/audit", params={"entity": "consumers/carol", "since": str(since)}).json()[
            "data"
        ]
        assert [e["method"] for e in audit] == ["POST", "POST"]
        newest = audit[0]
        assert newest["who"] == "root" and newest["role"] == "admin"
        assert len(newest["before"]["credentials"]) == 1
        assert len(newest["after"]["credentials"]) == 2
        assert newest["after"]["credentials"][0]["password_hash"] == "[REDACTED]"
        assert newest["after"]["credentials"][1]["key_sha256"] == "[REDACTED]"
        assert key not in str(audit) and "pa55word-carol" not in str(audit)

        r = api.delete(f"/consumers/carol/credentials/{issued['id']}")
        assert r.status_code == 204
        served_within(ag.gw, "/keyed/x", 401, timeout=1)
        assert ag.gw.get("/keyed/x", headers={"apikey": key}).status_code == 401
    # the store keeps neither the key nor the password
    raw = b"".join(p.read_bytes() for p in ag.gw.dir.glob("ferrogate-admin.db*"))
    assert key.encode() not in raw and b"pa55word-carol" not in raw


def test_plugins_and_plans(admin_gateway: Any, upstream: Upstream) -> None:
    ag = admin_gateway(base_config(upstream))
    with ag.api() as api:
        r = api.post(
            "/plugins",
            json={
                "name": "response-transformer",
                "config": {"add": {"headers": {"x-from-admin": "yes"}}},
            },
        )
        assert r.status_code == 201, r.text
        # The first plugin of a worker loads the plugin host (imports): allow for that once.
        t0 = time.monotonic()
        while ag.gw.get("/base/p").headers.get("x-from-admin") != "yes":
            assert time.monotonic() - t0 < 10
            time.sleep(0.02)
        t0 = time.monotonic()
        r = api.patch(
            "/plugins/response-transformer",
            json={"config": {"add": {"headers": {"x-from-admin": "again"}}}},
        )
        assert r.status_code == 200, r.text
        with ag.gw.client(limits=httpx.Limits(max_keepalive_connections=0)) as c:
            while {c.get("/base/p").headers.get("x-from-admin") for _ in range(8)} != {"again"}:
                assert time.monotonic() - t0 < 1.0
                time.sleep(0.02)
        bad = api.post("/plugins", json={"name": "no-such-plugin"})
        assert bad.status_code == 400
        assert bad.json()["error"]["problems"][0]["path"].startswith("plugins/1")
        assert api.delete("/plugins/response-transformer").status_code == 204
        r = api.put("/plans/gold", json={"quotas": [{"limit": 5, "per": "month"}]})
        assert r.status_code == 201
        assert api.get("/plans", params={"name_prefix": "go"}).json()["data"] == [
            {"name": "gold", "quotas": [{"limit": 5, "per": "month"}]}
        ]


def test_db_less_mode_is_read_only_and_audits_file_reloads(
    admin_gateway: Any, upstream: Upstream
) -> None:
    ag = admin_gateway(base_config(upstream), store={"type": "file"})
    with ag.api() as api:
        assert api.get("/").json()["writable"] is False
        assert [r["name"] for r in api.get("/routes").json()["data"]] == ["base"]
        r = api.post("/routes", json={"name": "x", "paths": ["/x"], "upstream": "backend"})
        assert r.status_code == 405
        assert r.json()["error"]["code"] == "read_only"
        assert "source of truth" in r.json()["error"]["message"]
        assert api.delete("/routes/base").status_code == 405
        assert ag.gw.get("/base/x").status_code == 200
        config = {**ag.config}
        config["routes"] = [
            *config["routes"],
            {"name": "y", "paths": ["/y"], "upstream": "backend"},
        ]
        ag.gw.write_config(config)
        ag.gw.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while api.get("/routes/y").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        audit = api.get("/audit").json()["data"]
        assert audit[0]["entity"] == "routes/y" and audit[0]["who"] == "file"
        assert audit[0]["before"] is None


def test_the_sqlite_store_survives_a_restart(admin_gateway: Any, upstream: Upstream) -> None:
    ag = admin_gateway(base_config(upstream))
    with ag.api() as api:
        r = api.post("/routes", json={"name": "kept", "paths": ["/kept/*"], "upstream": "backend"})
        assert r.status_code == 201
        assert api.delete("/routes/base").status_code == 204
        revision = api.get("/").json()["revision"]
    ag.stop()
    ag.start()
    with ag.api() as api:
        assert api.get("/").json()["revision"] == revision
        assert [r["name"] for r in api.get("/routes").json()["data"]] == ["kept"]
    assert ag.gw.get("/kept/x").status_code == 200
    # the file seeded the store once; its routes do not come back
    assert ag.gw.get("/base/x").status_code == 404
    with sqlite3.connect(ag.gw.dir / "ferrogate-admin.db") as db:
        assert db.execute("SELECT MAX(revision) FROM documents").fetchone()[0] == revision


def test_the_admin_listener_needs_its_own_address(tmp_path: Path) -> None:
    port = free_port()
    config = {
        "listen": [f"127.0.0.1:{port}"],
        "routes": [{"paths": ["/"], "upstream": "http://127.0.0.1:9"}],
        "admin": {
            "listen": f"127.0.0.1:{port}",
            "tokens": {"t": {"token": "short", "role": "admin"}},
        },
    }
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    out = run_cli("check", str(path))
    assert out.returncode != 0
    assert "admin.listen: the admin API needs its own address" in out.stdout + out.stderr
    assert "admin.tokens.t.token: an admin token needs at least 16 characters" in (
        out.stdout + out.stderr
    )


def test_contract_against_the_served_openapi_document(
    admin_gateway: Any, upstream_factory: UpstreamFactory, tmp_path: Path
) -> None:
    ag = admin_gateway(base_config(upstream_factory("up")))
    spec = httpx.get(ag.admin_url + "/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert "/routes/{name}" in spec["paths"] and "RouteEntity" in spec["components"]["schemas"]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            ag.admin_url + "/openapi.json",
            "-H",
            f"Authorization: Bearer {ADMIN_TOKEN}",
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--phases",
            "examples,fuzzing",
            "--max-examples",
            "4",
            "--workers",
            "1",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # its example database goes there, not into the checkout
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "passed" in out.stdout
    # the gateway still serves after whatever was thrown at its admin API
    assert ag.gw.proc is not None and ag.gw.proc.poll() is None


def test_problem_paths_merge_patches_and_stored_secrets() -> None:
    from ferrogate.admin_api import _merge_patch, problem_path
    from ferrogate.admin_entities import KINDS, diff, protect_secrets, split_document
    from ferrogate.consumers import hash_key
    from ferrogate.problems import format_path

    for path, want in [
        (("routes", 3, "upstream"), "routes/3/upstream"),
        (("upstreams", "a.b", "targets", 0), "upstreams/a.b/targets/0"),
        (("consumers", 'odd "name"', "plan"), 'consumers/odd "name"/plan'),
    ]:
        assert problem_path(format_path(path)) == want
    assert _merge_patch({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": None, "e": 4}, "f": 5}) == {
        "a": 1,
        "b": {"d": 3, "e": 4},
        "f": 5,
    }
    assert {"upstreams", "routes", "plugins", "plans", "consumers"} <= set(KINDS)
    assert not {"listen", "admin", "tls", "status", "trusted_proxies"} & set(KINDS)
    local, doc = split_document(
        {
            "listen": ["127.0.0.1:1"],
            "routes": [{"paths": ["/"], "upstream": "u"}, {"name": "n", "paths": ["/n"]}],
            "consumers": {
                "c": {
                    "credentials": [
                        {"type": "key-auth", "key": "k" * 20},
                        {"type": "basic-auth", "username": "c", "password": "p" * 12},
                    ]
                }
            },
        }
    )
    assert local == {"listen": ["127.0.0.1:1"]}
    assert [r["name"] for r in doc["routes"]] == ["route-0", "n"]
    stored = protect_secrets(doc)
    creds = stored["consumers"]["c"]["credentials"]
    assert creds[0] == {"type": "key-auth", "key_sha256": hash_key("k" * 20)}
    assert creds[1]["password_hash"].startswith("scrypt$") and "password" not in creds[1]
    changes = diff(doc, stored)
    assert [(c.kind, c.key) for c in changes] == [("consumers", "c")]
