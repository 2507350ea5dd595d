"""``ip_restriction:``, globally and per route: client addresses let in or kept out.

The data plane checks the client's real address (behind ``trusted_proxies``, the one their
X-Forwarded-For names) and answers 403 ``ip_forbidden``; see docs/config.md.
"""

import ipaddress
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from ferrogate.problems import DataPath

__all__ = ["IpRestriction", "normalize_ip_restriction"]


class IpRestriction(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Client addresses (IPv4/IPv6 addresses or CIDRs) let in or kept out."""

    allow: Annotated[
        list[str],
        Meta(description="Only these addresses get through (when given); e.g. 10.0.0.0/8, ::1."),
    ] = []
    deny: Annotated[
        list[str], Meta(description="These addresses never get through, even when allowed.")
    ] = []


def normalize_ip_restriction(
    rules: IpRestriction | None, at: DataPath, report: Callable[[DataPath, str], None]
) -> dict[str, Any] | None:
    """Canonical CIDRs (``10.1.2.3`` -> ``10.1.2.3/32``), each bad entry reported."""
    if rules is None:
        return None
    if not rules.allow and not rules.deny:
        report(at, "give 'allow' or 'deny' addresses")
    out: dict[str, Any] = {}
    for field in ("allow", "deny"):
        nets = []
        for j, text in enumerate(getattr(rules, field)):
            try:
                nets.append(str(ipaddress.ip_network(text.strip(), strict=False)))
            except ValueError:
                report((*at, field, j), f"'{text}' is not an IP address or CIDR (10.0.0.0/8, ::1)")
        out[field] = nets
    return out
