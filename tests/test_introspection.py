"""oauth2-introspection on a real gateway in front of a real authorization server (Authlib):
who gets through, what the upstream sees, the cache bounded by each token's expiry, shared
in-flight introspections, and the answers when the server cannot be asked."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import msgspec
import pytest

from authorization_server import AuthServer
from ferrogate.plugins.oauth2_introspection import OAuth2Introspection, TokenCache
from ferrogate.testing import PluginHarness
from gateway import Gateway
from upstreams import Upstream, closed_port

PLUGIN = "oauth2-introspection"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def route(name: str, **plugin: Any) -> dict[str, Any]:
    return {
        "name": name,
        "paths": [f"/{name}/*"],
        "upstream": "app",
        "plugins": [{"name": PLUGIN, "config": plugin}],
    }


@pytest.fixture(scope="module")
def auth_server() -> Iterator[AuthServer]:
    server = AuthServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = Upstream("app")
    yield up
    up.close()


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, auth_server: AuthServer, upstream: Upstream
) -> Iterator[Gateway]:
    """One worker, so that every request of a test meets the same cache."""
    workdir = tmp_path_factory.mktemp("gateway")
    secret_file = workdir / "as-secret"
    secret_file.write_text(AuthServer.GATEWAY.client_secret + "\n")
    endpoint = auth_server.url + "/introspect"
    client = {"url": endpoint, "client_id": "gateway"}
    from_env = {**client, "client_secret": "${AS_SECRET}"}
    config = {
        "consumers": {"alice": {}, "reporting": {}},
        "upstreams": {"app": {"targets": [upstream.address]}},
        "routes": [
            route(
                "api",
                **from_env,
                hide_credentials=True,
                claims_to_headers={"sub": "x-user-sub", "scope": "x-scopes"},
            ),
            route(
                "svc",
                **client,
                client_secret={"file": str(secret_file)},
                consumer_claim="client_id",
            ),
            route("admin", **from_env, required_scopes=["orders:admin"]),
            route("short", **from_env, cache_ttl="1s"),
            route("open", **from_env, allow_unknown_consumers=True, audience="orders-api"),
            route("aud", **from_env, audience="billing-api"),
            route("down", url=f"http://127.0.0.1:{closed_port()}/introspect", client_id="x"),
        ],
    }
    gateway = Gateway(
        workdir, config, workers=1, env={"AS_SECRET": AuthServer.GATEWAY.client_secret}
    )
    gateway.start()
    yield gateway
    gateway.stop()


def test_an_active_token_names_the_consumer_and_its_claims_go_upstream(
    gw: Gateway, auth_server: AuthServer, upstream: Upstream
) -> None:
    token = auth_server.seed("alice", scope="orders:read orders:write")
    spoofed = {**bearer(token), "x-user-sub": "admin", "x-consumer-username": "root"}
    r = gw.get("/api/orders", headers=spoofed)
    assert r.status_code == 200, r.text
    seen = upstream.last()
    assert seen.header("x-consumer-username") == "alice"
    assert seen.header("x-user-sub") == "alice"  # the claim, not the client's header
    assert seen.header("x-scopes") == "orders:read orders:write"
    assert seen.header("authorization") is None  # hide_credentials


def test_a_client_credentials_token_maps_by_client_id_with_a_secret_from_a_file(
    gw: Gateway, auth_server: AuthServer, upstream: Upstream
) -> None:
    issued = httpx.post(
        auth_server.url + "/token",
        data={"grant_type": "client_credentials", "scope": "reports:read"},
        auth=(AuthServer.REPORTING.client_id, AuthServer.REPORTING.client_secret),
    )
    assert issued.status_code == 200, issued.text
    token = issued.json()["access_token"]
    r = gw.get("/svc/reports", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert upstream.last().header("x-consumer-username") == "reporting"
    assert upstream.last().header("authorization") == f"Bearer {token}"  # not hidden here


def test_missing_malformed_unknown_revoked_and_expired_tokens_are_401(
    gw: Gateway, auth_server: AuthServer
) -> None:
    missing = gw.get("/api/orders")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="ferrogate"'
    assert missing.json()["error"]["code"] == "unauthorized"

    before = auth_server.count()
    malformed = gw.get("/api/orders", headers={"authorization": "Bearer a b{c}"})
    assert malformed.status_code == 401
    assert 'error="invalid_token"' in malformed.headers["www-authenticate"]
    assert auth_server.count() == before  # refused without asking

    revoked = auth_server.seed("alice")
    auth_server.tokens[revoked].revoked = True
    expired = auth_server.seed("alice", expires_in=-10)
    for token in ["never-issued-" + "x" * 20, revoked, expired]:
        r = gw.get("/api/orders", headers=bearer(token))
        assert r.status_code == 401, (token, r.text)
        assert r.headers["www-authenticate"].startswith('Bearer realm="ferrogate", ')
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
        error = r.json()["error"]
        assert error["code"] == "invalid_token"
        assert error["request_id"] == r.headers["x-request-id"]
        assert token not in r.text
    assert auth_server.count() == before + 3

    # An inactive answer is cached too (briefly): asking again costs no introspection.
    assert gw.get("/api/orders", headers=bearer(revoked)).status_code == 401
    assert auth_server.count() == before + 3


def test_one_introspection_per_token_until_its_exp(gw: Gateway, auth_server: AuthServer) -> None:
    token = auth_server.seed("alice", expires_in=4)
    before = auth_server.count()
    auth_server.delay = 0.3  # the concurrent requests all arrive while the first is asked
    try:
        with ThreadPoolExecutor(12) as pool:
            statuses = list(
                pool.map(lambda _: gw.get("/api/o", headers=bearer(token)).status_code, range(12))
            )
    finally:
        auth_server.delay = 0.0
    assert statuses == [200] * 12
    for _ in range(5):
        assert gw.get("/api/o", headers=bearer(token)).status_code == 200
    assert auth_server.count() == before + 1

    # Past the token's exp the cached answer is gone: the server is asked again, says no.
    deadline = time.monotonic() + 10
    while (status := gw.get("/api/o", headers=bearer(token)).status_code) == 200:
        assert time.monotonic() < deadline, "still accepted long after exp"
        time.sleep(0.05)
    assert status == 401
    assert auth_server.count() == before + 2


def test_the_cache_keeps_an_active_answer_at_most_cache_ttl(
    gw: Gateway, auth_server: AuthServer
) -> None:
    token = auth_server.seed("alice")  # valid for an hour
    before = auth_server.count()
    assert gw.get("/short/a", headers=bearer(token)).status_code == 200
    auth_server.tokens[token].revoked = True
    assert gw.get("/short/a", headers=bearer(token)).status_code == 200  # cached
    assert auth_server.count() == before + 1
    deadline = time.monotonic() + 6
    while gw.get("/short/a", headers=bearer(token)).status_code == 200:
        assert time.monotonic() < deadline, "the revocation was never seen"
        time.sleep(0.05)
    assert auth_server.count() == before + 2


def test_required_scopes_and_unknown_consumers_are_403(
    gw: Gateway, auth_server: AuthServer, upstream: Upstream
) -> None:
    reader = auth_server.seed("alice", scope="orders:read")
    r = gw.get("/admin/x", headers=bearer(reader))
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "insufficient_scope"
    assert "orders:admin" in r.json()["error"]["message"]
    challenge = r.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge and 'scope="orders:admin"' in challenge

    admin = auth_server.seed("alice", scope="orders:read orders:admin")
    assert gw.get("/admin/x", headers=bearer(admin)).status_code == 200

    stranger = auth_server.seed("mallory", scope="orders:read")
    r = gw.get("/api/x", headers=bearer(stranger))
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "unknown_consumer"
    # Where unknown consumers are allowed the request goes on, without a consumer.
    r = gw.get("/open/x", headers=bearer(stranger))
    assert r.status_code == 200, r.text
    assert upstream.last().header("x-consumer-username") is None


def test_a_token_for_another_audience_is_401(gw: Gateway, auth_server: AuthServer) -> None:
    token = auth_server.seed("alice")
    r = gw.get("/aud/x", headers=bearer(token))
    assert r.status_code == 401
    assert "audience" in r.json()["error"]["message"]


def test_an_unreachable_or_failing_server_is_503_not_401(
    gw: Gateway, auth_server: AuthServer
) -> None:
    token = auth_server.seed("alice")
    r = gw.get("/down/x", headers=bearer(token))
    assert r.status_code == 503
    error = r.json()["error"]
    assert (error["status"], error["code"]) == (503, "introspection_unavailable")
    assert error["request_id"] == r.headers["x-request-id"]
    assert "www-authenticate" not in r.headers

    auth_server.fail_with = 500
    try:
        r = gw.get("/api/x", headers=bearer(token))
        assert r.status_code == 503
    finally:
        auth_server.fail_with = None
    # Failures are not cached: once the server answers again, so does the gateway.
    assert gw.get("/api/x", headers=bearer(token)).status_code == 200

    deadline = time.monotonic() + 5
    while True:
        events = [
            json.loads(line)
            for line in gw.stderr_text().splitlines()
            if '"introspection_failed"' in line
        ]
        if events or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert events and events[0]["plugin"] == PLUGIN and events[0]["route"] == "down"
    assert token not in gw.stderr_text()
    assert AuthServer.GATEWAY.client_secret not in gw.stderr_text()


# -- settings and the cache, without a server ---------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"url": "ftp://as/introspect"}, "url: must be an absolute http"),
        ({"url": "http://as/i", "client_secret": "s"}, "client_secret: set client_id too"),
        (
            {"url": "http://as/i", "client_id": "a", "bearer_token": "t"},
            "bearer_token: use either",
        ),
        (
            {"url": "http://as/i", "client_id": "a", "client_secret": {"file": "/nonexistent"}},
            "client_secret: cannot read the secret file /nonexistent",
        ),
        ({"url": "http://as/i", "claims_to_headers": {"sub": "bad header"}}, "claims_to_headers"),
    ],
)
def test_settings_that_cannot_work_are_refused(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PluginHarness(OAuth2Introspection, config)


def test_unknown_settings_are_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        PluginHarness(OAuth2Introspection, {"url": "http://as/i", "cache": 1})


def test_the_token_cache_expires_and_stays_bounded() -> None:
    cache = TokenCache(2)
    cache.put(b"a", {"active": True}, until=10.0)
    cache.put(b"b", None, until=10.0)
    assert cache.get(b"a", 5.0) == (True, {"active": True})
    assert cache.get(b"b", 5.0) == (True, None)
    cache.put(b"c", {"active": True}, until=10.0)  # a is the least recently used now
    assert cache.get(b"a", 5.0) == (False, None)
    assert cache.get(b"b", 10.0) == (False, None)  # expired
    assert len(cache) == 1
