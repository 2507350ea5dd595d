"""The jwt plugin through a real gateway: tokens made here with PyJWT, keys made here with
cryptography, a JWKS document served by a small HTTP server of the test."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway import Gateway, GatewayFactory, run_cli
from test_access_log import line_for, log_path
from upstreams import Upstream, UpstreamFactory

HS_SECRET = "s3cr3t-for-alice-0123456789abcdef0123"
AUD = "orders-api"


def pem(private: Any) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "user-7", "aud": AUD, "iat": now, "exp": now + 300, **extra}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def challenge_of(r: httpx.Response) -> str:
    return r.headers.get("www-authenticate", "")


def assert_refused(r: httpx.Response, reason: str, token: str | None = None) -> None:
    assert r.status_code == 401, r.text
    body = r.json()["error"]
    assert body["code"] == "invalid_token"
    assert body["message"] == reason
    assert body["request_id"] == r.headers["x-request-id"]
    assert challenge_of(r) == (
        f'Bearer realm="ferrogate", error="invalid_token", error_description="{reason}"'
    )
    if token is not None:
        for part in token.split("."):
            if len(part) > 8:
                assert part not in r.text and part not in challenge_of(r)


def route(path: str, config: dict[str, Any], name: str) -> dict[str, Any]:
    return {
        "name": name,
        "paths": [f"/{path}/*"],
        "upstream": "app",
        "plugins": [{"name": "jwt", "config": config}],
    }


@pytest.fixture(scope="module")
def app() -> Iterator[Upstream]:
    factory = UpstreamFactory()
    yield factory("app")
    factory.close_all()


@pytest.fixture(scope="module")
def gw(app: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    keys = {
        "algorithms": ["ES256", "EdDSA"],
        "consumer_keys": False,
        "keys": [
            {"kid": "es-1", "algorithm": "ES256", "public_key": pem(EC_KEY)},
            {"algorithm": "EdDSA", "public_key": pem(ED_KEY)},
        ],
        "issuers": ["https://idp.example"],
        "audience": [AUD, "other-api"],
        "consumer_claim": "sub",
    }
    config = {
        "access_log": {"path": "access.log"},
        "consumers": {
            "alice": {
                "credentials": [
                    {
                        "type": "jwt",
                        "key": "alice-issuer",
                        "algorithm": "HS256",
                        "secret": HS_SECRET,
                    }
                ]
            },
            "bob": {
                "credentials": [
                    {
                        "type": "jwt",
                        "key": "bob-issuer",
                        "algorithm": "RS256",
                        "public_key": pem(RSA_KEY),
                    }
                ]
            },
            "user-7": {},
            "guest": {},
        },
        "upstreams": {"app": {"targets": [app.address]}},
        "routes": [
            route(
                "api",
                {
                    # HS and RS on one route: each key stays bound to its own algorithm.
                    "algorithms": ["HS256", "RS256"],
                    "audience": AUD,
                    "claims_to_headers": {"sub": "x-user-id", "email": "x-user-email"},
                    "hide_credentials": True,
                },
                "api",
            ),
            route("keys", keys, "keys"),
            route(
                "scoped",
                {**keys, "required_scopes": ["orders:read", "orders:write"]},
                "scoped",
            ),
            route(
                "leeway",
                {"algorithms": ["RS256"], "audience": AUD, "leeway": "30s"},
                "leeway",
            ),
            route(
                "anon",
                {
                    "algorithms": ["HS256"],
                    "audience": AUD,
                    "anonymous": "guest",
                    "query_param": "jwt",
                    "cookie": "session",
                },
                "anon",
            ),
        ],
    }
    g = Gateway(tmp_path_factory.mktemp("jwt-gateway"), config, workers=1)
    g.start()
    yield g
    g.stop()


def rs_token(**extra: Any) -> str:
    return jwt.encode(claims(iss="bob-issuer", **extra), RSA_KEY, algorithm="RS256")


# --- valid tokens ---------------------------------------------------------------------------


def test_hs256_token_of_a_consumer_goes_upstream_as_that_consumer(
    gw: Gateway, app: Upstream
) -> None:
    token = jwt.encode(
        claims(iss="alice-issuer", email="alice@example.com"), HS_SECRET, algorithm="HS256"
    )
    r = gw.get(
        "/api/orders",
        headers={**bearer(token), "x-user-id": "forged", "x-user-email": "forged@x"},
    )
    assert r.status_code == 200, r.text
    seen = app.last()
    assert seen.header_all("x-user-id") == ["user-7"]
    assert seen.header_all("x-user-email") == ["alice@example.com"]
    assert seen.header("x-consumer-username") == "alice"
    assert seen.header("x-credential-identifier") == "alice-issuer"
    assert not seen.has_header("authorization")  # hide_credentials
    assert line_for(log_path(gw), r.headers["x-request-id"])["consumer"] == "alice"


def test_rs256_token_maps_to_its_consumer_and_missing_claims_clear_forged_headers(
    gw: Gateway, app: Upstream
) -> None:
    r = gw.get("/api/x", headers={**bearer(rs_token()), "x-user-email": "forged@x"})
    assert r.status_code == 200, r.text
    seen = app.last()
    assert seen.header("x-consumer-username") == "bob"
    assert not seen.has_header("x-user-email")  # no email claim: the client's copy is gone
    assert line_for(log_path(gw), r.headers["x-request-id"])["consumer"] == "bob"
    # The second time comes from the verification cache and means the same.
    again = gw.get("/api/x", headers=bearer(rs_token()))
    assert again.status_code == 200
    assert app.last().header("x-consumer-username") == "bob"


def test_es256_with_kid_and_eddsa_without_kid(gw: Gateway, app: Upstream) -> None:
    es = jwt.encode(
        claims(iss="https://idp.example"), EC_KEY, algorithm="ES256", headers={"kid": "es-1"}
    )
    r = gw.get("/keys/a", headers=bearer(es))
    assert r.status_code == 200, r.text
    assert app.last().header("x-consumer-username") == "user-7"  # consumer_claim: sub
    ed = jwt.encode(claims(iss="https://idp.example", sub="nobody"), ED_KEY, algorithm="EdDSA")
    r = gw.get("/keys/b", headers=bearer(ed))
    assert r.status_code == 200, r.text
    # sub names no consumer: the request passes unidentified (require_consumer is off)
    assert not app.last().has_header("x-consumer-username")
    assert line_for(log_path(gw), r.headers["x-request-id"])["consumer"] is None


# --- refused tokens -------------------------------------------------------------------------


def test_no_token_is_a_plain_bearer_challenge(gw: Gateway) -> None:
    r = gw.get("/api/x")
    assert r.status_code == 401
    assert challenge_of(r) == 'Bearer realm="ferrogate"'
    assert r.json()["error"]["message"] == "no bearer token in the request"
    other_scheme = gw.get("/api/x", headers={"authorization": "Basic YTpi"})
    assert other_scheme.status_code == 401
    assert challenge_of(other_scheme) == 'Bearer realm="ferrogate"'


def test_expired_and_not_yet_valid_tokens(gw: Gateway) -> None:
    now = int(time.time())
    expired = rs_token(exp=now - 60)
    assert_refused(gw.get("/api/x", headers=bearer(expired)), "the token has expired", expired)
    early = rs_token(nbf=now + 20)
    assert_refused(gw.get("/api/x", headers=bearer(early)), "the token is not valid yet", early)
    # 30 s of leeway covers both a clock 20 s behind and an expiry 20 s ago ...
    assert gw.get("/leeway/x", headers=bearer(early)).status_code == 200
    assert gw.get("/leeway/x", headers=bearer(rs_token(exp=now - 20))).status_code == 200
    # ... but not more.
    assert_refused(
        gw.get("/leeway/x", headers=bearer(rs_token(nbf=now + 90))), "the token is not valid yet"
    )
    no_exp = jwt.encode({"iss": "bob-issuer", "aud": AUD}, RSA_KEY, algorithm="RS256")
    assert_refused(gw.get("/api/x", headers=bearer(no_exp)), "the token has no 'exp' claim")


def test_wrong_issuer_and_wrong_audience(gw: Gateway) -> None:
    evil = jwt.encode(
        claims(iss="https://evil.example"), EC_KEY, algorithm="ES256", headers={"kid": "es-1"}
    )
    assert_refused(gw.get("/keys/x", headers=bearer(evil)), "the token's issuer is not accepted")
    other_aud = rs_token(aud="billing-api")
    assert_refused(
        gw.get("/api/x", headers=bearer(other_aud)), "the token is not meant for this audience"
    )


def test_bad_signature(gw: Gateway) -> None:
    forged = jwt.encode(claims(iss="bob-issuer"), OTHER_RSA_KEY, algorithm="RS256")
    assert_refused(gw.get("/api/x", headers=bearer(forged)), "the token's signature is invalid")
    # A valid token with one payload byte changed: same header and signature.
    head, payload, sig = rs_token().split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=="))
    body["sub"] = "admin"
    tampered = f"{head}.{b64url(json.dumps(body).encode())}.{sig}"
    assert_refused(gw.get("/api/x", headers=bearer(tampered)), "the token's signature is invalid")


def test_alg_none_is_refused(gw: Gateway, app: Upstream) -> None:
    before = app.count
    unsigned = jwt.encode(claims(iss="alice-issuer"), None, algorithm="none")
    assert unsigned.endswith(".")
    assert_refused(
        gw.get("/api/x", headers=bearer(unsigned)), "the token's algorithm (none) is not accepted"
    )
    # Upper-case or with a forged signature makes no difference.
    head = b64url(json.dumps({"alg": "None", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims(iss="alice-issuer")).encode())
    assert_refused(
        gw.get("/api/x", headers=bearer(f"{head}.{payload}.c2ln")),
        "the token's algorithm is not accepted",
    )
    assert app.count == before


def test_algorithm_confusion_is_refused(gw: Gateway, app: Upstream) -> None:
    """An HS256 token whose HMAC secret is bob's RSA public key (the PEM text the gateway
    has): the route accepts HS256 and RS256, but bob's key verifies RS256 only."""
    before = app.count
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims(iss="bob-issuer")).encode())
    signing_input = f"{head}.{payload}".encode()
    sig = hmac.new(pem(RSA_KEY).encode(), signing_input, hashlib.sha256).digest()
    token = f"{head}.{payload}.{b64url(sig)}"
    assert_refused(
        gw.get("/api/x", headers=bearer(token)),
        "no key of the token's algorithm matches the token",
        token,
    )
    assert app.count == before


def test_unknown_kid_is_refused(gw: Gateway) -> None:
    token = jwt.encode(
        claims(iss="https://idp.example"), EC_KEY, algorithm="ES256", headers={"kid": "es-9"}
    )
    assert_refused(gw.get("/keys/x", headers=bearer(token)), "no key is known for the token's kid")


def test_malformed_tokens_and_two_authorization_headers(gw: Gateway) -> None:
    assert_refused(gw.get("/api/x", headers=bearer("not-a-token")), "the token is malformed")
    assert_refused(gw.get("/api/x", headers=bearer("a.b.c")), "the token is malformed")
    r = gw.get("/api/x", headers=[("authorization", f"Bearer {rs_token()}")] * 2)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_request"
    assert 'error="invalid_request"' in challenge_of(r)


# --- scopes and the anonymous consumer ---------------------------------------------------


def test_required_scopes(gw: Gateway, app: Upstream) -> None:
    def token(**extra: Any) -> str:
        return jwt.encode(
            claims(iss="https://idp.example", **extra),
            EC_KEY,
            algorithm="ES256",
            headers={"kid": "es-1"},
        )

    lacking = gw.get("/scoped/x", headers=bearer(token(scope="orders:read profile")))
    assert lacking.status_code == 403
    assert lacking.json()["error"]["code"] == "insufficient_scope"
    assert lacking.json()["error"]["message"] == "the token lacks the scope(s): orders:write"
    assert challenge_of(lacking) == (
        'Bearer realm="ferrogate", error="insufficient_scope", scope="orders:read orders:write"'
    )
    # space-separated scope, or an scp list (Azure AD, Okta)
    assert gw.get("/scoped/x", headers=bearer(token(scope="orders:write orders:read"))).is_success
    assert gw.get(
        "/scoped/x", headers=bearer(token(scp=["orders:read", "orders:write"]))
    ).is_success
    assert app.last().header("x-consumer-username") == "user-7"


def test_anonymous_fallback_query_and_cookie_tokens(gw: Gateway, app: Upstream) -> None:
    r = gw.get("/anon/x")
    assert r.status_code == 200
    assert app.last().header("x-anonymous-consumer") == "true"
    assert line_for(log_path(gw), r.headers["x-request-id"])["consumer"] == "guest"
    token = jwt.encode(claims(iss="alice-issuer"), HS_SECRET, algorithm="HS256")
    assert gw.get("/anon/x", params={"jwt": token}).status_code == 200
    assert app.last().header("x-consumer-username") == "alice"
    assert gw.get("/anon/x", headers={"cookie": f"a=1; session={token}"}).status_code == 200
    assert app.last().header("x-consumer-username") == "alice"
    # A token that is present but wrong is refused, not treated as no token.
    bad = jwt.encode(claims(iss="alice-issuer"), HS_SECRET + "x", algorithm="HS256")
    assert_refused(gw.get("/anon/x", params={"jwt": bad}), "the token's signature is invalid")


# --- JWKS -----------------------------------------------------------------------------------


class Jwks:
    """A JWKS endpoint whose key set the test changes, counting the fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with outer.lock:
                    outer.fetches += 1
                    body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("cache-control", "public, max-age=1")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/.well-known/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, *keys: dict[str, Any]) -> None:
        with self.lock:
            self.keys = list(keys)

    def count(self) -> int:
        with self.lock:
            return self.fetches

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def jwk(private: Any, kid: str, alg: str) -> dict[str, Any]:
    cls = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[alg]
    out: dict[str, Any] = cls.to_jwk(private.public_key(), as_dict=True)
    return {**out, "kid": kid, "use": "sig"} | ({"alg": alg} if alg != "RS256" else {})


def poll_status(gw: Gateway, path: str, token: str, status: int, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = gw.get(path, headers=bearer(token)).status_code
        if got == status:
            return
        assert time.monotonic() < deadline, f"{path}: still {got}, expected {status}"
        time.sleep(0.1)


def test_jwks_rotation(gateway: GatewayFactory, upstream: Upstream) -> None:
    jwks = Jwks()
    try:
        k1, k2 = RSA_KEY, EC_KEY
        jwks.publish(jwk(k1, "k1", "RS256"))
        gw = gateway(
            {
                "upstreams": {"app": {"targets": [upstream.address]}},
                "routes": [
                    route(
                        "api",
                        {
                            "algorithms": ["RS256", "ES256"],
                            "audience": AUD,
                            "jwks_url": jwks.url,
                            "jwks_min_ttl": 0,
                            "jwks_refetch_interval": "500ms",
                            "claims_to_headers": {"sub": "x-user-id"},
                        },
                        "api",
                    )
                ],
            },
            workers=1,
        )
        t1 = jwt.encode(claims(), k1, algorithm="RS256", headers={"kid": "k1"})
        t2 = jwt.encode(claims(), k2, algorithm="ES256", headers={"kid": "k2"})
        r = gw.get("/api/x", headers=bearer(t1))
        assert r.status_code == 200, r.text
        assert upstream.last().header("x-user-id") == "user-7"
        assert jwks.count() == 1

        # A new key appears: a token naming it makes the gateway fetch the set again.
        jwks.publish(jwk(k1, "k1", "RS256"), jwk(k2, "k2", "ES256"))
        poll_status(gw, "/api/x", t2, 200)

        # An unknown kid is refused; the refetches it causes are rate-limited.
        unknown = jwt.encode(claims(), k2, algorithm="ES256", headers={"kid": "k9"})
        before, start = jwks.count(), time.monotonic()
        with httpx.Client(base_url=gw.url) as client:
            for _ in range(20):
                assert_refused(
                    client.get("/api/x", headers=bearer(unknown)),
                    "no key is known for the token's kid",
                )
        elapsed = time.monotonic() - start
        # one fetch per refetch interval (0.5 s) or per expiry of the set (max-age=1) at most
        assert jwks.count() - before <= 2 + int(elapsed / 0.5), (jwks.count() - before, elapsed)

        # k1 is withdrawn: once the set's max-age has passed, its tokens stop working, the
        # verification cache included; k2 keeps working.
        jwks.publish(jwk(k2, "k2", "ES256"))
        poll_status(gw, "/api/x", t1, 401)
        assert_refused(gw.get("/api/x", headers=bearer(t1)), "no key is known for the token's kid")
        assert gw.get("/api/x", headers=bearer(t2)).status_code == 200
    finally:
        jwks.close()


def test_jwks_unreachable_is_a_503_not_a_401(gateway: GatewayFactory, upstream: Upstream) -> None:
    jwks = Jwks()
    url = jwks.url
    jwks.close()  # nothing listens there any more
    gw = gateway(
        {
            "upstreams": {"app": {"targets": [upstream.address]}},
            "routes": [
                route(
                    "api",
                    {"algorithms": ["RS256"], "audience": AUD, "jwks_url": url, "jwks_timeout": 2},
                    "api",
                )
            ],
        },
        workers=1,
    )
    token = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "k1"})
    r = gw.get("/api/x", headers=bearer(token))
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "jwks_unavailable"
    assert "jwks_fetch_failed" in gw.stderr_text()


# --- config checks --------------------------------------------------------------------------


def check(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    out = run_cli("check", str(path))
    assert out.returncode != 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_keys_that_do_not_fit_their_algorithm_are_config_problems(tmp_path: Path) -> None:
    rsa_pem = pem(RSA_KEY).replace("\n", "\n          ")
    text = f"""\
listen: [127.0.0.1:1]
consumers:
  carol:
    credentials:
      - type: jwt
        key: carol-issuer
        algorithm: HS256
        secret: short
  dave:
    credentials:
      - type: jwt
        key: dave-issuer
        algorithm: ES256
        public_key: |
          {rsa_pem}
routes:
  - paths: ["/*"]
    upstream: http://127.0.0.1:9
    plugins:
      - name: jwt
        config:
          algorithms: [HS256]
          keys:
            - algorithm: HS256
              public_key: |
                {pem(RSA_KEY).replace(chr(10), chr(10) + "                ")}
"""
    out = check(tmp_path, text)
    assert "consumers.carol.credentials[0].secret: an HS256 secret needs at least 32 bytes" in out
    assert "consumers.dave.credentials[0].public_key: not a usable ES256 public key" in out
    assert "HS256 takes 'secret' (and only that)" in out
    assert "BEGIN PUBLIC KEY" not in out and "short" not in out.replace("a short", "")
