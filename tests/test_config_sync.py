"""Declarative sync on real gateways: ``ferrogate config export|diff|import`` through the
admin API (and straight from a SQLite store), lossless round trips, dry runs, one revision
and one audit entry per import, and invalid files refused with file:line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from admin_gateway import ADMIN_TOKEN, OPERATOR_TOKEN, AdminGateway, served_within
from ferrogate.admin_entities import KINDS
from gateway import run_cli
from upstreams import Upstream

API_KEY = "sync-test-key-0123456789"


def config_a(up: Upstream) -> dict[str, Any]:
    return {
        "upstreams": {"backend": {"targets": [up.address]}},
        "routes": [
            {"name": "base", "paths": ["/base/*"], "upstream": "backend"},
            {
                "name": "keyed",
                "paths": ["/keyed/*"],
                "upstream": "backend",
                "plugins": [{"name": "key-auth"}],
            },
        ],
        "consumers": {
            "alice": {
                "tags": {"team": "red"},
                "credentials": [
                    {"type": "key-auth", "key": API_KEY},
                    {"type": "hmac-auth", "key_id": "alice-hmac", "secret": "s" * 32},
                ],
            }
        },
        "plans": {"free": {"quotas": [{"limit": 1000, "per": "day"}]}},
    }


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Any]:
    started: list[AdminGateway] = []

    def start(name: str, config: dict[str, Any]) -> AdminGateway:
        ag = AdminGateway(tmp_path / name, config)
        started.append(ag)
        ag.start()
        return ag

    yield start
    for ag in started:
        ag.stop()


def cli(ag: AdminGateway, *args: str) -> Any:
    return run_cli("config", "--admin-url", ag.admin_url, "--token", ADMIN_TOKEN, *args)


def revision(ag: AdminGateway) -> int:
    with ag.api() as api:
        return int(api.get("/").json()["revision"])


def test_export_import_round_trip_is_lossless(
    gateways: Any, upstream: Upstream, tmp_path: Path
) -> None:
    a = gateways("a", config_a(upstream))
    exported = tmp_path / "a.yaml"
    done = cli(a, "export", "-o", str(exported))
    assert done.returncode == 0, done.stderr
    text = exported.read_text()
    data = yaml.safe_load(text)
    assert list(data) == [k for k in KINDS if k in data]  # the canonical order
    assert set(data) == {"upstreams", "routes", "consumers", "plans"}
    creds = data["consumers"]["alice"]["credentials"]
    # Hashes, never the key; the HMAC secret as verification needs it.
    assert API_KEY not in text and "key_sha256" in creds[0]
    assert creds[1]["secret"] == "s" * 32
    assert exported.stat().st_mode & 0o777 == 0o600

    # The same store read directly gives the same file.
    direct = run_cli("config", "export", "--store", f"sqlite:{a.gw.dir / 'ferrogate-admin.db'}")
    after_verb = run_cli("config", "export", "--admin-url", a.admin_url, "--token", ADMIN_TOKEN)
    assert after_verb.stdout == text
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout == text

    # Into itself: nothing to change, no new revision.
    before = revision(a)
    same = cli(a, "diff", str(exported))
    assert (same.returncode, same.stdout) == (0, "")
    again = cli(a, "import", str(exported))
    assert again.returncode == 0, again.stderr
    assert "nothing to change" in again.stdout
    assert revision(a) == before

    # Into a fresh gateway with other entities: it becomes A's, key hashes included.
    other = {
        "upstreams": {"elsewhere": {"targets": [upstream.address]}},
        "routes": [{"name": "other", "paths": ["/other/*"], "upstream": "elsewhere"}],
    }
    b = gateways("b", other)
    assert b.gw.get("/keyed/x").status_code == 404
    imported = cli(b, "import", str(exported))
    assert imported.returncode == 0, imported.stderr
    assert "imported as revision 2" in imported.stdout
    served_within(b.gw, "/keyed/x", 200, 2.0, headers={"apikey": API_KEY})
    # Every worker, not only those the first check's connections reached: each applies the
    # new config on its own.
    served_within(b.gw, "/keyed/x", 401, 2.0)
    assert b.gw.get("/other/x").status_code == 404
    re_exported = cli(b, "export")
    assert re_exported.returncode == 0, re_exported.stderr
    assert re_exported.stdout == text


def test_diff_dry_run_and_import(gateways: Any, upstream: Upstream, tmp_path: Path) -> None:
    a = gateways("a", config_a(upstream))
    exported = tmp_path / "a.yaml"
    assert cli(a, "export", "-o", str(exported)).returncode == 0
    data = yaml.safe_load(exported.read_text())
    data["routes"] = [r for r in data["routes"] if r["name"] != "keyed"]
    data["routes"].append({"name": "new", "paths": ["/new/*"], "upstream": "backend"})
    data["plans"]["free"]["quotas"][0]["limit"] = 5
    wanted = tmp_path / "wanted.yaml"
    wanted.write_text(yaml.safe_dump(data, sort_keys=False))

    diff = cli(a, "diff", str(wanted))
    assert diff.returncode == 1, diff.stderr
    lines = diff.stdout.splitlines()
    assert "- routes/keyed" in lines
    assert "+ routes/new" in lines
    assert "~ plans/free" in lines
    assert "--- current/plans/free" in lines and "+++ file/plans/free" in lines
    assert "-- limit: 1000" in lines and "+- limit: 5" in lines
    assert not any(line.startswith(("~ routes/base", "~ consumers")) for line in lines)

    before = revision(a)
    dry = cli(a, "import", "--dry-run", str(wanted))
    assert dry.returncode == 0, dry.stderr
    assert "+ routes/new" in dry.stdout and "dry run" in dry.stdout
    assert revision(a) == before
    assert a.gw.get("/new/x").status_code == 404

    done = cli(a, "import", str(wanted))
    assert done.returncode == 0, done.stderr
    assert revision(a) == before + 1
    served_within(a.gw, "/new/x", 200, 2.0)
    assert a.gw.get("/keyed/x", headers={"apikey": API_KEY}).status_code == 404
    with a.api() as api:
        entries = api.get("/audit").json()["data"]
    # One entry for the whole import; before it only the seeding of the store.
    assert [e["method"] for e in entries[1:]] == ["SEED"] * (len(entries) - 1)
    entry = entries[0]
    assert (entry["method"], entry["entity"], entry["who"]) == ("IMPORT", "config", "root")
    assert entry["revision"] == before + 1
    assert entry["after"] == {
        "added": ["routes/new"],
        "changed": ["plans/free"],
        "removed": ["routes/keyed"],
    }
    assert cli(a, "diff", str(wanted)).returncode == 0


def test_invalid_files_are_refused_with_file_and_line(
    gateways: Any, upstream: Upstream, tmp_path: Path
) -> None:
    a = gateways("a", config_a(upstream))
    before = revision(a)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "upstreams:\n"
        "  backend:\n"
        f"    targets: [{upstream.address}]\n"
        "routes:\n"
        "  - name: base\n"
        "    paths: [/base/*]\n"
        "    upstream: backend\n"
        "  - name: broken\n"
        "    paths: [/broken/*]\n"
        "    upstream: nowhere\n"
    )
    done = cli(a, "import", str(bad))
    assert done.returncode == 2
    assert f"{bad}:10:" in done.stderr and "nowhere" in done.stderr
    assert revision(a) == before

    local = tmp_path / "local.yaml"
    local.write_text("routes: []\nlisten: ['127.0.0.1:1']\n")
    done = cli(a, "import", str(local))
    assert done.returncode == 2
    assert f"{local}:2:1: listen: not an entity kind" in done.stderr

    broken = tmp_path / "broken.yaml"
    broken.write_text("routes:\n  - name: x\n   paths: [/]\n")
    done = cli(a, "diff", str(broken))
    assert done.returncode == 2
    assert f"{broken}:3:" in done.stderr
    assert revision(a) == before

    # The whole config holds secrets: admins only.
    who = run_cli("config", "--admin-url", a.admin_url, "--token", OPERATOR_TOKEN, "export")
    assert who.returncode == 2 and "403" in who.stderr
