"""A worker's plugin host: builds the ``Host`` the data plane calls, from the normalized
config, each time the config is applied (start and every reload).

Plugin code is imported afresh for every build, so ``ferrogate reload`` picks up changed
plugin files. The new ``Host`` serves new requests; requests in flight hold the previous one
(and through it the previous code) until they finish.

Async hooks run on one event loop per worker (uvloop when installed), on a thread of its
own; the data plane hands such a phase over and awaits the answer without blocking its
other connections. Sync hooks run inline on the data plane's thread.
"""

import asyncio
import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from ferrogate import consumer_plugins, consumers
from ferrogate.hooks import Chain, Host, Slot
from ferrogate.plugin_registry import discover

__all__ = [
    "build_host",
    "hook_loop",
    "hooks_of",
    "load",
    "publish_stats",
    "set_worker_identity",
    "worker_identity",
]

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()

# The host serving new requests, and where its plugin timings are published.
_current: Host | None = None
_stats_path: Path | None = None
_stats_worker = 0
STATS_INTERVAL = 2.0
# The runtime file and worker id of this worker process (None outside a worker).
_identity: tuple[Path, int] | None = None


def set_worker_identity(runtime: Path, worker_id: int) -> None:
    """Said by the worker before its first host is built."""
    global _identity
    _identity = (runtime, worker_id)


def worker_identity() -> tuple[Path, int] | None:
    """The runtime file and worker id, for plugins that hand the master files of their own
    beside it (``ai/usage.py``); None outside a worker."""
    return _identity


def publish_stats(path: str | os.PathLike[str], worker_id: int) -> None:
    """Write this worker's per-plugin timings to ``path`` every ``STATS_INTERVAL`` seconds
    (`ferrogate plugins --stats` sums the workers' files). Counters survive reloads."""
    global _stats_path, _stats_worker
    _stats_path = Path(path)
    _stats_worker = worker_id
    threading.Thread(target=_stats_loop, name="ferrogate-plugin-stats", daemon=True).start()


def _stats_loop() -> None:
    while True:
        time.sleep(STATS_INTERVAL)
        host, path = _current, _stats_path
        if host is None or path is None:
            continue
        record = {
            "pid": os.getpid(),
            "worker": _stats_worker,
            "ts": round(time.time(), 3),
            "routes": host.stats(),
        }
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(record, separators=(",", ":")))
            os.replace(tmp, path)
        except OSError:
            pass


def hook_loop() -> asyncio.AbstractEventLoop:
    """The worker's event loop for async hooks, started on first use."""
    global _loop
    with _loop_lock:
        if _loop is None:
            try:
                import uvloop

                loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            except ImportError:
                loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="ferrogate-hooks", daemon=True)
            thread.start()
            _loop = loop
        return _loop


def hooks_of(plugin: Any, declared: Mapping[str, bool], response_body: str) -> dict[str, Any]:
    """The bound hooks of ``plugin`` that run: body hooks only in the body mode its config
    asked for; a plugin with both body hooks keeps both (each request may pick the mode,
    ``req.response_body_mode``) unless its config asked for none."""
    skip = set()
    both = "on_response_body" in declared and "on_response_chunk" in declared
    if response_body != "buffered" and not (both and response_body == "streamed"):
        skip.add("on_response_body")
    if response_body != "streamed" and not (both and response_body == "buffered"):
        skip.add("on_response_chunk")
    return {hook: getattr(plugin, hook) for hook in declared if hook not in skip}


def build_host(config: dict[str, Any]) -> Host | None:
    """The plugin host for a normalized config; None when no route has plugins."""
    routes = config.get("routes", [])
    if not any(r.get("plugins") for r in routes):
        return None
    # Before the plugins are made: one may look its consumers up in its constructor.
    consumers.install(config.get("consumers", {}))
    registry = discover(config.get("plugins_dir"))
    chains: list[Chain] = [Chain(r["name"], []) for r in routes]
    instances: dict[tuple[str, str], Any] = {}
    any_async = False

    def slot_of(entry: dict[str, Any], skip_for: frozenset[str] = frozenset()) -> Slot:
        nonlocal any_async
        plugin_spec = registry.plugins.get(entry["name"])
        if plugin_spec is None:
            problems = "; ".join(registry.problems) or "not found"
            raise RuntimeError(f"plugin '{entry['name']}' is not available: {problems}")
        # One instance per plugin and config in a worker: a top-level plugin on every
        # route is one object (with one connection pool, one cache), as in Kong.
        key = (entry["name"], json.dumps(entry["config"], sort_keys=True))
        plugin = instances.get(key)
        if plugin is None:
            config_struct = msgspec.convert(entry["config"], plugin_spec.config_type)
            plugin = instances[key] = plugin_spec.cls(config_struct)
        hooks = hooks_of(plugin, plugin_spec.hooks, entry.get("response_body", "none"))
        any_async = any_async or any(plugin_spec.hooks.values())
        return Slot(
            entry["name"],
            plugin,
            consumer_plugins.guarded(hooks, skip_for),
            timeout=entry.get("timeout"),
            budget=entry.get("budget"),
            on_over_budget=entry.get("on_over_budget", "log"),
            bypass_for=entry.get("bypass_for", 30.0),
        )

    # Plugins per consumer: one dispatching slot in every chain (consumer_plugins.py).
    own = {
        name: [slot_of(entry) for entry in c["plugins"]]
        for name, c in config.get("consumers", {}).items()
        if c.get("plugins")
    }
    dispatch = consumer_plugins.dispatcher(own, any_async) if own else None
    replaced = consumer_plugins.overriding(config.get("consumers", {}))
    for route in routes:
        spec = route.get("plugins")
        if not spec:
            continue
        entries = spec["entries"]
        at = consumer_plugins.position(entries)
        slots = [
            slot_of(entry, replaced.get(entry["name"], frozenset()) if i >= at else frozenset())
            for i, entry in enumerate(entries)
        ]
        if dispatch is not None:
            slots.insert(at, dispatch)
        chains[spec["chain"]] = Chain(route["name"], slots)
    host = Host(chains, hook_loop() if any_async else None)
    if _current is not None:
        _carry_stats(_current, host)
    return host


def _carry_stats(old: Host, new: Host) -> None:
    """A reloaded plugin on the same route keeps counting where it was."""
    previous = {
        (chain.route, slot.name): slot.stats
        for chain in old.chains
        for slot in {*chain.request, *chain.response, *chain.body, *chain.log}
    }
    for chain in new.chains:
        for slot in {*chain.request, *chain.response, *chain.body, *chain.log}:
            stats = previous.get((chain.route, slot.name))
            if stats is not None:
                slot.stats = stats


def load(config_json: str) -> Host | None:
    """Entry point for the data plane: the host for this config text."""
    global _current
    host = build_host(json.loads(config_json))
    _current = host
    return host
