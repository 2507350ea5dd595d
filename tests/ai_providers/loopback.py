"""The HTTP/1.1 plumbing the provider test servers share: a threaded keep-alive server on
127.0.0.1 that records every request and lets each provider module build the answers.

A provider server subclasses :class:`ProviderServer` and implements ``answer``; it returns a
:class:`Reply` whose body is bytes (sent with Content-Length) or an iterator of bytes (sent
chunked, one chunk per item, flushed as produced: how the providers stream SSE).
Faults are queued with :meth:`ProviderServer.fail` and taken one per request, before the
request is validated; ``delay`` holds every answer back that many seconds.
"""

from __future__ import annotations

import json
import socketserver
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Recorded:
    """One request as the provider saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes | Iterator[bytes] = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Fault:
    status: int = 0
    """An error answer with this status (0: none)."""
    stream_error: bool = False
    """Stream normally for a while, then send the provider's error event."""
    retry_after: str | None = None


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    provider: ProviderServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        rec = Recorded(
            self.command,
            url.path,
            parse_qs(url.query),
            {k.lower(): v for k, v in self.headers.items()},
            body,
        )
        provider = self.server.provider
        with provider.lock:
            provider.requests.append(rec)
            fault = provider.faults.popleft() if provider.faults else Fault()
        if provider.delay:
            time.sleep(provider.delay)
        reply = provider.answer(rec, fault)
        self.send_response(reply.status)
        self.send_header("content-type", reply.content_type)
        for name, value in reply.headers:
            self.send_header(name, value)
        if isinstance(reply.body, bytes):
            self.send_header("content-length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
            return
        self.send_header("transfer-encoding", "chunked")
        self.send_header("cache-control", "no-cache")
        self.end_headers()
        for piece in reply.body:
            if piece:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
            if provider.stream_delay:
                time.sleep(provider.stream_delay)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class ProviderServer:
    """Base of the provider test servers (started on construction, ``close()`` to stop)."""

    def __init__(self, api_key: str = "test-key") -> None:
        self.api_key = api_key
        self.requests: list[Recorded] = []
        self.faults: deque[Fault] = deque()
        self.delay = 0.0
        self.stream_delay = 0.0
        """Pause after each streamed piece."""
        self.lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.provider = self
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(
        self,
        status: int = 0,
        times: int = 1,
        *,
        stream_error: bool = False,
        retry_after: str | None = None,
    ) -> None:
        """The next ``times`` requests get this fault."""
        with self.lock:
            for _ in range(times):
                self.faults.append(Fault(status, stream_error, retry_after))

    @property
    def last(self) -> Recorded:
        return self.requests[-1]

    def answer(self, rec: Recorded, fault: Fault) -> Reply:
        raise NotImplementedError

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ProviderServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def words(text: str) -> int:
    """The test servers' token count: whitespace-separated words."""
    return len(text.split())


def sample(schema: Any) -> Any:
    """A value following a JSON schema (the subset tools and response formats use)."""
    if not isinstance(schema, dict):
        return None
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = kind[0]
    if kind == "object" or "properties" in schema:
        return {k: sample(v) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [sample(schema.get("items") or {"type": "string"})]
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "x"
