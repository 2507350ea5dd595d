"""Finding, validating and reloading plugins: plugins_dir, entry points, config errors,
`ferrogate plugins` / `routes`, and plugin code swapped under load without a failed request."""

from __future__ import annotations

import json
import signal
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway import GatewayFactory, run_cli
from upstreams import Upstream

PLUGINS_DIR = str(Path(__file__).parent / "plugins_dir")


def write_config(path: Path, up: Upstream, route_plugins: list[dict[str, Any]], **top: Any) -> Path:
    doc = {
        "listen": ["127.0.0.1:0"],
        "plugins_dir": PLUGINS_DIR,
        "routes": [{"name": "r", "paths": ["/*"], "upstream": up.url, "plugins": route_plugins}],
        **top,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def problems_of(path: Path, env: dict[str, str] | None = None) -> list[str]:
    out = run_cli("check", str(path), env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    return out.stdout.strip().splitlines()


def line_of(path: Path, needle: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def test_unknown_plugin_gets_a_did_you_mean(tmp_path: Path, upstream: Upstream) -> None:
    path = write_config(tmp_path / "g.yaml", upstream, [{"name": "t-stampp"}])
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:{line_of(path, 't-stampp')}:")
    assert "routes[0].plugins[0].name: unknown plugin 't-stampp'" in problem
    assert "did you mean 't-stamp'?" in problem
    assert "route 'r'" in problem


def test_plugin_config_errors_name_plugin_route_and_field(
    tmp_path: Path, upstream: Upstream
) -> None:
    path = write_config(
        tmp_path / "g.yaml",
        upstream,
        [
            {"name": "t-async", "config": {"delay": "soon"}},
            {"name": "t-log", "config": {"paht": "/tmp/x"}},
        ],
    )
    first, second = problems_of(path)
    assert first.startswith(f"{path}:{line_of(path, 'soon')}:")
    assert "routes[0].plugins[0].config.delay: Expected `float`, got `str`" in first
    assert "(plugin 't-async' on route 'r')" in first
    assert "routes[0].plugins[1].config" in second
    assert "unknown field `paht`" in second
    assert "plugin 't-log'" in second


def test_top_level_plugin_errors_are_reported_once(tmp_path: Path, upstream: Upstream) -> None:
    path = write_config(
        tmp_path / "g.yaml",
        upstream,
        [],
        plugins=[{"name": "t-async", "config": {"delay": []}}],
    )
    (problem,) = problems_of(path)
    assert "plugins[0].config.delay" in problem
    assert "every route" in problem


def test_broken_plugin_file_is_a_config_problem(tmp_path: Path, upstream: Upstream) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken.py").write_text("from ferrogate import Plugin\n\nclass X(Plugin:\n")
    # tests beside plugin files are never executed as plugins
    (plugins / "test_broken.py").write_text("raise SystemExit('a test was imported')\n")
    (plugins / "nohook.py").write_text(
        "from ferrogate import Plugin\n\nclass Lazy(Plugin):\n    name = 'lazy'\n"
    )
    path = write_config(tmp_path / "g.yaml", upstream, [{"name": "cors"}])
    doc = yaml.safe_load(path.read_text())
    doc["plugins_dir"] = "plugins"  # relative to the config file
    path.write_text(yaml.safe_dump(doc))
    found = problems_of(path)
    text = "\n".join(found)
    assert "broken.py: SyntaxError: invalid syntax (broken.py, line 3)" in text
    assert "plugin 'lazy' defines no hook" in text
    assert all(p.startswith(f"{path}:{line_of(path, 'plugins_dir')}:") for p in found)


def test_a_disabled_plugin_needs_no_settings(tmp_path: Path, upstream: Upstream) -> None:
    path = write_config(
        tmp_path / "g.yaml",
        upstream,
        [{"name": "t-log", "enabled": False}],
        plugins=[{"name": "t-log", "config": {"path": str(tmp_path / "log")}}],
    )
    out = run_cli("check", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    out = run_cli("routes", "-c", str(path))
    assert "t-log" not in out.stdout


def test_plugins_command_lists_hooks_and_config_schema() -> None:
    out = run_cli("plugins", "--plugins-dir", PLUGINS_DIR, "t-async", "cors")
    assert out.returncode == 0, out.stderr
    assert "t-async  (priority 0, " in out.stdout
    assert "hooks: on_request (async), on_response (async)" in out.stdout
    assert "delay: number = 0.2" in out.stdout
    assert "cors  (priority 2000, builtin)" in out.stdout

    out = run_cli("plugins", "--plugins-dir", PLUGINS_DIR, "--json")
    assert out.returncode == 0, out.stderr
    listed = {p["name"]: p for p in json.loads(out.stdout)}
    assert {"request-transformer", "response-transformer", "cors", "request-termination"} <= set(
        listed
    )
    assert listed["t-log"]["config_schema"]["required"] == ["path"]
    assert listed["t-upper-stream"]["hooks"] == {"on_response_chunk": "sync"}

    out = run_cli("plugins", "no-such-plugin")
    assert out.returncode == 2
    assert "unknown plugin: no-such-plugin" in out.stderr


def test_routes_command_shows_the_run_order(tmp_path: Path, upstream: Upstream) -> None:
    path = write_config(
        tmp_path / "g.yaml",
        upstream,
        [{"name": "t-mark-a", "priority": 30}],
        plugins=[{"name": "t-mark-c"}, {"name": "t-mark-b"}],
    )
    out = run_cli("routes", "-c", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "t-mark-a(30) > t-mark-b(20) > t-mark-c(10)" in out.stdout


def make_entry_point_package(site: Path) -> None:
    pkg = site / "fg_example_plugins"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            '''
            """An installed plugin package."""
            import msgspec
            from ferrogate import Plugin, Request


            class Hello(Plugin):
                """Says hello to the upstream."""

                name = "ep-hello"

                class Config(msgspec.Struct, forbid_unknown_fields=True):
                    to: str = "world"

                def on_request(self, req: Request) -> None:
                    req.headers["x-hello"] = self.config.to
            '''
        )
    )
    dist = site / "fg_example_plugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fg-example-plugins\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[ferrogate.plugins]\nep-hello = fg_example_plugins:Hello\n"
    )


def test_entry_point_plugins_are_discovered(
    gateway: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    make_entry_point_package(site)
    env = {"PYTHONPATH": str(site)}
    out = run_cli("plugins", "ep-hello", env=env)
    assert out.returncode == 0, out.stderr
    assert "ep-hello  (priority 0, entry point ep-hello (fg-example-plugins))" in out.stdout
    gw = gateway(
        {
            "upstreams": {"b": {"targets": [upstream.address]}},
            "routes": [
                {
                    "paths": ["/*"],
                    "upstream": "b",
                    "plugins": [{"name": "ep-hello", "config": {"to": "tests"}}],
                }
            ],
        },
        workers=1,
        env=env,
    )
    assert gw.get("/ep").status_code == 200
    assert upstream.last().header("x-hello") == "tests"


VERSIONED = """
import asyncio
from ferrogate import Plugin, Request, Response

VERSION = "{version}"


class Versioned(Plugin):
    name = "t-versioned"

    async def on_request(self, req: Request) -> None:
        if req.path == "/slow":
            await asyncio.sleep(1.5)

    def on_response(self, req: Request, resp: Response) -> None:
        resp.headers["x-version"] = VERSION
"""


def test_plugin_code_reloads_under_load_without_a_failed_request(
    gateway: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    code = plugins / "versioned.py"
    code.write_text(VERSIONED.format(version="1"))
    cfg = {
        "plugins_dir": str(plugins),
        "upstreams": {"b": {"targets": [upstream.address]}},
        "routes": [{"paths": ["/*"], "upstream": "b", "plugins": [{"name": "t-versioned"}]}],
    }
    gw = gateway(cfg, workers=2)
    assert gw.get("/v").headers["x-version"] == "1"

    # A request in flight when the code changes finishes with the code it started with.
    slow: dict[str, httpx.Response] = {}
    in_flight = threading.Thread(target=lambda: slow.update(r=gw.get("/slow", timeout=20)))
    in_flight.start()
    time.sleep(0.3)

    stop = threading.Event()
    results: list[tuple[int, str | None]] = []
    failures: list[BaseException] = []

    def load() -> None:
        with gw.client() as client:
            while not stop.is_set():
                try:
                    r = client.get("/load")
                    results.append((r.status_code, r.headers.get("x-version")))
                except httpx.HTTPError as e:
                    failures.append(e)

    loaders = [threading.Thread(target=load) for _ in range(3)]
    for t in loaders:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while len(results) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        for version in ("2", "3", "4"):
            code.write_text(VERSIONED.format(version=version))
            gw.signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with gw.client(limits=httpx.Limits(max_keepalive_connections=0)) as fresh:
                    if all(fresh.get("/v").headers["x-version"] == version for _ in range(10)):
                        break
                time.sleep(0.05)
            else:
                raise AssertionError(f"version {version} never served by every worker")
    finally:
        stop.set()
        for t in loaders:
            t.join()
        in_flight.join()
    assert not failures, failures[:3]
    assert len(results) > 100
    assert {status for status, _ in results} == {200}
    assert {v for _, v in results} >= {"1", "4"}
    assert slow["r"].status_code == 200
    assert slow["r"].headers["x-version"] == "1"


def test_broken_plugin_code_on_reload_keeps_the_old_code_serving(
    gateway: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    code = plugins / "versioned.py"
    code.write_text(VERSIONED.format(version="1"))
    gw = gateway(
        {
            "plugins_dir": str(plugins),
            "routes": [
                {"paths": ["/*"], "upstream": upstream.url, "plugins": [{"name": "t-versioned"}]}
            ],
        },
        workers=1,
    )
    code.write_text("this is not python\n")
    out = run_cli("reload", "--pid-file", str(gw.pid_file), timeout=20)
    assert out.returncode != 0
    assert "versioned.py" in out.stdout + out.stderr
    r = gw.get("/still")
    assert r.status_code == 200
    assert r.headers["x-version"] == "1"


def test_plugin_time_is_published_per_plugin_and_phase(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(
        {
            "plugins_dir": PLUGINS_DIR,
            "routes": [
                {
                    "name": "timed",
                    "paths": ["/*"],
                    "upstream": upstream.url,
                    "plugins": [
                        {"name": "t-stamp"},
                        {"name": "t-slow-sync", "config": {"delay": 0.02}, "budget": "5ms"},
                    ],
                }
            ],
        },
        workers=2,
    )
    with gw.client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for _ in range(10):
            assert client.get("/t").status_code == 200

    def stats() -> dict[tuple[str, str], dict[str, int]]:
        out = run_cli("plugins", "--stats", "--json", "--pid-file", str(gw.pid_file))
        assert out.returncode == 0, out.stderr
        return {(r["plugin"], r["phase"]): r for r in json.loads(out.stdout)}

    deadline = time.monotonic() + 10
    seen = stats()
    # every request, the readiness probe included, has been counted by some worker
    while (
        time.monotonic() < deadline
        and seen.get(("t-stamp", "on_response"), {}).get("calls", 0) < 10
    ):
        time.sleep(0.2)
        seen = stats()
    stamp = seen[("t-stamp", "on_request")]
    slow = seen[("t-slow-sync", "on_request")]
    assert stamp["calls"] >= 10 and seen[("t-stamp", "on_response")]["calls"] >= 10
    assert slow["calls"] == stamp["calls"]
    assert slow["over_budget"] == slow["calls"]
    assert slow["total_ns"] >= slow["calls"] * 20_000_000 > stamp["total_ns"]
    assert slow["max_ns"] >= 20_000_000

    # counters carry on across a reload
    before = slow["calls"]
    gw.signal(signal.SIGHUP)
    time.sleep(0.5)
    for _ in range(3):
        gw.get("/t")
    deadline = time.monotonic() + 10
    while (
        time.monotonic() < deadline and stats()[("t-slow-sync", "on_request")]["calls"] < before + 3
    ):
        time.sleep(0.2)
    assert stats()[("t-slow-sync", "on_request")]["calls"] >= before + 3

    text = run_cli("plugins", "--stats", "--pid-file", str(gw.pid_file)).stdout
    assert "timed  t-slow-sync  on_request" in text
    assert "(2 workers; counters since start)" in text
