"""The keys the jwt plugin verifies signatures with, each bound to the algorithms it may be used
with: a key never verifies a token of another family, whatever the token's header says (an
RSA public key is never an HMAC secret). Keys come from PEM text, HMAC secrets, consumer
credentials, or a JWKS document fetched over HTTP and kept fresh."""

import asyncio
import concurrent.futures
import contextlib
import re
import threading
import time
from collections.abc import Iterable
from typing import Any

import httpx
import jwt
import msgspec
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import get_default_algorithms

from ferrogate.events import emit

__all__ = ["ALGORITHMS", "HMAC_ALGORITHMS", "JwksSource", "Key", "key_from_jwk", "prepare_key"]

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
ALGORITHMS = (*HMAC_ALGORITHMS, *RSA_ALGORITHMS, *EC_ALGORITHMS, "EdDSA")
"""What the plugin accepts; ``none`` is not among them and never will be."""

_EC_CURVES = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_CURVES_JWK = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_IMPLEMENTATIONS = get_default_algorithms()
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)", re.I)
_LOG_EVERY = 10.0


class Key:
    """One verification key: the prepared key object and the algorithms it may verify.

    ``consumer`` and ``credential`` are set for a consumer's ``jwt`` credential: a token it
    verifies is that consumer's. ``alive`` turns False when a JWKS refresh drops the key, which
    also voids the cached verifications made with it."""

    __slots__ = ("algorithms", "alive", "consumer", "credential", "jwks", "kid", "material")

    def __init__(
        self,
        material: Any,
        algorithms: Iterable[str],
        *,
        kid: str | None = None,
        credential: str,
        consumer: str | None = None,
        jwks: "JwksSource | None" = None,
    ) -> None:
        self.material = material
        self.algorithms = frozenset(algorithms)
        self.kid = kid
        self.credential = credential
        """A name for the key that is safe to log."""
        self.consumer = consumer
        self.jwks = jwks
        self.alive = True


def _family(material: Any) -> str:
    if isinstance(material, bytes):
        return "a secret"
    if isinstance(material, (rsa.RSAPublicKey, rsa.RSAPrivateKey)):
        return "an RSA key"
    if isinstance(material, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
        return f"an EC key on {material.curve.name}"
    if isinstance(material, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return "an Ed25519/Ed448 key"
    return f"a {type(material).__name__}"


def prepare_key(algorithm: str, text: str, field: str) -> Any:
    """The key object for ``algorithm`` from an HMAC secret or a PEM public key.

    ValueError (naming ``field``, never the key's content) when the text is not a key of the
    algorithm's type: an RSA key for ES256, a PEM key as an HMAC secret, a private key."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{field}: algorithm {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    if algorithm in HMAC_ALGORITHMS:
        secret = text.encode()
        if len(secret) < 32:
            # RFC 7518 3.2: an HMAC key at least as long as the hash output (HS256: 32 bytes).
            raise ValueError(f"{field}: an {algorithm} secret needs at least 32 bytes")
    impl = _IMPLEMENTATIONS[algorithm]
    try:
        material = impl.prepare_key(text.encode())
    except jwt.InvalidKeyError as e:
        if algorithm in HMAC_ALGORITHMS:
            raise ValueError(
                f"{field}: this is a public key, not an {algorithm} secret; an RS*/PS*/ES*/EdDSA "
                "algorithm goes with a public key"
            ) from None
        raise ValueError(f"{field}: not a usable {algorithm} public key ({_reason(e)})") from None
    except ValueError:
        raise ValueError(f"{field}: not a PEM public key") from None
    if isinstance(
        material,
        (
            rsa.RSAPrivateKey,
            ec.EllipticCurvePrivateKey,
            ed25519.Ed25519PrivateKey,
            ed448.Ed448PrivateKey,
        ),
    ):
        raise ValueError(f"{field}: this is a private key; give the public key only")
    return material


def _reason(e: Exception) -> str:
    text = str(e)
    if "curve" in text:
        return text
    return "wrong key type for the algorithm"


def key_from_jwk(
    jwk: dict[str, Any], allowed: frozenset[str], jwks: "JwksSource | None" = None
) -> Key | None:
    """A key of a JWKS, or None when it cannot verify any ``allowed`` algorithm (encryption
    keys, symmetric keys, unknown types, an ``alg`` not allowed)."""
    if jwk.get("use", "sig") != "sig":
        return None
    kty = jwk.get("kty")
    alg = jwk.get("alg")
    if kty == "RSA":
        candidates: tuple[str, ...] = RSA_ALGORITHMS
    elif kty == "EC":
        crv_alg = _CURVES_JWK.get(jwk.get("crv", ""))
        candidates = (crv_alg,) if crv_alg else ()
    elif kty == "OKP":
        candidates = ("EdDSA",)
    else:
        # Symmetric keys have no place in a published key set.
        return None
    if alg is not None:
        candidates = tuple(a for a in candidates if a == alg)
    algorithms = [a for a in candidates if a in allowed]
    if not algorithms:
        return None
    try:
        material = jwt.PyJWK(jwk, algorithm=algorithms[0]).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
        return None
    kid = jwk.get("kid")
    kid = kid if isinstance(kid, str) else None
    return Key(
        material,
        algorithms,
        kid=kid,
        credential=f"jwks:{kid}" if kid else "jwks",
        jwks=jwks,
    )


class JwksSource:
    """A JWKS URL's keys, fetched by the worker's hook event loop (httpx.AsyncClient), so the
    requests that find the set fresh or a little stale never wait for the network.

    - Stale set (past its TTL): a refresh starts in the background; requests go on with the
      keys they have until it lands (a withdrawn key stops working then).
    - First use, or a token naming a ``kid`` the set lacks: the request waits for one fetch
      (at most ``timeout``); for an unknown kid at most once per ``refetch_interval``, which is
      how a rotation to a new key is followed. A fetch in flight is shared, never repeated.
    - A failed fetch keeps the keys already known and is logged (at most every 10 s).
    """

    def __init__(
        self,
        url: str,
        allowed: frozenset[str],
        *,
        ttl: float | None,
        min_ttl: float,
        max_ttl: float,
        refetch_interval: float,
        timeout: float,
    ) -> None:
        self.url = url
        self.allowed = allowed
        self.ttl = ttl
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.refetch_interval = refetch_interval
        self.timeout = timeout
        self.by_kid: dict[str, Key] = {}
        self.unnamed: list[Key] = []
        self._docs: dict[str, bytes] = {}
        self.loaded = False
        self.fresh_until = 0.0
        """Wall-clock time after which the set is refreshed (in the background)."""
        self._last_attempt = -1e18
        self._inflight: concurrent.futures.Future[None] | None = None
        self._lock = threading.Lock()
        self._client: httpx.AsyncClient | None = None
        self._last_log = -1e18

    def _start(self) -> "concurrent.futures.Future[None]":
        """The fetch in flight, or a new one on the hook loop."""
        with self._lock:
            fut = self._inflight
            if fut is None or fut.done():
                from ferrogate.plugin_host import hook_loop

                self._last_attempt = time.monotonic()
                fut = self._inflight = asyncio.run_coroutine_threadsafe(self._fetch(), hook_loop())
            return fut

    def _wait(self, fut: "concurrent.futures.Future[None]") -> None:
        with contextlib.suppress(concurrent.futures.TimeoutError):
            fut.result(self.timeout + 0.5)

    def _since_attempt(self) -> float:
        return time.monotonic() - self._last_attempt

    def refresh(self, now: float) -> None:
        """Make sure the set is loaded (waiting only the first time) and, when it is stale,
        that a refresh is under way. ``now`` is ``time.time()``."""
        if now < self.fresh_until:
            return
        if not self.loaded:
            if self._since_attempt() >= min(1.0, self.refetch_interval) or self._busy():
                self._wait(self._start())
        elif self._since_attempt() >= min(1.0, self.refetch_interval):
            self._start()

    def _busy(self) -> bool:
        fut = self._inflight
        return fut is not None and not fut.done()

    def find(self, kid: str) -> Key | None:
        """The key named ``kid``; an unknown one fetches the set again (rate-limited)."""
        self.refresh(time.time())
        key = self.by_kid.get(kid)
        if key is None and (self._busy() or self._since_attempt() >= self.refetch_interval):
            self._wait(self._start())
            key = self.by_kid.get(kid)
        return key

    async def _fetch(self) -> None:
        if self._client is None:  # made on the loop it is used on
            self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        try:
            r = await self._client.get(self.url, headers={"accept": "application/json"})
            if r.status_code != 200:
                raise ValueError(f"status {r.status_code}")
            doc = msgspec.json.decode(r.content)
            if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
                raise ValueError("not a JWKS document (no 'keys' list)")
        except (httpx.HTTPError, ValueError, msgspec.DecodeError) as e:
            self._log(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            # Tried again no sooner than a refetch would be; the known keys stay in use.
            self.fresh_until = time.time() + min(self.refetch_interval, self.min_ttl)
            return
        self._install(doc["keys"])
        ttl = self.ttl
        if ttl is None:
            m = _MAX_AGE.search(r.headers.get("cache-control", ""))
            ttl = float(m.group(1)) if m else 300.0
        self.fresh_until = time.time() + max(self.min_ttl, min(self.max_ttl, ttl))

    def _install(self, jwks: list[Any]) -> None:
        by_kid: dict[str, Key] = {}
        docs: dict[str, bytes] = {}
        unnamed: list[Key] = []
        for jwk in jwks:
            if not isinstance(jwk, dict):
                continue
            kid = jwk.get("kid")
            doc = msgspec.json.encode(jwk, order="sorted")
            if isinstance(kid, str) and kid in by_kid:
                continue  # the first of two keys with one kid wins, as the lookups would
            # The same key as before stays the same object, so its cached verifications stay.
            old = self.by_kid.get(kid) if isinstance(kid, str) else None
            if old is not None and self._docs.get(kid) == doc:  # type: ignore[arg-type]
                key: Key | None = old
            else:
                key = key_from_jwk(jwk, self.allowed, self)
            if key is None:
                continue
            if key.kid is None:
                unnamed.append(key)
            else:
                by_kid[key.kid] = key
                docs[key.kid] = doc
        # Swapped in whole (the request thread reads these without a lock), then the keys
        # that left are voided.
        old_keys = [*self.by_kid.values(), *self.unnamed]
        self.by_kid, self.unnamed, self._docs = by_kid, unnamed, docs
        for key in old_keys:
            if by_kid.get(key.kid or "") is not key:
                key.alive = False
        self.loaded = True

    def _log(self, error: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY:
            self._last_log = now
            emit("warning", "jwks_fetch_failed", url=_safe_url(self.url), error=error)


def _safe_url(url: str) -> str:
    """The URL without user info or query (either may hold a credential)."""
    try:
        u = httpx.URL(url)
    except httpx.InvalidURL:
        return "(invalid URL)"
    port = f":{u.port}" if u.port else ""
    return f"{u.scheme}://{u.host}{port}{u.path}"
