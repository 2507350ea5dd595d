"""The ``tls:`` section: HTTPS listeners, their certificates and client certificates.

The files are read and checked by the Rust engine (``_core.check_config`` builds the same
rustls config a worker does), so ``ferrogate check`` reports an unreadable file, a PEM
without a certificate or a key that does not match its certificate.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ferrogate.problems import DataPath

__all__ = ["CertificateFiles", "ClientAuth", "Tls", "normalize_tls"]

Address = Annotated[str, Meta(description="host:port; IPv6 hosts in brackets: [::1]:8443.")]
TLS_VERSIONS = ("1.2", "1.3")


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class CertificateFiles(_Section, kw_only=True, frozen=True):
    """A certificate (PEM, followed by its intermediates) and its private key (PEM)."""

    cert: Annotated[str, Meta(description="Path, relative to the config file.")]
    key: Annotated[str, Meta(description="Path, relative to the config file.")]


class ClientAuth(_Section, kw_only=True, frozen=True):
    """Client certificates (mutual TLS)."""

    mode: Annotated[
        Literal["none", "optional", "required"],
        Meta(
            description="required: the handshake fails without a valid client certificate; "
            "optional: verified when sent (routes with `client_cert: required` need one)."
        ),
    ] = "none"
    ca: Annotated[
        str | None,
        Meta(description="PEM bundle of the CAs client certificates must chain to."),
    ] = None


class Tls(_Section, kw_only=True, frozen=True):
    """HTTPS listeners (HTTP/1.1 and HTTP/2 by ALPN)."""

    listen: Annotated[list[Address], Meta(description="Addresses that serve HTTPS.")]
    certificates: Annotated[
        list[CertificateFiles],
        Meta(
            description="Chosen by the name the client asks for (SNI) among each "
            "certificate's DNS names; the first when none fits."
        ),
    ]
    min_version: Annotated[
        str | float, Meta(description='The oldest TLS version accepted: "1.2" or "1.3".')
    ] = "1.2"
    client_auth: Annotated[ClientAuth, Meta(description="Client certificates; off.")] = (
        msgspec.field(default_factory=ClientAuth)
    )


def normalize_tls(
    tls: Tls,
    base_dir: Path,
    address: Callable[[str, DataPath], str],
    taken: list[str],
    report: Callable[[DataPath, str], None],
) -> dict[str, Any]:
    """The normalized ``tls`` section: absolute paths; ``taken`` are the plain listeners."""
    listen: list[str] = []
    for i, a in enumerate(tls.listen):
        normalized = address(a, ("tls", "listen", i))
        # Port 0 (any free port) never collides.
        if not normalized.endswith(":0") and (normalized in taken or normalized in listen):
            report(("tls", "listen", i), f"{normalized} is already a listen address")
        listen.append(normalized)
    if not tls.listen:
        report(("tls", "listen"), "at least one HTTPS listen address is needed")
    if not tls.certificates:
        report(("tls", "certificates"), "at least one certificate is needed")
    version = tls.min_version if isinstance(tls.min_version, str) else f"{tls.min_version:g}"
    if version not in TLS_VERSIONS:
        report(
            ("tls", "min_version"),
            f"'{version}' is not accepted: TLS 1.2 or 1.3 (older versions are insecure)",
        )
    auth = tls.client_auth
    if auth.mode != "none" and auth.ca is None:
        report(("tls", "client_auth", "ca"), f"mode '{auth.mode}' needs a CA bundle ('ca')")
    return {
        "listen": listen,
        "certificates": [
            {"cert": str(base_dir / c.cert), "key": str(base_dir / c.key)} for c in tls.certificates
        ],
        "min_version": version,
        "client_auth": {
            "mode": auth.mode,
            "ca": None if auth.ca is None else str(base_dir / auth.ca),
        },
    }
