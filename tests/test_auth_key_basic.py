"""key-auth and basic-auth on a real gateway: who gets through, what the upstream sees, what
the refusals say, and that no secret reaches a log."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from ferrogate.consumers import verify_password
from gateway import Gateway, GatewayFactory, ferrogate_cli, run_cli
from upstreams import Upstream

ALICE_KEY = "alice-k3y-9f8e7d6c5b4a"
BOB_KEY = "bob-k3y-0a1b2c3d4e5f"
ALICE_PW = "correct horse battery staple"
CAROL_PW = "carol-pass-7781"
SECRETS = [ALICE_KEY, BOB_KEY, ALICE_PW, CAROL_PW]


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"authorization": f"Basic {token}"}


def hash_password_cli(stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ferrogate_cli(), "hash-password"], input=stdin, capture_output=True, text=True, timeout=30
    )


def hashed(password: str) -> str:
    out = hash_password_cli(password + "\n")
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def config(up: Upstream, carol_hash: str, **top: Any) -> dict[str, Any]:
    def route(name: str, *plugins: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "paths": [f"/{name}/*"], "upstream": "b", "plugins": list(plugins)}

    return {
        "upstreams": {"b": {"targets": [up.address]}},
        "consumers": {
            "alice": {
                "groups": ["admins"],
                "credentials": [
                    {"type": "key-auth", "key": ALICE_KEY},
                    {"type": "basic-auth", "username": "alice", "password": ALICE_PW},
                ],
            },
            "bob": {"credentials": [{"type": "key-auth", "key": BOB_KEY}]},
            "carol": {
                "credentials": [
                    {"type": "basic-auth", "username": "carol", "password_hash": carol_hash}
                ]
            },
            "guest": {},
        },
        "routes": [
            route(
                "key",
                {"name": "key-auth", "config": {"hide_credentials": True, "key_in_query": True}},
            ),
            route("shown", {"name": "key-auth", "config": {"upstream_headers": False}}),
            route("anon", {"name": "key-auth", "config": {"anonymous": "guest"}}),
            route("basic", {"name": "basic-auth", "config": {"hide_credentials": True}}),
        ],
        "access_log": {
            "path": "access.log",
            "fields": ["request_id", "consumer", "route", "path", "query", "status"],
            "capture": {"request_headers": True},
        },
        **top,
    }


def start(gateway: GatewayFactory, up: Upstream, carol_hash: str) -> Gateway:
    return gateway(config(up, carol_hash), workers=1)


def log_lines(gw: Gateway, n: int) -> list[dict[str, Any]]:
    """The access log's request lines (not the readiness probe's), once there are ``n``."""
    path = gw.dir / "access.log"
    deadline = time.monotonic() + 5
    while True:
        text = path.read_text() if path.exists() else ""
        lines = [json.loads(x) for x in text.splitlines()]
        lines = [x for x in lines if not x.get("path", "").startswith("/__ferrogate")]
        if len(lines) >= n or time.monotonic() > deadline:
            assert len(lines) >= n, lines
            return lines
        time.sleep(0.02)


def assert_refused(resp: httpx.Response, challenge: str, message: str) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.headers["www-authenticate"] == challenge
    assert resp.headers["content-type"] == "application/json"
    err = resp.json()["error"]
    assert err == {
        "status": 401,
        "code": "unauthorized",
        "message": message,
        "request_id": resp.headers["x-request-id"],
    }
    for secret in SECRETS:
        assert secret not in resp.text


def test_hash_password_prints_a_hash_the_password_verifies_against() -> None:
    encoded = hashed(CAROL_PW)
    assert encoded.startswith("scrypt$")
    assert verify_password(CAROL_PW, encoded)
    assert not verify_password(CAROL_PW + "x", encoded)
    assert hashed(CAROL_PW) != encoded  # salted
    empty = hash_password_cli("\n")
    assert empty.returncode == 2 and "empty" in empty.stderr and empty.stdout == ""


def test_key_auth_by_header_and_query_hidden_from_the_upstream(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = start(gateway, upstream, hashed(CAROL_PW))
    # A client cannot pass itself off as someone else with the identity headers.
    resp = gw.get("/key/a", headers={"x-api-key": ALICE_KEY, "x-consumer-username": "root"})
    assert resp.status_code == 200, resp.text
    got = upstream.last()
    assert got.header("x-consumer-username") == "alice"
    assert got.header_all("x-consumer-username") == ["alice"]
    assert re.fullmatch(r"[0-9a-f]{12}", got.header("x-credential-identifier") or "")
    assert not got.has_header("x-api-key") and not got.has_header("apikey")

    resp = gw.get(f"/key/b?x=1&apikey={BOB_KEY}")
    assert resp.status_code == 200, resp.text
    got = upstream.last()
    assert got.target == "/key/b?x=1"
    assert got.header("x-consumer-username") == "bob"

    # Without hide_credentials and upstream_headers, the upstream gets the request as sent.
    resp = gw.get("/shown/c", headers={"apikey": BOB_KEY, "x-consumer-username": "root"})
    assert resp.status_code == 200
    got = upstream.last()
    assert got.header("apikey") == BOB_KEY
    assert got.header("x-consumer-username") == "root"
    assert not got.has_header("x-credential-identifier")

    lines = log_lines(gw, 3)
    assert [(x["route"], x["consumer"]) for x in lines] == [
        ("key", "alice"),
        ("key", "bob"),
        ("shown", "bob"),
    ]


def test_key_auth_refuses_missing_and_wrong_keys_without_echoing_them(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = start(gateway, upstream, hashed(CAROL_PW))
    challenge = 'Key realm="ferrogate"'
    assert_refused(gw.get("/key/a"), challenge, "no API key in the request")
    wrong = ALICE_KEY[:-1] + "X"
    resp = gw.get("/key/a", headers={"apikey": wrong})
    assert_refused(resp, challenge, "invalid API key")
    assert wrong not in resp.text
    # Query keys are off on this route: a key there is not looked at.
    assert_refused(gw.get(f"/shown/a?apikey={ALICE_KEY}"), challenge, "no API key in the request")
    assert upstream.count == 0


def test_anonymous_fallback_only_without_a_credential(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = start(gateway, upstream, hashed(CAROL_PW))
    resp = gw.get("/anon/a")
    assert resp.status_code == 200
    got = upstream.last()
    assert got.header("x-consumer-username") == "guest"
    assert got.header("x-anonymous-consumer") == "true"
    assert not got.has_header("x-credential-identifier")

    resp = gw.get("/anon/a", headers={"apikey": ALICE_KEY, "x-anonymous-consumer": "true"})
    assert resp.status_code == 200
    got = upstream.last()
    assert got.header("x-consumer-username") == "alice"
    assert not got.has_header("x-anonymous-consumer")

    # A wrong key is a mistake to report, not a reason to downgrade to anonymous.
    assert_refused(
        gw.get("/anon/a", headers={"apikey": "not-a-real-key"}),
        'Key realm="ferrogate"',
        "invalid API key",
    )
    assert [x["consumer"] for x in log_lines(gw, 3)] == ["guest", "alice", None]


def test_basic_auth_good_and_bad_passwords(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = start(gateway, upstream, hashed(CAROL_PW))
    challenge = 'Basic realm="ferrogate", charset="UTF-8"'
    # The second request of the same credentials is answered from the worker's cache of
    # verified passwords; both must be accepted.
    for _ in range(2):
        resp = gw.get("/basic/a", headers=basic("alice", ALICE_PW))
        assert resp.status_code == 200, resp.text
        got = upstream.last()
        assert got.header("x-consumer-username") == "alice"
        assert got.header("x-credential-identifier") == "alice"
        assert not got.has_header("authorization")
    # A password given as a hash made by `ferrogate hash-password`.
    resp = gw.get("/basic/a", headers=basic("carol", CAROL_PW))
    assert resp.status_code == 200, resp.text
    assert upstream.last().header("x-consumer-username") == "carol"

    for _ in range(2):  # a failure is not remembered as a success either
        assert_refused(
            gw.get("/basic/a", headers=basic("alice", CAROL_PW)),
            challenge,
            "invalid username or password",
        )
    assert_refused(
        gw.get("/basic/a", headers=basic("mallory", ALICE_PW)),
        challenge,
        "invalid username or password",
    )
    assert_refused(gw.get("/basic/a"), challenge, "no username and password")
    assert_refused(
        gw.get("/basic/a", headers={"authorization": "Bearer abc"}),
        challenge,
        "no username and password",
    )
    assert_refused(
        gw.get("/basic/a", headers={"authorization": "Basic !!notbase64"}),
        challenge,
        "malformed Basic credentials",
    )
    assert upstream.count == 3


def test_no_secret_reaches_the_logs(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = start(gateway, upstream, hashed(CAROL_PW))
    sent = [
        gw.get("/key/a", headers={"apikey": ALICE_KEY}),
        gw.get(f"/key/a?apikey={BOB_KEY}"),
        gw.get("/key/a", headers={"x-api-key": ALICE_KEY + "0"}),
        gw.get("/basic/a", headers=basic("alice", ALICE_PW)),
        gw.get("/basic/a", headers=basic("carol", ALICE_PW)),
    ]
    assert [r.status_code for r in sent] == [200, 200, 401, 200, 401]
    lines = log_lines(gw, len(sent))
    assert lines[0]["captured"]["request_headers"]["apikey"] == "[REDACTED]"
    assert lines[1]["query"] == "apikey=[REDACTED]"
    assert lines[3]["captured"]["request_headers"]["authorization"] == "[REDACTED]"
    log_text = (gw.dir / "access.log").read_text()
    everything = log_text + gw.stderr_text() + gw.stdout_text()
    encoded = [
        base64.b64encode(f"{u}:{p}".encode()).decode()
        for u, p in [("alice", ALICE_PW), ("carol", ALICE_PW)]
    ]
    for secret in [*SECRETS, *encoded]:
        assert secret not in everything


def test_anonymous_must_name_a_consumer(tmp_path: Path, upstream: Upstream) -> None:
    import yaml

    cfg = config(upstream, hashed(CAROL_PW), listen=["127.0.0.1:0"])
    cfg["routes"][2]["plugins"][0]["config"]["anonymous"] = "nobody"
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = run_cli("check", str(path))
    assert out.returncode == 2
    assert "routes[2].plugins[0].config" in out.stdout, out.stdout
    assert "anonymous: no consumer named 'nobody'" in out.stdout, out.stdout
