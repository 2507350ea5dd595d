"""Limits on the request head: header field count (431) and request target length (414),
each exactly at the limit (served) and one over (refused), on HTTP/1.1 and HTTP/2."""

from __future__ import annotations

import httpx
import pytest

from gateway import Gateway, GatewayFactory
from rawhttp import RawConnection, RawResponse
from upstreams import Upstream

MAX_HEADERS = 12
MAX_URL = 64


@pytest.fixture
def limited(gateway: GatewayFactory, upstream: Upstream) -> Gateway:
    return gateway(
        {
            "limits": {"max_headers": MAX_HEADERS, "max_url_bytes": MAX_URL},
            "routes": [{"paths": ["/*"], "upstream": upstream.url}],
        },
        workers=1,
    )


def raw(gw: Gateway, target: str, fields: int) -> RawResponse:
    """GET with exactly ``fields`` header fields (Host included)."""
    lines = [f"GET {target} HTTP/1.1", "Host: gw.test", "Connection: close"]
    lines += [f"X-F{i}: v" for i in range(fields - 2)]
    with RawConnection(gw.port) as conn:
        conn.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        return conn.read_response()


def target_of(length: int) -> str:
    return "/p?q=" + "a" * (length - 5)


def test_header_count_on_http1(limited: Gateway, upstream: Upstream) -> None:
    assert raw(limited, "/x", MAX_HEADERS).status == 200
    assert upstream.count == 1
    assert raw(limited, "/x", MAX_HEADERS + 1).status == 431
    assert upstream.count == 1


def test_header_count_on_http2(limited: Gateway, upstream: Upstream) -> None:
    with httpx.Client(http1=False, http2=True, base_url=limited.url, timeout=10) as client:
        # :method, :path, :scheme and :authority are pseudo-headers, not fields; httpx adds
        # accept, accept-encoding and user-agent.
        base = 3
        ok = {f"x-f{i}": "v" for i in range(MAX_HEADERS - base)}
        resp = client.get("/x", headers=ok)
        assert resp.http_version == "HTTP/2"
        assert resp.status_code == 200, resp.text
        over = {**ok, "x-one-more": "v"}
        resp = client.get("/x", headers=over)
        assert resp.status_code == 431
        err = resp.json()["error"]
        assert err["code"] == "headers_too_large"
        expected = f"{MAX_HEADERS + 1} header fields, above the limit of {MAX_HEADERS}"
        assert expected in err["message"]
    assert upstream.count == 1


def test_url_length(limited: Gateway, upstream: Upstream) -> None:
    assert len(target_of(MAX_URL)) == MAX_URL
    resp = raw(limited, target_of(MAX_URL), 3)
    assert resp.status == 200
    assert upstream.last().target == target_of(MAX_URL)
    resp = raw(limited, target_of(MAX_URL + 1), 3)
    assert resp.status == 414
    err = resp.json()
    assert isinstance(err, dict)
    assert err["error"]["code"] == "uri_too_long"
    assert f"{MAX_URL + 1} bytes, above the limit of {MAX_URL}" in err["error"]["message"]
    assert upstream.count == 1


def test_defaults_admit_ordinary_requests(gateway: GatewayFactory, upstream: Upstream) -> None:
    # Answered at the gateway: the test upstream has its own limit of 100 fields.
    answer = {"name": "request-termination", "config": {"status": 200}}
    gw = gateway(
        {"routes": [{"paths": ["/*"], "upstream": upstream.url, "plugins": [answer]}]},
        workers=1,
    )
    assert raw(gw, "/x", 100).status == 200
    assert raw(gw, "/x", 101).status == 431
    assert raw(gw, target_of(8192), 3).status == 200
    assert raw(gw, target_of(8193), 3).status == 414
