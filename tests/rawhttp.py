"""HTTP/1.1 over a plain socket: exact bytes out, a parsed response back.

Used where a normal client would refuse or normalize what we want to send (malformed or
ambiguous requests, hop-by-hop headers, ``Expect: 100-continue``).
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes
    closed: bool = False
    interim: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    def json(self) -> object:
        return json.loads(self.body)


class RawConnection:
    """One client connection to ``127.0.0.1:port``."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.eof = False

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"connection closed; got {self.buf!r}")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError(f"connection closed after {len(self.buf)} of {n} bytes")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_head(self) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Read one status line and header block (an interim 1xx response included)."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"connection closed before a response head; got {self.buf!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        parts = lines[0].decode("latin-1").split(" ", 2)
        assert parts[0].startswith("HTTP/1."), f"not an HTTP/1 status line: {lines[0]!r}"
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        headers = []
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        return status, reason, headers, head

    def read_response(self, *, method: str = "GET") -> RawResponse:
        """Read the next final response (skipping 1xx interim responses)."""
        interim: list[int] = []
        while True:
            status, reason, headers, head = self.read_head()
            if 100 <= status < 200 and status != 101:
                interim.append(status)
                continue
            break
        resp = RawResponse(status, reason, headers, b"", head, interim=interim)
        te = (resp.header("transfer-encoding") or "").lower()
        cl = resp.header("content-length")
        if method == "HEAD" or status in (204, 304):
            return resp
        if "chunked" in te:
            body = b""
            while True:
                size = int(self._read_line().split(b";")[0], 16)
                if size == 0:
                    while self._read_line():
                        pass
                    break
                body += self._read_exact(size)
                self._read_exact(2)
            resp.body = body
        elif cl is not None:
            resp.body = self._read_exact(int(cl.split(",")[0]))
        else:
            while self._fill():
                pass
            resp.body, self.buf = self.buf, b""
            resp.closed = True
        return resp

    def is_closed(self, timeout: float = 3.0) -> bool:
        """True if the peer closes the connection within ``timeout`` without sending more."""
        if self.eof:
            return True
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    data = self.sock.recv(65536)
                except ConnectionResetError:
                    return True
                if not data:
                    return True
                self.buf += data
            return False
        except TimeoutError:
            return False


def exchange(port: int, data: bytes, *, method: str = "GET") -> tuple[RawResponse, bool]:
    """Send ``data``, read one response, and report whether the server then closed."""
    with RawConnection(port) as conn:
        conn.send(data)
        resp = conn.read_response(method=method)
        closed = resp.closed or conn.is_closed()
        return resp, closed
