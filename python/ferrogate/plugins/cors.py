"""Cross-origin resource sharing: answers preflight requests at the gateway and adds the
CORS headers to the responses of cross-origin requests."""

import re
from typing import Annotated

import msgspec
from msgspec import Meta

from ferrogate.hooks import Headers, Request, Response
from ferrogate.plugin import Plugin
from ferrogate.plugins.request_transformer import check_header_name

__all__ = ["Cors"]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HANDLED = "cors.handled"
"""``req.ctx`` key set when the preflight needs no CORS headers on its response."""
_ORIGIN = "cors.origin"
"""``req.ctx`` key: the request's ``Origin`` as the client sent it (a later plugin may drop
the header before the upstream)."""
_UNSET = object()

DEFAULT_METHODS = ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS"]


def _add_vary_origin(headers: Headers) -> None:
    for value in headers.getall("vary"):
        for part in value.split(","):
            if part.strip().lower() in ("origin", "*"):
                return
    headers.add("vary", "Origin")


class Cors(Plugin):
    """Cross-origin resource sharing: answers preflights and adds CORS response headers.

    A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) is answered
    by the gateway with 204 and ``Access-Control-Allow-Origin``, ``-Allow-Methods``,
    ``-Allow-Headers`` (the configured ``headers``, or the request's
    ``Access-Control-Request-Headers`` echoed when none are configured), ``-Allow-Credentials``
    and ``-Max-Age``; with ``preflight_continue`` it goes to the upstream instead and gets no
    headers from this plugin. Any other request that has an ``Origin`` gets
    ``Access-Control-Allow-Origin``, ``-Allow-Credentials`` and ``-Expose-Headers`` on its
    response, including answers that another plugin gave instead of the upstream (such as a
    401 or a 429), so that the browser lets the page read them.

    ``origins`` lists exact origins (``https://app.example.com``; compared case-insensitively),
    ``"*"`` for any origin, and regular expressions prefixed with ``~`` that must match the
    whole origin (``~https://.*\\.example\\.com``, case-insensitive). The answer names the
    request's origin, with ``Vary: Origin``, unless ``"*"`` is allowed and ``credentials`` is
    off, when it is ``*``. With ``credentials`` and ``"*"``, the request's origin is echoed,
    since browsers reject ``*`` on credentialed requests.

    An origin that is not allowed gets no ``Access-Control-*`` header at all, only
    ``Vary: Origin``. Its preflight is still answered with 204, as Kong does (without an
    allowed origin the browser then refuses the cross-origin request), and its other requests
    still reach the upstream: CORS is enforced by browsers, it is not access control.

    The priority (2000) makes it run before authentication plugins, so preflights, which
    carry no credentials, are answered before any of them would reject them.
    """

    name = "cors"
    priority = 2000

    class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
        """Settings of cors."""

        origins: Annotated[
            list[str],
            Meta(
                min_length=1,
                description='Allowed origins: exact ("https://app.example.com"), "*" for any, '
                'or a regex prefixed with "~" matching the whole origin.',
            ),
        ] = msgspec.field(default_factory=lambda: ["*"])
        methods: Annotated[
            list[str],
            Meta(description="Methods a preflight allows (Access-Control-Allow-Methods)."),
        ] = msgspec.field(default_factory=lambda: list(DEFAULT_METHODS))
        headers: Annotated[
            list[str],
            Meta(
                description="Request headers a preflight allows; empty: echo the request's "
                "Access-Control-Request-Headers."
            ),
        ] = []
        exposed_headers: Annotated[
            list[str],
            Meta(description="Response headers the page may read (Access-Control-Expose-Headers)."),
        ] = []
        credentials: Annotated[
            bool,
            Meta(description="Allow cookies and credentials (Access-Control-Allow-Credentials)."),
        ] = False
        max_age: Annotated[
            Annotated[int, Meta(ge=0)] | None,
            Meta(description="Seconds a browser may cache a preflight (Access-Control-Max-Age)."),
        ] = None
        preflight_continue: Annotated[
            bool, Meta(description="Send preflights to the upstream instead of answering them.")
        ] = False

    config: "Cors.Config"

    def __init__(self, config: "Cors.Config") -> None:
        super().__init__(config)
        c = config
        self._any = False
        self._exact: set[str] = set()
        self._patterns: list[re.Pattern[str]] = []
        for i, origin in enumerate(c.origins):
            if origin == "*":
                self._any = True
            elif origin.startswith("~"):
                try:
                    self._patterns.append(re.compile(origin[1:], re.IGNORECASE))
                except re.error as e:
                    raise ValueError(
                        f"origins[{i}]: invalid regular expression '{origin[1:]}': {e}"
                    ) from None
            elif origin:
                self._exact.add(origin.rstrip("/").lower())
            else:
                raise ValueError(f"origins[{i}]: an origin cannot be empty")
        for i, method in enumerate(c.methods):
            if not _TOKEN.fullmatch(method):
                raise ValueError(f"methods[{i}]: '{method}' is not a valid HTTP method")
        for field in ("headers", "exposed_headers"):
            for i, header in enumerate(getattr(c, field)):
                if header != "*":
                    check_header_name(header, f"{field}[{i}]")
        # "*" as the answer only when no credentials: otherwise the origin is echoed.
        self._wildcard = self._any and not c.credentials
        self._methods = ", ".join(m.upper() for m in c.methods)
        self._allow_headers = ", ".join(c.headers)
        self._expose = ", ".join(c.exposed_headers)
        self._max_age = str(c.max_age) if c.max_age is not None else None

    def allowed(self, origin: str) -> bool:
        """Whether ``origin`` (an ``Origin`` header value) may make cross-origin requests."""
        if self._any:
            return True
        if origin.lower() in self._exact:
            return True
        return any(p.fullmatch(origin) for p in self._patterns)

    def _origin_headers(self, headers: Headers, origin: str | None) -> bool:
        """Set Access-Control-Allow-Origin (and -Credentials) for ``origin``, and Vary:
        Origin when the answer depends on it; True when the origin is allowed."""
        if not self._wildcard:
            _add_vary_origin(headers)
        if origin is None or not self.allowed(origin):
            return False
        headers["access-control-allow-origin"] = "*" if self._wildcard else origin
        if self.config.credentials:
            headers["access-control-allow-credentials"] = "true"
        return True

    def on_request(self, req: Request) -> Response | None:
        origin = req.ctx[_ORIGIN] = req.headers.get("origin")
        if req.method != "OPTIONS" or origin is None:
            return None
        if "access-control-request-method" not in req.headers:
            return None
        req.ctx[_HANDLED] = True
        if self.config.preflight_continue:
            return None
        headers = Headers()
        if self._origin_headers(headers, origin):
            headers["access-control-allow-methods"] = self._methods
            allow = self._allow_headers or req.headers.get("access-control-request-headers")
            if allow:
                headers["access-control-allow-headers"] = allow
            if self._max_age is not None:
                headers["access-control-max-age"] = self._max_age
        return Response(204, None, headers)

    def on_response(self, req: Request, resp: Response) -> None:
        if req.ctx.get(_HANDLED):
            return
        origin = req.ctx.get(_ORIGIN, _UNSET)
        if origin is _UNSET:  # answered by a plugin that runs before this one
            origin = req.headers.get("origin")
        if self._origin_headers(resp.headers, origin) and self._expose:
            resp.headers["access-control-expose-headers"] = self._expose
