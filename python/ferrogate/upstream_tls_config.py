"""``upstreams.NAME.tls``: TLS from the gateway to an upstream's targets.

The files are read and checked by the Rust engine (``_core.check_config`` builds the same
rustls client config a worker does), so ``ferrogate check`` reports an unreadable CA bundle
or a client key that does not fit its certificate, at the line of the setting.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from ferrogate.events import emit
from ferrogate.problems import DataPath
from ferrogate.tls_config import TLS_VERSIONS

__all__ = ["UpstreamTls", "default_upstream_tls", "normalize_upstream_tls", "warn_unverified"]


class UpstreamTls(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """TLS towards the targets; an `https://` route URL implies it with these defaults."""

    verify: Annotated[
        bool,
        Meta(
            description="Check the target's certificate (chain, validity period, name). "
            "false encrypts without authenticating the upstream, and is logged as a warning."
        ),
    ] = True
    ca: Annotated[
        str | None,
        Meta(
            description="PEM bundle of the CAs the targets' certificates must chain to "
            "(path relative to the config file); default: the system's trusted roots."
        ),
    ] = None
    sni: Annotated[
        str | None,
        Meta(
            description="The name sent as SNI and checked against the certificate; "
            "default: the target's host (an IP address is checked against the certificate's "
            "IP addresses and sends no SNI)."
        ),
    ] = None
    client_cert: Annotated[
        str | None,
        Meta(description="The gateway's certificate (PEM chain) for upstreams that ask for one."),
    ] = None
    client_key: Annotated[
        str | None, Meta(description="The private key (PEM) of `client_cert`.")
    ] = None
    min_version: Annotated[
        str | float, Meta(description='The oldest TLS version used: "1.2" or "1.3".')
    ] = "1.2"


def normalize_upstream_tls(
    tls: UpstreamTls | None,
    base_dir: Path,
    at: DataPath,
    report: Callable[[DataPath, str], None],
) -> dict[str, Any] | None:
    """The normalized ``tls`` of an upstream (absolute paths), or None for plain HTTP."""
    if tls is None:
        return None
    version = tls.min_version if isinstance(tls.min_version, str) else f"{tls.min_version:g}"
    if version not in TLS_VERSIONS:
        report(
            (*at, "min_version"),
            f"'{version}' is not accepted: TLS 1.2 or 1.3 (older versions are insecure)",
        )
    if tls.client_cert is not None and tls.client_key is None:
        report((*at, "client_cert"), "a client certificate needs its private key (client_key)")
    if tls.client_key is not None and tls.client_cert is None:
        report((*at, "client_key"), "a client key needs its certificate (client_cert)")

    def path(value: str | None) -> str | None:
        return None if value is None else str(base_dir / value)

    return {
        "verify": tls.verify,
        "ca": path(tls.ca),
        "sni": tls.sni,
        "client_cert": path(tls.client_cert),
        "client_key": path(tls.client_key),
        "min_version": version,
    }


def default_upstream_tls() -> dict[str, Any]:
    """What an ``https://`` route URL gets: verified against the system's roots."""
    normalized = normalize_upstream_tls(UpstreamTls(), Path(), (), lambda *_: None)
    assert normalized is not None
    return normalized


def unverified(upstreams: dict[str, Any]) -> list[str]:
    """Names of the upstreams whose targets' certificates are not checked."""
    return sorted(name for name, u in upstreams.items() if u.get("tls") and not u["tls"]["verify"])


def warn_unverified(upstreams: dict[str, Any]) -> None:
    """Log that TLS verification is off where it is (at start and at each reload)."""
    for name in unverified(upstreams):
        emit(
            "warning",
            "upstream_tls_unverified",
            upstream=name,
            message="tls.verify is false: the upstream's certificate is not checked",
        )
