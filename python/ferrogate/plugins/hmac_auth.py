"""HMAC request signatures: the client signs the method, target, date, body digest and
chosen headers with a secret it shares with the gateway.

The request carries::

    Authorization: hmac-sha256 keyId="alice", headers="@request-target date digest",
                   signature="<base64 HMAC>"
    Date: Tue, 07 Jun 2025 20:51:35 GMT            (or X-Date, which wins when both are sent)
    Digest: SHA-256=<base64 SHA-256 of the body>    (SHA-512= also understood)

The string to sign has one line per name of ``headers``, in that order, joined by ``\\n``
(no newline after the last)::

    @request-target: <method in lower case> <path>[?<query>]
    <header name in lower case>: <its values, each trimmed, joined by ", ">

where path and query are exactly as the client sent them in the request line. The
signature is base64 (standard alphabet, padded) of HMAC-<hash>(secret, string to sign), the
secret and the string as UTF-8. This is draft-cavage-http-signatures with ``@request-target``
for its ``(request-target)`` (both are accepted) and the algorithm as the scheme.
"""

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections import OrderedDict
from email.utils import parsedate_to_datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from ferrogate import auth
from ferrogate.consumers import Credential, current
from ferrogate.hooks import Headers, Request, Response
from ferrogate.plugin import Plugin
from ferrogate.plugins.request_transformer import check_header_name
from ferrogate.units import Duration, parse_duration

__all__ = ["ALGORITHMS", "HmacAuth", "ReplayCache", "string_to_sign"]

ALGORITHMS = {"hmac-sha256": "sha256", "hmac-sha384": "sha384", "hmac-sha512": "sha512"}
_DIGESTS = {"sha-256": "sha256", "sha-512": "sha512"}
_TARGET = "@request-target"
_TARGET_ALIASES = frozenset({_TARGET, "(request-target)"})
_PARAM = re.compile(r'\s*([A-Za-z]+)\s*=\s*"([^"\\]*)"\s*(?:,|$)')
_MAX_HEADER = 8192

Algorithm = Literal["hmac-sha256", "hmac-sha384", "hmac-sha512"]


class _Refused(Exception):
    """Why a request's signature is not accepted (said to the client as is)."""


def string_to_sign(method: str, path: str, query: str, headers: Headers, names: list[str]) -> str:
    """The signed string for ``names`` (lower case) of this request (see the module doc)."""
    lines = []
    for name in names:
        if name in _TARGET_ALIASES:
            target = path + ("?" + query if query else "")
            lines.append(f"{name}: {method.lower()} {target}")
        else:
            values = headers.getall(name)
            if not values:
                raise _Refused(f"the signed header '{name}' is missing from the request")
            lines.append(f"{name}: " + ", ".join(v.strip() for v in values))
    return "\n".join(lines)


def _parse(value: str) -> tuple[str, dict[str, str]]:
    """(scheme, params) of ``<scheme> name="value", ...``; ValueError when malformed."""
    scheme, _, rest = value.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if m is None or m.end() == pos:
            raise ValueError
        params[m.group(1)] = m.group(2)
        pos = m.end()
    return scheme.lower(), params


class ReplayCache:
    """Signatures already accepted, each until the moment its date leaves the allowed skew
    (wall-clock seconds). Bounded: when full, the oldest entry goes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.evicted = 0
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def first_time(self, signature: bytes, until: float, now: float) -> bool:
        """Record ``signature``; False when it was recorded before and is still live."""
        seen = self._seen
        while seen:
            oldest, expiry = next(iter(seen.items()))
            if expiry > now:
                break
            del seen[oldest]
        known = seen.get(signature)
        if known is not None and known > now:
            return False
        seen[signature] = until
        while len(seen) > self.size:
            seen.popitem(last=False)
            self.evicted += 1
        return True

    def __len__(self) -> int:
        return len(self._seen)


class HmacAuth(Plugin):
    """Signed requests (HMAC-SHA256/384/512 over method, target, date, body digest, headers).

    ``Authorization: hmac-sha256 keyId="...", headers="@request-target date digest",
    signature="..."``; the key id is an ``hmac-auth`` credential of a consumer. The signed
    headers must include ``@request-target``, the date (``x-date`` when sent, else ``date``;
    within ``clock_skew`` of the gateway's clock), ``digest`` when the request has a body and
    ``validate_digest`` is on (the default; the body is then buffered and checked against
    ``Digest``), and ``enforce_headers``. A signature accepted once is refused again while
    its date is within the skew (per worker). The string to sign is in the module doc and
    docs/plugins.md.
    """

    name = "hmac-auth"
    priority = auth.PRIORITY  # the last of the authentication plugins, as in Kong

    class Config(auth.AuthConfig, kw_only=True, frozen=True):
        """Settings of hmac-auth."""

        algorithms: Annotated[
            list[Algorithm], Meta(min_length=1, description="Accepted algorithms.")
        ] = msgspec.field(default_factory=lambda: list(ALGORITHMS))  # type: ignore[arg-type]
        clock_skew: Annotated[
            Duration,
            Meta(description="Greatest difference allowed between Date/X-Date and now."),
        ] = 300.0
        validate_digest: Annotated[
            bool,
            Meta(
                description="Buffer the body and check it against the Digest header; a "
                "request with a body must then sign `digest`."
            ),
        ] = True
        enforce_headers: Annotated[
            list[str], Meta(description="Headers every signature must cover.")
        ] = msgspec.field(default_factory=list)
        replay_protection: Annotated[
            bool, Meta(description="Refuse a signature already accepted within the skew.")
        ] = True
        replay_cache_size: Annotated[
            int, Meta(ge=1, description="Most signatures remembered per worker.")
        ] = 100_000

    config: "HmacAuth.Config"

    def __init__(self, config: "HmacAuth.Config") -> None:
        super().__init__(config)
        c = config
        auth.check_config(c)
        self._skew = parse_duration(c.clock_skew)
        self._enforce = [
            check_header_name(h, f"enforce_headers[{i}]") if h not in _TARGET_ALIASES else _TARGET
            for i, h in enumerate(c.enforce_headers)
        ]
        self._algorithms: dict[str, str] = {a: ALGORITHMS[a] for a in c.algorithms}
        self._replays = ReplayCache(c.replay_cache_size)
        self._challenges = [
            f'{a} realm="{c.realm}", headers="@request-target date digest"' for a in c.algorithms
        ]

    @classmethod
    def request_body_mode(cls, config: "HmacAuth.Config") -> Literal["none", "buffered"]:
        return "buffered" if config.validate_digest else "none"

    def _unauthorized(self, req: Request, message: str) -> Response:
        resp = auth.error(req, 401, "unauthorized", message)
        for challenge in self._challenges:
            resp.headers.add("www-authenticate", challenge)
        return resp

    def on_request(self, req: Request) -> Response | None:
        c = self.config
        if auth.skip(req, c):
            return None
        value = req.headers.get("authorization") or ""
        if not value.lower().startswith("hmac-"):
            return auth.fallback(
                req, c, self._unauthorized(req, "a signed request is required (hmac-auth)")
            )
        try:
            credential = self._verify(req, value)
        except _Refused as e:
            return self._unauthorized(req, str(e))
        auth.identify(req, credential, c)
        if c.hide_credentials:
            req.headers.remove("authorization")
        return None

    def _verify(self, req: Request, value: str) -> Credential:
        """The credential of a valid, fresh, first-seen signature; raises _Refused."""
        if len(value) > _MAX_HEADER:
            raise _Refused("the Authorization header is too long")
        try:
            scheme, params = _parse(value)
        except ValueError:
            raise _Refused(
                'malformed Authorization: expected <algorithm> keyId="...", '
                'headers="...", signature="..."'
            ) from None
        hash_name = self._algorithms.get(scheme)
        if hash_name is None:
            raise _Refused(f"algorithm not accepted here (use {', '.join(self._algorithms)})")
        key_id, signed, given = (params.get(k) for k in ("keyId", "headers", "signature"))
        if not key_id or not signed or not given:
            raise _Refused("the Authorization header needs keyId, headers and signature")
        try:
            signature = base64.b64decode(given, validate=True)
        except (binascii.Error, ValueError):
            raise _Refused("the signature is not base64") from None

        names = signed.lower().split()
        covered = {_TARGET if n in _TARGET_ALIASES else n for n in names}
        headers = req.headers
        date_header = "x-date" if "x-date" in headers else "date"
        body = req.body or b""
        digest_header = headers.get("digest")
        must_sign = [_TARGET, date_header, *self._enforce]
        if self.config.validate_digest and (body or digest_header is not None):
            must_sign.append("digest")
        unsigned = [n for n in must_sign if n not in covered]
        if unsigned:
            raise _Refused(f"the signature must cover: {' '.join(unsigned)}")

        # The date first: a stale request is refused without spending an HMAC on it.
        raw_date = headers.get(date_header)
        try:
            date = parsedate_to_datetime(raw_date or "").timestamp()
        except (TypeError, ValueError, IndexError):
            raise _Refused(f"the {date_header} header is missing or not an HTTP date") from None
        now = time.time()
        if abs(now - date) > self._skew:
            raise _Refused(
                f"the {date_header} header is more than {self._skew:g}s away from the "
                "gateway's clock"
            )
        if self.config.validate_digest and digest_header is not None:
            self._check_digest(digest_header, body)

        text = string_to_sign(req.method, req.path, req.query, headers, names)
        credential = current().find("hmac-auth", key_id)
        secret = str(credential.data["secret"]) if credential is not None else ""
        expected = hmac.new(secret.encode(), text.encode(), hash_name).digest()
        # An unknown key id costs the same and reads the same as a wrong signature.
        if not hmac.compare_digest(expected, signature) or credential is None:
            raise _Refused("the signature does not match the request")
        if self.config.replay_protection and not self._replays.first_time(
            signature, date + self._skew, now
        ):
            raise _Refused("this signed request was already received (replay)")
        return credential

    @staticmethod
    def _check_digest(value: str, body: bytes) -> None:
        checked = False
        for part in value.split(","):
            algorithm, sep, encoded = part.strip().partition("=")
            hash_name = _DIGESTS.get(algorithm.lower())
            if not sep or hash_name is None:
                continue
            try:
                given = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise _Refused("the Digest header is not base64") from None
            if not hmac.compare_digest(hashlib.new(hash_name, body).digest(), given):
                raise _Refused("the body does not match the Digest header")
            checked = True
        if not checked:
            raise _Refused("the Digest header has no SHA-256= or SHA-512= value")
