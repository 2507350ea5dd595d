"""JWT authentication: signed bearer tokens verified at the gateway (PyJWT), with keys from
consumers' ``jwt`` credentials, the plugin's settings, or a JWKS URL."""

import hashlib
import re
import time
from collections import OrderedDict
from types import MappingProxyType
from typing import Annotated, Any, Literal

import jwt
import msgspec
from msgspec import Meta

from ferrogate import auth
from ferrogate.consumers import Credential, SecretFile, current
from ferrogate.hooks import Headers, Request, Response
from ferrogate.plugin import Plugin
from ferrogate.plugins.jwt_keys import ALGORITHMS, HMAC_ALGORITHMS, JwksSource, Key, prepare_key
from ferrogate.plugins.request_transformer import check_header_name
from ferrogate.units import Duration, parse_duration

__all__ = ["JwtAuth"]

Algorithm = Literal[
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
]
KeyText = Annotated[
    str | SecretFile,
    Meta(
        description="Inline (${VAR} for an environment variable) or {file: PATH} "
        "(relative to the directory the gateway was started in)."
    ),
]

_MAX_TOKEN = 16384
_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_MAX_CANDIDATES = 8
"""Keys tried for a token without ``kid`` (each try is a signature check)."""


class KeySpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A verification key given in the plugin's settings."""

    algorithm: Annotated[Algorithm, Meta(description="The one algorithm this key verifies.")]
    kid: Annotated[
        str | None,
        Meta(
            description="Tokens whose header has this kid use this key (else: tried when "
            "the token has no kid)."
        ),
    ] = None
    public_key: Annotated[
        KeyText | None, Meta(description="A PEM public key (RS*, PS*, ES*, EdDSA).")
    ] = None
    secret: Annotated[KeyText | None, Meta(description="An HMAC secret (HS*), >= 32 bytes.")] = None


class _Verified:
    """What a verified token means for a request; cached per token."""

    __slots__ = ("claims", "consumer", "credential", "headers", "key", "scopes", "until")

    def __init__(
        self,
        key: Key,
        claims: dict[str, Any],
        scopes: frozenset[str],
        consumer: str | None,
        credential: str,
        headers: list[tuple[str, str | None]],
        until: float,
    ) -> None:
        self.key = key
        self.claims = MappingProxyType(claims)
        self.scopes = scopes
        self.consumer = consumer
        self.credential = credential
        self.headers = headers
        self.until = until


class _Invalid(Exception):
    """The token is refused (401 invalid_token); the message is safe to show the client."""


class _Unavailable(Exception):
    """The keys to verify the token cannot be had now (never the client's fault)."""


def _read(value: str | SecretFile, field: str) -> str:
    if isinstance(value, str):
        return value
    try:
        with open(value.file, encoding="utf-8") as f:
            return f.read().rstrip("\r\n")
    except OSError as e:
        raise ValueError(f"{field}: cannot read {value.file}: {e.strerror or e}") from None


def _explain(e: jwt.InvalidTokenError) -> str:
    """A refusal's reason for the client; PyJWT's own texts may quote the token's content."""
    if isinstance(e, jwt.ExpiredSignatureError):
        return "the token has expired"
    if isinstance(e, jwt.ImmatureSignatureError):
        return "the token is not valid yet"
    if isinstance(e, jwt.InvalidIssuerError):
        return "the token's issuer is not accepted"
    if isinstance(e, jwt.InvalidAudienceError):
        return "the token is not meant for this audience"
    if isinstance(e, jwt.MissingRequiredClaimError):
        return f"the token has no '{e.claim}' claim"
    if isinstance(e, jwt.InvalidSignatureError):
        return "the token's signature is invalid"
    if isinstance(e, jwt.InvalidIssuedAtError):
        return "the token's iat claim is not a number"
    if isinstance(e, (jwt.InvalidAlgorithmError, jwt.InvalidKeyError)):
        return "the token's algorithm does not match its key"
    return "the token is malformed"


class JwtAuth(Plugin):
    """Verifies JSON Web Tokens and identifies the consumer they belong to.

    The token is read from ``Authorization: Bearer`` (or ``header``, ``query_param``,
    ``cookie``). Its signature is checked with a key bound to one algorithm family: a
    consumer's ``jwt`` credential whose ``key`` equals the token's ``key_claim`` (``iss``), a
    key of ``keys`` (by ``kid``), or a key of the ``jwks_url`` set (by ``kid``; an unknown
    ``kid`` fetches the set again, at most every ``jwks_refetch_interval``). Only
    ``algorithms`` are accepted, never ``none``. Then ``exp``, ``nbf``, ``iat`` (and
    ``max_age``), ``issuers``, ``audience`` and ``required_claims`` are checked, with
    ``leeway``.

    The consumer is the credential's, or the one ``consumer_claim`` names. The token's scopes
    (``scope``, ``scp``) go to ``req.ctx["scopes"]``, its claims to ``req.ctx["claims"]``;
    ``required_scopes`` missing is a 403 ``insufficient_scope``. ``claims_to_headers`` sends
    claims upstream. A verified token is remembered per worker (by its SHA-256) until its
    ``exp``, at most ``cache_ttl``, so a repeated token costs a lookup, not a signature check.
    """

    name = "jwt"
    priority = auth.PRIORITY + 50  # Kong's order: key-auth, basic-auth, jwt, oauth2, hmac

    class Config(auth.AuthConfig, forbid_unknown_fields=True, kw_only=True, frozen=True):
        """Settings of jwt."""

        algorithms: Annotated[
            list[Algorithm],
            Meta(
                min_length=1,
                description="The algorithms accepted; a token's own alg is only checked "
                "against this list and its key.",
            ),
        ]
        keys: Annotated[
            list[KeySpec], Meta(description="Verification keys given here (by kid).")
        ] = msgspec.field(default_factory=list)
        jwks_url: Annotated[
            str | None, Meta(description="A JWKS document with the verification keys (by kid).")
        ] = None
        consumer_keys: Annotated[
            bool,
            Meta(description="Verify with the consumers' jwt credentials (matched by key_claim)."),
        ] = True
        key_claim: Annotated[
            str, Meta(description="The claim matched against a jwt credential's key.")
        ] = "iss"
        consumer_claim: Annotated[
            str | None,
            Meta(
                description="For tokens verified with keys/jwks_url: the claim that names the "
                "consumer (e.g. sub)."
            ),
        ] = None
        require_consumer: Annotated[
            bool,
            Meta(description="Refuse (403) a valid token that maps to no configured consumer."),
        ] = False
        header: Annotated[
            str | None,
            Meta(
                description="The header with the token ('Bearer ' prefix for authorization); "
                "null: none."
            ),
        ] = "authorization"
        query_param: Annotated[
            str | None, Meta(description="A query parameter with the token (tried next).")
        ] = None
        cookie: Annotated[str | None, Meta(description="A cookie with the token (tried last).")] = (
            None
        )
        issuers: Annotated[
            list[str], Meta(description="Accepted iss values (empty: any issuer).")
        ] = msgspec.field(default_factory=list)
        audience: Annotated[
            str | list[str] | None,
            Meta(description="The aud claim must be or contain (one of) this."),
        ] = None
        required_claims: Annotated[list[str], Meta(description="Claims every token must have.")] = (
            msgspec.field(default_factory=lambda: ["exp"])
        )
        leeway: Annotated[Duration, Meta(description="Clock skew allowed on exp, nbf and iat.")] = (
            0.0
        )
        max_age: Annotated[
            Duration | None,
            Meta(description="Refuse tokens issued (iat) longer ago than this (iat required)."),
        ] = None
        required_scopes: Annotated[
            list[str], Meta(description="Scopes the token must all have (else 403).")
        ] = msgspec.field(default_factory=list)
        claims_to_headers: Annotated[
            dict[str, str], Meta(description="Claim -> request header sent upstream.")
        ] = msgspec.field(default_factory=dict)
        cache_ttl: Annotated[
            Duration,
            Meta(description="Longest a verified token is remembered (never beyond its exp)."),
        ] = 300.0
        cache_size: Annotated[
            int, Meta(ge=0, description="Most tokens remembered per worker (0: no cache).")
        ] = 10000
        jwks_ttl: Annotated[
            Duration | None,
            Meta(
                description="How long the JWKS is used before a refetch (default: its "
                "Cache-Control max-age, else 5m), within jwks_min_ttl..jwks_max_ttl."
            ),
        ] = None
        jwks_min_ttl: Annotated[Duration, Meta(description="Lower bound of the JWKS TTL.")] = 60.0
        jwks_max_ttl: Annotated[Duration, Meta(description="Upper bound of the JWKS TTL.")] = (
            86400.0
        )
        jwks_refetch_interval: Annotated[
            Duration,
            Meta(description="Least time between two fetches for an unknown kid."),
        ] = 30.0
        jwks_timeout: Annotated[Duration, Meta(description="How long a JWKS fetch may take.")] = 5.0

    config: "JwtAuth.Config"

    def __init__(self, config: "JwtAuth.Config") -> None:
        super().__init__(config)
        c = config
        auth.check_config(c)
        self._allowed = frozenset(c.algorithms)
        if not (c.header or c.query_param or c.cookie):
            raise ValueError("header, query_param and cookie are all unset: no token can be sent")
        self._header = check_header_name(c.header, "header") if c.header else None
        self._bearer = self._header == "authorization"
        if not (c.keys or c.jwks_url or c.consumer_keys):
            raise ValueError("no key: set keys, jwks_url or consumer_keys")
        self._by_kid: dict[str, Key] = {}
        self._unnamed: list[Key] = []
        for i, spec in enumerate(c.keys):
            at = f"keys[{i}]"
            if spec.algorithm not in self._allowed:
                raise ValueError(f"{at}.algorithm: {spec.algorithm} is not in algorithms")
            hmac = spec.algorithm in HMAC_ALGORITHMS
            given = spec.secret if hmac else spec.public_key
            other = spec.public_key if hmac else spec.secret
            if given is None or other is not None:
                want = "secret" if hmac else "public_key"
                raise ValueError(f"{at}: {spec.algorithm} takes '{want}' (and only that)")
            field = f"{at}.{'secret' if hmac else 'public_key'}"
            material = prepare_key(spec.algorithm, _read(given, field), field)
            key = Key(
                material,
                (spec.algorithm,),
                kid=spec.kid,
                credential=f"kid:{spec.kid}" if spec.kid else f"key:{i}",
            )
            if spec.kid is None:
                self._unnamed.append(key)
            elif spec.kid in self._by_kid:
                raise ValueError(f"{at}.kid: {spec.kid!r} is given twice")
            else:
                self._by_kid[spec.kid] = key
        self._jwks: JwksSource | None = None
        if c.jwks_url is not None:
            if not c.jwks_url.startswith(("https://", "http://")):
                raise ValueError("jwks_url: must be an http:// or https:// URL")
            min_ttl, max_ttl = parse_duration(c.jwks_min_ttl), parse_duration(c.jwks_max_ttl)
            if min_ttl > max_ttl:
                raise ValueError("jwks_min_ttl: above jwks_max_ttl")
            self._jwks = JwksSource(
                c.jwks_url,
                self._allowed,
                ttl=None if c.jwks_ttl is None else parse_duration(c.jwks_ttl),
                min_ttl=min_ttl,
                max_ttl=max_ttl,
                refetch_interval=parse_duration(c.jwks_refetch_interval),
                timeout=parse_duration(c.jwks_timeout),
            )
        self._claim_headers = [
            (claim, check_header_name(header, f"claims_to_headers.{claim}"))
            for claim, header in c.claims_to_headers.items()
        ]
        self._leeway = parse_duration(c.leeway)
        self._max_age = None if c.max_age is None else parse_duration(c.max_age)
        self._issuers = list(c.issuers) or None
        required = list(dict.fromkeys(c.required_claims))
        if self._max_age is not None and "iat" not in required:
            required.append("iat")
        self._options: Any = {"require": required}
        self._required_scopes = frozenset(c.required_scopes)
        self._scope_challenge = (
            f'Bearer realm="{c.realm}", error="insufficient_scope", '
            f'scope="{" ".join(sorted(self._required_scopes))}"'
        )
        self._ttl = parse_duration(c.cache_ttl)
        self._cache_size = c.cache_size if self._ttl > 0 else 0
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()
        # Consumer credentials as keys, made on first use (the registry is the config's).
        self._credential_keys: dict[str, tuple[Credential, Key | None]] = {}

    # --- the token -------------------------------------------------------------------------

    def _token(self, req: Request) -> tuple[str | None, str | None]:
        """(token, problem): the token, or why the request's token cannot be read."""
        c = self.config
        if self._header is not None:
            values = req.headers.getall(self._header)
            if len(values) > 1:
                return None, f"more than one {self._header} header"
            if values:
                value = values[0].strip()
                scheme, _, rest = value.partition(" ")
                if scheme.lower() == "bearer":
                    return rest.strip(), None
                if not self._bearer:
                    return value, None
                # Another scheme (Basic, ...) is another plugin's credential, not a token.
        if c.query_param is not None:
            found = req.query_params.getall(c.query_param)
            if len(found) > 1:
                return None, f"more than one {c.query_param} query parameter"
            if found:
                return found[0], None
        if c.cookie is not None:
            for header in req.headers.getall("cookie"):
                for part in header.split(";"):
                    name, eq, value = part.strip().partition("=")
                    if eq and name == c.cookie:
                        return value.strip('"'), None
        return None, None

    def _hide(self, req: Request) -> None:
        c = self.config
        if self._header is not None:
            req.headers.remove(self._header)
        if c.query_param is not None and c.query_param in req.query_params:
            req.query_params.remove(c.query_param)
        if c.cookie is not None and "cookie" in req.headers:
            kept = [
                part.strip()
                for header in req.headers.getall("cookie")
                for part in header.split(";")
                if part.strip() and part.strip().partition("=")[0] != c.cookie
            ]
            if kept:
                req.headers["cookie"] = "; ".join(kept)
            else:
                req.headers.remove("cookie")

    # --- keys ------------------------------------------------------------------------------

    def _credential_key(self, value: Any) -> Key | None:
        if not isinstance(value, str):
            return None
        cred = current().find("jwt", value)
        if cred is None:
            return None
        known = self._credential_keys.get(value)
        if known is not None and known[0] is cred:
            return known[1]
        data = cred.data
        alg = data.get("algorithm", "")
        text = data.get("secret") if alg in HMAC_ALGORITHMS else data.get("public_key")
        key: Key | None = None
        if alg in self._allowed and isinstance(text, str):
            try:
                material = prepare_key(alg, text, "credential")
            except ValueError:
                material = None  # refused when the config loaded; a token cannot use it
            if material is not None:
                key = Key(material, (alg,), credential=cred.id, consumer=cred.consumer)
        self._credential_keys[value] = (cred, key)
        return key

    def _candidates(self, header: dict[str, Any], payload: dict[str, Any]) -> list[Key]:
        kid = header.get("kid")
        if isinstance(kid, str):
            key = self._by_kid.get(kid)
            if key is not None:
                return [key]
            if self._jwks is not None:
                self._jwks.refresh(time.time())
                key = self._jwks.by_kid.get(kid)
                if key is not None:
                    return [key]
        if self.config.consumer_keys:
            key = self._credential_key(payload.get(self.config.key_claim))
            if key is not None:
                return [key]
        jwks = self._jwks
        if isinstance(kid, str):
            if jwks is not None:
                key = jwks.find(kid)
                if key is not None:
                    return [key]
                if not jwks.loaded:
                    raise _Unavailable
            raise _Invalid("no key is known for the token's kid")
        keys = list(self._unnamed)
        if jwks is not None:
            jwks.refresh(time.time())
            if not jwks.loaded and not keys:
                raise _Unavailable
            keys += jwks.unnamed
        return keys

    # --- verification ----------------------------------------------------------------------

    def _verify(self, token: str, now: float) -> _Verified:
        if len(token) > _MAX_TOKEN or not _JWS.fullmatch(token):
            raise _Invalid("the token is malformed")
        try:
            unverified = jwt.api_jwt.decode_complete(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            raise _Invalid("the token is malformed") from None
        header, payload = unverified["header"], unverified["payload"]
        alg = header.get("alg")
        if alg not in self._allowed:
            shown = f" ({alg})" if alg in ALGORITHMS or alg == "none" else ""
            raise _Invalid(f"the token's algorithm{shown} is not accepted")
        keys = [k for k in self._candidates(header, payload) if alg in k.algorithms]
        if not keys:
            raise _Invalid("no key of the token's algorithm matches the token")
        claims: dict[str, Any] | None = None
        error: jwt.InvalidTokenError | None = None
        used: Key | None = None
        for key in keys[:_MAX_CANDIDATES]:
            try:
                claims = jwt.decode(
                    token,
                    key.material,
                    algorithms=[alg],
                    options=self._options,
                    audience=self.config.audience,
                    issuer=self._issuers,
                    leeway=self._leeway,
                )
            except jwt.InvalidSignatureError as e:
                error = e
                continue
            except jwt.InvalidTokenError as e:
                raise _Invalid(_explain(e)) from None
            used = key
            break
        if claims is None or used is None:
            assert error is not None
            raise _Invalid(_explain(error))
        until = now + self._ttl
        exp = claims.get("exp")
        if exp is not None:
            until = min(until, float(exp) + self._leeway)
        if self._max_age is not None:
            iat = float(claims["iat"])
            if now - iat > self._max_age + self._leeway:
                raise _Invalid("the token was issued too long ago")
            until = min(until, iat + self._max_age + self._leeway)
        consumer = used.consumer
        if consumer is None and self.config.consumer_claim is not None:
            named = claims.get(self.config.consumer_claim)
            if isinstance(named, str) and current().get(named) is not None:
                consumer = named
        headers = []
        for claim, name in self._claim_headers:
            value = claims.get(claim)
            headers.append((name, None if value is None else auth.claim_header_value(value)))
        return _Verified(
            used,
            claims,
            auth.scopes_of(claims, ("scope", "scp")),
            consumer,
            used.credential,
            headers,
            until,
        )

    def _cached(self, digest: bytes, now: float) -> _Verified | None:
        hit = self._cache.get(digest)
        if hit is None:
            return None
        key = hit.key
        jwks = key.jwks
        if jwks is not None and now >= jwks.fresh_until:
            # A stale set is refreshed in the background; a key withdrawn from it stops
            # working when the new set lands, for remembered tokens too.
            jwks.refresh(now)
        if hit.until <= now or not key.alive:
            del self._cache[digest]
            return None
        return hit

    def _remember(self, digest: bytes, verified: _Verified) -> None:
        if self._cache_size == 0:
            return
        cache = self._cache
        cache[digest] = verified
        if len(cache) > self._cache_size:
            cache.popitem(last=False)

    # --- the hook --------------------------------------------------------------------------

    def _challenge(self, req: Request, message: str, error: str | None = None) -> Response:
        params = {} if error is None else {"error": error, "error_description": message}
        code = error or "unauthorized"
        status_400 = error == "invalid_request"
        response = auth.unauthorized(
            req, message, scheme="Bearer", realm=self.config.realm, code=code, params=params
        )
        if status_400:
            response.status = 400
        return response

    def on_request(self, req: Request) -> Response | None:
        c = self.config
        if auth.skip(req, c):
            return None
        token, problem = self._token(req)
        if problem is not None:
            return self._challenge(req, problem, "invalid_request")
        if not token:
            return auth.fallback(req, c, self._challenge(req, "no bearer token in the request"))
        now = time.time()
        digest = hashlib.sha256(token.encode()).digest()
        verified = self._cached(digest, now)
        if verified is None:
            try:
                verified = self._verify(token, now)
            except _Invalid as e:
                return self._challenge(req, str(e), "invalid_token")
            except _Unavailable:
                # jwks_fetch_failed is logged by the key source.
                return auth.error(
                    req, 503, "jwks_unavailable", "the keys to verify the token cannot be fetched"
                )
            self._remember(digest, verified)
        consumer = verified.consumer
        if consumer is not None:
            auth.identify(req, Credential(consumer, "jwt", verified.credential, {}), c)
        elif c.require_consumer:
            return auth.forbidden(
                req, "the token names no consumer of this gateway", code="unknown_consumer"
            )
        missing = self._required_scopes - verified.scopes
        if missing:
            return auth.error(
                req,
                403,
                "insufficient_scope",
                f"the token lacks the scope(s): {', '.join(sorted(missing))}",
                Headers({"www-authenticate": self._scope_challenge}),
            )
        req.ctx["scopes"] = verified.scopes
        req.ctx["claims"] = verified.claims
        if c.hide_credentials:
            self._hide(req)
        headers = req.headers
        for name, value in verified.headers:
            if value is None:
                headers.remove(name)
            else:
                headers[name] = value
        return None
