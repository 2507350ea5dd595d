"""The status listener: a small HTTP server in the master, on its own address (never the
proxy port), for /metrics, the analytics API, alerts and the dashboard.

Low traffic by design (scrapes, an operator's browser), so it runs on threads of the
standard library's server; handlers read state the master keeps (worker metric snapshots,
the analytics store), never the workers directly.

Paths are registered by the modules that own them (``Route``); those marked ``auth`` need
the admin token, as ``Authorization: Bearer <token>`` or the ``ferrogate_token`` cookie
that the dashboard's login form sets.
"""

import hmac
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ferrogate.addresses import split_host_port
from ferrogate.events import emit

__all__ = ["Reply", "Request", "Route", "StatusServer", "json_reply"]

TOKEN_COOKIE = "ferrogate_token"


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes
    authorized: bool = False
    """The request carried the admin token (for routes that check it themselves)."""


@dataclass(slots=True)
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(value: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(value, separators=(",", ":")).encode() + b"\n")


def error_reply(status: int, code: str, message: str) -> Reply:
    return json_reply({"error": {"code": code, "message": message}}, status)


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    handler: Callable[[Request], Reply]
    auth: bool = True
    methods: tuple[str, ...] = ("GET",)
    prefix: bool = False
    """Match every path under ``path`` too."""


class StatusServer:
    """Serves registered routes on ``listen`` until ``stop``."""

    def __init__(self, listen: str, admin_token: str | None, routes: list[Route]) -> None:
        self.listen = listen
        self.admin_token = admin_token
        self.routes = list(routes)
        self.metrics_need_token = False
        host, port = split_host_port(listen, allow_port_zero=True)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "ferrogate-status"

            def log_message(self, format: str, *args: object) -> None:
                pass  # requests here are not the proxy's traffic; no access log

            def _serve(self) -> None:
                server.serve_one(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve

        self.httpd = ThreadingHTTPServer((host.strip("[]"), port), Handler)
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]  # type: ignore[return-value]

    def start(self) -> None:
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="status-listener", daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def set_token(self, token: str | None, metrics_need_token: bool) -> None:
        self.admin_token = token
        self.metrics_need_token = metrics_need_token

    def add(self, route: Route) -> None:
        self.routes = [r for r in self.routes if r.path != route.path] + [route]

    def _find(self, path: str) -> Route | None:
        for r in self.routes:
            if path == r.path or (r.prefix and path.startswith(r.path.rstrip("/") + "/")):
                return r
        return None

    def authorized(self, headers: Mapping[str, str]) -> bool:
        token = self.admin_token
        if not token:
            return False
        given = ""
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        else:
            cookie = SimpleCookie()
            try:
                cookie.load(headers.get("cookie", ""))
            except Exception:  # a malformed cookie header is just no token
                cookie = SimpleCookie()
            if TOKEN_COOKIE in cookie:
                given = cookie[TOKEN_COOKIE].value
        return hmac.compare_digest(given.encode(), token.encode())

    def serve_one(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        headers = {k.lower(): v for k, v in h.headers.items()}
        length = int(headers.get("content-length") or 0)
        body = h.rfile.read(min(length, 1 << 20)) if length else b""
        req = Request(h.command, url.path, query, headers, body, self.authorized(headers))
        route = self._find(url.path)
        if route is None:
            reply = error_reply(404, "not_found", f"nothing at {url.path}")
        elif req.method not in route.methods and not (
            req.method == "HEAD" and "GET" in route.methods
        ):
            reply = error_reply(405, "method_not_allowed", f"{req.method} is not allowed here")
        elif (route.auth or (route.path == "/metrics" and self.metrics_need_token)) and (
            not self.authorized(headers)
        ):
            if not self.admin_token:
                reply = error_reply(
                    403, "no_admin_token", "set status.admin_token in the config to use this"
                )
            else:
                reply = error_reply(401, "unauthorized", "a valid admin token is needed")
                reply.headers["WWW-Authenticate"] = 'Bearer realm="ferrogate"'
        else:
            try:
                reply = route.handler(req)
            except Exception as e:
                emit("error", "status_handler_failed", path=url.path, error=repr(e))
                reply = error_reply(500, "internal", "the status listener failed; see the log")
        data = reply.body if req.method != "HEAD" else b""
        h.send_response(reply.status)
        h.send_header("Content-Type", reply.content_type)
        h.send_header("Content-Length", str(len(reply.body)))
        h.send_header("Cache-Control", "no-store")
        for k, v in reply.headers.items():
            h.send_header(k, v)
        h.end_headers()
        if data:
            h.wfile.write(data)
