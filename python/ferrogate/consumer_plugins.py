"""Plugins per consumer (``consumers.NAME.plugins``), run inside the route's access-phase
chain: no crossing of their own.

Every route chain gets one extra slot, placed right after its authentication plugins (the
entries of priority ``auth.PRIORITY`` or more, which come first in run order). That slot looks
at ``req.consumer`` (set by those plugins, or by the data plane from a client certificate)
and runs that consumer's ``on_request`` hooks in their own priority order; an early answer
from one ends the chain like any plugin's. A route plugin after that point with the name of
one of the consumer's plugins is skipped for that consumer: the more specific one wins (as
in Kong). Before that point nothing is known about the consumer, so nothing is replaced.
"""

import asyncio
from collections.abc import Callable, Mapping
from time import perf_counter_ns
from typing import Any

from ferrogate import auth
from ferrogate.hooks import Request, Slot

__all__ = ["DISPATCH_NAME", "dispatcher", "guarded", "overriding", "position"]

DISPATCH_NAME = "consumer-plugins"


def overriding(consumers: Mapping[str, Mapping[str, Any]]) -> dict[str, frozenset[str]]:
    """plugin name -> the consumers with a plugin of that name (normalized config)."""
    out: dict[str, set[str]] = {}
    for consumer, spec in consumers.items():
        for entry in spec.get("plugins") or []:
            out.setdefault(entry["name"], set()).add(consumer)
    return {name: frozenset(who) for name, who in out.items()}


def position(entries: list[Mapping[str, Any]]) -> int:
    """Where the dispatching slot goes in a route's (ordered) entries: after the
    authentication tier."""
    for i, entry in enumerate(entries):
        if entry["priority"] < auth.PRIORITY:
            return i
    return len(entries)


def guarded(hooks: dict[str, Any], skip_for: frozenset[str]) -> dict[str, Any]:
    """A route plugin's hooks with ``on_request`` skipped for the consumers in ``skip_for``
    (their own plugin of that name runs instead). An async hook's coroutine is returned
    unstarted, as the chain expects."""
    hook = hooks.get("on_request")
    if hook is None or not skip_for:
        return hooks

    def on_request(req: Request) -> Any:
        if req.consumer in skip_for:
            return None
        return hook(req)

    return {**hooks, "on_request": on_request}


def dispatcher(per_consumer: Mapping[str, list[Slot]], is_async: bool) -> Slot:
    """The slot that runs the request's consumer's plugins."""
    table = {
        name: tuple(s for s in slots if s.on_request is not None)
        for name, slots in per_consumer.items()
    }
    run: Callable[[Request], Any]

    def run_sync(req: Request) -> Any:
        slots = table.get(req.consumer) if req.consumer is not None else None
        if not slots:
            return None
        rid = req.request_id
        for slot in slots:
            start = perf_counter_ns()
            if slot.bypassed_until > start:
                continue
            try:
                answer = slot.on_request(req)
            except BaseException as e:
                raise slot.failed("on_request", rid, e) from None
            slot.account("on_request", rid, start, perf_counter_ns())
            if answer is not None:
                return answer
        return None

    async def run_async(req: Request) -> Any:
        slots = table.get(req.consumer) if req.consumer is not None else None
        if not slots:
            return None
        rid = req.request_id
        for slot in slots:
            start = perf_counter_ns()
            if slot.bypassed_until > start:
                continue
            try:
                answer = slot.on_request(req)
                if asyncio.iscoroutine(answer):
                    answer = await asyncio.wait_for(answer, slot.timeout)
            except TimeoutError:
                raise slot.failed(
                    "on_request", rid, TimeoutError(f"timed out after {slot.timeout}s")
                ) from None
            except BaseException as e:
                raise slot.failed("on_request", rid, e) from None
            slot.account("on_request", rid, start, perf_counter_ns())
            if answer is not None:
                return answer
        return None

    run = run_async if is_async else run_sync
    # Its own time is its plugins' (each accounted in its slot): no budget or timeout here.
    return Slot(DISPATCH_NAME, None, {"on_request": run}, timeout=None)
