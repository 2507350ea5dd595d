"""Slowloris defences: connections per client address, the request head deadline and the
request body stall timeout; ordinary clients are not hurt by any of them."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from gateway import Gateway, GatewayFactory
from rawhttp import RawConnection
from upstreams import Upstream

GET = b"GET /x HTTP/1.1\r\nHost: gw.test\r\n\r\n"


def connect(gw: Gateway, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", gw.port))
    return s


def closed_within(s: socket.socket, seconds: float) -> bool:
    """True if the server closes ``s`` within ``seconds`` (whatever it sent before)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            if not s.recv(65536):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    return False


def served(s: socket.socket) -> bool:
    """Send one request on ``s``; True if a 200 comes back."""
    try:
        s.sendall(GET)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                return False
            body += chunk
        return head.startswith(b"HTTP/1.1 200")
    except OSError:
        return False


@contextlib.contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for s in opened:
            s.close()


def test_one_address_cannot_hold_more_connections_than_the_limit(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(
        {
            "limits": {"max_connections_per_ip": 3},
            "timeouts": {"client_header": "20s"},
            "routes": [{"paths": ["/*"], "upstream": upstream.url}],
        },
        workers=1,
    )
    with sockets() as idle:
        # Two idle connections and one in keep-alive use fill the address's share. The
        # worker may not have seen the startup probe's connection close yet (it counts
        # until then): try again until it has.
        deadline = time.monotonic() + 5
        while True:
            trio = [connect(gw), connect(gw), connect(gw)]
            busy = trio[2]
            if served(busy):
                idle += trio
                break
            for s in trio:
                s.close()
            assert time.monotonic() < deadline, "the probe's place was never given back"
            time.sleep(0.05)
        over = connect(gw)
        idle.append(over)
        assert closed_within(over, 5)
        # Another client (127.0.0.2 is loopback too) is served meanwhile, and so are the
        # connections already admitted.
        other = connect(gw, "127.0.0.2")
        idle.append(other)
        assert served(other)
        assert served(busy)
        # A closed connection frees its place.
        idle[0].close()
        deadline = time.monotonic() + 5
        while True:
            again = connect(gw)
            idle.append(again)
            if served(again):
                break
            assert time.monotonic() < deadline, "the freed place was not given back"
            time.sleep(0.05)


SLOW_HEAD = b"GET /x HTTP/1.1\r\nHost: gw.test\r\nX-Pad: " + b"a" * 40 + b"\r\n\r\n"


def cut_off_after(s: socket.socket, started: float) -> float | None:
    """Send a head byte by byte, 0.25 s apart; the seconds from ``started`` until the server
    closed the connection, or None if it never did."""
    for b in SLOW_HEAD:
        try:
            s.sendall(bytes([b]))
        except OSError:
            return time.monotonic() - started
        if closed_within(s, 0.25):
            return time.monotonic() - started
    return None


def header_timeout_gateway(gateway: GatewayFactory, upstream: Upstream) -> Gateway:
    """One worker with a 1 s header timeout and a 30 s idle timeout."""
    return gateway(
        {
            "timeouts": {"client_header": "1s", "client_idle": "30s"},
            "routes": [{"paths": ["/*"], "upstream": upstream.url}],
        },
        workers=1,
    )


def test_a_head_sent_byte_by_byte_is_cut_off_at_the_header_timeout(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = header_timeout_gateway(gateway, upstream)
    normal = connect(gw)
    assert served(normal)
    started = time.monotonic()
    slow = connect(gw)
    with slow, normal:
        cut = cut_off_after(slow, started)
        assert cut is not None, "the slow head was never cut off"
        # The deadline counts from the connection's opening: about 1s, not 1s of silence.
        assert 0.7 < cut < 3.0, cut
        assert upstream.count == 1
        # Idle keep-alive time is not head time: the normal client, idle for longer than
        # the header timeout, is still served.
        time.sleep(1.3)
        assert served(normal)


def test_a_slow_head_on_a_kept_alive_connection_counts_from_its_first_byte(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = header_timeout_gateway(gateway, upstream)
    with connect(gw) as conn:
        assert served(conn)
        # Idle for longer than the header timeout: that time is not the next head's.
        time.sleep(1.3)
        cut = cut_off_after(conn, time.monotonic())
        assert cut is not None, "the slow head was never cut off"
        assert 0.7 < cut < 3.0, cut
        assert upstream.count == 1


def test_a_silent_connection_is_closed_at_the_header_timeout(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(
        {
            "timeouts": {"client_header": "1s"},
            "routes": [{"paths": ["/*"], "upstream": upstream.url}],
        },
        workers=1,
    )
    with connect(gw) as silent:
        started = time.monotonic()
        assert closed_within(silent, 5)
        assert 0.7 < time.monotonic() - started < 3.0


@pytest.mark.parametrize("chunked", [False, True])
def test_a_stalled_body_is_cut_off_and_a_slow_steady_one_is_not(
    gateway: GatewayFactory, upstream: Upstream, chunked: bool
) -> None:
    gw = gateway(
        {
            "timeouts": {"client_body": "1s"},
            "routes": [{"paths": ["/*"], "upstream": upstream.url}],
        },
        workers=1,
    )
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: 12"

    def piece(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data) if chunked else data

    end = b"0\r\n\r\n" if chunked else b""
    head = b"POST /up HTTP/1.1\r\nHost: gw.test\r\n" + framing + b"\r\n\r\n"
    # Steady: a piece every 0.4s, 2.4s in all (longer than the timeout, no gap as long).
    with RawConnection(gw.port) as conn:
        conn.send(head)
        for _ in range(6):
            time.sleep(0.4)
            conn.send(piece(b"ab"))
        conn.send(end)
        resp = conn.read_response(method="POST")
        assert resp.status == 200
    assert upstream.last().body_len == 12
    # Stalled: part of the body, then nothing.
    with connect(gw) as stalled:
        stalled.sendall(head + piece(b"abc"))
        started = time.monotonic()
        assert closed_within(stalled, 5)
        assert 0.7 < time.monotonic() - started < 3.5
    assert upstream.count == 1


# HTTP/2 clients are held to the same timeouts: hyper keeps none of them for HTTP/2.


class H2Client:
    """A raw HTTP/2 client (h2c with prior knowledge) that shows what the gateway sends."""

    def __init__(self, gw: Gateway) -> None:
        self.sock = connect(gw)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.conn.initiate_connection()
        self.flush()
        self.events: list[h2.events.Event] = []

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def request(self, method: str, path: str, length: int | None = None, part: bytes = b"") -> int:
        """Open a stream; with ``length``, a body of that length of which only ``part`` is
        sent (the stream stays open)."""
        sid = self.conn.get_next_available_stream_id()
        headers = [(":method", method), (":path", path), (":scheme", "http")]
        headers += [(":authority", "gw.test")]
        if length is not None:
            headers.append(("content-length", str(length)))
        self.conn.send_headers(sid, headers, end_stream=length is None)
        if part:
            self.conn.send_data(sid, part)
        self.flush()
        return sid

    def read_until(self, done: Callable[[h2.events.Event], bool], seconds: float) -> bool:
        """Read (answering pings) until an event ``done`` accepts; False at EOF or timeout."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return False
            if not data:
                return False
            for event in self.conn.receive_data(data):
                self.events.append(event)
                if done(event):
                    return True
            self.flush()
        return False

    def close(self) -> None:
        self.sock.close()


GOAWAY = 0x7


def read_to_end(s: socket.socket, seconds: float) -> bytes | None:
    """All that arrives on ``s`` until the server closes it; None if it does not in time."""
    data = b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            return None
        if not chunk:
            return data
        data += chunk
    return None


def frame_types(data: bytes) -> list[int]:
    """The types of the HTTP/2 frames in ``data`` (9-byte headers: length, type, ...)."""
    types = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        types.append(data[3])
        data = data[9 + length :]
    return types


@pytest.fixture
def h2_idle_gateway(gateway: GatewayFactory, upstream: Upstream) -> Gateway:
    return gateway(
        {
            "timeouts": {"client_idle": "1s", "client_body": "1s"},
            "routes": [{"paths": ["/*"], "upstream": upstream.url}],
        },
        workers=1,
    )


def test_an_idle_http2_connection_is_closed_after_its_last_stream(
    h2_idle_gateway: Gateway,
) -> None:
    client = H2Client(h2_idle_gateway)
    try:
        client.request("GET", "/first")
        assert client.read_until(lambda e: isinstance(e, h2.events.StreamEnded), 5)
        answered = time.monotonic()
        status = next(e for e in client.events if isinstance(e, h2.events.ResponseReceived))
        assert dict(status.headers)[":status"] == "200"
        # Idle from here: a GOAWAY, then the connection closes.
        rest = read_to_end(client.sock, 5)
        assert rest is not None, "the idle connection was not closed"
        assert 0.7 < time.monotonic() - answered < 3.5
        assert GOAWAY in frame_types(rest)
    finally:
        client.close()


def test_a_preface_split_after_its_first_byte_is_still_http2_with_its_timeouts(
    h2_idle_gateway: Gateway,
) -> None:
    # Which protocol a connection speaks is told from its first three bytes: one byte,
    # a pause, then the rest must not land it on a path without the HTTP/2 timeouts.
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [(":method", "GET"), (":path", "/split"), (":scheme", "http"), (":authority", "gw")],
        end_stream=True,
    )
    opening = conn.data_to_send()
    with connect(h2_idle_gateway) as s:
        s.sendall(opening[:1])
        time.sleep(0.3)
        s.sendall(opening[1:])
        data = read_to_end(s, 6)
    assert data is not None, "the idle connection was not closed"
    events = conn.receive_data(before_goaway(data))
    (head,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert dict(head.headers)[b":status"] == b"200"
    assert GOAWAY in frame_types(data)


def test_an_http1_request_split_after_its_first_byte_is_served(
    h2_idle_gateway: Gateway, upstream: Upstream
) -> None:
    with connect(h2_idle_gateway) as s:
        s.sendall(GET[:1])
        time.sleep(0.3)
        s.sendall(GET[1:])
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
    assert upstream.last().path == "/x"


def before_goaway(data: bytes) -> bytes:
    """The frames in ``data`` before the first GOAWAY (the h2 library refuses any after it)."""
    at = 0
    while len(data) - at >= 9 and data[at + 3] != GOAWAY:
        at += 9 + int.from_bytes(data[at : at + 3], "big")
    return data[:at]


def test_a_silent_http2_client_is_dropped_at_the_idle_timeout(h2_idle_gateway: Gateway) -> None:
    # The preface, then nothing: not even an answer to the gateway's ping.
    with connect(h2_idle_gateway) as silent:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        silent.sendall(conn.data_to_send())
        started = time.monotonic()
        assert closed_within(silent, 6)
        assert 0.7 < time.monotonic() - started < 4.0


def test_an_http2_stream_in_flight_outlives_the_idle_timeout(
    h2_idle_gateway: Gateway, upstream: Upstream
) -> None:
    with httpx.Client(http1=False, http2=True, base_url=h2_idle_gateway.url, timeout=15) as c:
        slow = c.get("/slow", headers={"X-Up-Sleep": "2.5"})
        assert slow.status_code == 200
        assert slow.http_version == "HTTP/2"
        # the same connection still serves within the idle time
        assert c.get("/next").status_code == 200
    assert upstream.count == 2


def test_a_stalled_http2_request_body_is_cut_off(
    h2_idle_gateway: Gateway, upstream: Upstream
) -> None:
    client = H2Client(h2_idle_gateway)
    try:
        sid = client.request("POST", "/up", length=12, part=b"abc")
        started = time.monotonic()

        def answered(e: h2.events.Event) -> bool:
            return isinstance(e, h2.events.StreamEnded | h2.events.StreamReset) and (
                e.stream_id == sid
            )

        assert client.read_until(answered, 5)
        assert 0.7 < time.monotonic() - started < 3.5
        (head,) = [e for e in client.events if isinstance(e, h2.events.ResponseReceived)]
        assert dict(head.headers)[":status"] == "408"
        body = b"".join(e.data for e in client.events if isinstance(e, h2.events.DataReceived))
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout"
        assert "client_body" in error["message"]
        # the connection's other streams go on
        client.request("GET", "/after")
        assert client.read_until(lambda e: isinstance(e, h2.events.StreamEnded), 5)
        heads = [e for e in client.events if isinstance(e, h2.events.ResponseReceived)]
        assert dict(heads[-1].headers)[":status"] == "200"
    finally:
        client.close()
    assert [r.path for r in upstream.requests] == ["/after"]
