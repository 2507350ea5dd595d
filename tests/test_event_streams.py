"""Server-sent event streams through the real gateway: heartbeats while a stream idles at an
event boundary (``sse_heartbeat``), and a client that leaves mid-stream closing the upstream
connection instead of letting it run on."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import GatewayFactory

PLUGINS_DIR = str(Path(__file__).parent / "routing_plugins")


class SseUpstream:
    """A raw HTTP/1.1 server answering every request with a chunked event stream: the
    ``script`` of ``(pause seconds, bytes)`` steps, then, if ``endless``, one event every 50
    ms until the connection breaks (not for the gateway's readiness probe). Records when each
    connection was seen closed."""

    def __init__(self, script: list[tuple[float, bytes]], endless: bool = False) -> None:
        self.script = script
        self.endless = endless
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.closed = 0
        self.sent_events = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                got = conn.recv(4096)
                if not got:
                    return
                head += got
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            for pause, data in self.script:
                time.sleep(pause)
                conn.sendall(b"%x\r\n%s\r\n" % (len(data), data))
            endless = self.endless and b"__ferrogate_probe__" not in head
            while endless and not self._stop.is_set():
                time.sleep(0.05)
                data = b"data: tick\n\n"
                conn.sendall(b"%x\r\n%s\r\n" % (len(data), data))
                with self._lock:
                    self.sent_events += 1
            conn.sendall(b"0\r\n\r\n")
            # Wait for the gateway to close or reuse the connection.
            conn.recv(1)
        except OSError:
            pass
        finally:
            with self._lock:
                self.closed += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture
def sse_upstreams() -> Iterator[list[SseUpstream]]:
    made: list[SseUpstream] = []
    yield made
    for up in made:
        up.close()


def sse_config(up: SseUpstream, **route: Any) -> dict[str, Any]:
    return {
        "plugins_dir": PLUGINS_DIR,
        "upstreams": {"a": {"targets": [up.address]}},
        "routes": [{"name": "events", "paths": ["/*"], "upstream": "a", **route}],
    }


def test_an_idle_stream_gets_pings_only_between_events(
    gateway: GatewayFactory, sse_upstreams: list[SseUpstream]
) -> None:
    up = SseUpstream(
        [
            (0.0, b"data: 1\n\n"),
            (0.7, b"data: 2\n"),  # an event cut in two, idle in the middle
            (0.7, b"\n"),
        ]
    )
    sse_upstreams.append(up)
    gw = gateway(sse_config(up, sse_heartbeat="200ms"), workers=1)
    with gw.client() as c, c.stream("GET", "/stream") as r:
        assert r.headers["content-type"] == "text/event-stream"
        body = b"".join(r.iter_raw())
    assert body.startswith(b"data: 1\n\n: ping\n\n")
    # never inside the cut event
    assert b"data: 2\n\n" in body
    assert body.replace(b": ping\n\n", b"") == b"data: 1\n\ndata: 2\n\n"

    # off by default; a stream with a length or another type is never touched
    gw2 = gateway(sse_config(up), workers=1)
    assert gw2.get("/stream").content == b"data: 1\n\ndata: 2\n\n"


def test_chunk_hooks_see_the_upstream_bytes_without_pings(
    gateway: GatewayFactory, sse_upstreams: list[SseUpstream]
) -> None:
    up = SseUpstream([(0.0, b"data: 1\n\n"), (0.6, b"data: 2\n\n")])
    sse_upstreams.append(up)
    plugins = [{"name": "t-route"}]
    gw = gateway(sse_config(up, sse_heartbeat="200ms", plugins=plugins), workers=1)
    with gw.client() as c, c.stream("GET", "/s", headers={"x-mode": "streamed"}) as r:
        body = b"".join(r.iter_raw())
    # the hook's mark follows the upstream's last bytes; the pings came after the hooks
    assert body.replace(b": ping\n\n", b"") == b"data: 1\n\ndata: 2\n\n|streamed"
    assert b": ping\n\n" in body


@pytest.mark.parametrize("plugins", [False, True], ids=["plain", "chunk-hooks"])
def test_a_client_leaving_mid_stream_closes_the_upstream_connection(
    gateway: GatewayFactory, sse_upstreams: list[SseUpstream], plugins: bool
) -> None:
    up = SseUpstream([(0.0, b"data: first\n\n")], endless=True)
    sse_upstreams.append(up)
    route: dict[str, Any] = {"plugins": [{"name": "t-route"}]} if plugins else {}
    gw = gateway(sse_config(up, **route), workers=1)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as client:
        mode = b"x-mode: streamed\r\n" if plugins else b""
        client.sendall(b"GET /s HTTP/1.1\r\nhost: gw\r\n" + mode + b"\r\n")
        got = b""
        while got.count(b"data: tick") < 3:
            chunk = client.recv(65536)
            assert chunk, "the gateway closed the stream"
            got += chunk
    deadline = time.monotonic() + 5
    while up.closed < up.accepted:
        assert time.monotonic() < deadline, "the upstream connection outlived the client"
        time.sleep(0.02)
    # and the stream stopped: no event is sent after the close was seen
    sent = up.sent_events
    time.sleep(0.2)
    assert up.sent_events == sent
