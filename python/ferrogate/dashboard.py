"""The dashboard page on the status listener.

``/dashboard`` is one static page (``dashboard_static/``, shipped in the package: the page
makes no request outside the status listener) whose script reads the analytics and alerts
APIs with the admin token. Browsers carry the token as the ``ferrogate_token`` cookie
(HttpOnly, SameSite=Strict), which the login form sets: a page without a valid token is
the login form, never the data.
"""

from __future__ import annotations

import hmac
import html
from http.cookies import SimpleCookie
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from ferrogate.status_server import TOKEN_COOKIE, Reply, Request, Route

__all__ = ["Dashboard"]

PAGE = "/dashboard"
STATIC = "/dashboard/static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The page and its script come only from the status listener; nothing inline runs.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def _assets() -> dict[str, tuple[bytes, str]]:
    """Every file of ``dashboard_static/`` by name, read once: the set served is fixed."""
    out = {}
    for entry in resources.files("ferrogate").joinpath("dashboard_static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in CONTENT_TYPES:
            out[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    return out


def _cookie(value: str, max_age: int | None = None) -> str:
    c: SimpleCookie = SimpleCookie()
    c[TOKEN_COOKIE] = value
    morsel = c[TOKEN_COOKIE]
    morsel["httponly"] = True
    morsel["samesite"] = "Strict"
    morsel["path"] = "/"
    if max_age is not None:
        morsel["max-age"] = max_age
    return morsel.OutputString()


class Dashboard:
    def __init__(self, normalized: dict[str, Any]) -> None:
        self.assets = _assets()
        self.token: str | None = None
        self.reconfigure(normalized)

    def routes(self) -> list[Route]:
        # auth=False: these answer the login form rather than a bare 401
        return [
            Route(PAGE, self._page, auth=False),
            Route(PAGE + "/", self._page, auth=False),
            Route(PAGE + "/login", self._login, auth=False, methods=("POST",)),
            Route(PAGE + "/logout", self._logout, auth=False, methods=("POST",)),
            Route(STATIC, self._static, auth=False, prefix=True),
        ]

    def reconfigure(self, normalized: dict[str, Any]) -> None:
        status = normalized.get("status") or {}
        self.token = status.get("admin_token")

    def worker_exited(self, worker_id: int) -> None:
        pass

    def stop(self) -> None:
        pass

    # -- handlers ------------------------------------------------------------------------------
    def _page(self, req: Request) -> Reply:
        if req.authorized:
            return self._html(200, self.assets["index.html"][0])
        if not self.token:
            return self._login_page(
                403, "Set status.admin_token in the config to use the dashboard."
            )
        # a cookie that is no longer good (the token changed): say so, and drop it
        stale = TOKEN_COOKIE in req.headers.get("cookie", "")
        reply = self._login_page(401, "That token is no longer valid." if stale else "")
        if stale:
            reply.headers["Set-Cookie"] = _cookie("", max_age=0)
        return reply

    def _login(self, req: Request) -> Reply:
        form = parse_qs(req.body.decode("utf-8", "replace"), max_num_fields=10)
        given = (form.get("token") or [""])[-1].strip()
        token = self.token
        if not token:
            return self._login_page(
                403, "Set status.admin_token in the config to use the dashboard."
            )
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            return self._login_page(401, "That token was not accepted.")
        return Reply(303, b"", "text/plain", {"Location": PAGE, "Set-Cookie": _cookie(given)})

    def _logout(self, req: Request) -> Reply:
        return Reply(303, b"", "text/plain", {"Location": PAGE, "Set-Cookie": _cookie("", 0)})

    def _static(self, req: Request) -> Reply:
        name = req.path[len(STATIC) + 1 :]
        asset = self.assets.get(name)
        if asset is None or name.endswith(".html"):
            return Reply(404, b"not found\n", "text/plain")
        body, content_type = asset
        return Reply(200, body, content_type, dict(SECURITY_HEADERS))

    # -- pages ---------------------------------------------------------------------------------
    def _html(self, status: int, body: bytes) -> Reply:
        return Reply(status, body, CONTENT_TYPES[".html"], dict(SECURITY_HEADERS))

    def _login_page(self, status: int, notice: str) -> Reply:
        page = self.assets["login.html"][0].decode()
        if notice:
            page = page.replace(
                "<!--notice-->", f'<p class="notice" role="alert">{html.escape(notice)}</p>'
            )
        reply = self._html(status, page.encode())
        if status == 401:
            reply.headers["WWW-Authenticate"] = 'Bearer realm="ferrogate"'
        return reply
