"""Header edits crossing the hook boundary as a diff (or as the whole list), applied to the
upstream request and to the response through a real gateway; and the consumer on both sides
of the access crossing: one the data plane identified (a client certificate) is
``req.consumer`` when the chain starts, and one a plugin names before answering early is the
one the access log records."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import ferrogate.hooks as compiled_or_plain
from certs import CA
from gateway import Gateway, GatewayFactory, free_port
from upstreams import Upstream

PLUGINS = str(Path(__file__).parent / "edit_plugins")


def received(upstream: Upstream, name: str) -> list[str]:
    """Every value of header ``name`` the upstream got, in the order it got them."""
    return [v for k, v in upstream.last().headers if k.lower() == name]


@pytest.fixture
def edits_gateway(gateway: GatewayFactory, upstream: Upstream) -> Gateway:
    return gateway(
        {
            "plugins_dir": PLUGINS,
            "routes": [
                {
                    "paths": ["/*"],
                    "upstream": upstream.url,
                    "plugins": [{"name": "t-header-ops"}],
                }
            ],
        },
        workers=1,
    )


def send(gw: Gateway, op: str) -> httpx.Response:
    # Repeated fields: httpx sends each pair of a list as its own line, in order.
    headers = [("x-op", op), ("x-multi", "a"), ("X-Multi", "b"), ("x-other", "o")]
    return gw.get("/h", headers=headers)


def test_removing_one_of_two_repeated_fields(edits_gateway: Gateway, upstream: Upstream) -> None:
    r = send(edits_gateway, "remove-one")
    assert r.status_code == 200
    assert received(upstream, "x-multi") == ["b"]
    # untouched fields stay as the client sent them
    assert received(upstream, "x-other") == ["o"]
    assert received(upstream, "x-op") == ["remove-one"]
    # the response diff: one field removed, two added in order, the rest kept
    assert "x-upstream" not in r.headers
    assert r.headers.get_list("x-added") == ["1", "2"]
    assert r.headers["content-type"] == "application/json"


def test_setting_replaces_every_field_of_the_name(
    edits_gateway: Gateway, upstream: Upstream
) -> None:
    assert send(edits_gateway, "replace").status_code == 200
    assert received(upstream, "x-multi") == ["z"]
    assert received(upstream, "x-set") == ["s"]
    assert received(upstream, "x-other") == ["o"]


def test_adding_appends_after_the_fields_of_the_same_name(
    edits_gateway: Gateway, upstream: Upstream
) -> None:
    assert send(edits_gateway, "add").status_code == 200
    assert received(upstream, "x-multi") == ["a", "b", "c"]
    assert received(upstream, "x-new") == ["1", "2"]
    assert received(upstream, "x-other") == ["o"]


def test_renaming_moves_every_field(edits_gateway: Gateway, upstream: Upstream) -> None:
    assert send(edits_gateway, "rename").status_code == 200
    assert received(upstream, "x-multi") == []
    assert received(upstream, "x-renamed") == ["a", "b"]


def test_clearing_every_header(edits_gateway: Gateway, upstream: Upstream) -> None:
    r = send(edits_gateway, "clear")
    assert r.status_code == 200
    for gone in ("x-multi", "x-other", "x-op", "user-agent", "accept"):
        assert received(upstream, gone) == [], gone
    assert received(upstream, "x-only") == ["1"]
    # what the gateway itself adds upstream is added after the plugins ran
    assert received(upstream, "x-request-id") == [r.headers["x-request-id"]]


def test_the_wire_form_is_a_diff_only_when_fields_stay_untouched() -> None:
    h = compiled_or_plain._wire_headers(b"host:x\nx-multi:a\nx-multi:b\napikey:k\n")
    h.remove("apikey")
    h.remove("absent")  # finds nothing: not part of the diff
    h.add("X-Consumer", "c")
    assert h._wire() == (["apikey", "x-consumer"], [("x-consumer", "c")])
    # every field touched: the whole list is as short, and replaces the lot
    h = compiled_or_plain._wire_headers(b"a:1\n")
    h["a"] = "2"
    assert h._wire() == [("a", "2")]
    h = compiled_or_plain._wire_headers(b"a:1\nb:2\n")
    for name in list(h):
        h.remove(name)
    assert h._wire() == []


# --- the consumer across the access crossing ------------------------------------------------


def access_log(gw: Gateway, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    path = gw.dir / "access.log"
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record.get("request_id") == request_id:
                    return record  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"no access log line for {request_id} within {timeout}s")


def test_an_early_answer_is_logged_against_the_consumer_a_plugin_named(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(
        {
            "plugins_dir": PLUGINS,
            "access_log": {"path": "access.log", "fields": ["request_id", "consumer", "status"]},
            "routes": [
                {"paths": ["/*"], "upstream": upstream.url, "plugins": [{"name": "t-identify"}]}
            ],
        },
        workers=1,
    )
    r = gw.get("/x", headers={"x-who": "carol", "x-refuse": "1"})
    assert r.status_code == 403
    assert access_log(gw, r.headers["x-request-id"])["consumer"] == "carol"
    r = gw.get("/x", headers={"x-who": "dave"})
    assert r.status_code == 200
    assert access_log(gw, r.headers["x-request-id"])["consumer"] == "dave"
    r = gw.get("/x", headers={"x-refuse": "1"})
    assert r.status_code == 403
    assert access_log(gw, r.headers["x-request-id"]).get("consumer") is None
    assert upstream.count == 1


class ClientPki:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(exist_ok=True)
        self.dir = directory
        self.ca = CA()
        self.ca_file = self.ca.write(directory / "ca.pem")
        self.ca.issue("CN=localhost", dns=["localhost"]).write(directory, "server")
        self.client_ca = CA("ferrogate test client CA")
        self.client_ca.write(directory / "client-ca.pem")

    def client(self, subject: str, name: str) -> tuple[Path, Path]:
        issued = self.client_ca.issue(subject, client=True)
        return issued.write(self.dir, name)

    def verify(self, cert: tuple[Path, Path] | None) -> Any:
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if cert is not None:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        return ctx


def test_mtls_consumer_is_seen_by_plugins_and_authorized_by_acl(
    gateway: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> None:
    pki = ClientPki(tmp_path / "certs")
    port = free_port()
    gw = gateway(
        {
            "plugins_dir": PLUGINS,
            "tls": {
                "listen": [f"127.0.0.1:{port}"],
                "certificates": [{"cert": "../certs/server.pem", "key": "../certs/server.key"}],
                "client_auth": {"mode": "optional", "ca": "../certs/client-ca.pem"},
            },
            "consumers": {
                "alice": {
                    "groups": ["admins"],
                    "credentials": [{"type": "mtls", "subject": "CN=alice,O=Acme"}],
                },
                "bob": {
                    "groups": ["users"],
                    "credentials": [{"type": "mtls", "subject": "CN=bob,O=Acme"}],
                },
            },
            "access_log": {"path": "access.log", "fields": ["request_id", "consumer", "status"]},
            "routes": [
                {
                    "paths": ["/admin/*"],
                    "upstream": upstream.url,
                    "plugins": [
                        {"name": "t-seen"},
                        {"name": "acl", "config": {"allow": ["admins"]}},
                    ],
                }
            ],
        },
        workers=1,
    )
    url = f"https://localhost:{port}/admin/x"
    alice = pki.client("CN=alice,O=Acme", "alice")
    r = httpx.get(url, verify=pki.verify(alice), timeout=10)
    assert r.status_code == 200
    assert received(upstream, "x-seen-consumer") == ["alice"]
    assert received(upstream, "x-seen-credential") != ["-"]
    assert access_log(gw, r.headers["x-request-id"])["consumer"] == "alice"

    bob = pki.client("CN=bob,O=Acme", "bob")
    r = httpx.get(url, verify=pki.verify(bob), timeout=10)
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden"
    assert access_log(gw, r.headers["x-request-id"])["consumer"] == "bob"

    # a certificate no consumer's credential names, and none at all: not identified
    for cert in (pki.client("CN=mallory,O=Acme", "mallory"), None):
        r = httpx.get(url, verify=pki.verify(cert), timeout=10)
        assert r.status_code == 401
        assert "www-authenticate" in r.headers
    assert upstream.count == 1
