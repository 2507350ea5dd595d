"""From the ``plugins:`` lists of a config to each route's chain: names resolved, settings
validated against each plugin's ``Config``, top-level and route plugins merged and ordered.

Run order within every phase: higher ``priority`` first; equal priorities keep config order,
top-level plugins before the route's own. A route plugin with the name of a top-level one
replaces it (``enabled: false`` removes it).
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from ferrogate.plugin_registry import PluginSpec, Registry
from ferrogate.problems import DataPath
from ferrogate.structcheck import did_you_mean

__all__ = ["Entry", "chain_of", "check_use", "consumer_chains"]

Report = Callable[[DataPath, str], None]

_AT = re.compile(r"^(.*?)(?: - at `\$(.*)`)?$", re.S)
_SEGMENT = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


@dataclass(frozen=True)
class Entry:
    """One plugin use, checked."""

    spec: PluginSpec
    config: Any
    """The plugin's settings as plain data (validated; defaults filled in)."""
    priority: int
    enabled: bool
    request_body: bool
    response_body: str
    settings: dict[str, Any]
    """timeout, budget, on_over_budget, bypass_for (seconds)."""
    body_cap: int = 0
    """Cap of the bodies this use buffers, in bytes."""


def _config_path(where: str) -> DataPath:
    out: list[str | int] = []
    for name, index in _SEGMENT.findall(where):
        out.append(int(index) if index else name)
    return tuple(out)


def check_use(
    use: Any,
    at: DataPath,
    registry: Registry,
    report: Report,
    owner: str,
    settings: dict[str, Any],
) -> Entry | None:
    """Resolve and validate one ``PluginUse``; problems name the plugin and ``owner``."""
    spec = registry.plugins.get(use.name)
    if spec is not None and not use.enabled:
        # Switched off (typically a top-level plugin on one route): nothing to validate.
        return Entry(spec, None, 0, False, False, "none", settings)
    if spec is None:
        hint = did_you_mean(use.name, registry.plugins)
        if not hint and registry.warnings:
            hint = " (" + "; ".join(registry.warnings) + ")"
        report((*at, "name"), f"unknown plugin '{use.name}'{hint} ({owner})")
        return None
    try:
        config = msgspec.convert(use.config, spec.config_type)
    except msgspec.ValidationError as e:
        m = _AT.match(str(e))
        assert m is not None
        reason, where = m.group(1), m.group(2) or ""
        report(
            (*at, "config", *_config_path(where)),
            f"{reason} (plugin '{use.name}' on {owner})",
        )
        return None
    try:
        spec.cls(config)
        request_body = spec.cls.request_body_mode(config)
        response_body = spec.cls.response_body_mode(config)
        body_cap = int(spec.cls.max_body_size_for(config))
    except Exception as e:
        report((*at, "config"), f"plugin '{use.name}' on {owner} cannot start: {e}")
        return None
    needs = {"buffered": "on_response_body", "streamed": "on_response_chunk"}.get(response_body)
    if response_body not in ("none", "buffered", "streamed") or (
        needs is not None and needs not in spec.hooks
    ):
        report(
            (*at, "name"),
            f"plugin '{use.name}' asks for response body mode {response_body!r} "
            f"but does not define {needs or 'a body hook'}",
        )
        return None
    return Entry(
        spec=spec,
        config=msgspec.to_builtins(config),
        priority=spec.priority if use.priority is None else use.priority,
        enabled=use.enabled,
        request_body=request_body == "buffered",
        response_body=response_body,
        settings=settings,
        body_cap=body_cap,
    )


def chain_of(
    route_index: int, top: list[Entry | None], own: list[Entry | None]
) -> dict[str, Any] | None:
    """The normalized plugin chain of a route, or None when it has no plugins.

    The data plane reads the phase flags; the worker's plugin host reads ``entries``.
    """
    merged: dict[str, tuple[int, Entry]] = {}
    order = 0
    for entry in [*top, *own]:
        if entry is None:
            continue
        merged.pop(entry.spec.name, None)
        merged[entry.spec.name] = (order, entry)
        order += 1
    ordered = sorted(
        (v for v in merged.values() if v[1].enabled), key=lambda v: (-v[1].priority, v[0])
    )
    entries = [e for _, e in ordered]
    if not entries:
        return None

    def mode(hook: str) -> str | None:
        found = [e.spec.hooks[hook] for e in entries if hook in e.spec.hooks]
        if not found:
            return None
        return "async" if any(found) else "sync"

    body = "none"
    if any(e.response_body == "buffered" for e in entries):
        body = "buffered"
    elif any(e.response_body == "streamed" for e in entries):
        body = "streamed"
    return {
        "chain": route_index,
        "request": mode("on_request") or "sync",
        "request_body": any(e.request_body for e in entries),
        "response": mode("on_response"),
        "response_body": body,
        "log": any("on_log" in e.spec.hooks for e in entries),
        "body_cap": min(
            (e.body_cap for e in entries if e.request_body or e.response_body == "buffered"),
            default=0,
        ),
        "entries": [
            {
                "name": e.spec.name,
                "config": e.config,
                "priority": e.priority,
                "response_body": e.response_body,
                **e.settings,
            }
            for e in entries
        ],
    }


def consumer_chains(
    uses: dict[str, list[Entry | None]], routes: list[dict[str, Any]], report: Report
) -> dict[str, list[dict[str, Any]]]:
    """The normalized plugins of each consumer (``consumers.NAME.plugins``), in run order.

    They run in the access phase only, inside the route's chain right after its
    authentication plugins (see ``plugin_host``), so a plugin with other hooks or a body
    mode is refused. When one has an async ``on_request``, every chain's access phase is
    made async so that it can be awaited.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    any_async = False
    for consumer, entries in uses.items():
        kept: list[tuple[int, Entry]] = []
        for j, entry in enumerate(entries):
            if entry is None or not entry.enabled:
                continue
            at: DataPath = ("consumers", consumer, "plugins", j, "name")
            name = entry.spec.name
            other = sorted(h for h in entry.spec.hooks if h != "on_request")
            if "on_request" not in entry.spec.hooks:
                report(at, f"plugin '{name}' has no on_request: a consumer's plugins run there")
            elif other or entry.request_body or entry.response_body != "none":
                report(
                    at,
                    f"plugin '{name}' on consumer '{consumer}': a consumer's plugins run in the "
                    f"access phase only (on_request), and this one also needs "
                    f"{', '.join(other) or 'a body'}",
                )
            else:
                kept.append((j, entry))
        kept.sort(key=lambda v: (-v[1].priority, v[0]))
        any_async = any_async or any(e.spec.hooks["on_request"] for _, e in kept)
        out[consumer] = [
            {"name": e.spec.name, "config": e.config, "priority": e.priority, **e.settings}
            for _, e in kept
        ]
    if any_async:
        for route in routes:
            if route.get("plugins"):
                route["plugins"]["request"] = "async"
    return out
