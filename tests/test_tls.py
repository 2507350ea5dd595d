"""TLS termination: HTTPS and HTTP/2 by ALPN, certificates by SNI, protocol versions,
certificate rotation without a restart, client certificates (mTLS) and consumers by
certificate. Certificates are made per test by ``certs.CA``; clients are real (httpx,
Python's ssl, curl, openssl s_client)."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from certs import CA, Issued
from gateway import Gateway, GatewayFactory, free_port, run_cli
from upstreams import Upstream


class Pki:
    """A server CA with certificates for a.test and b.test, and a client CA."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(exist_ok=True)
        self.ca = CA()
        self.ca_file = self.ca.write(directory / "ca.pem")
        self.a = self.ca.issue("CN=a.test", dns=["a.test", "localhost"])
        self.a.write(directory, "a")
        self.b = self.ca.issue("CN=b.test", dns=["b.test", "*.b.test"])
        self.b.write(directory, "b")
        self.client_ca = CA("ferrogate test client CA")
        self.client_ca_file = self.client_ca.write(directory / "client-ca.pem")

    def client(self, subject: str, **kwargs: Any) -> tuple[Path, Path]:
        issued = self.client_ca.issue(subject, client=True, **kwargs)
        return issued.write(self.dir, subject.split(",")[0].split("=")[1])


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "certs")


def tls_section(tls_port: int, **extra: Any) -> dict[str, Any]:
    # Relative to the config file, which is in tmp_path/gateway-N/.
    return {
        "listen": [f"127.0.0.1:{tls_port}"],
        "certificates": [
            {"cert": "../certs/a.pem", "key": "../certs/a.key"},
            {"cert": "../certs/b.pem", "key": "../certs/b.key"},
        ],
        **extra,
    }


def start(
    gateway: GatewayFactory,
    upstream: Upstream,
    *,
    routes: list[dict[str, Any]] | None = None,
    workers: int = 1,
    **tls: Any,
) -> tuple[Gateway, str]:
    port = free_port()
    config: dict[str, Any] = {
        "tls": tls_section(port, **tls),
        "access_log": {"path": "access.log"},
        "routes": routes or [{"paths": ["/*"], "upstream": upstream.url}],
    }
    gw = gateway(config, workers=workers)
    return gw, f"https://localhost:{port}"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def context(
    pki: Pki,
    *,
    cert: tuple[Path, Path] | None = None,
    version: ssl.TLSVersion | None = None,
    ca: Path | None = None,
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca or pki.ca_file))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def served_certificate(
    port: int, server_name: str | None, ctx: ssl.SSLContext | None = None
) -> tuple[dict[str, Any], str | None]:
    """The certificate the gateway presents for ``server_name`` (None: no SNI), and the
    negotiated protocol version."""
    if ctx is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with ctx.wrap_socket(raw, server_hostname=server_name) as s:
        der = s.getpeercert(binary_form=True)
        version = s.version()
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return {
        "serial": cert.serial_number,
        "dns": sans.value.get_values_for_type(x509.DNSName),
    }, version


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout}s (last: {last!r})")


def access_lines(gw: Gateway) -> list[dict[str, Any]]:
    path = gw.dir / "access.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def logged(gw: Gateway, request_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((r for r in access_lines(gw) if r["request_id"] == request_id), None)

    found: dict[str, Any] = wait_until(find, 5, f"access log line for {request_id}")
    return found


# --- HTTPS, HTTP/2, forwarded headers ------------------------------------------------------


def test_https_serves_http1_and_http2_and_tells_the_upstream(
    gateway: GatewayFactory, upstream: Upstream, pki: Pki
) -> None:
    gw, url = start(gateway, upstream)
    with httpx.Client(verify=context(pki), http2=False) as client:
        r = client.get(url + "/one")
    assert r.status_code == 200
    assert r.http_version == "HTTP/1.1"
    assert upstream.last().header("x-forwarded-proto") == "https"
    with httpx.Client(verify=context(pki), http2=True) as client:
        r = client.get(url + "/two")
        r2 = client.get(url + "/three")
    assert (r.status_code, r2.status_code) == (200, 200)
    assert r.http_version == "HTTP/2"
    assert upstream.last().path == "/three"
    assert upstream.last().header("x-forwarded-proto") == "https"
    # The plain listener is untouched.
    assert gw.get("/plain").status_code == 200
    assert upstream.last().header("x-forwarded-proto") == "http"
    # curl with our CA, over HTTP/2.
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(pki.ca_file),
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            url + "/curl",
        ],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "2 200"


def test_clients_that_do_not_trust_the_ca_refuse(
    gateway: GatewayFactory, upstream: Upstream, pki: Pki, tmp_path: Path
) -> None:
    _, url = start(gateway, upstream)
    other = CA("someone else").write(tmp_path / "other-ca.pem")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(url + "/", verify=context(pki, ca=other), timeout=10)
    out = subprocess.run(
        ["curl", "-sS", "--cacert", str(other), url + "/"],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert out.returncode == 60, out  # peer certificate cannot be authenticated
    assert upstream.count == 0


# --- certificates by SNI -------------------------------------------------------------------


def test_certificate_is_chosen_by_sni(
    gateway: GatewayFactory, upstream: Upstream, pki: Pki
) -> None:
    _, url = start(gateway, upstream)
    port = port_of(url)
    assert served_certificate(port, "a.test")[0]["serial"] == pki.a.serial
    assert served_certificate(port, "b.test")[0]["dns"] == ["b.test", "*.b.test"]
    assert served_certificate(port, "api.b.test")[0]["serial"] == pki.b.serial
    # No SNI, or a name no certificate covers: the first certificate.
    assert served_certificate(port, None)[0]["serial"] == pki.a.serial
    assert served_certificate(port, "unknown.example")[0]["serial"] == pki.a.serial
    # Verified by a client that checks the name it asked for.
    with httpx.Client(verify=context(pki)) as client:
        r = client.get(
            f"https://127.0.0.1:{port}/",
            headers={"host": "b.test"},
            extensions={"sni_hostname": "b.test"},
        )
    assert r.status_code == 200


# --- protocol versions ---------------------------------------------------------------------


def test_tls_1_2_and_1_3_accepted_older_refused(
    gateway: GatewayFactory, upstream: Upstream, pki: Pki
) -> None:
    _, url = start(gateway, upstream)
    port = port_of(url)
    for version, name in ((ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")):
        assert served_certificate(port, "a.test", context(pki, version=version))[1] == name
    # A client that offers only TLS 1.1 (allowed on its side) gets a handshake alert.
    out = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-tls1_1",
            "-cipher",
            "DEFAULT:@SECLEVEL=0",
        ],
        capture_output=True,
        text=True,
        timeout=15,
        stdin=subprocess.DEVNULL,
    )
    assert "SSL alert number" in out.stdout + out.stderr, out
    assert "no peer certificate available" in out.stdout


def test_min_version_1_3_refuses_tls_1_2(
    gateway: GatewayFactory, upstream: Upstream, pki: Pki
) -> None:
    _, url = start(gateway, upstream, min_version="1.3")
    port = port_of(url)
    assert (
        served_certificate(port, "a.test", context(pki, version=ssl.TLSVersion.TLSv1_3))[1]
        == "TLSv1.3"
    )
    with pytest.raises(ssl.SSLError):
        served_certificate(port, "a.test", context(pki, version=ssl.TLSVersion.TLSv1_2))


# --- bad certificates ----------------------------------------------------------------------


def test_expired_certificate_is_served_and_refused_by_clients(
    gateway: GatewayFactory, upstream: Upstream, pki: Pki
) -> None:
    pki.ca.issue("CN=a.test", dns=["localhost"], expired=True).write(pki.dir, "a")
    _, url = start(gateway, upstream)
    with pytest.raises(httpx.ConnectError, match="expired"):
        httpx.get(url + "/", verify=context(pki), timeout=10)
    out = subprocess.run(
        ["curl", "-sS", "--cacert", str(pki.ca_file), url + "/"],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert out.returncode == 60
    assert "expired" in out.stderr
    assert upstream.count == 0


def test_check_reports_bad_certificate_files(tmp_path: Path, pki: Pki) -> None:
    other = pki.ca.issue("CN=other", dns=["other.test"])
    # a.pem with b's key: a mismatch.
    (pki.dir / "mismatch.key").write_bytes(other.key_pem())
    (pki.dir / "empty.pem").write_text("not a certificate\n")
    config = tmp_path / "gw.yaml"
    base = {
        "listen": ["127.0.0.1:0"],
        "routes": [{"paths": ["/*"], "upstream": "http://127.0.0.1:9"}],
    }

    def check(tls: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        config.write_text(json.dumps({**base, "tls": tls}))
        done = run_cli("check", str(config))
        # Problems are listed on stdout, the count on stderr.
        done.stderr = done.stdout + done.stderr
        return done

    good = {
        "listen": ["127.0.0.1:0"],
        "certificates": [{"cert": "certs/a.pem", "key": "certs/a.key"}],
    }
    ok = check(good)
    assert ok.returncode == 0, ok.stderr
    bad = check({**good, "certificates": [{"cert": "certs/a.pem", "key": "certs/mismatch.key"}]})
    assert bad.returncode != 0
    assert "tls.certificates[0].key" in bad.stderr
    assert "does not belong to the certificate" in bad.stderr
    missing = check({**good, "certificates": [{"cert": "certs/nope.pem", "key": "certs/a.key"}]})
    assert missing.returncode != 0
    assert "nope.pem" in missing.stderr and "No such file" in missing.stderr
    empty = check({**good, "certificates": [{"cert": "certs/empty.pem", "key": "certs/a.key"}]})
    assert "no PEM certificate" in empty.stderr
    old = check({**good, "min_version": "1.1"})
    assert old.returncode != 0 and "tls.min_version" in old.stderr
    no_ca = check({**good, "client_auth": {"mode": "required"}})
    assert no_ca.returncode != 0 and "needs a CA bundle" in no_ca.stderr


# --- rotation ------------------------------------------------------------------------------


def test_rotated_certificate_is_served_without_restart(
    gateway: GatewayFactory, upstream: Upstream, pki: Pki
) -> None:
    gw, url = start(gateway, upstream, workers=2)
    port = port_of(url)
    assert served_certificate(port, "a.test")[0]["serial"] == pki.a.serial
    # A broken file (a half-finished copy) keeps the certificate in use.
    (pki.dir / "a.pem.tmp").write_text("-----BEGIN CERTIFICATE-----\ngarbage\n")
    (pki.dir / "a.pem.tmp").replace(pki.dir / "a.pem")
    wait_until(lambda: "tls_reload_failed" in gw.stderr_text(), 10, "a failed reload logged")
    assert served_certificate(port, "a.test")[0]["serial"] == pki.a.serial
    assert gw.get("/").status_code == 200
    rotated: Issued = pki.ca.issue("CN=a.test", dns=["a.test", "localhost"])
    rotated.write(pki.dir, "a")

    def new_serial_everywhere() -> bool:
        # Several connections, so that both workers are asked.
        return all(
            served_certificate(port, "a.test")[0]["serial"] == rotated.serial for _ in range(6)
        )

    wait_until(new_serial_everywhere, 15, "the rotated certificate served")
    with httpx.Client(verify=context(pki)) as client:
        assert client.get(url + "/").status_code == 200


def test_reload_reads_certificates_again(
    gateway: GatewayFactory, upstream: Upstream, pki: Pki
) -> None:
    gw, url = start(gateway, upstream)
    port = port_of(url)
    # A reload that swaps the order makes b the default certificate.
    config = gw.full_config(
        {
            "tls": {
                **tls_section(port),
                "certificates": [
                    {"cert": "../certs/b.pem", "key": "../certs/b.key"},
                    {"cert": "../certs/a.pem", "key": "../certs/a.key"},
                ],
            },
            "routes": [{"paths": ["/*"], "upstream": upstream.url}],
        }
    )
    gw.write_config_text(json.dumps(config))
    gw.signal(signal.SIGHUP)
    wait_until(
        lambda: served_certificate(port, None)[0]["serial"] == pki.b.serial, 10, "b is the default"
    )
    assert served_certificate(port, "a.test")[0]["serial"] == pki.a.serial


# --- client certificates -------------------------------------------------------------------


CONSUMERS = {
    "alice": {"credentials": [{"type": "mtls", "subject": "CN=alice, O=Acme"}]},
    "bob": {"credentials": [{"type": "mtls", "san": "spiffe://acme/bob"}]},
}


def test_required_client_certificate(gateway: GatewayFactory, upstream: Upstream, pki: Pki) -> None:
    port = free_port()
    gw = gateway(
        {
            "tls": tls_section(
                port, client_auth={"mode": "required", "ca": "../certs/client-ca.pem"}
            ),
            "consumers": CONSUMERS,
            "access_log": {"path": "access.log"},
            "routes": [{"paths": ["/*"], "upstream": upstream.url}],
        },
        workers=1,
    )
    url = f"https://localhost:{port}"
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/", verify=context(pki), timeout=10)
    stranger = CA("not trusted").issue("CN=alice,O=Acme", client=True).write(pki.dir, "stranger")
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/", verify=context(pki, cert=stranger), timeout=10)
    assert upstream.count == 0
    alice = pki.client("CN=alice,O=Acme")
    r = httpx.get(url + "/mine", verify=context(pki, cert=alice), timeout=10)
    assert r.status_code == 200
    assert logged(gw, r.headers["x-request-id"])["consumer"] == "alice"
    # curl too, by the certificate's URI SAN.
    bob = pki.client("CN=bob", uris=["spiffe://acme/bob"])
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--cacert",
            str(pki.ca_file),
            "--cert",
            str(bob[0]),
            "--key",
            str(bob[1]),
            url + "/bob",
        ],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert out.returncode == 0, out.stderr
    request_id = next(
        line.split(":", 1)[1].strip()
        for line in out.stdout.splitlines()
        if line.lower().startswith("x-request-id")
    )
    assert logged(gw, request_id)["consumer"] == "bob"


def test_optional_client_certificate_with_a_route_that_requires_one(
    gateway: GatewayFactory, upstream: Upstream, pki: Pki
) -> None:
    port = free_port()
    gw = gateway(
        {
            "tls": tls_section(
                port, client_auth={"mode": "optional", "ca": "../certs/client-ca.pem"}
            ),
            "consumers": CONSUMERS,
            "access_log": {"path": "access.log"},
            "routes": [
                {"paths": ["/*"], "upstream": upstream.url},
                {"paths": ["/admin/*"], "upstream": upstream.url, "client_cert": "required"},
            ],
        },
        workers=1,
    )
    url = f"https://localhost:{port}"
    with httpx.Client(verify=context(pki), http2=True) as anonymous:
        assert anonymous.get(url + "/public").status_code == 200
        r = anonymous.get(url + "/admin/users")
    assert r.status_code == 403
    error = r.json()["error"]
    assert error["code"] == "client_cert_required"
    assert error["request_id"] == r.headers["x-request-id"]
    assert upstream.last().path == "/public"
    # The plain listener has no client certificates at all.
    assert gw.get("/admin/users").status_code == 403
    # A certificate no consumer claims still opens the route; none is named.
    carol = pki.client("CN=carol,O=Acme")
    r = httpx.get(url + "/admin/x", verify=context(pki, cert=carol), timeout=10)
    assert r.status_code == 200
    assert logged(gw, r.headers["x-request-id"])["consumer"] is None
    alice = pki.client("CN=alice,O=Acme")
    r = httpx.get(url + "/admin/y", verify=context(pki, cert=alice), timeout=10)
    assert r.status_code == 200
    assert upstream.last().path == "/admin/y"
    assert logged(gw, r.headers["x-request-id"])["consumer"] == "alice"
