"""Small, real HTTP/1.1 upstream servers for the integration tests.

An :class:`Upstream` is a threaded keep-alive HTTP/1.1 server on 127.0.0.1 that records every
request it received in full (method, target, headers in order, body length and CRC) and counts
the TCP connections it accepted. Each request can steer the answer with ``X-Up-*`` headers:

``X-Up-Sleep: SECONDS``  wait before answering (after the body was read)
``X-Up-Size: BYTES``     answer with a body of that many pattern bytes, streamed in 1 MiB writes
``X-Up-Status: CODE``    answer with that status
``X-Up-Hop: 1``          add hop-by-hop headers to the answer (they must not reach the client)
``X-Up-Drop: 1``         close the connection without answering
``X-Up-Cut: BYTES``      send the head and BYTES of the body, then reset the connection
``X-Up-Stall: BYTES``    send the head and BYTES of the body, then send nothing more

Without ``X-Up-Size`` the answer is a JSON document describing the request (see ``_describe``).
The same can be set for every request an upstream gets, while a test runs: ``status``,
``status_for`` (by path, e.g. a health check path), ``drop`` and ``sleep``.

``python upstreams.py NAME`` runs one upstream in its own process (it prints its port): see
:class:`UpstreamProcess`, for tests that kill a target the hard way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

CHUNK = bytes(range(256)) * 4096  # 1 MiB of a known pattern


def pattern_bytes(size: int) -> bytes:
    """The first ``size`` bytes of the pattern an upstream sends for ``X-Up-Size: size``."""
    reps = size // len(CHUNK) + 1
    return (CHUNK * reps)[:size]


def pattern_crc(size: int) -> int:
    """CRC32 of the pattern body of ``size`` bytes, computed without building it whole."""
    crc = 0
    full, rest = divmod(size, len(CHUNK))
    for _ in range(full):
        crc = zlib.crc32(CHUNK, crc)
    return zlib.crc32(CHUNK[:rest], crc)


@dataclass
class Received:
    """One request as the upstream saw it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    connection: int
    body_len: int = 0
    body_crc: int = 0
    body_head: bytes = b""
    chunked: bool = False

    def header(self, name: str) -> str | None:
        """All values of header ``name`` joined with ", " (None if absent)."""
        values = self.header_all(name)
        return ", ".join(values) if values else None

    def header_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def has_header(self, name: str) -> bool:
        return bool(self.header_all(name))

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 512
    upstream: Upstream

    def handle_error(self, request: object, client_address: object) -> None:
        # a peer that resets or drops a connection is part of several tests, not an error
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body go out in separate writes: without this, Nagle's algorithm and the
    # peer's delayed ACK add ~40 ms to every keep-alive response
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.conn_id = self.server.upstream._connection_opened(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.upstream._connection_closed(self.connection)

    def log_message(self, format: str, *args: object) -> None:
        pass

    # BaseHTTPRequestHandler calls do_<METHOD>; every method is handled the same way.
    def __getattr__(self, name: str) -> object:
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)

    def _read_body(self, rec: Received) -> None:
        crc = 0
        total = 0
        head = bytearray()

        def consume(left: int) -> None:
            nonlocal crc, total
            while left:
                data = self.rfile.read(min(left, 1 << 20))
                if not data:
                    raise ConnectionError("eof in body")
                left -= len(data)
                total += len(data)
                crc = zlib.crc32(data, crc)
                if len(head) < 65536:
                    head.extend(data[: 65536 - len(head)])

        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            rec.chunked = True
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("eof in chunk size")
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    # trailers until the empty line
                    while True:
                        t = self.rfile.readline(65537)
                        if t in (b"\r\n", b"\n", b""):
                            break
                    break
                consume(size)
                self.rfile.readline(3)
        else:
            consume(int(self.headers.get("Content-Length") or 0))
        rec.body_len = total
        rec.body_crc = crc
        rec.body_head = bytes(head)

    def _handle(self) -> None:
        up = self.server.upstream
        rec = Received(
            method=self.command,
            target=self.path,
            headers=list(self.headers.items()),
            connection=self.conn_id,
        )
        up._arrived(rec)
        try:
            self._read_body(rec)
        except (ConnectionError, ValueError, OSError):
            self.close_connection = True
            return
        up._received(rec)

        if rec.header("X-Up-Drop") or up.drop:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return

        sleep = float(rec.header("X-Up-Sleep") or up.sleep)
        if sleep > 0 and up._stop.wait(sleep):
            self.close_connection = True
            return

        status = int(rec.header("X-Up-Status") or up.status_for.get(rec.path) or up.status or 200)
        size_header = rec.header("X-Up-Size")
        if size_header is not None:
            size = int(size_header)
            ctype = "application/octet-stream"
            body = None
        else:
            body = json.dumps(self._describe(rec, up.name)).encode()
            size = len(body)
            ctype = "application/json"

        # 204 and 304 have no body (RFC 9110 15.3.5, 15.4.5), nor has a 204 a length.
        bodyless = status in (204, 304)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if status != 204:
            self.send_header("Content-Length", str(size))
        self.send_header("X-Upstream", up.name)
        if rec.header("X-Up-Hop"):
            self.send_header("Connection", "X-Custom-Hop, Upgrade")
            self.send_header("Keep-Alive", "timeout=5, max=100")
            self.send_header("Proxy-Connection", "keep-alive")
            self.send_header("Upgrade", "foo/1")
            self.send_header("X-Custom-Hop", "secret")
            self.send_header("X-End-To-End", "kept")
        self.end_headers()
        if bodyless:
            return
        cut, stall = rec.header("X-Up-Cut"), rec.header("X-Up-Stall")
        if cut is not None or stall is not None:
            self._send_part(body or pattern_bytes(size), int(cut or stall or 0), stall is not None)
            return
        if body is not None:
            self.wfile.write(body)
            return
        left = size
        while left:
            n = min(left, len(CHUNK))
            self.wfile.write(CHUNK if n == len(CHUNK) else CHUNK[:n])
            left -= n

    def _send_part(self, body: bytes, n: int, stall: bool) -> None:
        """Send the first ``n`` bytes of ``body``; then stall, or reset the connection."""
        self.wfile.write(body[:n])
        self.wfile.flush()
        self.close_connection = True
        if stall:
            self.server.upstream._stop.wait()
            return
        time.sleep(0.05)  # let the bytes leave before the reset
        # SO_LINGER with a zero timeout: close() sends a RST instead of a FIN
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    @staticmethod
    def _describe(rec: Received, name: str) -> dict[str, object]:
        headers: dict[str, list[str]] = {}
        for k, v in rec.headers:
            headers.setdefault(k.lower(), []).append(v)
        return {
            "upstream": name,
            "method": rec.method,
            "target": rec.target,
            "path": rec.path,
            "headers": headers,
            "body_len": rec.body_len,
            "body_crc": rec.body_crc,
            "connection": rec.connection,
        }


@dataclass
class Upstream:
    """A recording HTTP/1.1 upstream server on 127.0.0.1 (started on construction)."""

    name: str = "up"
    sleep: float = 0.0
    status: int | None = None
    status_for: dict[str, int] = field(default_factory=dict)
    drop: bool = False
    requests: list[Received] = field(default_factory=list)
    arrivals: list[Received] = field(default_factory=list)
    connections: int = 0
    open_connections: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._socks: set[socket.socket] = set()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.upstream = self
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"upstream-{self.name}",
            daemon=True,
        )
        self._thread.start()

    # -- addresses ---------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- what was received -------------------------------------------------------------------
    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def last(self) -> Received:
        with self._lock:
            assert self.requests, f"upstream {self.name} received no request"
            return self.requests[-1]

    def wait_for_arrivals(self, n: int, timeout: float = 5.0) -> None:
        """Block until ``n`` requests have arrived (headers read), or fail."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.arrivals) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"upstream {self.name}: {len(self.arrivals)} of {n} requests arrived"
                    )
                self._cond.wait(left)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.arrivals.clear()
            self.connections = 0

    # -- callbacks from handler threads -----------------------------------------------------
    def _connection_opened(self, sock: socket.socket) -> int:
        with self._lock:
            self.connections += 1
            self.open_connections += 1
            self._socks.add(sock)
            return self.connections

    def _connection_closed(self, sock: socket.socket) -> None:
        with self._lock:
            self.open_connections -= 1
            self._socks.discard(sock)

    def _arrived(self, rec: Received) -> None:
        with self._cond:
            self.arrivals.append(rec)
            self._cond.notify_all()

    def _received(self, rec: Received) -> None:
        with self._lock:
            self.requests.append(rec)

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)


class UpstreamFactory:
    """``make(name, sleep=0.0) -> Upstream``; remembers what it made to reset and close it."""

    def __init__(self) -> None:
        self.made: list[Upstream] = []

    def __call__(self, name: str = "up", **kwargs: Any) -> Upstream:
        up = Upstream(name, **kwargs)
        self.made.append(up)
        return up

    def reset_all(self) -> None:
        for up in self.made:
            up.reset()

    def close_all(self) -> None:
        for up in self.made:
            up.close()


class UpstreamProcess:
    """An :class:`Upstream` in its own process, to be killed with SIGKILL mid-test.

    It records nothing the test can read; the gateway's view (and the other targets') is
    what such tests look at.
    """

    def __init__(self, name: str = "up") -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, __file__, name],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=5)
            raise RuntimeError(f"upstream process {name} did not start")
        self.port = int(line)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL, by PID: its connections are reset, its port refuses connections."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=5)


def closed_port() -> int:
    """A loopback port that nothing listens on (connecting to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    # One upstream in this process (UpstreamProcess): print the port, serve until killed.
    # Buffered writes put each (small) response on the wire in one send, so a SIGKILL lands
    # before a response or after it, never between its head and its body: a response cut
    # after its head cannot be retried by any proxy, and the tests that kill this process
    # are about the failures a gateway can hide (refused connects, resets before a response).
    _Handler.wbufsize = -1
    server = Upstream(sys.argv[1] if len(sys.argv) > 1 else "up")
    print(server.port, flush=True)
    threading.Event().wait()
