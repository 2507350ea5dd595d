"""IP allow and deny lists on the client's real address, over IPv4 and IPv6 listeners."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import Gateway, run_cli
from upstreams import Upstream


def free_v6_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def dual(tmp_path: Path, upstream: Upstream) -> Iterator[tuple[Gateway, int]]:
    """A gateway listening on 127.0.0.1 and on ::1."""
    v6 = free_v6_port()
    config: dict[str, Any] = {
        "trusted_proxies": ["127.0.0.1"],
        "ip_restriction": {"deny": ["192.0.2.0/24", "2001:db8::/32"]},
        "upstreams": {"u": {"targets": [{"address": upstream.address}]}},
        "routes": [
            {"name": "open", "paths": ["/open/*"], "upstream": "u"},
            {
                "name": "v4",
                "paths": ["/v4/*"],
                "upstream": "u",
                "ip_restriction": {"allow": ["127.0.0.0/8"]},
            },
            {
                "name": "v6",
                "paths": ["/v6/*"],
                "upstream": "u",
                "ip_restriction": {"allow": ["::1"]},
            },
            {
                "name": "not-local4",
                "paths": ["/deny/*"],
                "upstream": "u",
                "ip_restriction": {"allow": ["0.0.0.0/0", "::/0"], "deny": ["127.0.0.1"]},
            },
        ],
    }
    gw = Gateway(tmp_path / "gw", config, workers=1)
    gw.write_config({**config, "listen": [gw.address, f"[::1]:{v6}"]})
    try:
        gw.start()
        upstream.reset()
        yield gw, v6
    finally:
        gw.stop()


def get(base: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(base + path, headers=headers, timeout=10)


def assert_forbidden(resp: httpx.Response) -> None:
    assert resp.status_code == 403, resp.text
    assert resp.headers["content-type"] == "application/json"
    err = resp.json()["error"]
    assert err["code"] == "ip_forbidden"
    assert err["request_id"] == resp.headers["x-request-id"]


def test_route_lists_admit_and_refuse_each_address_family(
    dual: tuple[Gateway, int], upstream: Upstream
) -> None:
    gw, v6 = dual
    v4, v6url = gw.url, f"http://[::1]:{v6}"
    assert get(v4, "/open/a").status_code == 200
    assert get(v6url, "/open/a").status_code == 200
    assert get(v4, "/v4/a").status_code == 200
    assert_forbidden(get(v6url, "/v4/a"))
    assert get(v6url, "/v6/a").status_code == 200
    assert_forbidden(get(v4, "/v6/a"))
    assert_forbidden(get(v4, "/deny/a"))
    assert get(v6url, "/deny/a").status_code == 200
    assert upstream.count == 5


def test_the_real_client_behind_a_trusted_proxy_is_judged(
    dual: tuple[Gateway, int], upstream: Upstream
) -> None:
    gw, v6 = dual
    v4, v6url = gw.url, f"http://[::1]:{v6}"
    # 127.0.0.1 is a trusted proxy: the right-most untrusted hop is the client.
    assert_forbidden(get(v4, "/open/a", {"x-forwarded-for": "192.0.2.7"}))
    assert_forbidden(get(v4, "/open/a", {"x-forwarded-for": "198.51.100.1, 2001:db8::5"}))
    assert get(v4, "/open/a", {"x-forwarded-for": "192.0.2.7, 198.51.100.1"}).status_code == 200
    assert_forbidden(get(v4, "/v4/a", {"x-forwarded-for": "198.51.100.1"}))
    # A trusted proxy forwarding for itself (a local client) keeps its address.
    assert get(v4, "/v4/a", {"x-forwarded-for": "127.0.0.1"}).status_code == 200
    # ::1 is not trusted: what it claims is not believed, either way.
    assert get(v6url, "/open/a", {"x-forwarded-for": "192.0.2.7"}).status_code == 200
    assert_forbidden(get(v6url, "/v4/a", {"x-forwarded-for": "127.0.0.1"}))
    assert upstream.count == 3


def test_bad_addresses_are_reported_with_their_location(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "listen: ['127.0.0.1:1']\n"
        "ip_restriction: {allow: ['10.0.0.0/8', 'nope']}\n"
        "routes:\n"
        "  - paths: ['/*']\n"
        "    upstream: http://127.0.0.1:9\n"
        "    ip_restriction: {}\n"
    )
    out = run_cli("check", str(cfg))
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "ip_restriction.allow[1]: 'nope' is not an IP address or CIDR" in text, text
    assert "routes[0].ip_restriction: give 'allow' or 'deny' addresses" in text, text
