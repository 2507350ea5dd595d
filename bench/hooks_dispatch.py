"""Micro-benchmark of the plugin hook boundary: the compiled ``ferrogate.hooks`` against the
same ``hooks.py`` run as plain Python.

No server: each scenario calls the ``Host`` entry points the data plane calls, in a loop, on a
one-route chain.

- ``noop request``: ``Host.request`` through one plugin whose ``on_request`` returns None;
- ``header edits``: ``Host.request`` through one plugin that sets 3 headers and removes one;
- ``streamed chunk``: ``Host.response`` then ``Host.response_chunk`` through a no-op chunk hook.

Usage (after ``pip install .``), from the repository root::

    python bench/hooks_dispatch.py                    # about 15 seconds
    python bench/hooks_dispatch.py --rounds 3 --time 0.1

Each figure is the best of ``--rounds`` timed runs of about ``--time`` seconds each, in ns per
operation. ``--compiled PATH`` times that compiled module instead of the installed one.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

# as the data plane sends them: latin-1 text, a newline first
REQUEST_HEADERS = "\nhost:x\naccept:*/*\nuser-agent:curl\n"
RESPONSE_HEADERS = "\ncontent-type:text/plain\ncontent-length:5\n"
META = ("req-1", "127.0.0.1", "r", "x", "http", "HTTP/1.1", None, None, None)
CHUNK = b"x" * 1024


class NoopPlugin:
    def on_request(self, req: Any) -> None:
        return None

    def on_response_chunk(self, req: Any, resp: Any, chunk: bytes, last: bool) -> None:
        return None


class HeaderPlugin:
    def on_request(self, req: Any) -> None:
        headers = req.headers
        headers["x-forwarded-proto"] = "http"
        headers["x-request-start"] = "t=1700000000.000"
        headers["x-tenant"] = "acme"
        headers.remove("user-agent")


def load_compiled(path: str | None) -> ModuleType:
    if path is None:
        import ferrogate.hooks as module

        return module
    loader = importlib.machinery.ExtensionFileLoader("ferrogate.hooks", path)
    spec = importlib.util.spec_from_file_location("ferrogate.hooks", path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def load_plain(source: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("ferrogate_hooks_plain", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def scenarios(hooks: ModuleType) -> dict[str, Callable[[], object]]:
    def host(plugin: Any, names: tuple[str, ...]) -> Any:
        slot = hooks.Slot("p", plugin, {name: getattr(plugin, name) for name in names})
        return hooks.Host([hooks.Chain("r", [slot])])

    noop = host(NoopPlugin(), ("on_request",))
    edits = host(HeaderPlugin(), ("on_request",))
    chunks = host(NoopPlugin(), ("on_response_chunk",))
    req, _ = chunks.request(0, "GET", "/data", "", REQUEST_HEADERS, None, META)

    def noop_request() -> object:
        return noop.request(0, "GET", "/api/users/42", "a=1", REQUEST_HEADERS, None, META)

    def header_edits() -> object:
        _, decision = edits.request(0, "GET", "/api/users/42", "a=1", REQUEST_HEADERS, None, META)
        return decision

    def streamed_chunk() -> object:
        chunks.response(0, req, 200, RESPONSE_HEADERS)
        return chunks.response_chunk(0, req, CHUNK, True)

    # what each returns is checked once, so both modules are timed doing the same work
    assert noop_request()[1] is None
    decision = header_edits()
    assert isinstance(decision, tuple)
    removed, added = decision[4]  # a diff: host and accept are left as they are
    assert ("x-tenant", "acme") in added and "user-agent" in removed
    assert streamed_chunk() == CHUNK
    return {
        "noop request": noop_request,
        "header edits": header_edits,
        "streamed chunk": streamed_chunk,
    }


def time_op(fn: Callable[[], object], seconds: float, rounds: int) -> float:
    """Best ns/op over ``rounds`` runs of about ``seconds`` each."""
    n = 1
    while True:  # calibrate: a loop count that takes about `seconds`
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        spent = time.perf_counter_ns() - start
        if spent >= seconds * 1e9 / 10:
            n = max(1, int(n * seconds * 1e9 / spent))
            break
        n *= 4
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--time", type=float, default=0.5, help="seconds per round")
    parser.add_argument("--compiled", help="a compiled hooks module to time (default: installed)")
    args = parser.parse_args()

    compiled = load_compiled(args.compiled)
    compiled_file = compiled.__file__ or ""
    if not compiled_file.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
        sys.exit(f"ferrogate.hooks is not compiled here ({compiled_file}): pip install . first")
    import ferrogate

    plain = load_plain(Path(ferrogate.__file__).with_name("hooks.py"))
    print(f"compiled: {compiled_file}")
    print(f"plain:    {plain.__file__}")
    print(f"python {sys.version.split()[0]}; best of {args.rounds} x {args.time:g} s\n")
    print(f"{'scenario':<16}{'compiled ns/op':>16}{'plain ns/op':>14}{'speed-up':>10}")
    for (name, fast), slow in zip(
        scenarios(compiled).items(), scenarios(plain).values(), strict=True
    ):
        a = time_op(fast, args.time, args.rounds)
        b = time_op(slow, args.time, args.rounds)
        print(f"{name:<16}{a:>16.0f}{b:>14.0f}{b / a:>9.2f}x")


if __name__ == "__main__":
    main()
