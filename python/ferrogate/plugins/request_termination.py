"""Answers requests at the gateway with a fixed response, without contacting the upstream."""

from http import HTTPStatus
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from ferrogate.hooks import Headers, Request, Response
from ferrogate.plugin import Plugin
from ferrogate.plugins.request_transformer import check_header_name

__all__ = ["RequestTermination"]

_NO_BODY = frozenset({204, 205, 304})


def _multi(pairs: list[tuple[str, str]]) -> dict[str, str | list[str]]:
    """Pairs as a JSON object; a name given more than once maps to the list of its values."""
    out: dict[str, str | list[str]] = {}
    for name, value in pairs:
        known = out.get(name)
        if known is None:
            out[name] = value
        elif isinstance(known, list):
            known.append(value)
        else:
            out[name] = [known, value]
    return out


class RequestTermination(Plugin):
    """Answers requests at the gateway with a fixed status and body (maintenance, echo).

    The answer is ``status`` (503 by default) with ``{"message": ...}`` as JSON, where the
    message is ``message`` or the status's reason phrase, or with ``body`` sent as is, with
    ``content_type`` (``text/plain; charset=utf-8`` by default). ``headers`` are added to it.
    Statuses that have no body (1xx, 204, 205, 304) are sent without one.

    ``echo: true`` answers with the request instead, as JSON: ``{"message"?, "request":
    {method, path, query, headers, host, scheme, http_version, client_ip, request_id},
    "route"}``, where a query parameter or header given more than once maps to the list of
    its values. The request body is not included.

    With ``trigger``, only requests that have a header or a query parameter of that name are
    answered; the others go on as if the plugin were absent (as Kong's ``trigger``). The low
    priority (2) lets authentication plugins run first, so that a config can answer only some
    consumers.
    """

    name = "request-termination"
    priority = 2

    class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
        """Settings of request-termination."""

        status: Annotated[
            int, Meta(ge=100, le=599, description="The status code of the answer.")
        ] = 503
        message: Annotated[
            str | None,
            Meta(description='Sent as {"message": ...} (JSON); default: the reason phrase.'),
        ] = None
        body: Annotated[str | None, Meta(description="A raw body instead of the JSON message.")] = (
            None
        )
        content_type: Annotated[
            str | None,
            Meta(description="The Content-Type of `body` (default text/plain; charset=utf-8)."),
        ] = None
        headers: Annotated[
            dict[str, str], Meta(description="Extra response headers: name -> value.")
        ] = {}
        echo: Annotated[
            bool, Meta(description="Answer with the request itself as JSON (for debugging).")
        ] = False
        trigger: Annotated[
            str | None,
            Meta(
                description="Only answer requests that have a header or query parameter of "
                "this name; the others pass."
            ),
        ] = None

    config: "RequestTermination.Config"

    def __init__(self, config: "RequestTermination.Config") -> None:
        super().__init__(config)
        c = config
        if c.message is not None and c.body is not None:
            raise ValueError("message and body: set one or the other, not both")
        if c.content_type is not None and c.body is None:
            raise ValueError("content_type: only applies to `body`, which is not set")
        if c.echo and c.body is not None:
            raise ValueError("echo: the answer is the request as JSON; `body` cannot be set too")
        silent = c.status < 200 or c.status in _NO_BODY
        if silent and (c.echo or c.message is not None or c.body is not None):
            raise ValueError(f"status: a {c.status} response has no body; drop message/body/echo")
        self._headers: list[tuple[str, str]] = []
        for name, value in c.headers.items():
            key = check_header_name(name, "headers")
            if any(ch in value for ch in "\r\n\0"):
                raise ValueError(f"headers.{name}: a header value cannot contain CR, LF or NUL")
            self._headers.append((key, value))
        if c.content_type is not None and any(ch in c.content_type for ch in "\r\n\0"):
            raise ValueError("content_type: a header value cannot contain CR, LF or NUL")
        if c.trigger is not None and not c.trigger:
            raise ValueError("trigger: the name cannot be empty")
        try:
            phrase = HTTPStatus(c.status).phrase
        except ValueError:
            phrase = "Request terminated"
        self._message = c.message if c.message is not None else phrase
        self._body: bytes | None = None
        self._content_type = "application/json"
        if not silent:
            if c.body is not None:
                self._body = c.body.encode()
                self._content_type = c.content_type or "text/plain; charset=utf-8"
            else:
                self._body = msgspec.json.encode({"message": self._message})
        self._trigger = c.trigger

    def _echo(self, req: Request) -> bytes:
        out: dict[str, Any] = {}
        if self.config.message is not None:
            out["message"] = self.config.message
        out["request"] = {
            "method": req.method,
            "path": req.path,
            "query": _multi(req.query_params.items()),
            "headers": _multi(req.headers.items()),
            "host": req.host,
            "scheme": req.scheme,
            "http_version": req.http_version,
            "client_ip": req.client_ip,
            "request_id": req.request_id,
        }
        out["route"] = req.route
        return msgspec.json.encode(out)

    def on_request(self, req: Request) -> Response | None:
        trigger = self._trigger
        if trigger is not None and trigger not in req.headers and trigger not in req.query_params:
            return None
        headers = Headers()
        body = self._body
        if self.config.echo:
            body = self._echo(req)
        if body is not None:
            headers["content-type"] = "application/json" if self.config.echo else self._content_type
        for name, value in self._headers:
            headers[name] = value
        return Response(self.config.status, body, headers)
