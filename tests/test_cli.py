"""The command line: version, check, env interpolation, schema, routes."""

from __future__ import annotations

import json
import os
import re
from importlib.metadata import version
from pathlib import Path

from gateway import GatewayFactory, run_cli
from upstreams import Upstream

GOOD = """\
listen:
  - 127.0.0.1:18999
upstreams:
  backend:
    targets: [127.0.0.1:9001, {address: 127.0.0.1:9002, weight: 3}]
    balance: round_robin
routes:
  - name: users
    paths: ["/api/users/{id}"]
    methods: [GET]
    headers:
      - {name: X-Version, regex: "^v[12]$"}
    upstream: backend
  - name: site
    paths: [/*]
    upstream: http://127.0.0.1:9003/base
"""

# each problem sits on a known line
BAD = """\
listen:
  - 127.0.0.1:18999
lisen: 127.0.0.1:1
upstreams:
  backend:
    targets: [127.0.0.1:9001]
routes:
  - name: a
    paths: [/a]
    upstream: nosuch
  - name: b
    paths: [/b]
    upstream: backend
    headers:
      - {name: X-V, regex: "(["}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_version_prints_the_package_version() -> None:
    out = run_cli("--version")
    assert out.returncode == 0, out.stderr
    assert version("ferrogate") in out.stdout + out.stderr


def test_version_says_whether_the_build_is_profile_guided() -> None:
    out = run_cli("--version")
    built = re.search(r"\((plain|profile-guided) build\)", out.stdout + out.stderr)
    assert built, out.stdout + out.stderr
    if os.environ.get("FERROGATE_PGO") == "on":
        # CI builds the wheel under test insisting on the profile (.ci/run)
        assert built.group(1) == "profile-guided"


def test_check_accepts_a_good_config(tmp_path: Path) -> None:
    path = write(tmp_path, "good.yaml", GOOD)
    out = run_cli("check", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


def test_check_reports_every_problem_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", BAD)
    out = run_cli("check", str(path))
    text = out.stdout + out.stderr
    assert out.returncode != 0
    lines = text.splitlines()

    def line_for(lineno: int) -> str:
        hits = [ln for ln in lines if re.search(rf"bad\.yaml:{lineno}(:\d+)?:", ln)]
        assert hits, f"no problem reported at bad.yaml:{lineno}:\n{text}"
        return hits[0]

    assert "did you mean 'listen'" in line_for(3)
    assert "nosuch" in line_for(10)
    assert "regex" in line_for(15).lower()


def test_check_interpolates_environment_variables(tmp_path: Path) -> None:
    text = 'listen: ["127.0.0.1:${FG_TEST_PORT:-18999}"]\n'
    text += "routes:\n  - paths: [/*]\n    upstream: http://127.0.0.1:${FG_TEST_UP}\n"
    path = write(tmp_path, "env.yaml", text)
    out = run_cli("check", str(path), env={"FG_TEST_UP": "9001"})
    assert out.returncode == 0, out.stdout + out.stderr


def test_run_uses_interpolated_environment_variables(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(
        {"routes": [{"paths": ["/*"], "upstream": "http://127.0.0.1:${FG_TEST_UP}"}]},
        env={"FG_TEST_UP": str(upstream.port)},
    )
    assert gw.get("/via-env").status_code == 200
    assert upstream.last().target == "/via-env"


def test_check_reports_an_unset_variable_with_its_line(tmp_path: Path) -> None:
    text = "listen: [127.0.0.1:18999]\nroutes:\n  - paths: [/*]\n"
    text += "    upstream: http://127.0.0.1:${FG_TEST_SURELY_UNSET_VAR}\n"
    path = write(tmp_path, "unset.yaml", text)
    out = run_cli("check", str(path), env={})
    output = out.stdout + out.stderr
    assert out.returncode != 0
    hits = [ln for ln in output.splitlines() if re.search(r"unset\.yaml:4(:\d+)?:", ln)]
    assert hits, output
    assert "FG_TEST_SURELY_UNSET_VAR" in hits[0]


def test_schema_is_a_json_schema_for_the_config() -> None:
    out = run_cli("schema")
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)
    assert schema.get("type") == "object"
    props = schema["properties"]
    for key in ("listen", "upstreams", "routes", "limits", "timeouts"):
        assert key in props, key


def test_routes_lists_routes_in_precedence_order(tmp_path: Path) -> None:
    text = """\
listen: [127.0.0.1:18999]
upstreams:
  backend: {targets: [127.0.0.1:9001]}
routes:
  - {name: kilo-catchall, paths: ["/u/{*rest}"], upstream: backend}
  - {name: lima-param, paths: ["/u/{id}"], upstream: backend}
  - {name: mike-static, paths: [/u/me], upstream: backend}
  - {name: oscar-low, paths: [/p], upstream: backend}
  - {name: papa-high, paths: [/p], priority: 7, upstream: backend}
  - {name: quebec-wild, paths: [/u/me], hosts: ["*.example.test"], upstream: backend}
  - {name: romeo-exact, paths: [/u/me], hosts: [api.example.test], upstream: backend}
"""
    path = write(tmp_path, "routes.yaml", text)
    out = run_cli("routes", "-c", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    names = ["romeo-exact", "quebec-wild", "mike-static", "lima-param", "kilo-catchall"]
    positions = [out.stdout.find(n) for n in names]
    assert -1 not in positions, out.stdout
    assert positions == sorted(positions), out.stdout
    assert out.stdout.find("papa-high") < out.stdout.find("oscar-low"), out.stdout


def test_run_refuses_a_broken_config(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", BAD)
    out = run_cli("run", "-c", str(path), "--workers", "1", timeout=30)
    assert out.returncode != 0
    assert re.search(r"bad\.yaml:3(:\d+)?:", out.stderr), out.stderr
