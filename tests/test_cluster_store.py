"""Cluster mode: two real gateway nodes sharing the admin API's PostgreSQL store (a private
server the tests start): propagation, restarts, the database going away and coming back,
the polling safety net, and starting without the database."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from admin_gateway import ADMIN_TOKEN, AdminGateway, served_within
from certs import CA
from gateway import Gateway, free_port, run_cli
from postgres_server import PostgresServer
from test_certificates import certificate_served_within, served_serial
from upstreams import Upstream

# The documented bound for a change to be served by every worker of every node (NOTIFY +
# validation + a reload).
PROPAGATION_BOUND = 1.0
# After the database returns: the watcher's reconnect backoff (at most 5 s) comes on top.
RECONNECT_BOUND = 8.0


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.init()
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def nodes(tmp_path: Path, pg: PostgresServer, upstream: Upstream) -> Iterator[Any]:
    """start(name) -> an AdminGateway on this test's own database."""
    dsn = pg.create_database()
    started: list[AdminGateway] = []

    def start(name: str, poll: str = "5s", **local: Any) -> AdminGateway:
        store = {"postgres": {"dsn": dsn, "poll_interval": poll}}
        node = AdminGateway(tmp_path / name, {**base_config(upstream), **local}, store=store)
        started.append(node)
        node.start()
        return node

    start.dsn = dsn  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for node in started:
            node.stop()
        if not (pg.data / "postmaster.pid").exists():
            pg.start()


def base_config(up: Upstream) -> dict[str, Any]:
    return {
        "upstreams": {"backend": {"targets": [up.address]}},
        "routes": [{"name": "base", "paths": ["/base/*"], "upstream": "backend"}],
    }


def add_route(node: AdminGateway, name: str) -> httpx.Response:
    with node.api() as api:
        return api.post(
            "/routes", json={"name": name, "paths": [f"/{name}/*"], "upstream": "backend"}
        )


def revision(node: AdminGateway) -> int:
    with node.api() as api:
        return int(api.get("/").json()["revision"])


def events(gw: Gateway, name: str) -> list[dict[str, Any]]:
    out = []
    for line in (gw.stderr_text() + gw.stdout_text()).splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            out.append(json.loads(line))
    return out


def insert_without_notify(dsn: str, route: str) -> int:
    """A revision stored the way a save does but with its NOTIFY lost."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rev, body = conn.execute(
            "SELECT revision, body FROM ferrogate_documents ORDER BY revision DESC LIMIT 1"
        ).fetchone()  # type: ignore[misc]
        doc = json.loads(body)
        doc["routes"].append({"name": route, "paths": [f"/{route}/*"], "upstream": "backend"})
        conn.execute(
            "INSERT INTO ferrogate_documents (revision, created, body) VALUES (%s, %s, %s)",
            (rev + 1, time.time(), json.dumps(doc)),
        )
        return int(rev) + 1


def test_a_change_on_one_node_is_served_by_the_other(nodes: Any) -> None:
    a = nodes("a")
    b = nodes("b")
    assert revision(a) == revision(b) == 1  # seeded once, by whichever node came first

    assert add_route(a, "orders").status_code == 201
    took = served_within(b.gw, "/orders/x", 200, PROPAGATION_BOUND)
    assert took <= PROPAGATION_BOUND
    assert revision(b) == 2
    with b.api() as api:
        assert api.get("/routes/orders").status_code == 200

    # And the other way round, with the audit log shared.
    with b.api() as api:
        assert api.delete("/routes/orders").status_code == 204
    served_within(a.gw, "/orders/x", 404, PROPAGATION_BOUND)
    with a.api() as api:
        audit = api.get("/audit", params={"entity": "routes/orders"}).json()["data"]
    assert [(e["method"], e["revision"]) for e in audit] == [("DELETE", 3), ("POST", 2)]

    with psycopg.connect(nodes.dsn) as conn:
        assert conn.execute("SELECT version FROM ferrogate_schema").fetchall() == [(1,)]
        revs = [r[0] for r in conn.execute("SELECT revision FROM ferrogate_documents")]
    assert sorted(revs) == [1, 2, 3]

    # A node restarted picks up what changed while it was down.
    b.stop()
    assert add_route(a, "late").status_code == 201
    b.start()
    assert b.gw.get("/late/x").status_code == 200
    assert revision(b) == 4


def applied_at(gw: Gateway, since: float) -> dict[int, float]:
    """worker id -> when it first applied a config after ``since`` (its own event)."""
    out: dict[int, float] = {}
    for e in events(gw, "config_applied"):
        if e["ts"] > since and e["worker"] not in out:
            out[int(e["worker"])] = float(e["ts"])
    return out


def test_propagation_reaches_every_worker_of_every_node_within_a_second(nodes: Any) -> None:
    a = nodes("a")
    b = nodes("b")
    for node in (a, b):
        assert node.gw.workers == 2
    took: list[float] = []
    for i in range(5):
        name = f"p{i}"
        t0 = time.time()
        assert add_route(a if i % 2 else b, name).status_code == 201
        for node in (a, b):
            served_within(node.gw, f"/{name}/x", 200, PROPAGATION_BOUND)
        # Every worker of both nodes says when it swapped the new config in.
        deadline = time.monotonic() + PROPAGATION_BOUND
        while True:
            applied = [applied_at(node.gw, t0) for node in (a, b)]
            if all(len(w) == 2 for w in applied) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert [sorted(w) for w in applied] == [[0, 1], [0, 1]], applied
        took.append(max(ts - t0 for w in applied for ts in w.values()))
    print("propagation (s):", [round(t, 3) for t in took])
    assert max(took) < PROPAGATION_BOUND, took


def test_a_certificate_reaches_the_https_listeners_of_every_node(
    nodes: Any, tmp_path: Path
) -> None:
    ca = CA()
    default = ca.issue("CN=default.test", dns=["default.test"])
    default.write(tmp_path, "default")
    started: dict[str, tuple[AdminGateway, int]] = {}
    for name in ("a", "b"):
        port = free_port()
        tls = {
            "listen": [f"127.0.0.1:{port}"],
            "certificates": [{"cert": "../default.pem", "key": "../default.key"}],
        }
        started[name] = (nodes(name, tls=tls), port)
    shop = ca.issue("CN=shop.test", dns=["shop.test"])
    with started["a"][0].api() as api:
        r = api.post(
            "/certificates",
            json={
                "name": "shop",
                "cert": shop.cert_pem().decode(),
                "key": shop.key_pem().decode(),
                "snis": ["shop.test"],
            },
        )
        assert r.status_code == 201, r.text
    for _, port in started.values():
        certificate_served_within(port, "shop.test", shop.serial, PROPAGATION_BOUND)
        assert served_serial(port, "other.test") == default.serial
    with started["b"][0].api() as api:
        assert api.get("/certificates/shop").json()["key"] == "[REDACTED]"
        assert api.delete("/certificates/shop").status_code == 204
    for _, port in started.values():
        certificate_served_within(port, "shop.test", default.serial, PROPAGATION_BOUND)


def test_stale_base_revision_is_a_conflict(nodes: Any) -> None:
    a = nodes("a")
    # A change stored behind the node's back, its NOTIFY lost: the node's base is stale.
    insert_without_notify(nodes.dsn, "sneaky")
    with a.api() as api:
        r = api.post("/routes", json={"name": "mine", "paths": ["/mine/*"], "upstream": "backend"})
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "conflict"
    # The conflict made the node take the latest revision: it serves it and a retry works.
    served_within(a.gw, "/sneaky/x", 200, PROPAGATION_BOUND)
    assert add_route(a, "mine").status_code == 201
    assert revision(a) == 3


def test_the_database_going_away_and_coming_back(nodes: Any, pg: PostgresServer) -> None:
    a = nodes("a")
    b = nodes("b")
    assert add_route(a, "before").status_code == 201
    served_within(b.gw, "/before/x", 200, PROPAGATION_BOUND)

    pg.stop()
    for node in (a, b):
        served_within(node.gw, "/before/x", 200, 1.0)
        served_within(node.gw, "/base/x", 200, 1.0)
    r = add_route(a, "during")
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "store_unavailable"
    assert "cannot be reached" in error["message"] and "revision 2" in error["message"]
    assert r.headers["retry-after"] == "5"
    with a.api() as api:
        assert api.get("/routes/before").status_code == 200  # reads are from memory
        assert api.get("/audit").status_code == 503
    assert a.gw.get("/during/x").status_code == 404

    pg.start()
    assert add_route(a, "after").status_code == 201
    served_within(a.gw, "/after/x", 200, PROPAGATION_BOUND)
    took = served_within(b.gw, "/after/x", 200, RECONNECT_BOUND)
    assert took <= RECONNECT_BOUND
    assert events(b.gw, "admin_store_unreachable")
    assert events(b.gw, "admin_store_reconnected")


def test_polling_catches_changes_whose_notification_was_lost(nodes: Any) -> None:
    a = nodes("a", poll="1s")
    b = nodes("b", poll="1s")
    insert_without_notify(nodes.dsn, "quiet")
    for node in (a, b):
        served_within(node.gw, "/quiet/x", 200, 1.0 + PROPAGATION_BOUND)

    # The LISTEN connections broken: a change meanwhile is caught up on by the reconnect or
    # the next poll.
    with psycopg.connect(nodes.dsn, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name LIKE 'ferrogate-watch-%%'"
        ).fetchone()
    assert killed == (2,)
    insert_without_notify(nodes.dsn, "while-broken")
    for node in (a, b):
        served_within(node.gw, "/while-broken/x", 200, 1.0 + PROPAGATION_BOUND)


def test_starting_with_the_database_down(nodes: Any, pg: PostgresServer, tmp_path: Path) -> None:
    a = nodes("a")
    assert add_route(a, "cached").status_code == 201
    a.stop()
    pg.stop()

    # Its cache on disk: the node starts, serves its last config and says so.
    a.start()
    assert a.gw.get("/cached/x").status_code == 200
    [event] = events(a.gw, "admin_store_unavailable")
    assert event["serving"] == "cache" and event["revision"] == 2
    assert add_route(a, "refused").status_code == 503

    # No cache and no database: refused, with the reason.
    c = AdminGateway(
        tmp_path / "c",
        base_config_from(a),
        store={"postgres": {"dsn": nodes.dsn}},
    )
    with pytest.raises(RuntimeError, match="exited with 1") as failed:
        c.start()
    assert "cannot be reached" in str(failed.value)
    assert "no cached config" in str(failed.value)
    c.stop()

    # The database back: the node catches up and takes changes again.
    pg.start()
    deadline = time.monotonic() + RECONNECT_BOUND
    while (r := add_route(a, "back")).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.status_code == 201, r.text
    served_within(a.gw, "/back/x", 200, PROPAGATION_BOUND)


def base_config_from(node: AdminGateway) -> dict[str, Any]:
    return {k: v for k, v in node.config.items() if k != "admin"}


def test_an_import_reaches_every_node(nodes: Any, tmp_path: Path) -> None:
    a = nodes("a")
    b = nodes("b")
    exported = run_cli("config", "export", "--store", f"postgres:{nodes.dsn}")
    assert exported.returncode == 0, exported.stderr
    data = yaml.safe_load(exported.stdout)
    data["routes"].append({"name": "synced", "paths": ["/synced/*"], "upstream": "backend"})
    wanted = tmp_path / "wanted.yaml"
    wanted.write_text(yaml.safe_dump(data, sort_keys=False))
    done = run_cli(
        "config", "--admin-url", a.admin_url, "--token", ADMIN_TOKEN, "import", str(wanted)
    )
    assert done.returncode == 0, done.stderr
    served_within(b.gw, "/synced/x", 200, PROPAGATION_BOUND)
    again = run_cli("config", "export", "--store", f"postgres:{nodes.dsn}")
    assert yaml.safe_load(again.stdout) == data


def test_store_settings_are_checked(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "listen: ['127.0.0.1:1']\n"
        "routes: [{paths: [/], upstream: up}]\n"
        "upstreams: {up: {targets: ['127.0.0.1:2']}}\n"
        "admin:\n"
        "  listen: 127.0.0.1:3\n"
        "  store:\n"
        "    postgres:\n"
        "      dsn: {file: missing.dsn}\n"
        "      poll_interval: soon\n"
    )
    done = run_cli("check", str(config))
    assert done.returncode != 0
    problems = done.stdout.splitlines()
    assert any(p.startswith(f"{config}:8:") and "the DSN file" in p for p in problems)
    assert any(p.startswith(f"{config}:9:") and "invalid duration" in p for p in problems)

    config.write_text(
        "listen: ['127.0.0.1:1']\n"
        "routes: [{paths: [/], upstream: up}]\n"
        "upstreams: {up: {targets: ['127.0.0.1:2']}}\n"
        "admin:\n"
        "  listen: 127.0.0.1:3\n"
        "  store:\n"
        "    type: sqlite\n"
        "    postgres: {dsn: 'host=127.0.0.1'}\n"
    )
    done = run_cli("check", str(config))
    assert done.returncode != 0
    assert f"{config}:8:" in done.stdout and "not used with type: sqlite" in done.stdout
