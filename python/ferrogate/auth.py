"""What authentication plugins share: their common settings, the answers they give (401 with
``WWW-Authenticate``, 403), and how they tell the gateway who the client is.

An authentication plugin looks like this::

    from ferrogate import auth
    from ferrogate.consumers import current

    class TokenAuth(Plugin):
        name = "token-auth"
        priority = auth.PRIORITY              # before acl, rate limits, transformers

        class Config(auth.AuthConfig):        # anonymous, hide_credentials, realm, ...
            header: str = "x-token"

        def __init__(self, config):
            super().__init__(config)
            auth.check_config(config)         # ValueError: reported when the config loads

        def on_request(self, req):
            if auth.skip(req, self.config):   # identified by an earlier plugin (OR)
                return None
            token = req.headers.get(self.config.header)
            if token is None:
                return auth.fallback(req, self.config,
                                     auth.unauthorized(req, "no token", scheme="Token",
                                                       realm=self.config.realm))
            cred = current().find(...)
            if cred is None:
                return auth.unauthorized(req, "invalid token", scheme="Token",
                                         realm=self.config.realm)
            auth.identify(req, cred, self.config)
            if self.config.hide_credentials:
                req.headers.remove(self.config.header)
            return None

Error bodies have the shape of the gateway's own errors:
``{"error": {"status", "code", "message", "request_id"}}``. Messages say what is wrong and
never echo what the client sent (a mistyped key is still almost a key).

``anonymous`` names a consumer the request continues as when it carries no credential of
the plugin's kind; a credential that is present but wrong is still refused (Kong also lets
those through as anonymous: that hides a client's mistakes from it). When several
authentication plugins run on a route, each with ``anonymous``, the first one that
recognizes a credential wins and the others step aside (``skip``): the client may use any
of them. Without ``anonymous``, every one of them must succeed.

Upstream, an identified request carries ``X-Consumer-Username`` and
``X-Credential-Identifier`` (the credential's safe id), or ``X-Anonymous-Consumer: true``;
headers of those names sent by the client are removed first, so the upstream can trust them
(``upstream_headers: false`` sends none and leaves the client's alone).
"""

import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta

from ferrogate.consumers import Credential, current
from ferrogate.hooks import Headers, Request, Response

__all__ = [
    "ACL_PRIORITY",
    "PRIORITY",
    "AuthConfig",
    "challenges",
    "check_config",
    "error",
    "fallback",
    "forbidden",
    "identify",
    "is_anonymous",
    "skip",
    "unauthorized",
]

PRIORITY: Final = 1000
"""Authentication plugins run at this priority: after cors (2000), before acl
(``ACL_PRIORITY``) and the plugins that act on who the client is."""
ACL_PRIORITY: Final = 950

CONSUMER_HEADER: Final = "x-consumer-username"
CREDENTIAL_HEADER: Final = "x-credential-identifier"
ANONYMOUS_HEADER: Final = "x-anonymous-consumer"

_ANONYMOUS = "auth.anonymous"
"""``req.ctx`` key: True while the request's consumer is the anonymous fallback."""
_CHALLENGES = "auth.challenges"
"""``req.ctx`` key: the WWW-Authenticate values of the plugins that fell back to anonymous."""


class AuthConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Settings every authentication plugin has (subclass it for the plugin's ``Config``)."""

    anonymous: Annotated[
        str | None,
        Meta(
            description="A consumer the request continues as when it carries no credential "
            "(a wrong credential is still refused). Default: refuse with 401."
        ),
    ] = None
    hide_credentials: Annotated[
        bool, Meta(description="Remove the credential from the request sent upstream.")
    ] = False
    upstream_headers: Annotated[
        bool,
        Meta(
            description="Send X-Consumer-Username and X-Credential-Identifier (or "
            "X-Anonymous-Consumer) upstream, replacing any the client sent."
        ),
    ] = True
    realm: Annotated[
        str, Meta(description="The realm named in the WWW-Authenticate header of a 401.")
    ] = "ferrogate"


def check_config(config: AuthConfig) -> None:
    """Raise ValueError when ``config`` cannot work: an ``anonymous`` consumer that the
    config does not define, a realm that cannot be quoted in a header."""
    if any(ch in config.realm for ch in '"\\\r\n\0'):
        raise ValueError("realm: cannot contain a quote, a backslash, CR, LF or NUL")
    if config.anonymous is not None and current().get(config.anonymous) is None:
        known = sorted(c.name for c in current())
        listed = f" (defined: {', '.join(known)})" if known else " (no consumer is defined)"
        raise ValueError(
            f"anonymous: no consumer named '{config.anonymous}' under 'consumers:'{listed}"
        )


# --- answers -------------------------------------------------------------------------------


def error(
    req: Request,
    status: int,
    code: str,
    message: str,
    headers: Headers | None = None,
) -> Response:
    """An answer in the gateway's error shape, with the request's id."""
    body = {
        "error": {
            "status": status,
            "code": code,
            "message": message,
            "request_id": req.request_id,
        }
    }
    out = headers if headers is not None else Headers()
    out["content-type"] = "application/json"
    return Response(status, body, out)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unauthorized(
    req: Request,
    message: str,
    *,
    scheme: str,
    realm: str,
    code: str = "unauthorized",
    params: dict[str, str] | None = None,
) -> Response:
    """401 with ``WWW-Authenticate: <scheme> realm="<realm>"[, name="value"...]`` (``params``
    such as RFC 6750's ``error="invalid_token"``)."""
    challenge = f"{scheme} realm={_quoted(realm)}"
    for name, value in (params or {}).items():
        challenge += f", {name}={_quoted(value)}"
    return error(req, 401, code, message, Headers({"www-authenticate": challenge}))


def forbidden(req: Request, message: str, *, code: str = "forbidden") -> Response:
    """403: the client is known but may not do this."""
    return error(req, 403, code, message)


# --- who the client is ---------------------------------------------------------------------


def skip(req: Request, config: AuthConfig) -> bool:
    """True when this plugin has nothing to do: it has ``anonymous`` and an earlier
    authentication plugin already recognized a credential (the plugins are alternatives)."""
    return (
        config.anonymous is not None
        and req.consumer is not None
        and not req.ctx.get(_ANONYMOUS, False)
    )


def identify(req: Request, credential: Credential, config: AuthConfig) -> None:
    """The request is from ``credential``'s consumer: set ``req.consumer`` and
    ``req.credential`` (the credential's id, never a secret) and the upstream headers."""
    req.consumer = credential.consumer
    req.credential = credential.id
    # Absent reads as False; an empty ctx stays unallocated.
    req.ctx.pop(_ANONYMOUS, None)
    if config.upstream_headers:
        # Setting replaces every field of the name the client sent.
        headers = req.headers
        headers.remove(ANONYMOUS_HEADER)
        headers[CONSUMER_HEADER] = credential.consumer
        headers[CREDENTIAL_HEADER] = credential.id


def fallback(req: Request, config: AuthConfig, refusal: Response) -> Response | None:
    """For a request without credentials: continue as the ``anonymous`` consumer (None), or
    ``refusal`` when there is none. Fails closed if that consumer has gone."""
    name = config.anonymous
    if name is None or current().get(name) is None:
        return refusal
    # Kept for a later refusal of the anonymous consumer (acl): it names the ways to
    # authenticate, like the answer this plugin would have given.
    req.ctx.setdefault(_CHALLENGES, []).extend(refusal.headers.getall("www-authenticate"))
    req.consumer = name
    req.credential = None
    req.ctx[_ANONYMOUS] = True
    if config.upstream_headers:
        headers = req.headers
        headers.remove(CREDENTIAL_HEADER)
        headers[CONSUMER_HEADER] = name
        headers[ANONYMOUS_HEADER] = "true"
    return None


def is_anonymous(req: Request) -> bool:
    """Whether the request's consumer is an ``anonymous`` fallback."""
    return bool(req.ctx.get(_ANONYMOUS, False))


def challenges(req: Request) -> list[str]:
    """The ``WWW-Authenticate`` challenges of the authentication plugins that let the request
    continue as anonymous, for a plugin that refuses it later with 401."""
    return list(req.ctx.get(_CHALLENGES, ()))


# --- what bearer-token plugins (jwt, oauth2-introspection) pass on -------------------------

_BAD_HEADER_VALUE = re.compile(r"[\r\n\0]")


def scopes_of(claims: Mapping[str, Any], names: Iterable[str]) -> frozenset[str]:
    """The scopes a token's claims grant: each named claim, a space-separated string (OAuth
    ``scope``) or a list of strings (``scp``)."""
    out: set[str] = set()
    for name in names:
        value = claims.get(name)
        if isinstance(value, str):
            out.update(value.split())
        elif isinstance(value, list):
            out.update(s for s in value if isinstance(s, str))
    return frozenset(out)


def claim_header_value(value: Any) -> str | None:
    """A claim as an upstream header value; None for one that cannot be sent safely."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (str, int, float)):
        text = str(value)
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        text = " ".join(value)
    else:
        text = msgspec.json.encode(value).decode()
    return None if _BAD_HEADER_VALUE.search(text) else text
