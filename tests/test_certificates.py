"""Certificates as entities: created, replaced and deleted through the admin API and served
by SNI on the HTTPS listener within a second (real TLS clients: Python's ssl, openssl
s_client), validation refusing a broken PEM or a key of another certificate, the private
key never shown, and the same checks on a config file."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from admin_gateway import OPERATOR_TOKEN, AdminGateway
from certs import CA, Issued
from gateway import free_port, run_cli
from upstreams import Upstream

BOUND = 1.0


def served_serial(port: int, server_name: str | None) -> int:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as s,
    ):
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def certificate_served_within(
    port: int, server_name: str, serial: int, bound: float = BOUND
) -> float:
    """Seconds until many fresh handshakes (any worker) all get the certificate ``serial``."""
    t0 = time.monotonic()
    while True:
        got = {served_serial(port, server_name) for _ in range(8)}
        took = time.monotonic() - t0
        if got == {serial}:
            return took
        assert took < bound, f"{server_name}: serials {got} after {took:.2f}s, want {serial}"
        time.sleep(0.02)


def s_client_serial(port: int, server_name: str, ca: Path) -> int:
    done = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            server_name,
            "-verify_return_error",
            "-verify_hostname",
            server_name,
            "-CAfile",
            str(ca),
        ],
        input=b"",
        capture_output=True,
        timeout=10,
    )
    assert done.returncode == 0, done.stdout.decode()[-2000:] + done.stderr.decode()
    out = done.stdout.decode()
    pem = out[out.index("-----BEGIN CERTIFICATE-----") : out.index("-----END CERTIFICATE-----")]
    cert = x509.load_pem_x509_certificate((pem + "-----END CERTIFICATE-----\n").encode())
    return int(cert.serial_number)


class Setup:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = CA()
        self.ca_file = self.ca.write(directory / "ca.pem")
        self.default = self.ca.issue("CN=gateway.test", dns=["gateway.test"])
        self.default.write(directory, "default")


def body(name: str, issued: Issued, snis: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "cert": issued.cert_pem().decode(),
        "key": issued.key_pem().decode(),
        "snis": snis,
    }


@pytest.fixture
def node(tmp_path: Path, upstream: Upstream) -> Iterator[tuple[AdminGateway, Setup, int]]:
    setup = Setup(tmp_path / "certs")
    port = free_port()
    config = {
        "tls": {
            "listen": [f"127.0.0.1:{port}"],
            "certificates": [{"cert": "../certs/default.pem", "key": "../certs/default.key"}],
        },
        "upstreams": {"backend": {"targets": [upstream.address]}},
        "routes": [{"name": "base", "paths": ["/*"], "upstream": "backend"}],
    }
    ag = AdminGateway(tmp_path / "gw", config)
    ag.start()
    try:
        yield ag, setup, port
    finally:
        ag.stop()


def test_certificate_entity_served_by_sni_updated_and_deleted(
    node: tuple[AdminGateway, Setup, int],
) -> None:
    ag, setup, port = node
    default = setup.default.serial
    assert served_serial(port, "shop.test") == default

    shop = setup.ca.issue("CN=shop.test", dns=["shop.test", "*.shop.test"])
    with ag.api() as api:
        r = api.post("/certificates", json=body("shop", shop, ["shop.test", "*.shop.test"]))
        assert r.status_code == 201, r.text
        assert r.json()["key"] == "[REDACTED]"
        assert r.json()["snis"] == ["shop.test", "*.shop.test"]
    certificate_served_within(port, "shop.test", shop.serial)
    certificate_served_within(port, "www.shop.test", shop.serial)
    assert s_client_serial(port, "www.shop.test", setup.ca_file) == shop.serial
    # Other names, and clients that send none, keep the listener's certificate.
    assert served_serial(port, "other.test") == default
    assert served_serial(port, None) == default
    assert served_serial(port, "a.b.shop.test") == default

    with ag.api() as api:
        got = api.get("/certificates/shop")
        assert got.status_code == 200
        assert got.json()["key"] == "[REDACTED]"
        assert got.json()["cert"] == shop.cert_pem().decode()
        listed = api.get("/certificates").json()["data"]
        assert [c["key"] for c in listed] == ["[REDACTED]"]

        # Renewed: a new certificate and key for the same names.
        renewed = setup.ca.issue("CN=shop.test", dns=["shop.test", "*.shop.test"])
        r = api.put("/certificates/shop", json=body("shop", renewed, ["shop.test", "*.shop.test"]))
        assert r.status_code == 200, r.text
    certificate_served_within(port, "shop.test", renewed.serial)

    # Read, modify, write back: the redacted key stands for the stored one.
    with ag.api() as api:
        entity = api.get("/certificates/shop").json()
        entity["snis"] = ["shop.test"]
        r = api.put("/certificates/shop", json=entity)
        assert r.status_code == 200, r.text
    certificate_served_within(port, "www.shop.test", default)
    assert served_serial(port, "shop.test") == renewed.serial

    with ag.api() as api:
        audit = api.get("/audit", params={"entity": "certificates/shop"}).json()["data"]
        assert [e["method"] for e in audit] == ["PUT", "PUT", "POST"]
        text = json.dumps(audit)
        assert "PRIVATE KEY" not in text and "[REDACTED]" in text
        assert api.delete("/certificates/shop").status_code == 204
    certificate_served_within(port, "shop.test", default)


def test_broken_certificates_are_refused_at_their_field(
    node: tuple[AdminGateway, Setup, int],
) -> None:
    ag, setup, _ = node
    one = setup.ca.issue("CN=one.test", dns=["one.test"])
    other = setup.ca.issue("CN=other.test", dns=["other.test"])

    def refused(entity: dict[str, Any]) -> list[dict[str, str]]:
        with ag.api() as api:
            r = api.post("/certificates", json=entity)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "invalid_config"
            assert api.get(f"/certificates/{entity['name']}").status_code == 404
            return list(r.json()["error"]["problems"])

    mismatched = {**body("bad", one, ["one.test"]), "key": other.key_pem().decode()}
    [p] = refused(mismatched)
    assert p["path"] == "certificates/bad/key"
    assert "does not belong to the certificate" in p["message"]
    assert "PRIVATE KEY" not in json.dumps(p)

    garbled = {**body("bad", one, ["one.test"]), "cert": "-----BEGIN CERTIFICATE-----\nnope\n"}
    assert [p["path"] for p in refused(garbled)] == ["certificates/bad/cert"]
    not_a_key = {**body("bad", one, ["one.test"]), "key": "hello"}
    assert [p["path"] for p in refused(not_a_key)] == ["certificates/bad/key"]
    bad_name = body("bad", one, ["one.test", "not a host"])
    assert [p["path"] for p in refused(bad_name)] == ["certificates/bad/snis/1"]

    # Private keys are for admins: an operator may not write certificates.
    with ag.api(OPERATOR_TOKEN) as api:
        r = api.post("/certificates", json=body("one", one, ["one.test"]))
        assert r.status_code == 403


def test_certificates_in_a_config_file_are_checked(tmp_path: Path) -> None:
    ca = CA()
    one = ca.issue("CN=one.test", dns=["one.test"])
    other = ca.issue("CN=other.test", dns=["other.test"])
    (tmp_path / "one.key").write_bytes(other.key_pem())
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": ["127.0.0.1:1"],
                "routes": [{"paths": ["/"], "upstream": "http://127.0.0.1:2"}],
                "certificates": {
                    "one": {
                        "cert": one.cert_pem().decode(),
                        "key": {"file": "one.key"},
                        "snis": ["one.test"],
                    },
                },
            },
            sort_keys=False,
        )
    )
    done = run_cli("check", str(config))
    assert done.returncode != 0
    assert "certificates.one.key" in done.stdout, done.stdout
    assert "does not belong to the certificate" in done.stdout
    (tmp_path / "one.key").write_bytes(one.key_pem())
    done = run_cli("check", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
