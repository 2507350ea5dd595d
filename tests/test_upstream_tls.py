"""TLS towards upstreams: verification against a custom CA (wrong CA, expired certificate,
wrong name refused with 502 and an event), verify: false, SNI, the gateway's client
certificate, keep-alive reuse of TLS connections, handshake failures retried like connect
failures, active probes over TLS, and `ferrogate check` on a bad CA path. The upstreams are
real HTTPS servers (Python's ssl) with certificates made per test by ``certs.CA``."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from certs import CA, Issued
from gateway import Gateway, GatewayFactory, run_cli


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: TlsUpstream

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        self.owner.tcp_connections += 1
        # The handshake runs in the handler's thread (setup), not in the accepting one.
        wrapped = self.owner.context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        )
        return wrapped, addr

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # refused handshakes are part of the tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        owner = self.server.owner
        conn = self.connection
        assert isinstance(conn, ssl.SSLSocket)
        try:
            conn.do_handshake()
        except (ssl.SSLError, OSError) as e:
            owner.failed_handshakes.append(str(e))
            raise
        owner.handshakes += 1
        owner.alpn.append(conn.selected_alpn_protocol())
        peer = conn.getpeercert()
        owner.client_subjects.append(
            None if not peer else dict(x[0] for x in peer["subject"]).get("commonName")
        )

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._answer()

    def _answer(self) -> None:
        owner = self.server.owner
        owner.requests += 1
        body = json.dumps({"path": self.path, "host": self.headers.get("Host")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class TlsUpstream:
    """An HTTPS/1.1 server on 127.0.0.1 that records handshakes, SNI and client certs."""

    def __init__(self, cert: Path, key: Path, *, client_ca: Path | None = None) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.context.set_alpn_protocols(["http/1.1"])
        if client_ca is not None:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(client_ca)
        self.sni: list[str | None] = []
        self.context.sni_callback = self._sni
        self.tcp_connections = 0
        self.handshakes = 0
        self.requests = 0
        self.failed_handshakes: list[str] = []
        self.alpn: list[str | None] = []
        self.client_subjects: list[str | None] = []
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.owner = self
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _sni(self, sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        self.sni.append(name)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Pki:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(exist_ok=True)
        self.dir = directory
        self.ca = CA("upstream test CA")
        self.ca_file = self.ca.write(directory / "ca.pem")
        self.other_ca = CA("some other CA")
        self.other_ca_file = self.other_ca.write(directory / "other-ca.pem")
        self.client_ca = CA("upstream client CA")
        self.client_ca_file = self.client_ca.write(directory / "client-ca.pem")

    def server(self, stem: str, dns: list[str], **kwargs: Any) -> tuple[Path, Path]:
        return self.ca.issue(f"CN={dns[0]}", dns=dns, **kwargs).write(self.dir, stem)

    def ip_server(self, stem: str, ip: str) -> tuple[Path, Path]:
        """A certificate whose only name is an IP address (certs.CA issues DNS names)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, ip)]))
            .issuer_name(self.ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                critical=False,
            )
            .sign(self.ca.key, hashes.SHA256())
        )
        return Issued(cert, key).write(self.dir, stem)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "certs")


@pytest.fixture
def https_upstream(pki: Pki) -> Iterator[Callable[..., TlsUpstream]]:
    made: list[TlsUpstream] = []

    def make(cert: tuple[Path, Path] | None = None, **kwargs: Any) -> TlsUpstream:
        cert_file, key_file = cert or pki.server("localhost", ["localhost"])
        up = TlsUpstream(cert_file, key_file, **kwargs)
        made.append(up)
        return up

    yield make
    for up in made:
        up.close()


def events(gw: Gateway, name: str) -> list[dict[str, Any]]:
    found = []
    for line in gw.stderr_text().splitlines():
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                found.append(event)
    return found


def wait_for(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start(
    gateway: GatewayFactory,
    targets: list[str],
    tls: dict[str, Any] | None,
    **upstream: Any,
) -> Gateway:
    config = {
        "upstreams": {"secure": {"targets": targets, "tls": tls, **upstream}},
        "routes": [{"paths": ["/*"], "upstream": "secure"}],
    }
    return gateway(config, workers=1)


def assert_tls_refused(gw: Gateway, words: str) -> dict[str, Any]:
    resp = gw.get("/x")
    assert resp.status_code == 502, resp.text
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert error["code"] == "upstream_tls_failed"
    assert "TLS verification" in error["message"] and words in error["message"], error
    assert error["request_id"]
    [event, *_] = wait_for(lambda: events(gw, "upstream_tls_failed"), "the tls event")
    assert words in event["reason"] and event["upstream"] == "secure", event
    return error


def test_a_certificate_from_the_configured_ca_is_verified_and_passes(
    gateway: GatewayFactory, pki: Pki, https_upstream: Callable[..., TlsUpstream]
) -> None:
    up = https_upstream()
    gw = start(gateway, [f"localhost:{up.port}"], {"ca": str(pki.ca_file)})
    resp = gw.get("/hello?x=1")
    assert resp.status_code == 200, resp.text
    assert resp.json()["path"] == "/hello?x=1"
    assert "http/1.1" in up.alpn
    assert up.sni[-1] == "localhost", "SNI defaults to the target's host"


def test_a_certificate_from_another_ca_is_refused(
    gateway: GatewayFactory, pki: Pki, https_upstream: Callable[..., TlsUpstream]
) -> None:
    up = https_upstream()
    gw = start(gateway, [f"localhost:{up.port}"], {"ca": str(pki.other_ca_file)})
    error = assert_tls_refused(gw, "unknown issuer")
    assert str(pki.dir) not in error["message"], "no file paths in client errors"
    assert up.requests == 0


def test_the_system_roots_do_not_trust_a_private_ca(
    gateway: GatewayFactory, https_upstream: Callable[..., TlsUpstream]
) -> None:
    up = https_upstream()
    gw = gateway({"routes": [{"paths": ["/*"], "upstream": f"https://localhost:{up.port}"}]})
    resp = gw.get("/x")
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "upstream_tls_failed"
    assert "unknown issuer" in resp.json()["error"]["message"]


def test_an_expired_certificate_is_refused(
    gateway: GatewayFactory, pki: Pki, https_upstream: Callable[..., TlsUpstream]
) -> None:
    up = https_upstream(pki.server("expired", ["localhost"], expired=True))
    gw = start(gateway, [f"localhost:{up.port}"], {"ca": str(pki.ca_file)})
    assert_tls_refused(gw, "certificate expired")


def test_a_certificate_for_another_name_is_refused(
    gateway: GatewayFactory, pki: Pki, https_upstream: Callable[..., TlsUpstream]
) -> None:
    up = https_upstream(pki.server("other", ["other.test"]))
    gw = start(gateway, [f"localhost:{up.port}"], {"ca": str(pki.ca_file)})
    assert_tls_refused(gw, "not valid for 'localhost'")


def test_verify_false_takes_any_certificate_and_warns_at_load(
    gateway: GatewayFactory, pki: Pki, https_upstream: Callable[..., TlsUpstream]
) -> None:
    up = https_upstream(pki.server("expired-other", ["other.test"], expired=True))
    gw = start(gateway, [f"localhost:{up.port}"], {"verify": False})
    assert gw.get("/x").status_code == 200
    [warning] = events(gw, "upstream_tls_unverified")
    assert warning["upstream"] == "secure"


def test_sni_is_the_configured_name_and_is_verified(
    gateway: GatewayFactory, pki: Pki, https_upstream: Callable[..., TlsUpstream]
) -> None:
    up = https_upstream(pki.server("billing", ["billing.internal"]))
    gw = start(
        gateway,
        [f"127.0.0.1:{up.port}"],
        {"ca": str(pki.ca_file), "sni": "billing.internal"},
    )
    assert gw.get("/x").status_code == 200
    assert up.sni and set(up.sni) == {"billing.internal"}


def test_an_ip_target_sends_no_sni_and_is_checked_against_ip_names(
    gateway: GatewayFactory, pki: Pki, https_upstream: Callable[..., TlsUpstream]
) -> None:
    up = https_upstream(pki.ip_server("ip", "127.0.0.1"))
    gw = start(gateway, [f"127.0.0.1:{up.port}"], {"ca": str(pki.ca_file)})
    assert gw.get("/x").status_code == 200
    assert up.sni and set(up.sni) == {None}


def test_the_gateway_presents_its_client_certificate_when_asked(
    gateway: GatewayFactory, pki: Pki, https_upstream: Callable[..., TlsUpstream]
) -> None:
    up = https_upstream(client_ca=pki.client_ca_file)
    cert, key = pki.client_ca.issue("CN=gateway", client=True).write(pki.dir, "gw")
    tls = {"ca": str(pki.ca_file), "client_cert": str(cert), "client_key": str(key)}
    gw = start(gateway, [f"localhost:{up.port}"], tls)
    assert gw.get("/x").status_code == 200
    assert up.client_subjects[-1] == "gateway"


def test_an_upstream_requiring_a_client_certificate_refuses_the_gateway_without_one(
    gateway: GatewayFactory, pki: Pki, https_upstream: Callable[..., TlsUpstream]
) -> None:
    up = https_upstream(client_ca=pki.client_ca_file)
    gw = start(gateway, [f"localhost:{up.port}"], {"ca": str(pki.ca_file)}, retries={"count": 0})
    resp = gw.get("/x")
    assert resp.status_code == 502, resp.text
    error = resp.json()["error"]
    assert error["code"] == "upstream_tls_failed", error
    assert "refused the handshake" in error["message"], error
    assert up.requests == 0 and up.failed_handshakes


def test_tls_connections_are_kept_alive_and_reused(
    gateway: GatewayFactory, pki: Pki, https_upstream: Callable[..., TlsUpstream]
) -> None:
    up = https_upstream()
    gw = start(gateway, [f"localhost:{up.port}"], {"ca": str(pki.ca_file)})
    before = up.handshakes
    with gw.client() as client:
        for i in range(20):
            resp = client.post(f"/r{i}", content=b"x" * (i * 1000))
            assert resp.status_code == 200, resp.text
            assert resp.json()["path"] == f"/r{i}"
    assert up.requests >= 20
    assert up.handshakes - before <= 2, f"{up.handshakes - before} handshakes for 20 requests"


def test_a_refused_handshake_is_retried_on_another_target_like_a_connect_failure(
    gateway: GatewayFactory, pki: Pki, https_upstream: Callable[..., TlsUpstream]
) -> None:
    bad = https_upstream(pki.server("bad", ["localhost"], expired=True))
    good = https_upstream()
    gw = start(
        gateway,
        [f"localhost:{bad.port}", f"localhost:{good.port}"],
        {"ca": str(pki.ca_file)},
    )
    with gw.client() as client:
        for _ in range(6):
            # POST: only a failure that sent nothing is retried for any method.
            assert client.post("/x", content=b"body").status_code == 200
    assert good.requests >= 6
    assert bad.requests == 0 and bad.tcp_connections >= 1


def test_active_probes_use_the_tls_settings(
    gateway: GatewayFactory, pki: Pki, https_upstream: Callable[..., TlsUpstream]
) -> None:
    good = https_upstream()
    bad = https_upstream(pki.server("bad", ["other.test"]))
    health = {"active": {"path": "/health", "interval": "100ms", "unhealthy_threshold": 1}}
    gw = start(
        gateway,
        [f"localhost:{good.port}", f"localhost:{bad.port}"],
        {"ca": str(pki.ca_file)},
        health=health,
    )
    [down] = wait_for(lambda: events(gw, "target_down"), "the bad target to be marked down")
    assert down["target"] == f"localhost:{bad.port}"
    assert "tls" in down["probe"] and "not valid for" in down["probe"], down
    assert good.requests > 0, "the good target's probes pass over TLS"
    assert not [e for e in events(gw, "target_down") if e["target"].endswith(f":{good.port}")]


def test_check_reports_a_bad_ca_path_at_its_line(tmp_path: Path) -> None:
    text = (
        "listen: [127.0.0.1:18999]\n"
        "upstreams:\n"
        "  secure:\n"
        "    targets: [localhost:8443]\n"
        "    tls:\n"
        "      ca: certs/missing-ca.pem\n"
        "routes:\n"
        "  - paths: [/*]\n"
        "    upstream: secure\n"
    )
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    out = run_cli("check", str(path))
    output = out.stdout + out.stderr
    assert out.returncode != 0
    hits = [ln for ln in output.splitlines() if re.search(r"gw\.yaml:6(:\d+)?:", ln)]
    assert hits, output
    assert "missing-ca.pem" in hits[0] and "cannot read" in hits[0]


def test_check_accepts_https_urls_and_rejects_half_a_client_identity(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "listen: [127.0.0.1:18999]\n"
        "routes:\n"
        "  - paths: [/*]\n"
        "    upstream: https://api.example.test/base\n"
    )
    out = run_cli("check", str(good))
    assert out.returncode == 0, out.stdout + out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "listen: [127.0.0.1:18999]\n"
        "upstreams:\n"
        "  secure:\n"
        "    targets: [localhost:8443]\n"
        "    tls:\n"
        "      client_cert: gw.pem\n"
        '      min_version: "1.1"\n'
        "routes:\n"
        "  - paths: [/*]\n"
        "    upstream: secure\n"
    )
    out = run_cli("check", str(bad))
    output = out.stdout + out.stderr
    assert out.returncode != 0
    assert re.search(r"bad\.yaml:6(:\d+)?:.*needs its private key \(client_key\)", output), output
    assert re.search(r"bad\.yaml:7(:\d+)?:.*1\.1", output), output


def test_schema_describes_upstream_tls() -> None:
    out = run_cli("schema")
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)
    tls = schema["$defs"]["UpstreamTls"]["properties"]
    assert {"verify", "ca", "sni", "client_cert", "client_key", "min_version"} <= set(tls)
    assert "tls" in schema["$defs"]["Upstream"]["properties"]
