"""Malformed or ambiguous requests: 400, the connection is closed, nothing reaches the upstream.

These requests are the raw material of request smuggling, so each one is checked against an
upstream that records every request that even starts to arrive.
"""

from __future__ import annotations

import time

import pytest

from gateway import Gateway, GatewayFactory
from rawhttp import exchange
from upstreams import Upstream

MALFORMED = {
    "garbage_request_line": b"GARBAGE\r\nHost: t\r\n\r\n",
    "content_length_and_transfer_encoding": (
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "two_different_content_lengths": (
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    ),
    "duplicate_content_length": (
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
    ),
    "invalid_first_chunk_size": (
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    ),
    "bad_header_name_characters": b"GET /x HTTP/1.1\r\nHost: t\r\nX-B@d{}: 1\r\n\r\n",
}

# requests a parser accepts; only the gateway's own checks can turn them away
SEEN_BY_THE_GATEWAY = [
    "content_length_and_transfer_encoding",
    "duplicate_content_length",
    "invalid_first_chunk_size",
]


@pytest.fixture
def gw(gateway: GatewayFactory, upstream: Upstream) -> Gateway:
    return gateway(
        {
            "upstreams": {"backend": {"targets": [upstream.address]}},
            "routes": [{"name": "all", "paths": ["/*"], "upstream": "backend"}],
        }
    )


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_is_400_closed_and_never_forwarded(
    gw: Gateway, upstream: Upstream, case: str
) -> None:
    resp, closed = exchange(gw.port, MALFORMED[case], method="POST")
    assert resp.status == 400
    assert closed, "the gateway kept the connection open after a malformed request"
    time.sleep(0.3)
    assert upstream.arrivals == [], f"reached the upstream: {upstream.arrivals}"
    # the route itself works: a well-formed request on a new connection gets through
    assert gw.request("POST", "/x", content=b"hello").status_code == 200
    assert upstream.count == 1


@pytest.mark.parametrize("case", SEEN_BY_THE_GATEWAY)
def test_ambiguous_framing_is_answered_with_bad_request_json(gw: Gateway, case: str) -> None:
    resp, _ = exchange(gw.port, MALFORMED[case], method="POST")
    assert resp.status == 400
    error = resp.json()["error"]  # type: ignore[index]
    assert error["status"] == 400
    assert error["code"] == "bad_request"
    assert error["request_id"] == resp.header("x-request-id")


def test_nothing_after_a_smuggling_attempt_is_processed(gw: Gateway, upstream: Upstream) -> None:
    # a classic CL.TE attempt: the "body" is a second request
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
    body = b"0\r\n\r\n" + smuggled
    data = (
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        + body
    )
    resp, closed = exchange(gw.port, data, method="POST")
    assert resp.status == 400
    assert closed
    time.sleep(0.3)
    assert [r.target for r in upstream.arrivals] == []
