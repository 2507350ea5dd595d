"""A real GraphQL server for the tests: graphql-core executes a small schema with nested
lists, served over HTTP/1.1 on 127.0.0.1; it records every request it receives."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from graphql import build_schema, graphql_sync

SDL = """
type Query {
  users(first: Int = 10): [User!]!
  user(id: ID!): User
  hello(name: String = "world"): String!
  secret: String!
}

type Mutation {
  addUser(name: String!): User!
}

type User {
  id: ID!
  name: String!
  friends(first: Int = 10): [User!]!
  posts(limit: Int): [Post!]!
}

type Post {
  id: ID!
  title: String!
}
"""

SCHEMA = build_schema(SDL)
NAMES = ["ada", "bob", "cyd", "dee", "eve", "fay", "gus", "hal"]


def _user(i: int) -> dict[str, Any]:
    def friends(_info: Any, first: int = 10) -> list[dict[str, Any]]:
        return [_user((i + k + 1) % len(NAMES)) for k in range(min(first, 3))]

    def posts(_info: Any, limit: int | None = None) -> list[dict[str, Any]]:
        return [{"id": f"{i}-{k}", "title": f"post {k}"} for k in range(min(limit or 2, 2))]

    return {"id": str(i), "name": NAMES[i], "friends": friends, "posts": posts}


ROOT: dict[str, Any] = {
    "users": lambda _info, first=10: [_user(i) for i in range(min(first, len(NAMES)))],
    "user": lambda _info, id: _user(int(id) % len(NAMES)),
    "hello": lambda _info, name="world": f"hello {name}",
    "secret": lambda _info: "the secret",
    "addUser": lambda _info, name: {**_user(0), "name": name},
}


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    body: dict[str, Any] | None
    headers: dict[str, str]

    @property
    def document(self) -> str | None:
        text = self.body.get("query") if self.body is not None else self.query.get("query")
        return text if isinstance(text, str) else None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _run(self, seen: Seen, params: dict[str, Any]) -> None:
        self.server.record(seen)
        result = graphql_sync(
            SCHEMA,
            params.get("query") or "",
            root_value=ROOT,
            variable_values=params.get("variables"),
            operation_name=params.get("operationName"),
        )
        out: dict[str, Any] = {"data": result.data}
        if result.errors:
            out["errors"] = [e.formatted for e in result.errors]
        self._answer(200, out)

    def _headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items()}

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        params: dict[str, Any] = dict(query)
        if "variables" in params:
            params["variables"] = json.loads(params["variables"])
        self._run(Seen("GET", url.path, query, None, self._headers()), params)

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length))
        url = urlsplit(self.path)
        self._run(Seen("POST", url.path, {}, body, self._headers()), body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[Seen] = []
        self.lock = threading.Lock()

    def record(self, seen: Seen) -> None:
        with self.lock:
            self.seen.append(seen)


class GraphQLUpstream:
    """Started on construction; ``close()`` stops it."""

    def __init__(self) -> None:
        self._server = _Server()
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def seen(self) -> list[Seen]:
        with self._server.lock:
            return list(self._server.seen)

    def last(self) -> Seen:
        seen = self.seen
        assert seen, "the GraphQL upstream received nothing"
        return seen[-1]

    def reset(self) -> None:
        with self._server.lock:
            self._server.seen.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
