"""API key authentication: the client sends a key its consumer was given, in a header or (when
enabled) a query parameter."""

import hmac
from typing import Annotated

import msgspec
from msgspec import Meta

from ferrogate import auth
from ferrogate.consumers import current, hash_key
from ferrogate.hooks import Request, Response
from ferrogate.plugin import Plugin
from ferrogate.plugins.request_transformer import check_header_name

__all__ = ["KeyAuth"]


class KeyAuth(Plugin):
    """Identifies the consumer by an API key (``key-auth`` credentials).

    The key is read from the first of the ``key_names`` headers the request has (``apikey``,
    ``x-api-key`` by default) and, with ``key_in_query: true``, from a query parameter of one
    of those names. Query keys are off by default: URLs end up in browser histories, proxy
    logs and ``Referer`` headers. With ``hide_credentials`` the key is removed from what goes
    upstream.

    A request without a key gets 401 (or continues as the ``anonymous`` consumer); a key
    that matches no credential gets 401 "invalid API key". Both answers carry
    ``WWW-Authenticate: Key realm="..."`` and never echo the key.
    """

    name = "key-auth"
    priority = auth.PRIORITY + 250  # Kong's order: key-auth before basic-auth, jwt, hmac

    class Config(auth.AuthConfig, forbid_unknown_fields=True, kw_only=True, frozen=True):
        """Settings of key-auth."""

        key_names: Annotated[
            list[str],
            Meta(min_length=1, description="Header (and query parameter) names of the key."),
        ] = msgspec.field(default_factory=lambda: ["apikey", "x-api-key"])
        key_in_header: Annotated[bool, Meta(description="Look for the key in headers.")] = True
        key_in_query: Annotated[
            bool, Meta(description="Look for the key in query parameters too (off).")
        ] = False

    config: "KeyAuth.Config"

    def __init__(self, config: "KeyAuth.Config") -> None:
        super().__init__(config)
        auth.check_config(config)
        if not (config.key_in_header or config.key_in_query):
            raise ValueError("key_in_header and key_in_query are both off: no key can be sent")
        for i, name in enumerate(config.key_names):
            if config.key_in_header:
                check_header_name(name, f"key_names[{i}]")
            elif not name:
                raise ValueError(f"key_names[{i}]: a name cannot be empty")
        self._headers = [n.lower() for n in config.key_names] if config.key_in_header else []
        self._params = list(config.key_names) if config.key_in_query else []

    def _key(self, req: Request) -> str | None:
        headers = req.headers
        for name in self._headers:
            value = headers.get(name)
            if value is not None:
                return value.strip()
        if self._params:
            params = req.query_params
            for name in self._params:
                value = params.get(name)
                if value is not None:
                    return value
        return None

    def on_request(self, req: Request) -> Response | None:
        c = self.config
        # skip() is only ever true with `anonymous` set; the test first spares the default
        # configuration a call on every request.
        if c.anonymous is not None and auth.skip(req, c):
            return None
        found = self._key(req)
        if not found:
            return auth.fallback(
                req,
                c,
                auth.unauthorized(req, "no API key in the request", scheme="Key", realm=c.realm),
            )
        # The registry is indexed by the key's SHA-256, so the lookup compares digests: how
        # long it takes says nothing about how much of a real key a guess got right. The
        # explicit check repeats that comparison in constant time.
        digest = hash_key(found)
        credential = current().find("key-auth", digest)
        if credential is None or not hmac.compare_digest(credential.data["key_sha256"], digest):
            return auth.unauthorized(req, "invalid API key", scheme="Key", realm=c.realm)
        auth.identify(req, credential, c)
        if c.hide_credentials:
            # Every place a key may be sent, not only the one used: a second copy of the key
            # must not reach the upstream either.
            for name in self._headers:
                req.headers.remove(name)
            for name in self._params:
                req.query_params.remove(name)
        return None
