"""``ferrogate admin ...`` against a real gateway's admin API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from admin_gateway import ADMIN_TOKEN, READER_TOKEN, AdminGateway, served_within
from gateway import run_cli
from upstreams import Upstream


@pytest.fixture
def ag(tmp_path: Path, upstream: Upstream) -> Iterator[AdminGateway]:
    config = {
        "upstreams": {"backend": {"targets": [upstream.address]}},
        "routes": [
            {"name": "open", "paths": ["/open/*"], "upstream": "backend"},
            {
                "name": "keyed",
                "methods": ["GET"],
                "paths": ["/keyed/*"],
                "upstream": "backend",
                "plugins": [{"name": "key-auth"}],
            },
        ],
    }
    gw = AdminGateway(tmp_path / "gw", config)
    gw.start()
    yield gw
    gw.stop()


def admin(ag: AdminGateway, *args: str, token: str | None = ADMIN_TOKEN) -> tuple[int, str, str]:
    env = {"FERROGATE_ADMIN_TOKEN": token or ""}
    out = run_cli("admin", "--admin-url", ag.admin_url, *args, env=env)
    return out.returncode, out.stdout, out.stderr


def test_list_routes_and_upstreams(ag: AdminGateway, upstream: Upstream) -> None:
    code, out, err = admin(ag, "routes")
    assert code == 0, err
    assert out.splitlines() == [
        "open\t* /open/* -> backend",
        "keyed\tGET /keyed/* -> backend",
    ]
    code, out, _ = admin(ag, "routes", "--name-prefix", "ke")
    assert out.splitlines() == ["keyed\tGET /keyed/* -> backend"]
    code, out, _ = admin(ag, "upstreams")
    assert out.splitlines() == [f"backend\t{upstream.address}*1"]


def test_add_a_consumer_issue_and_revoke_a_key(ag: AdminGateway) -> None:
    code, out, err = admin(ag, "consumer", "add", "erin", "--group", "staff")
    assert code == 0, err
    assert "erin" in out
    code, out, err = admin(ag, "consumer", "add", "erin")
    assert code == 1 and "exists already" in err
    t0 = time.monotonic()
    code, out, err = admin(ag, "key", "issue", "erin")
    assert code == 0, err
    key = out.strip()
    assert len(key) >= 32 and "\n" not in key
    assert "not shown again" in err
    served_within(ag.gw, "/keyed/x", 200, timeout=5, headers={"apikey": key})
    # the CLI's own start-up is in this bound; the change itself takes far less
    assert time.monotonic() - t0 < 5
    code, out, _ = admin(ag, "consumers")
    assert out.splitlines() == ["erin\tplan=- credentials=1"]
    assert key not in out
    key_id = err.split("key id ")[1].split()[0]
    code, out, err = admin(ag, "key", "revoke", "erin", key_id)
    assert code == 0, err
    served_within(ag.gw, "/keyed/x", 401, timeout=5, headers={"apikey": key})


def test_errors_are_reported(ag: AdminGateway) -> None:
    code, _, err = admin(ag, "routes", token=None)
    assert code == 2 and "FERROGATE_ADMIN_TOKEN" in err
    code, _, err = admin(ag, "consumer", "add", "frank", token=READER_TOKEN)
    assert code == 1 and "403" in err and "read-only" in err
    code, _, err = admin(ag, "consumer", "add", "gina", "--plan", "missing")
    assert code == 1
    assert "consumers/gina/plan" in err
    code, _, err = admin(ag, "key", "issue", "nobody")
    assert code == 1 and "404" in err
