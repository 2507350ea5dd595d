"""A real OAuth 2.0 authorization server for the tests, built with Authlib on Flask and
served by Werkzeug on a loopback port in a thread: a token endpoint (client_credentials,
HTTP Basic client authentication) and an RFC 7662 introspection endpoint that only the
gateway's client may call. Tokens are issued by the token endpoint or seeded by a test;
the server counts the introspection requests it answers.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer as FlaskAuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin, grants
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from flask import Flask, Response
from werkzeug.serving import make_server

ISSUER = "https://as.test"


@dataclass
class Client(ClientMixin):  # type: ignore[misc]
    client_id: str
    client_secret: str
    scope: str = ""

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        return None

    def get_allowed_scope(self, scope: str) -> str:
        allowed = set(self.scope.split())
        return " ".join(s for s in (scope or "").split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(self.client_secret, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "client_secret_basic"

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials"


@dataclass
class Token(TokenMixin):  # type: ignore[misc]
    access_token: str
    client_id: str
    scope: str
    issued_at: int
    expires_in: int
    username: str | None = None
    revoked: bool = False

    def check_client(self, client: Client) -> bool:
        return client.client_id == self.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_expired(self) -> bool:
        return self.issued_at + self.expires_in <= time.time()

    def is_revoked(self) -> bool:
        return self.revoked


class AuthServer:
    """The authorization server; ``url`` is its base. Clients: ``gateway`` (may introspect)
    and ``reporting`` (client_credentials, scopes ``reports:read reports:write``)."""

    GATEWAY = Client("gateway", "gw-secret-7c1d")
    REPORTING = Client("reporting", "rep-secret-33a0", "reports:read reports:write")

    def __init__(self) -> None:
        self.clients = {c.client_id: c for c in (self.GATEWAY, self.REPORTING)}
        self.tokens: dict[str, Token] = {}
        self.introspections = 0
        self.delay = 0.0
        """Seconds each introspection waits before answering."""
        self.fail_with: int | None = None
        """A status to answer introspections with instead (e.g. 500)."""
        self._lock = threading.Lock()
        app = Flask("authorization-server")
        server = FlaskAuthorizationServer(app, self.clients.get, self._save_token)
        server.register_grant(grants.ClientCredentialsGrant)
        owner = self

        class Introspection(IntrospectionEndpoint):  # type: ignore[misc]
            def query_token(self, token: str, hint: str | None) -> Token | None:
                return owner.tokens.get(token)

            def check_permission(self, token: Token, client: Client, request: Any) -> bool:
                return bool(client.client_id == "gateway")

            def introspect_token(self, token: Token) -> dict[str, Any]:
                return {
                    "active": True,
                    "client_id": token.client_id,
                    "token_type": "Bearer",
                    "username": token.username,
                    "scope": token.scope,
                    "sub": token.username or token.client_id,
                    "aud": "orders-api",
                    "iss": ISSUER,
                    "exp": token.issued_at + token.expires_in,
                    "iat": token.issued_at,
                }

        server.register_endpoint(Introspection)

        @app.post("/token")
        def token() -> Response:
            return server.create_token_response()  # type: ignore[no-any-return]

        @app.post("/introspect")
        def introspect() -> Response:
            with self._lock:
                self.introspections += 1
            if self.delay:
                time.sleep(self.delay)
            if self.fail_with is not None:
                return Response("unavailable", status=self.fail_with)
            return server.create_endpoint_response("introspection")  # type: ignore[no-any-return]

        self._http = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self._http.server_port}"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    def _save_token(self, token: dict[str, Any], request: Any) -> None:
        self.tokens[token["access_token"]] = Token(
            token["access_token"],
            request.client.client_id,
            token.get("scope", ""),
            int(time.time()),
            int(token["expires_in"]),
        )

    def seed(self, username: str, scope: str = "", expires_in: int = 3600) -> str:
        """A token for ``username`` issued to the gateway's client, stored as if issued."""
        value = secrets.token_urlsafe(24)
        self.tokens[value] = Token(value, "gateway", scope, int(time.time()), expires_in, username)
        return value

    def count(self) -> int:
        with self._lock:
            return self.introspections

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)
