"""Config reload: SIGHUP and ``ferrogate reload`` apply a new config without dropping requests."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import httpx

from gateway import Gateway, GatewayFactory, run_cli
from upstreams import Upstream


def routes_config(up: Upstream, *extra_paths: str) -> dict[str, Any]:
    routes = [{"name": "base", "paths": ["/base/*"], "upstream": "backend"}]
    routes += [
        {"name": f"extra-{i}", "paths": [p], "upstream": "backend"}
        for i, p in enumerate(extra_paths)
    ]
    return {"upstreams": {"backend": {"targets": [up.address]}}, "routes": routes}


def all_workers_answer(gw: Gateway, path: str, status: int) -> None:
    """Every worker has the new state: many fresh connections all get ``status``."""
    with gw.client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        codes = [client.get(path).status_code for _ in range(20)]
    assert codes == [status] * 20, codes


def test_sighup_applies_a_changed_config(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(routes_config(upstream))
    assert gw.get("/fresh").status_code == 404
    gw.write_config(routes_config(upstream, "/fresh"))
    gw.signal(signal.SIGHUP)
    gw.wait_for_status("/fresh", 200, timeout=5)
    all_workers_answer(gw, "/fresh", 200)
    assert gw.get("/base/still").status_code == 200
    assert gw.proc is not None
    assert gw.proc.poll() is None


def test_reload_command_applies_a_changed_config(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(routes_config(upstream))
    assert gw.get("/by-command").status_code == 404
    gw.write_config(routes_config(upstream, "/by-command"))
    out = run_cli("reload", "--pid-file", str(gw.pid_file), timeout=20)
    assert out.returncode == 0, out.stdout + out.stderr
    gw.wait_for_status("/by-command", 200, timeout=5)
    all_workers_answer(gw, "/by-command", 200)


def test_reload_removes_a_dropped_route(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(routes_config(upstream, "/going"))
    assert gw.get("/going").status_code == 200
    gw.write_config(routes_config(upstream))
    gw.signal(signal.SIGHUP)
    gw.wait_for_status("/going", 404, timeout=5)
    all_workers_answer(gw, "/going", 404)


def test_broken_config_on_reload_is_refused_and_old_routes_keep_serving(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(routes_config(upstream))
    broken = routes_config(upstream, "/from-broken")
    broken["lisen"] = ["127.0.0.1:1"]
    gw.write_config(broken)
    gw.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "lisen" not in gw.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "lisen" in gw.stderr_text(), "the master did not report the broken config"
    all_workers_answer(gw, "/base/x", 200)
    all_workers_answer(gw, "/from-broken", 404)
    assert gw.proc is not None
    assert gw.proc.poll() is None


def test_reload_command_reports_a_broken_config(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(routes_config(upstream))
    text = gw.config_path.read_text() + "bogus_key: 1\n"
    gw.write_config_text(text)
    out = run_cli("reload", "--pid-file", str(gw.pid_file), timeout=20)
    assert out.returncode != 0
    assert "bogus_key" in out.stdout + out.stderr
    all_workers_answer(gw, "/base/x", 200)


def test_no_request_fails_while_the_config_is_reloaded(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(routes_config(upstream))
    clients, at_least, at_most = 4, 750, 5000  # per client: >= 3000 requests in all
    failures: list[str] = []
    done = [0] * clients
    reloads_done = threading.Event()

    def load(idx: int) -> None:
        with gw.client(timeout=10) as client:  # keep-alive: one connection per client
            while done[idx] < at_most and not (reloads_done.is_set() and done[idx] >= at_least):
                try:
                    resp = client.get(f"/base/{idx}/{done[idx]}")
                    if resp.status_code != 200:
                        failures.append(f"{resp.status_code}: {resp.text[:200]}")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                done[idx] += 1

    threads = [threading.Thread(target=load, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    reloads = 0
    try:
        while reloads < 6 and all(t.is_alive() for t in threads):
            reloads += 1
            path = f"/generation-{reloads}"
            gw.write_config(routes_config(upstream, path))
            gw.signal(signal.SIGHUP)
            gw.wait_for_status(path, 200, timeout=5)
            time.sleep(0.1)
    finally:
        reloads_done.set()
        for t in threads:
            t.join(timeout=60)
    assert reloads == 6, "the load ended before six reloads were done"
    assert sum(done) >= clients * at_least
    assert failures == [], f"{len(failures)} of {sum(done)} requests failed, e.g. {failures[:5]}"
