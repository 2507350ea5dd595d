"""``waf:``, globally and per route: the web application firewall (libmodsecurity + OWASP CRS).

The data plane loads libmodsecurity when a config enables the WAF and compiles the rules
(``_core.check_config`` does the same), so ``ferrogate check`` reports a missing library or
a rules file that does not compile, with libmodsecurity's reason. See docs/security.md.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ferrogate.problems import DataPath
from ferrogate.units import Size, parse_size

__all__ = ["RouteWaf", "Waf", "normalize_route_waf", "normalize_waf"]

Paranoia = Annotated[int, Meta(ge=1, le=4)]
Threshold = Annotated[int, Meta(ge=1)]
Mode = Literal["block", "detect"]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class Waf(_Section, kw_only=True, frozen=True):
    """The web application firewall on every route (a route may change or turn it off)."""

    rules: Annotated[
        str | list[str],
        Meta(
            description='"crs": the OWASP Core Rule Set installed on the system; or a list of '
            '"crs" and .conf files (relative to the config file), loaded in order.'
        ),
    ] = "crs"
    mode: Annotated[
        Mode,
        Meta(description="block: refuse with 403 waf_blocked; detect: log and forward."),
    ] = "block"
    paranoia: Annotated[
        Paranoia,
        Meta(description="CRS paranoia level 1-4: higher catches more, and more false positives."),
    ] = 1
    anomaly_threshold: Annotated[
        Threshold,
        Meta(description="CRS inbound anomaly score at which a request is refused."),
    ] = 5
    body_limit: Annotated[
        Size, Meta(description="Request bodies up to this size are inspected.")
    ] = 128 * 1024
    body_over_limit: Annotated[
        Literal["reject", "partial"],
        Meta(
            description="A larger body: reject (413 body_too_large), or partial (inspect "
            "the first body_limit bytes, forward all)."
        ),
    ] = "reject"


class RouteWaf(_Section, kw_only=True, frozen=True):
    """The WAF on one route: the top-level settings with these changes."""

    mode: Annotated[Mode | None, Meta(description="Overrides the top-level mode.")] = None
    paranoia: Annotated[
        Paranoia | None, Meta(description="Overrides the top-level paranoia level.")
    ] = None
    anomaly_threshold: Annotated[
        Threshold | None, Meta(description="Overrides the top-level threshold.")
    ] = None
    exclude_rules: Annotated[
        list[Annotated[int, Meta(ge=1)]],
        Meta(description="Rule ids that do not run on this route (e.g. 942100)."),
    ] = []
    exclude_args: Annotated[
        list[Annotated[str, Meta(pattern=r"^[^\s\"'|,]+$")]],
        Meta(
            description="Arguments (query, form or JSON; JSON keys as json.a.b) no rule "
            "inspects on this route."
        ),
    ] = []


RouteWafSetting = Annotated[
    RouteWaf | bool | Literal["off"] | None,
    Meta(description="off (or false): no WAF on this route; or changes to the top-level `waf`."),
]


def normalize_waf(
    waf: Waf | None, base_dir: Path, report: Callable[[DataPath, str], None]
) -> dict[str, Any] | None:
    """The normalized top-level ``waf``: rule files absolute, the size in bytes."""
    if waf is None:
        return None
    sources = [waf.rules] if isinstance(waf.rules, str) else list(waf.rules)
    if not sources:
        report(("waf", "rules"), "give 'crs' or rule files")
    rules: list[str] = []
    for j, source in enumerate(sources):
        at: DataPath = ("waf", "rules") if isinstance(waf.rules, str) else ("waf", "rules", j)
        if source == "crs":
            rules.append(source)
            continue
        path = base_dir / source
        if not path.is_file():
            report(at, f"no rules file at {path} (give 'crs' or a .conf file)")
        elif any(c.isspace() for c in str(path)):
            # libmodsecurity's Include directive takes the path unquoted.
            report(at, "the rules file's path must not contain spaces")
        rules.append(str(path))
    try:
        body_limit = parse_size(waf.body_limit)
    except ValueError as e:
        report(("waf", "body_limit"), str(e))
        body_limit = 0
    if body_limit == 0:
        report(("waf", "body_limit"), "must be above 0")
    return {
        "rules": rules,
        "mode": waf.mode,
        "paranoia": waf.paranoia,
        "anomaly_threshold": waf.anomaly_threshold,
        "body_limit": body_limit,
        "body_over_limit": waf.body_over_limit,
    }


def normalize_route_waf(
    setting: RouteWaf | bool | str | None,
    top: Waf | None,
    at: DataPath,
    report: Callable[[DataPath, str], None],
) -> dict[str, Any] | None:
    """A route's ``waf``: ``{"off": true}``, its overrides, or None (the top-level ones)."""
    if setting is None or setting is True:
        if setting is True and top is None:
            report(at, "the WAF needs the top-level 'waf' section")
        return None
    if setting is False or setting == "off":
        return {"off": True}
    assert isinstance(setting, RouteWaf)
    if top is None:
        report(at, "the WAF needs the top-level 'waf' section (its rules and body limit)")
    return {
        "off": False,
        "mode": setting.mode,
        "paranoia": setting.paranoia,
        "anomaly_threshold": setting.anomaly_threshold,
        "exclude_rules": list(setting.exclude_rules),
        "exclude_args": list(setting.exclude_args),
    }
