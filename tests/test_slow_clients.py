"""Slowloris defences: connections per client address, the request head deadline and the
request body stall timeout; ordinary clients are not hurt by any of them."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

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
