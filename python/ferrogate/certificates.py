"""The ``certificates:`` collection: server certificates served by SNI on the HTTPS listeners.

Unlike the files of ``tls.certificates`` (node-local), these are entities: the PEM is part of
the config (inline; the key may come from ``{file: PATH}`` or ``${VAR}``), so the admin API
manages them like routes and a cluster shares them. The listener's own certificate stays the
default for names no entity covers. Each is parsed here and its key checked against its
certificate, so a broken one is refused with its field before any worker sees it (the data
plane builds them again with rustls on every reload).
"""

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from msgspec import Meta

from ferrogate.consumers import Secret, read_secret
from ferrogate.problems import DataPath

__all__ = ["Certificate", "normalize_certificates"]

# A DNS name, or a wildcard one level deep (*.example.com), as rustls compares them.
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_SNI = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")


class Certificate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A server certificate for the host names in ``snis``."""

    cert: Annotated[str, Meta(description="PEM: the certificate, then its intermediates (inline).")]
    key: Annotated[
        Secret,
        Meta(
            description="PEM private key of the certificate: inline (${VAR} for an environment "
            "variable) or {file: PATH}. Never shown by the admin API."
        ),
    ]
    snis: Annotated[
        list[str],
        Meta(description="Host names (SNI) this certificate answers; *.example.com allowed."),
    ]
    tags: Annotated[dict[str, str], Meta(description="Free-form labels.")] = {}


def _public(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def normalize_certificates(
    certificates: Mapping[str, Certificate],
    base_dir: Path,
    report: Callable[[DataPath, str], None],
) -> list[dict[str, Any]]:
    """``[{name, cert, key, snis}]`` with the key read; every problem at its field. Messages
    never quote the key."""
    out: list[dict[str, Any]] = []
    owner: dict[str, str] = {}
    for name, c in certificates.items():
        at: DataPath = ("certificates", name)
        snis: list[str] = []
        if not c.snis:
            report((*at, "snis"), "at least one host name is needed")
        for i, sni in enumerate(c.snis):
            host = sni.strip().lower().rstrip(".")
            if not _SNI.match(host):
                report((*at, "snis", i), f"'{sni}' is not a host name (or *.domain wildcard)")
                continue
            if host in owner and owner[host] != name:
                report(
                    (*at, "snis", i), f"'{host}' is already served by certificate '{owner[host]}'"
                )
                continue
            owner[host] = name
            snis.append(host)
        leaf = None
        try:
            chain = x509.load_pem_x509_certificates(c.cert.encode())
            leaf = chain[0]
        except ValueError:
            report((*at, "cert"), "not a PEM certificate (BEGIN CERTIFICATE ...)")
        key_text = read_secret(c.key, base_dir, report, (*at, "key"), "private key")
        private = None
        if key_text:
            try:
                private = serialization.load_pem_private_key(key_text.encode(), password=None)
            except Exception:
                # The library's message may quote the input: ours does not.
                report((*at, "key"), "not an unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1)")
        elif isinstance(c.key, str):
            report((*at, "key"), "empty private key")
        if leaf is not None and private is not None:
            try:
                matches = _public(leaf.public_key()) == _public(private.public_key())
            except ValueError:
                matches = False
            if not matches:
                report((*at, "key"), "the private key does not belong to the certificate")
        out.append({"name": name, "cert": c.cert, "key": key_text, "snis": snis})
    return out
