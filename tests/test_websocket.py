"""WebSocket proxying: a real websockets server behind the gateway and real clients in front
(HTTP/1.1 Upgrade, and RFC 8441 extended CONNECT over h2c driven with the h2 library)."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close, Frame, Opcode
from websockets.sync.client import connect
from websockets.sync.server import Server, ServerConnection, serve

from certs import CA
from gateway import GatewayFactory, free_port

KEY = "ws-secret-key-1234"


@dataclass
class Session:
    path: str
    headers: dict[str, str]
    received: list[str | bytes] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    ended: threading.Event = field(default_factory=threading.Event)


class WsUpstream:
    """A websockets server: /echo echoes, "close-me" asks it to close with 4001, /silent
    never answers."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.sessions: list[Session] = []
        self.lock = threading.Lock()
        self.server: Server = serve(self.handle, "127.0.0.1", 0, max_size=None, ssl=tls)
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        session = Session(
            ws.request.path, {k.lower(): v for k, v in ws.request.headers.raw_items()}
        )
        with self.lock:
            self.sessions.append(session)
        try:
            for message in ws:
                session.received.append(message)
                if message == "close-me":
                    ws.close(4001, "upstream says bye")
                    break
                if not ws.request.path.startswith("/silent"):
                    ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            rcvd = ws.protocol.close_rcvd
            session.close_code = rcvd.code if rcvd else None
            session.close_reason = rcvd.reason if rcvd else None
            session.ended.set()

    def wait_session(self, n: int = 1, timeout: float = 5.0) -> Session:
        deadline = time.monotonic() + timeout
        while len(self.sessions) < n:
            assert time.monotonic() < deadline, f"{len(self.sessions)} sessions, expected {n}"
            time.sleep(0.01)
        return self.sessions[n - 1]

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)


@pytest.fixture
def ws_upstream() -> Iterator[WsUpstream]:
    up = WsUpstream()
    yield up
    up.close()


def config(up: WsUpstream, **route: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "ws", "paths": ["/*"], "upstream": "b", "websocket": True}
    base.update(route)
    return {"upstreams": {"b": {"targets": [up.address]}}, "routes": [base]}


def ws_url(gw: Any, path: str) -> str:
    return f"ws://{gw.address}{path}"


def test_messages_both_ways_and_a_large_one(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    gw = gateway(config(ws_upstream), workers=1)
    big = bytes(range(256)) * 8192  # 2 MiB, many TCP segments and reads
    with connect(ws_url(gw, "/echo?room=1"), max_size=None, open_timeout=5) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        ws.send(b"\x00\x01binary\xff")
        assert ws.recv(timeout=5) == b"\x00\x01binary\xff"
        ws.send(big)
        assert ws.recv(timeout=10) == big
        assert ws.response is not None
        assert ws.response.status_code == 101
        assert ws.response.headers["x-request-id"]
    session = ws_upstream.wait_session()
    assert session.path == "/echo?room=1"
    assert session.headers["upgrade"].lower() == "websocket"
    assert session.headers["x-forwarded-for"] == "127.0.0.1"
    assert session.received == ["hello", b"\x00\x01binary\xff", big]
    # the client's close reached the upstream with its code
    assert session.ended.wait(5)
    assert session.close_code == 1000


def test_close_codes_pass_through_both_ways(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    gw = gateway(config(ws_upstream), workers=1)
    with connect(ws_url(gw, "/echo"), open_timeout=5) as ws:
        ws.send("close-me")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "upstream says bye")

    with connect(ws_url(gw, "/echo"), open_timeout=5) as ws:
        ws.send("x")
        assert ws.recv(timeout=5) == "x"
        ws.close(4002, "client leaves")
    session = ws_upstream.wait_session(2)
    assert session.ended.wait(5)
    assert (session.close_code, session.close_reason) == (4002, "client leaves")


def test_key_auth_refuses_the_handshake_before_the_upstream(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    cfg = config(ws_upstream, plugins=[{"name": "key-auth"}])
    cfg["consumers"] = {"alice": {"credentials": [{"type": "key-auth", "key": KEY}]}}
    gw = gateway(cfg, workers=1)
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(gw, "/echo"), open_timeout=5)
    assert refused.value.response.status_code == 401
    assert ws_upstream.sessions == []
    with connect(ws_url(gw, "/echo"), additional_headers={"apikey": KEY}, open_timeout=5) as ws:
        ws.send("authorized")
        assert ws.recv(timeout=5) == "authorized"
    assert ws_upstream.wait_session().headers.get("x-consumer-username") == "alice"


def test_a_rate_limit_refuses_the_handshake(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    cfg = config(ws_upstream, rate_limits=[{"limit": 1, "per": "1m"}], paths=["/ws/*"])
    gw = gateway(cfg, workers=1)
    with connect(ws_url(gw, "/ws/a"), open_timeout=5) as ws:
        ws.send("first")
        assert ws.recv(timeout=5) == "first"
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(gw, "/ws/b"), open_timeout=5)
    response = refused.value.response
    assert response.status_code == 429
    assert json.loads(response.body or b"{}")["error"]["code"] == "rate_limited"
    assert len(ws_upstream.sessions) == 1


def test_idle_sessions_are_closed_with_1001_on_both_sides(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    gw = gateway(config(ws_upstream, websocket_idle="500ms"), workers=1)
    with connect(ws_url(gw, "/silent"), open_timeout=5) as ws:
        ws.send("anyone?")
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        waited = time.monotonic() - started
    assert 0.4 < waited < 4, waited
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    session = ws_upstream.wait_session()
    assert session.ended.wait(5)
    assert session.received == ["anyone?"]
    assert session.close_code == 1001


def test_sigterm_closes_sessions_with_1001_on_both_sides_and_waits_for_them(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    cfg = config(ws_upstream)
    cfg["grace_period"] = "10s"
    gw = gateway(cfg, workers=1)
    with connect(ws_url(gw, "/echo"), open_timeout=5) as ws:
        ws.send("before")
        assert ws.recv(timeout=5) == "before"
        started = time.monotonic()
        gw.signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=9)
        # At the next frame boundary, not at the end of the grace period.
        assert time.monotonic() - started < 3
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "gateway shutting down")
    session = ws_upstream.wait_session()
    assert session.ended.wait(5)
    assert session.close_code == 1001
    assert gw.proc is not None and gw.proc.wait(timeout=10) == 0
    stopped = [
        json.loads(line) for line in gw.stderr_text().splitlines() if "worker_stopped" in line
    ]
    assert len(stopped) == 1, gw.stderr_text()
    assert stopped[0]["websocket_sessions"] == 1
    assert stopped[0]["drained"] is True


def test_activity_keeps_a_session_open_past_the_idle_limit(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    gw = gateway(config(ws_upstream, websocket_idle="600ms"), workers=1)
    with connect(ws_url(gw, "/echo"), open_timeout=5) as ws:
        deadline = time.monotonic() + 1.5
        n = 0
        while time.monotonic() < deadline:
            ws.send(str(n))
            assert ws.recv(timeout=5) == str(n)
            n += 1
            time.sleep(0.15)


def test_a_route_without_websocket_does_not_upgrade(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    gw = gateway(config(ws_upstream, websocket=False), workers=1)
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(gw, "/echo"), open_timeout=5)
    # Upgrade is a hop-by-hop header: the upstream saw a plain GET and refused it itself.
    assert refused.value.response.status_code == 426
    assert ws_upstream.sessions == []


def test_many_concurrent_sessions(gateway: GatewayFactory, ws_upstream: WsUpstream) -> None:
    gw = gateway(config(ws_upstream), workers=2)

    def talk(i: int) -> list[str | bytes]:
        got = []
        with connect(ws_url(gw, f"/echo/{i}"), open_timeout=10) as ws:
            for j in range(5):
                ws.send(f"{i}:{j}")
                got.append(ws.recv(timeout=10))
        return got

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(talk, range(50)))
    assert results == [[f"{i}:{j}" for j in range(5)] for i in range(50)]
    assert len(ws_upstream.sessions) == 50


def test_the_session_is_logged_when_it_ends(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    cfg = config(ws_upstream)
    cfg["access_log"] = {
        "path": "access.log",
        "fields": ["request_id", "path", "status", "bytes_in", "bytes_out", "duration"],
    }
    gw = gateway(cfg, workers=1)
    log = Path(gw.dir) / "access.log"
    # no permessage-deflate: the frames keep their size
    with connect(ws_url(gw, "/echo"), open_timeout=5, compression=None) as ws:
        assert ws.response is not None
        request_id = ws.response.headers["x-request-id"]
        ws.send("x" * 1000)
        assert ws.recv(timeout=5) == "x" * 1000
        time.sleep(0.3)
        # still open: not logged yet
        assert not log.exists() or request_id not in log.read_text()
    deadline = time.monotonic() + 5
    lines: list[dict[str, Any]] = []
    while not lines:
        assert time.monotonic() < deadline, "the session was never logged"
        text = log.read_text() if log.exists() else ""
        lines = [json.loads(line) for line in text.splitlines() if request_id in line]
        time.sleep(0.02)
    (line,) = lines
    assert line["status"] == 101
    assert line["duration"] >= 0.3
    # a 1000-byte text frame each way, plus framing and the close frames
    assert 1000 < line["bytes_in"] < 1100
    assert 1000 < line["bytes_out"] < 1100


def h2_extended_connect(
    port: int, path: str, headers: list[tuple[str, str]] | None = None
) -> tuple[socket.socket, h2.connection.H2Connection, int, int]:
    """Open an RFC 8441 WebSocket stream over h2c; returns the socket, the connection, the
    stream id and the response status."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    enabled = False
    deadline = time.monotonic() + 5
    while not enabled:
        assert time.monotonic() < deadline, "the server never enabled extended CONNECT"
        for event in conn.receive_data(sock.recv(65536)):
            if isinstance(event, h2.events.RemoteSettingsChanged):
                setting = event.changed_settings.get(
                    h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL
                )
                enabled = enabled or (setting is not None and setting.new_value == 1)
        sock.sendall(conn.data_to_send())
    stream = conn.get_next_available_stream_id()
    conn.send_headers(
        stream,
        [
            (":method", "CONNECT"),
            (":protocol", "websocket"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"127.0.0.1:{port}"),
            ("sec-websocket-version", "13"),
            *(headers or []),
        ],
    )
    sock.sendall(conn.data_to_send())
    while True:
        for event in conn.receive_data(sock.recv(65536)):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
                sock.sendall(conn.data_to_send())
                return sock, conn, stream, status
        sock.sendall(conn.data_to_send())


def h2_read_frame(sock: socket.socket, conn: h2.connection.H2Connection, stream: int) -> bytes:
    data = b""
    while True:
        for event in conn.receive_data(sock.recv(65536)):
            if isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                conn.acknowledge_received_data(event.flow_controlled_length, stream)
                data += event.data
        sock.sendall(conn.data_to_send())
        if data:
            return data


def test_websocket_over_http2_extended_connect(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    gw = gateway(config(ws_upstream), workers=1)
    sock, conn, stream, status = h2_extended_connect(gw.port, "/echo/h2")
    with sock:
        assert status == 200
        # a masked client text frame, as a WebSocket client would send it
        frame = Frame(Opcode.TEXT, b"over h2")
        conn.send_data(stream, frame.serialize(mask=True, extensions=[]))
        sock.sendall(conn.data_to_send())
        echoed = h2_read_frame(sock, conn, stream)
        assert echoed[0] == 0x81 and echoed[2:] == b"over h2"
        closing = Frame(Opcode.CLOSE, Close(4003, "h2 done").serialize())
        conn.send_data(stream, closing.serialize(mask=True, extensions=[]))
        sock.sendall(conn.data_to_send())
        reply = h2_read_frame(sock, conn, stream)
        assert reply[0] == 0x88
    session = ws_upstream.wait_session()
    assert session.path == "/echo/h2"
    assert session.received == ["over h2"]
    assert session.ended.wait(5)
    assert (session.close_code, session.close_reason) == (4003, "h2 done")


def test_an_http2_websocket_session_is_not_an_idle_connection(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    # The connection's idle timeout counts only while no stream is open: the session's
    # stream stays open however long its silences (its own limit is `websocket_idle`).
    cfg = config(ws_upstream)
    cfg["timeouts"] = {"client_idle": "1s"}
    gw = gateway(cfg, workers=1)
    sock, conn, stream, status = h2_extended_connect(gw.port, "/echo/quiet")
    with sock:
        assert status == 200
        time.sleep(2.5)
        frame = Frame(Opcode.TEXT, b"still here")
        conn.send_data(stream, frame.serialize(mask=True, extensions=[]))
        sock.sendall(conn.data_to_send())
        echoed = h2_read_frame(sock, conn, stream)
        assert echoed[0] == 0x81 and echoed[2:] == b"still here"
    assert ws_upstream.wait_session().received == ["still here"]


def test_extended_connect_on_a_route_without_websocket_is_refused(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    gw = gateway(config(ws_upstream, websocket=False), workers=1)
    sock, _, _, status = h2_extended_connect(gw.port, "/echo")
    sock.close()
    assert status == 400
    assert ws_upstream.sessions == []


def test_wss_through_a_tls_listener_to_a_tls_upstream(
    gateway: GatewayFactory, tmp_path: Path
) -> None:
    ca = CA("websocket test CA")
    ca_file = ca.write(tmp_path / "ca.pem")
    cert, key = ca.issue("CN=localhost", dns=["localhost"]).write(tmp_path, "localhost")
    upstream_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    upstream_tls.load_cert_chain(cert, key)
    up = WsUpstream(upstream_tls)
    try:
        port = free_port()
        cfg = {
            "tls": {
                "listen": [f"127.0.0.1:{port}"],
                "certificates": [{"cert": str(cert), "key": str(key)}],
            },
            "upstreams": {"b": {"targets": [f"localhost:{up.port}"], "tls": {"ca": str(ca_file)}}},
            "routes": [{"paths": ["/*"], "upstream": "b", "websocket": True}],
        }
        gw = gateway(cfg, workers=1)
        assert gw.port != port
        client_tls = ssl.create_default_context(cafile=str(ca_file))
        with connect(f"wss://localhost:{port}/echo", ssl=client_tls, open_timeout=5) as ws:
            for message in ["over tls", b"\x01" * 100_000]:
                ws.send(message)
                assert ws.recv(timeout=5) == message
            ws.close(4005, "tls bye")
        session = up.wait_session()
        assert session.headers["x-forwarded-proto"] == "https"
        assert session.ended.wait(5)
        assert (session.close_code, session.close_reason) == (4005, "tls bye")
    finally:
        up.close()
