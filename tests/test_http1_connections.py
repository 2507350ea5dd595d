"""Keep-alive HTTP/1.1 connections: many requests on one connection, in order, with the
framing of each response right, whether the request has a body or not (the gateway serves
bodyless requests on its own HTTP/1.1 server and hands a connection to hyper at the first
request that needs it; both must look the same to a client)."""

from __future__ import annotations

import email.utils
import json
import socket
import socketserver
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from gateway import Gateway, GatewayFactory
from rawhttp import RawConnection
from upstreams import Upstream


def one_route(target: str, **extra: Any) -> dict[str, Any]:
    return {
        "upstreams": {"backend": {"targets": [target]}},
        "routes": [{"name": "all", "paths": ["/*"], "upstream": "backend"}],
        **extra,
    }


def get(path: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: gw.test", *extra, "", ""]
    return "\r\n".join(lines).encode()


def target_of(body: bytes) -> str:
    """The request target the test upstream describes in its JSON answer."""
    doc = json.loads(body)
    assert isinstance(doc, dict)
    return str(doc["target"])


def test_pipelined_requests_are_answered_in_order_on_one_connection(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream.address), workers=1)
    with RawConnection(gw.port) as conn:
        conn.send(get("/one") + get("/two") + get("/three"))
        targets = [target_of(conn.read_response().body) for _ in range(3)]
        assert targets == ["/one", "/two", "/three"]
        conn.send(get("/four"))
        assert target_of(conn.read_response().body) == "/four"
        assert not conn.is_closed(0.3)


def test_requests_with_bodies_between_bodyless_ones_keep_the_connection(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream.address), workers=1)
    with RawConnection(gw.port) as conn:
        conn.send(get("/before"))
        assert target_of(conn.read_response().body) == "/before"
        conn.send(b"POST /sized HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5\r\n\r\nhello")
        assert target_of(conn.read_response().body) == "/sized"
        conn.send(
            b"POST /chunked HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
        )
        assert target_of(conn.read_response().body) == "/chunked"
        conn.send(get("/after"))
        assert target_of(conn.read_response().body) == "/after"
        assert not conn.is_closed(0.3)
    got = {r.target: r for r in upstream.requests}
    assert got["/sized"].body_len == 5
    assert got["/chunked"].body_len == 3
    assert got["/before"].body_len == 0
    # One client connection, one request at a time: one upstream connection served all four.
    assert len({r.connection for r in upstream.requests}) == 1


def test_a_large_body_arriving_in_pieces_is_passed_whole_and_the_connection_stays(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream.address), workers=1)
    body = bytes(range(256)) * 4096  # 1 MiB
    with RawConnection(gw.port) as conn:
        conn.send(b"PUT /big HTTP/1.1\r\nHost: gw.test\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 100_000):
            conn.send(body[i : i + 100_000])
            time.sleep(0.01)
        assert target_of(conn.read_response().body) == "/big"
        conn.send(get("/after"))
        assert target_of(conn.read_response().body) == "/after"
    got = {r.target: r for r in upstream.requests}
    assert got["/big"].body_len == len(body)
    assert got["/big"].body_crc == zlib.crc32(body)
    assert len({r.connection for r in upstream.requests}) == 1


def test_a_short_unread_body_is_skipped_and_the_connection_kept(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway({"routes": [{"paths": ["/only"], "upstream": upstream.url}]}, workers=1)
    with RawConnection(gw.port) as conn:
        # No route: answered 404 before anything reads the body.
        conn.send(b"POST /elsewhere HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 2000\r\n\r\n")
        time.sleep(0.1)
        conn.send(b"x" * 2000)
        resp = conn.read_response()
        assert resp.status == 404
        assert resp.header("connection") is None
        conn.send(get("/only"))
        assert target_of(conn.read_response().body) == "/only"
    assert [r.target for r in upstream.requests] == ["/only"]


def test_a_long_unread_body_closes_the_connection_after_the_answer(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway({"routes": [{"paths": ["/only"], "upstream": upstream.url}]}, workers=1)
    with RawConnection(gw.port) as conn:
        conn.send(b"POST /elsewhere HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 10000000\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 404
        assert (resp.header("connection") or "").lower() == "close"
        assert conn.is_closed(3)
    assert upstream.requests == []


def test_connection_close_is_answered_in_kind_and_the_connection_closed(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream.address), workers=1)
    with RawConnection(gw.port) as conn:
        conn.send(get("/x", "Connection: close"))
        resp = conn.read_response()
        assert resp.status == 200
        assert (resp.header("connection") or "").lower() == "close"
        assert conn.is_closed(3)


def test_head_gets_the_length_and_no_body_and_the_next_request_is_intact(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream.address), workers=1)
    with RawConnection(gw.port) as conn:
        conn.send(b"HEAD /big HTTP/1.1\r\nHost: gw.test\r\nX-Up-Size: 5000\r\n\r\n")
        resp = conn.read_response(method="HEAD")
        assert resp.status == 200
        assert resp.header("content-length") == "5000"
        # No body bytes may follow: the next response must start right away.
        conn.send(get("/next"))
        assert target_of(conn.read_response().body) == "/next"


@pytest.mark.parametrize("status", [204, 304])
def test_bodyless_statuses_carry_no_body(
    gateway: GatewayFactory, upstream: Upstream, status: int
) -> None:
    gw = gateway(one_route(upstream.address), workers=1)
    with RawConnection(gw.port) as conn:
        conn.send(get("/empty", f"X-Up-Status: {status}"))
        resp = conn.read_response()
        assert resp.status == status
        assert resp.header("transfer-encoding") is None
        conn.send(get("/next"))
        assert target_of(conn.read_response().body) == "/next"


class _RawUpstream(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(socketserver.BaseRequestHandler):
    """Answers without a Content-Length: chunked in pieces, or until it closes."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        while True:
            head = b""
            while b"\r\n\r\n" not in head:
                data = sock.recv(65536)
                if not data:
                    return
                head += data
            path = head.split(b" ", 2)[1]
            if path == b"/chunked":
                sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                time.sleep(0.05)
                sock.sendall(b"6\r\n world\r\n")
                time.sleep(0.05)
                sock.sendall(b"0\r\n\r\n")
            else:
                sock.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
                )
                time.sleep(0.05)
                sock.sendall(b"until the upstream closes")
                return


@pytest.fixture
def unsized_upstream() -> Iterator[str]:
    server = _RawUpstream(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_answers_of_unknown_length_go_out_chunked_and_the_connection_stays(
    gateway: GatewayFactory, unsized_upstream: str
) -> None:
    gw = gateway(one_route(unsized_upstream), workers=1)
    with RawConnection(gw.port) as conn:
        for path, body in [
            ("/chunked", b"hello world"),
            ("/until-close", b"until the upstream closes"),
            ("/chunked", b"hello world"),
        ]:
            conn.send(get(path))
            resp = conn.read_response()
            assert resp.status == 200
            assert resp.header("transfer-encoding") == "chunked"
            assert resp.body == body
        assert not conn.is_closed(0.3)


def test_the_gateways_own_answers_carry_a_date(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway({"routes": [{"paths": ["/only"], "upstream": upstream.url}]}, workers=1)
    with RawConnection(gw.port) as conn:
        conn.send(get("/elsewhere"))
        resp = conn.read_response()
    assert resp.status == 404
    date = resp.header("date")
    assert date is not None
    sent = email.utils.parsedate_to_datetime(date).timestamp()
    assert abs(sent - time.time()) < 5
    assert resp.header("content-length") == str(len(resp.body))


def slow_send(sock: socket.socket, data: bytes, pause: float) -> float | None:
    """Send ``data`` a byte at a time; the seconds until the server cut it off, if it did."""
    started = time.monotonic()
    sock.settimeout(pause)
    for b in data:
        try:
            sock.sendall(bytes([b]))
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    return None


def test_a_later_head_on_a_kept_alive_connection_has_the_header_deadline(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw: Gateway = gateway(
        one_route(upstream.address, timeouts={"client_header": "1s", "client_idle": "30s"}),
        workers=1,
    )
    with RawConnection(gw.port) as conn:
        conn.send(get("/first"))
        assert conn.read_response().status == 200
        time.sleep(1.3)  # idle time is not head time
        cut = slow_send(conn.sock, get("/second", "X-Pad: " + "a" * 40), 0.1)
    assert cut is not None, "the slow head was never cut off"
    assert 0.7 < cut < 3.0, cut
    assert [r.target for r in upstream.requests] == ["/first"]


def test_an_idle_kept_alive_connection_is_closed_after_client_idle(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream.address, timeouts={"client_idle": "1s"}), workers=1)
    with RawConnection(gw.port) as conn:
        conn.send(get("/x"))
        assert conn.read_response().status == 200
        started = time.monotonic()
        assert conn.is_closed(5)
        assert 0.7 < time.monotonic() - started < 3.0
