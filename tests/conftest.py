"""Fixtures: real upstream servers and real ``ferrogate run`` processes on free loopback ports.

Every process a test starts is stopped by its PID at teardown. When a test fails, the stderr of
the gateways it started is attached to the report.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import Gateway, GatewayFactory
from upstreams import Upstream, UpstreamFactory


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "heavy: moves hundreds of MiB (still runs in CI; deselect with -m 'not heavy')"
    )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    report = yield
    if report.when == "call" and report.failed:
        for gw in getattr(item, "_ferrogate_gateways", []):
            text = gw.stderr_text()
            if len(text) > 20000:
                text = "...\n" + text[-20000:]
            report.sections.append((f"ferrogate on {gw.address}: stderr", text or "(empty)"))
    return report


@pytest.fixture
def upstream_factory() -> Iterator[UpstreamFactory]:
    """Recording HTTP/1.1 servers on free ports, closed at teardown."""
    factory = UpstreamFactory()
    yield factory
    factory.close_all()


@pytest.fixture
def upstream(upstream_factory: UpstreamFactory) -> Upstream:
    return upstream_factory("up")


@pytest.fixture
def gateway(
    request: pytest.FixtureRequest, tmp_path: Path, upstream_factory: UpstreamFactory
) -> Iterator[GatewayFactory]:
    """``start(config, workers=2, env=None) -> Gateway``: a running ``ferrogate run``.

    ``listen`` (a free port) and a short ``grace_period`` are added to the config. The readiness
    probe may reach an upstream, so the counters of all upstreams made so far are reset once the
    gateway is ready.
    """
    started: list[Gateway] = []
    request.node._ferrogate_gateways = started  # type: ignore[attr-defined]

    def start(
        config: dict[str, Any], *, workers: int = 2, env: dict[str, str] | None = None
    ) -> Gateway:
        gw = Gateway(tmp_path / f"gateway-{len(started)}", config, workers=workers, env=env)
        started.append(gw)
        gw.start()
        upstream_factory.reset_all()
        return gw

    yield start
    for gw in started:
        gw.stop()
