"""OAuth 2.0 token introspection (RFC 7662): bearer tokens checked by asking the
authorization server, with a per-worker cache bounded by each token's expiry."""

import asyncio
import hashlib
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any

import httpx
import msgspec
from msgspec import Meta

from ferrogate import auth
from ferrogate.consumers import Credential, SecretFile, current
from ferrogate.events import emit
from ferrogate.hooks import Headers, Request, Response
from ferrogate.plugin import Plugin
from ferrogate.plugins.request_transformer import check_header_name
from ferrogate.units import Duration, parse_duration

__all__ = ["OAuth2Introspection", "TokenCache"]

# RFC 6750's b64token; anything else cannot be a bearer token and is refused unasked.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_MAX_TOKEN = 8192
_LOG_EVERY = 10.0
"""Seconds between two ``introspection_failed`` events of one plugin instance."""

Secret = Annotated[
    str | SecretFile,
    Meta(
        description="Inline (${VAR} for an environment variable) or {file: PATH} "
        "(relative to the directory the gateway was started in)."
    ),
]


def read_secret(value: str | SecretFile, field: str) -> str:
    """The secret itself; ValueError names the field and the file, never the content."""
    if isinstance(value, str):
        return value
    try:
        return Path(value.file).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as e:
        raise ValueError(
            f"{field}: cannot read the secret file {value.file}: {e.strerror}"
        ) from None


class TokenCache:
    """Introspection results by token digest, each until its own deadline (monotonic
    seconds); the least recently used entry goes first when full."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[bytes, tuple[float, dict[str, Any] | None]] = OrderedDict()

    def get(self, key: bytes, now: float) -> tuple[bool, dict[str, Any] | None]:
        """(found, claims): claims None for a token known to be inactive."""
        entry = self._items.get(key)
        if entry is None:
            return False, None
        until, claims = entry
        if until <= now:
            del self._items[key]
            return False, None
        self._items.move_to_end(key)
        return True, claims

    def put(self, key: bytes, claims: dict[str, Any] | None, until: float) -> None:
        self._items[key] = (until, claims)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class _Unavailable(Exception):
    """The authorization server gave no usable answer (never the client's fault)."""


class OAuth2Introspection(Plugin):
    """Bearer tokens verified by the authorization server's introspection endpoint (RFC 7662).

    The token of ``Authorization: Bearer ...`` is POSTed to ``url`` (as ``token``, with
    ``token_type_hint``), authenticated with ``client_id``/``client_secret`` (HTTP Basic) or
    ``bearer_token``. ``active: false`` is a 401 ``invalid_token``. An active token maps to the
    consumer named by its ``consumer_claim`` (``username`` by default), whose scopes (the
    ``scope`` claim) are in ``req.ctx["scopes"]`` and its claims in ``req.ctx["claims"]``;
    ``required_scopes`` missing from it is a 403 ``insufficient_scope``; ``claims_to_headers``
    sends claims upstream (headers of those names sent by the client are removed first).

    Answers are cached per worker, keyed by the SHA-256 of the token: an active one until the
    token's ``exp`` and at most ``cache_ttl``, an inactive one for ``negative_cache_ttl``.
    Concurrent requests with the same token wait for one introspection. When the server cannot
    be asked (down, timeout, 5xx, not JSON) the client gets a 503 and an
    ``introspection_failed`` event is logged.
    """

    name = "oauth2-introspection"
    priority = auth.PRIORITY + 25  # after jwt (+50), before hmac-auth (+0)

    class Config(auth.AuthConfig, kw_only=True, frozen=True):
        """Settings of oauth2-introspection."""

        url: Annotated[str, Meta(description="The introspection endpoint (http or https).")]
        client_id: Annotated[
            str | None,
            Meta(description="Client id to authenticate to the endpoint (HTTP Basic)."),
        ] = None
        client_secret: Annotated[
            Secret | None,
            Meta(
                description="The client's secret (with client_id): inline, ${VAR} or {file: PATH}."
            ),
        ] = None
        bearer_token: Annotated[
            Secret | None,
            Meta(
                description="A token to authenticate to the endpoint (instead of client_id): "
                "inline, ${VAR} or {file: PATH}."
            ),
        ] = None
        token_type_hint: Annotated[
            str | None, Meta(description="Sent as token_type_hint; null sends none.")
        ] = "access_token"
        consumer_claim: Annotated[
            str,
            Meta(description="The claim naming the consumer: username, client_id, sub, ..."),
        ] = "username"
        allow_unknown_consumers: Annotated[
            bool,
            Meta(
                description="Let an active token whose claim names no configured consumer "
                "through without a consumer (default: 403)."
            ),
        ] = False
        audience: Annotated[
            str | None,
            Meta(description="If set, the token's aud claim must be or contain this value."),
        ] = None
        required_scopes: Annotated[
            list[str], Meta(description="Scopes the token must all have (else 403).")
        ] = msgspec.field(default_factory=list)
        scope_claim: Annotated[
            str, Meta(description="The claim with the scopes (space-separated or a list).")
        ] = "scope"
        claims_to_headers: Annotated[
            dict[str, str], Meta(description="Claim -> request header sent upstream.")
        ] = msgspec.field(default_factory=dict)
        timeout: Annotated[
            Duration, Meta(description="How long one introspection request may take.")
        ] = 3.0
        cache_ttl: Annotated[
            Duration,
            Meta(description="Longest an active answer is cached (never beyond the token's exp)."),
        ] = 60.0
        negative_cache_ttl: Annotated[
            Duration, Meta(description="How long an inactive answer is cached.")
        ] = 5.0
        cache_size: Annotated[
            int, Meta(ge=0, description="Most tokens cached per worker (0: no cache).")
        ] = 10000

    config: "OAuth2Introspection.Config"

    def __init__(self, config: "OAuth2Introspection.Config") -> None:
        super().__init__(config)
        c = config
        auth.check_config(c)
        try:
            url = httpx.URL(c.url)
        except httpx.InvalidURL as e:
            raise ValueError(f"url: {e}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("url: must be an absolute http:// or https:// URL")
        if c.client_secret is not None and c.client_id is None:
            raise ValueError("client_secret: set client_id too")
        if c.bearer_token is not None and c.client_id is not None:
            raise ValueError("bearer_token: use either client_id/client_secret or bearer_token")
        self._auth: httpx.Auth | None = None
        self._auth_header: str | None = None
        if c.client_id is not None:
            secret = (
                "" if c.client_secret is None else read_secret(c.client_secret, "client_secret")
            )
            self._auth = httpx.BasicAuth(c.client_id, secret)
        elif c.bearer_token is not None:
            self._auth_header = "Bearer " + read_secret(c.bearer_token, "bearer_token")
        self._form: dict[str, str] = {}
        if c.token_type_hint:
            self._form["token_type_hint"] = c.token_type_hint
        self._headers = [
            (claim, check_header_name(header, f"claims_to_headers.{claim}"))
            for claim, header in c.claims_to_headers.items()
        ]
        self._timeout = parse_duration(c.timeout)
        self._ttl = parse_duration(c.cache_ttl)
        self._negative_ttl = parse_duration(c.negative_cache_ttl)
        self._required = frozenset(c.required_scopes)
        self._cache = TokenCache(c.cache_size)
        self._inflight: dict[bytes, asyncio.Task[dict[str, Any] | None]] = {}
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._last_log = -_LOG_EVERY
        self._unlogged = 0

    # --- the authorization server ----------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        """One client (and connection pool) per instance, made on the loop it serves."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            headers = {"accept": "application/json"}
            if self._auth_header is not None:
                headers["authorization"] = self._auth_header
            self._client = httpx.AsyncClient(
                timeout=self._timeout, headers=headers, auth=self._auth, follow_redirects=False
            )
            self._client_loop = loop
        return self._client

    async def _ask(self, key: bytes, token: str) -> dict[str, Any] | None:
        """The claims of an active token, or None; cached. Raises _Unavailable."""
        try:
            r = await self._http().post(self.config.url, data={"token": token, **self._form})
        except httpx.HTTPError as e:
            raise _Unavailable(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
        if r.status_code != 200:
            raise _Unavailable(f"answered {r.status_code}")
        try:
            claims = r.json()
        except ValueError:
            raise _Unavailable("answered something that is not JSON") from None
        if not isinstance(claims, dict) or not isinstance(claims.get("active"), bool):
            raise _Unavailable("answered JSON without a boolean 'active'")
        now = time.monotonic()
        ttl = self._ttl
        exp = claims.get("exp")
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            left = exp - time.time()
            if left <= 0:  # active past its exp: the server's clock is behind ours
                claims = {"active": False}
            ttl = min(ttl, left)
        if not claims["active"]:
            self._cache.put(key, None, now + self._negative_ttl)
            return None
        if ttl > 0:
            self._cache.put(key, claims, now + ttl)
        return claims

    async def _claims(self, token: str) -> dict[str, Any] | None:
        key = hashlib.sha256(token.encode()).digest()
        found, claims = self._cache.get(key, time.monotonic())
        if found:
            return claims
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._ask(key, token))
            self._inflight[key] = task

            def done(t: "asyncio.Task[dict[str, Any] | None]", key: bytes = key) -> None:
                if self._inflight.get(key) is t:
                    del self._inflight[key]
                if not t.cancelled():
                    t.exception()  # retrieved here, so a lone failure is not reported twice

            task.add_done_callback(done)
        # Shielded: a waiter that times out must not cancel the others' introspection.
        return await asyncio.shield(task)

    def _log_failure(self, req: Request, reason: str) -> None:
        now = time.monotonic()
        if now - self._last_log < _LOG_EVERY:
            self._unlogged += 1
            return
        emit(
            "error",
            "introspection_failed",
            plugin=self.name,
            route=req.route,
            request_id=req.request_id,
            url=self.config.url,
            error=reason,
            not_logged_since=self._unlogged,
        )
        self._last_log = now
        self._unlogged = 0

    # --- the request -----------------------------------------------------------------------

    def _challenge(self, req: Request, message: str, **params: str) -> Response:
        return auth.unauthorized(
            req,
            message,
            scheme="Bearer",
            realm=self.config.realm,
            code=params.get("error", "unauthorized"),
            params=params,
        )

    async def on_request(self, req: Request) -> Response | None:
        c = self.config
        if auth.skip(req, c):
            return None
        scheme, _, token = (req.headers.get("authorization") or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            # RFC 6750 3.1: no error code when the request has no token at all.
            return auth.fallback(
                req, c, self._challenge(req, "a bearer token is required (Authorization: Bearer)")
            )
        if len(token) > _MAX_TOKEN or not _B64TOKEN.fullmatch(token):
            return self._challenge(req, "the bearer token is malformed", error="invalid_token")
        try:
            claims = await self._claims(token)
        except _Unavailable as e:
            self._log_failure(req, str(e))
            return auth.error(
                req, 503, "introspection_unavailable", "the token could not be verified now"
            )
        inactive = "the token is not active (expired, revoked or unknown)"
        if claims is None:
            return self._challenge(req, inactive, error="invalid_token")
        now = time.time()
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if isinstance(exp, (int, float)) and exp <= now:
            return self._challenge(req, inactive, error="invalid_token")
        if isinstance(nbf, (int, float)) and nbf > now:
            return self._challenge(req, "the token is not valid yet", error="invalid_token")
        if c.audience is not None:
            aud = claims.get("aud")
            if not (aud == c.audience or (isinstance(aud, list) and c.audience in aud)):
                return self._challenge(
                    req, "the token is not meant for this audience", error="invalid_token"
                )
        name = claims.get(c.consumer_claim)
        consumer = current().get(name) if isinstance(name, str) else None
        if consumer is None and not c.allow_unknown_consumers:
            return auth.forbidden(
                req,
                f"the token's {c.consumer_claim} names no consumer of this gateway",
                code="unknown_consumer",
            )
        scopes = auth.scopes_of(claims, (c.scope_claim,))
        missing = self._required - scopes
        if missing:
            challenge = Headers(
                {
                    "www-authenticate": f'Bearer realm="{c.realm}", error="insufficient_scope", '
                    f'scope="{" ".join(sorted(self._required))}"'
                }
            )
            return auth.error(
                req,
                403,
                "insufficient_scope",
                f"the token lacks the scope(s): {', '.join(sorted(missing))}",
                challenge,
            )
        if consumer is not None:
            client_id = claims.get("client_id")
            safe_id = client_id if isinstance(client_id, str) else consumer.name
            auth.identify(req, Credential(consumer.name, self.name, safe_id, {}), c)
        req.ctx["scopes"] = scopes
        req.ctx["claims"] = claims
        headers = req.headers
        for claim, header in self._headers:
            headers.remove(header)
            value = claims.get(claim)
            text = None if value is None else auth.claim_header_value(value)
            if text is not None:
                headers[header] = text
        if c.hide_credentials:
            headers.remove("authorization")
        return None
