"""Testing plugins with pytest.

``PluginHarness`` runs a plugin's hooks through the same dispatcher a worker uses, without a
server::

    from ferrogate.testing import PluginHarness

    def test_adds_header():
        h = PluginHarness(Greeter, {"greeting": "hi"})
        out = h.request("GET", "/hello")
        assert out.request.headers["x-greeting"] == "hi"
        assert out.response is None          # not answered early

``run_gateway`` starts a real ``ferrogate run`` with a config you give (and your plugin
files), for end-to-end tests::

    with run_gateway(config, plugins_dir=tmp_path) as url:
        httpx.get(url + "/hello")
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from ferrogate.hooks import (
    Chain,
    Headers,
    LogInfo,
    Request,
    Response,
    Slot,
    run_body,
    run_chunk,
    run_log,
    run_request,
    run_request_async,
    run_response,
    run_response_async,
)
from ferrogate.plugin import Plugin
from ferrogate.plugin_host import hooks_of
from ferrogate.plugin_registry import discover, spec_of

__all__ = ["Outcome", "PluginHarness", "run_gateway"]

HeaderInput = Mapping[str, str] | Iterable[tuple[str, str]] | None


@dataclass
class Outcome:
    """What ``on_request`` did: the request as it would go upstream, or an early answer."""

    request: Request
    response: Response | None
    """The plugin's early answer, or None when the request goes on to the upstream."""
    decision: tuple[Any, ...] | None
    """Exactly what the data plane would receive (see ``ferrogate.hooks``)."""


class PluginHarness:
    """A plugin chain (one plugin or several, in run order) driven without a server.

    ``plugins`` is a Plugin subclass or a registered plugin name, with its config as a dict
    (validated against the plugin's ``Config`` exactly as config loading does), or a list of
    ``(plugin, config)`` pairs for a chain.
    """

    def __init__(
        self,
        plugins: type[Plugin] | str | list[tuple[type[Plugin] | str, Mapping[str, Any] | None]],
        config: Mapping[str, Any] | None = None,
        *,
        route: str = "test",
    ) -> None:
        pairs = plugins if isinstance(plugins, list) else [(plugins, config)]
        self.slots: list[Slot] = []
        self.plugins: list[Plugin] = []
        registry = None
        specs = []
        for plugin, cfg in pairs:
            if isinstance(plugin, str):
                registry = registry or discover()
                spec = registry.plugins[plugin]
            else:
                spec = spec_of(plugin, "test")
            specs.append(spec)
            converted = msgspec.convert(dict(cfg or {}), spec.config_type)
            instance = spec.cls(converted)
            self.plugins.append(instance)
            hooks = hooks_of(instance, spec.hooks, spec.cls.response_body_mode(converted))
            self.slots.append(Slot(spec.name, instance, hooks, timeout=10.0))
        order = sorted(range(len(specs)), key=lambda i: (-specs[i].priority, i))
        self.chain = Chain(route, [self.slots[i] for i in order])
        self.route = route
        self._async = any(any(s.hooks.values()) for s in specs)
        # One loop for the harness's life, as a worker has one: clients a plugin keeps
        # across calls stay bound to a live loop.
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        """Close the harness's event loop."""
        self.loop.close()

    def __enter__(self) -> PluginHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def plugin(self) -> Plugin:
        """The (first) plugin instance."""
        return self.plugins[0]

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        *,
        query: str = "",
        headers: HeaderInput = None,
        body: bytes | None = None,
        client_ip: str = "127.0.0.1",
        request_id: str = "test-request",
        host: str = "localhost",
    ) -> Outcome:
        """Run ``on_request`` hooks on a request made of these parts."""
        req = Request(
            method,
            path,
            query,
            Headers(headers),
            body,
            request_id=request_id,
            client_ip=client_ip,
            route=self.route,
            host=host,
        )
        if self._async:
            decision = self.loop.run_until_complete(run_request_async(self.chain, req))
        else:
            decision = run_request(self.chain, req)
        early = None
        if decision is not None and decision[0] == 1:
            early = Response(decision[1], decision[3], Headers(decision[2]))
        return Outcome(req, early, decision)

    def response(
        self,
        req: Request,
        status: int = 200,
        *,
        headers: HeaderInput = None,
        body: bytes | None = None,
    ) -> Response:
        """Run ``on_response``, then the body hooks when ``body`` is given (as one buffer)."""
        resp = Response(status, None, Headers(headers))
        resp.headers.changed = False
        req.response = resp
        if self._async:
            self.loop.run_until_complete(run_response_async(self.chain, req, resp))
        else:
            run_response(self.chain, req, resp)
        if body is not None:
            if self.chain.buffered:
                resp.body = run_body(self.chain, req, resp, body)
            else:
                resp.body = run_chunk(self.chain, req, resp, body, True)
        return resp

    def stream(self, req: Request, resp: Response, chunks: Iterable[bytes]) -> list[bytes]:
        """Feed ``chunks`` through the chunk hooks as the data plane streams them."""
        items = list(chunks)
        return [
            run_chunk(self.chain, req, resp, chunk, i == len(items) - 1)
            for i, chunk in enumerate(items)
        ]

    def log(self, req: Request, info: LogInfo | None = None) -> None:
        """Run the ``on_log`` hooks."""
        status = req.response.status if req.response is not None else 200
        run_log(self.chain, req, info or LogInfo(status, 0, 0.001, "127.0.0.1:1"), self.loop)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def run_gateway(
    config: Mapping[str, Any],
    *,
    plugins_dir: str | os.PathLike[str] | None = None,
    workers: int = 1,
    timeout: float = 30.0,
) -> Iterator[str]:
    """Start ``ferrogate run`` on ``config`` (a dict as in gateway.yaml) and yield its URL.

    ``listen`` is set to a free loopback port; ``plugins_dir`` is added when given. The
    gateway is stopped (SIGTERM, then SIGKILL) when the block ends.
    """
    import yaml

    port = _free_port()
    doc = dict(config)
    doc["listen"] = [f"127.0.0.1:{port}"]
    doc.setdefault("grace_period", "2s")
    if plugins_dir is not None:
        doc["plugins_dir"] = os.fspath(Path(plugins_dir).resolve())
    with tempfile.TemporaryDirectory(prefix="ferrogate-test-") as tmp:
        path = Path(tmp) / "gateway.yaml"
        path.write_text(yaml.safe_dump(doc))
        log = (Path(tmp) / "stderr.log").open("w+")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ferrogate", "run", "-c", str(path), "--workers", str(workers)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"ferrogate exited with {proc.returncode}:\n{log.read()}")
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), timeout=0.5),
                ):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ferrogate did not listen on port {port} in {timeout}s")
                time.sleep(0.05)
            yield f"http://127.0.0.1:{port}"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
