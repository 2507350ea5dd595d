"""hmac-auth on a real gateway. The client signs requests here, from the string to sign as
docs/plugins.md describes it (not with the plugin's code): valid signatures pass and name
the consumer; tampering, wrong secrets, stale dates and replays are refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterator, Sequence
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from ferrogate.plugins.hmac_auth import HmacAuth, ReplayCache
from ferrogate.testing import PluginHarness
from gateway import Gateway
from test_access_log import line_for
from upstreams import Upstream

ALICE_SECRET = "alice-hmac-secret-5d2c9e"
BOB_SECRET = "bob-hmac-secret-81f0aa"
HASHES = {
    "hmac-sha256": hashlib.sha256,
    "hmac-sha384": hashlib.sha384,
    "hmac-sha512": hashlib.sha512,
}
SIGNED = ("@request-target", "date", "digest")


def http_date(offset: float = 0.0) -> str:
    return formatdate(time.time() + offset, usegmt=True)


def body_digest(body: bytes) -> str:
    return "SHA-256=" + base64.b64encode(hashlib.sha256(body).digest()).decode()


def authorization(
    method: str,
    target: str,
    headers: dict[str, str],
    *,
    names: Sequence[str] = SIGNED,
    key_id: str = "alice",
    secret: str = ALICE_SECRET,
    algorithm: str = "hmac-sha256",
) -> str:
    """The documented scheme: one ``name: value`` line per signed name, joined by LF, where
    ``@request-target`` is the lower-case method, a space and the path with its query."""
    lines = []
    for name in names:
        if name == "@request-target":
            lines.append(f"@request-target: {method.lower()} {target}")
        else:
            lines.append(f"{name}: {headers[name]}")
    mac = hmac.new(secret.encode(), "\n".join(lines).encode(), HASHES[algorithm])
    signature = base64.b64encode(mac.digest()).decode()
    return f'{algorithm} keyId="{key_id}", headers="{" ".join(names)}", signature="{signature}"'


def signed(
    method: str,
    target: str,
    body: bytes = b"",
    *,
    date_offset: float = 0.0,
    names: Sequence[str] | None = None,
    extra: dict[str, str] | None = None,
    **kwargs: Any,
) -> dict[str, str]:
    """Headers of a signed request: Date, Digest (when there is a body), Authorization."""
    headers = {"date": http_date(date_offset), **(extra or {})}
    if body:
        headers["digest"] = body_digest(body)
    if names is None:
        names = SIGNED if body else SIGNED[:2]
    headers["authorization"] = authorization(method, target, headers, names=names, **kwargs)
    return headers


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = Upstream("app")
    yield up
    up.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Gateway]:
    """One worker: the replay cache is per worker (see docs/plugins.md)."""

    def route(name: str, **config: Any) -> dict[str, Any]:
        return {
            "name": name,
            "paths": [f"/{name}/*"],
            "upstream": "app",
            "plugins": [{"name": "hmac-auth", "config": config}],
        }

    config = {
        "consumers": {
            "alice": {
                "credentials": [{"type": "hmac-auth", "key_id": "alice", "secret": "${ALICE_HMAC}"}]
            },
            "bob": {"credentials": [{"type": "hmac-auth", "key_id": "bob", "secret": BOB_SECRET}]},
        },
        "upstreams": {"app": {"targets": [upstream.address]}},
        "routes": [
            route("api"),
            route("plain", validate_digest=False, algorithms=["hmac-sha512"]),
            route("tenant", enforce_headers=["x-tenant"], hide_credentials=True),
        ],
        "access_log": {"path": "access.log", "fields": ["request_id", "consumer", "status"]},
    }
    gateway = Gateway(
        tmp_path_factory.mktemp("gateway"), config, workers=1, env={"ALICE_HMAC": ALICE_SECRET}
    )
    gateway.start()
    yield gateway
    gateway.stop()


def refused(r: httpx.Response, reason: str) -> None:
    assert r.status_code == 401, r.text
    error = r.json()["error"]
    assert error["code"] == "unauthorized"
    assert reason in error["message"], error["message"]
    assert error["request_id"] == r.headers["x-request-id"]
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith("hmac-sha") and 'realm="ferrogate"' in challenge
    assert ALICE_SECRET not in r.text


def test_a_signed_get_names_the_consumer(gw: Gateway, upstream: Upstream) -> None:
    target = "/api/orders?status=open&sort=-date&q=a%20b"
    r = gw.get(target, headers=signed("GET", target, extra={"x-consumer-username": "root"}))
    assert r.status_code == 200, r.text
    seen = upstream.last()
    assert seen.target == target
    assert seen.header("x-consumer-username") == "alice"
    assert seen.header("x-credential-identifier") == "alice"
    assert line_for(gw.dir / "access.log", r.headers["x-request-id"])["consumer"] == "alice"


@pytest.mark.parametrize("algorithm", ["hmac-sha256", "hmac-sha384", "hmac-sha512"])
def test_a_signed_post_with_its_digest(gw: Gateway, upstream: Upstream, algorithm: str) -> None:
    body = b'{"item": "widget", "qty": 3}'
    headers = signed(
        "POST", "/api/orders", body, key_id="bob", secret=BOB_SECRET, algorithm=algorithm
    )
    r = gw.request("POST", "/api/orders", content=body, headers=headers)
    assert r.status_code == 200, r.text
    seen = upstream.last()
    assert (seen.method, seen.body_len) == ("POST", len(body))
    assert seen.header("x-consumer-username") == "bob"


def test_a_wrong_secret_or_an_unknown_key_id_is_refused_alike(gw: Gateway) -> None:
    for kwargs in ({"secret": "not-alice-secret"}, {"key_id": "nobody"}, {"secret": BOB_SECRET}):
        r = gw.get("/api/x", headers=signed("GET", "/api/x", **kwargs))
        refused(r, "the signature does not match the request")


def test_tampering_with_the_path_query_body_or_digest_is_refused(gw: Gateway) -> None:
    r = gw.get("/api/admin", headers=signed("GET", "/api/orders"))
    refused(r, "does not match")
    r = gw.get("/api/orders?limit=1000", headers=signed("GET", "/api/orders?limit=10"))
    refused(r, "does not match")
    r = gw.request("DELETE", "/api/orders", headers=signed("GET", "/api/orders"))
    refused(r, "does not match")

    body = b'{"amount": 10}'
    headers = signed("POST", "/api/pay", body)
    r = gw.request("POST", "/api/pay", content=b'{"amount": 99}', headers=headers)
    refused(r, "the body does not match the Digest header")

    # A digest made for the new body, under the signature of the old one.
    headers = {**signed("POST", "/api/pay", body), "digest": body_digest(b'{"amount": 99}')}
    r = gw.request("POST", "/api/pay", content=b'{"amount": 99}', headers=headers)
    refused(r, "the signature does not match")

    # A body whose digest the signature does not cover, or that has no digest at all.
    headers = signed("POST", "/api/pay", body, names=["@request-target", "date"])
    refused(gw.request("POST", "/api/pay", content=body, headers=headers), "must cover: digest")
    headers = signed("POST", "/api/pay", names=["@request-target", "date"])
    refused(gw.request("POST", "/api/pay", content=body, headers=headers), "must cover: digest")


def test_the_date_must_be_there_signed_and_within_the_skew(gw: Gateway) -> None:
    no_date = signed("GET", "/api/x")
    del no_date["date"]
    refused(gw.get("/api/x", headers=no_date), "date")
    unsigned = signed("GET", "/api/x", names=["@request-target"])
    refused(gw.get("/api/x", headers=unsigned), "must cover: date")
    for offset in (-310, 310, -3600):  # HTTP dates drop the fraction of a second
        r = gw.get("/api/x", headers=signed("GET", "/api/x", date_offset=offset))
        refused(r, "more than 300s away")
    for offset in (-200, 120):
        assert (
            gw.get("/api/x", headers=signed("GET", "/api/x", date_offset=offset)).status_code == 200
        )

    # X-Date (which browsers may set) wins over Date, and must then be the one signed.
    headers = {"date": http_date(-3600), "x-date": http_date()}
    headers["authorization"] = authorization(
        "GET", "/api/x", headers, names=["@request-target", "x-date"]
    )
    assert gw.get("/api/x", headers=headers).status_code == 200
    headers = {"date": http_date(), "x-date": http_date(-3600)}
    headers["authorization"] = authorization(
        "GET", "/api/x", headers, names=["@request-target", "date"]
    )
    refused(gw.get("/api/x", headers=headers), "must cover: x-date")


def test_a_replayed_request_is_refused(gw: Gateway) -> None:
    body = b"transfer=100"
    headers = signed("POST", "/api/transfer", body)
    first = gw.request("POST", "/api/transfer", content=body, headers=headers)
    assert first.status_code == 200, first.text
    again = gw.request("POST", "/api/transfer", content=body, headers=headers)
    refused(again, "already received (replay)")
    # The same operation signed anew is a new request: within one second (HTTP dates have
    # whole seconds) the client tells them apart with a signed nonce.
    fresh = signed(
        "POST", "/api/transfer", body, extra={"x-nonce": "2"}, names=[*SIGNED, "x-nonce"]
    )
    assert gw.request("POST", "/api/transfer", content=body, headers=fresh).status_code == 200


def test_missing_or_malformed_authorization(gw: Gateway) -> None:
    refused(gw.get("/api/x"), "a signed request is required")
    refused(
        gw.get("/api/x", headers={"authorization": "Basic YTpi"}), "a signed request is required"
    )
    bad = {"date": http_date(), "authorization": 'hmac-sha256 keyId=alice, signature="x"'}
    refused(gw.get("/api/x", headers=bad), "malformed Authorization")
    no_headers = {
        "date": http_date(),
        "authorization": 'hmac-sha256 keyId="alice", signature="eA=="',
    }
    refused(gw.get("/api/x", headers=no_headers), "needs keyId, headers and signature")
    weak = {
        "date": http_date(),
        "authorization": 'hmac-md5 keyId="alice", headers="date", signature="eA=="',
    }
    refused(gw.get("/api/x", headers=weak), "algorithm not accepted")


def test_route_settings_algorithms_digest_off_enforced_headers(
    gw: Gateway, upstream: Upstream
) -> None:
    # /plain accepts hmac-sha512 only, and does not check bodies.
    refused(gw.get("/plain/x", headers=signed("GET", "/plain/x")), "algorithm not accepted")
    headers = signed("POST", "/plain/x", b"original", algorithm="hmac-sha512")
    r = gw.request("POST", "/plain/x", content=b"changed!", headers=headers)
    assert r.status_code == 200, (
        r.text
    )  # documented: without validate_digest, bodies are not signed

    tenant = {"x-tenant": "acme"}
    headers = signed("GET", "/tenant/x", extra=tenant)
    refused(gw.get("/tenant/x", headers=headers), "must cover: x-tenant")
    headers = signed(
        "GET", "/tenant/x", extra=tenant, names=["@request-target", "date", "x-tenant"]
    )
    r = gw.get("/tenant/x", headers={**headers})
    assert r.status_code == 200, r.text
    assert upstream.last().header("authorization") is None  # hide_credentials
    headers["x-tenant"] = "other"
    refused(gw.get("/tenant/x", headers=headers), "does not match")


def test_no_secret_reaches_the_logs(gw: Gateway) -> None:
    gw.get("/api/x", headers=signed("GET", "/api/x", secret="wrong"))
    log = (gw.dir / "access.log").read_text()
    for text in (log, gw.stderr_text(), gw.stdout_text()):
        assert ALICE_SECRET not in text and BOB_SECRET not in text


# -- without a gateway ------------------------------------------------------------------------


def test_the_replay_cache_forgets_expired_signatures_and_stays_bounded() -> None:
    cache = ReplayCache(2)
    assert cache.first_time(b"a", until=100.0, now=0.0)
    assert not cache.first_time(b"a", until=100.0, now=50.0)
    assert cache.first_time(b"a", until=200.0, now=100.0)  # expired: its date is too old now
    assert cache.first_time(b"b", until=300.0, now=100.0)
    assert cache.first_time(b"c", until=300.0, now=100.0)
    assert len(cache) == 2 and cache.evicted == 1


def test_settings_are_checked() -> None:
    with pytest.raises(msgspec.ValidationError, match="Invalid enum value 'hmac-md5'"):
        PluginHarness(HmacAuth, {"algorithms": ["hmac-md5"]})
    with pytest.raises(ValueError, match=r"enforce_headers\[0\]"):
        PluginHarness(HmacAuth, {"enforce_headers": ["bad header"]})
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        PluginHarness(HmacAuth, {"skew": 10})


def test_the_body_is_buffered_only_when_digests_are_checked() -> None:
    on = msgspec.convert({}, HmacAuth.Config)
    off = msgspec.convert({"validate_digest": False}, HmacAuth.Config)
    assert HmacAuth.request_body_mode(on) == "buffered"
    assert HmacAuth.request_body_mode(off) == "none"


def test_the_docs_show_the_string_to_sign_the_tests_use() -> None:
    docs = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    assert "@request-target: <method in lower case> <path>[?<query>]" in docs
