"""The web application firewall: a real gateway with libmodsecurity and the OWASP CRS in front
of a recording upstream. Attacks are refused before the upstream (or any plugin) sees them;
benign requests, bodies included, pass unchanged."""

from __future__ import annotations

import http.client
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import Gateway, GatewayFactory, free_port, run_cli
from test_metrics import Status
from upstreams import Upstream

# A name, not an address: CRS rule 920350 scores a numeric Host header.
HOST = {"host": "shop.example"}


def config(up: Upstream, waf: dict[str, Any] | None = None, **routes: Any) -> dict[str, Any]:
    """Routes /<name>/* with the given `waf` settings, plus /* with the top-level ones."""
    return {
        "waf": {"rules": "crs", **(waf or {})},
        "upstreams": {"u": {"targets": [up.address]}},
        "routes": [
            *(
                {"name": n, "paths": [f"/{n}/*"], "upstream": "u", "waf": w}
                for n, w in routes.items()
            ),
            {"name": "main", "paths": ["/*"], "upstream": "u"},
        ],
    }


def events(gw: Gateway, name: str, timeout: float = 5.0, count: int = 1) -> list[dict[str, Any]]:
    """The worker's structured events called `name`, once there are `count` of them."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for line in gw.stderr_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def assert_blocked(resp: httpx.Response, up: Upstream) -> dict[str, Any]:
    assert resp.status_code == 403, resp.text
    error = resp.json()["error"]
    assert error["code"] == "waf_blocked"
    assert error["request_id"] == resp.headers["x-request-id"]
    assert up.count == 0, "a refused request reached the upstream"
    return dict(error)


def raw_get(gw: Gateway, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """GET with the target exactly as given (httpx would resolve dot segments)."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request("GET", target, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def gw(gateway: GatewayFactory, upstream: Upstream) -> Gateway:
    return gateway(
        config(
            upstream,
            {"body_limit": "4KiB"},
            search={"exclude_args": ["q"]},
            scan={"exclude_rules": [913100]},
            pl2={"paranoia": 2},
            open="off",
            watch={"mode": "detect"},
        ),
        workers=1,
    )


def test_attacks_are_refused_before_the_upstream_and_logged_without_the_payload(
    gw: Gateway, upstream: Upstream
) -> None:
    sqli = "1' OR '1'='1' -- "
    assert_blocked(gw.get("/items", params={"id": sqli}, headers=HOST), upstream)
    assert_blocked(
        gw.request(
            "POST",
            "/comments",
            data={"author": "ann", "text": "<script>alert(document.cookie)</script>"},
            headers=HOST,
        ),
        upstream,
    )
    assert_blocked(
        gw.request("POST", "/jobs", json={"cmd": "; cat /etc/passwd"}, headers=HOST), upstream
    )
    assert_blocked(gw.get("/", headers={**HOST, "user-agent": "sqlmap/1.7.2#stable"}), upstream)
    status, body = raw_get(gw, "/static/a/b/../../../etc/passwd", HOST)
    assert status == 403 and json.loads(body)["error"]["code"] == "waf_blocked"
    assert upstream.count == 0

    logged = events(gw, "waf_blocked", count=5)
    assert len(logged) == 5
    first = logged[0]
    assert first["route"] == "main" and first["mode"] == "block" and first["paranoia"] == 1
    assert 942100 in first["rule_ids"] and 949110 in first["rule_ids"]
    assert first["anomaly_score"] >= 5 and "ARGS:id" in first["variables"]
    assert "ARGS:text" in logged[1]["variables"]
    assert "ARGS:json.cmd" in logged[2]["variables"]
    assert 913100 in logged[3]["rule_ids"]
    assert any(930000 <= i < 931000 for i in logged[4]["rule_ids"]), logged[4]
    text = gw.stderr_text()
    for payload in ("'1'='1'", "document.cookie", "cat /etc/passwd", "sqlmap/1.7"):
        assert payload not in text


def test_benign_requests_and_bodies_pass_unchanged(gw: Gateway, upstream: Upstream) -> None:
    r = gw.get("/products", params={"q": "red shoes", "page": "2"}, headers=HOST)
    assert r.status_code == 200, r.text
    form = {"name": "Anne O'Neil", "comment": "Great product, would buy again!"}
    r = gw.request("POST", "/reviews", data=form, headers=HOST)
    assert r.status_code == 200, r.text
    assert upstream.last().body_head == httpx.QueryParams(form).__str__().encode()
    doc = {"order": {"items": [{"sku": "A-1", "qty": 2}], "note": "leave at the door"}}
    r = gw.request("POST", "/orders", json=doc, headers=HOST)
    assert r.status_code == 200, r.text
    assert json.loads(upstream.last().body_head) == doc
    # A body just under the inspection limit, streamed in chunks.
    big = b"x=" + b"a" * 4000
    r = gw.request(
        "POST",
        "/upload",
        content=iter([big[:1000], big[1000:]]),
        headers={**HOST, "content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200, r.text
    assert upstream.last().body_head == big
    assert upstream.count == 4
    assert events(gw, "waf_blocked", timeout=0.3) == []


def test_a_json_body_that_does_not_parse_is_refused(gw: Gateway, upstream: Upstream) -> None:
    r = gw.request(
        "POST",
        "/orders",
        content=b'{"order": ',
        headers={**HOST, "content-type": "application/json"},
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_request"
    assert upstream.count == 0
    assert events(gw, "waf_blocked")[0]["rule_ids"] == [200002]


def test_paranoia_2_catches_what_level_1_lets_through(gw: Gateway, upstream: Upstream) -> None:
    markup = {"q": "<b>hi</b>"}
    assert gw.get("/main/x", params=markup, headers=HOST).status_code == 200
    assert upstream.count == 1
    upstream.reset()
    assert_blocked(gw.get("/pl2/x", params=markup, headers=HOST), upstream)
    assert events(gw, "waf_blocked")[0]["paranoia"] == 2


def test_exclusions_by_argument_and_by_rule_id_apply_on_their_route_only(
    gw: Gateway, upstream: Upstream
) -> None:
    sqli = "1' OR '1'='1' -- "
    assert gw.get("/search/", params={"q": sqli}, headers=HOST).status_code == 200
    assert upstream.last().target.startswith("/search/?q=")
    upstream.reset()
    # Another argument on the same route is still inspected.
    assert_blocked(gw.get("/search/", params={"sort": sqli}, headers=HOST), upstream)
    assert_blocked(gw.get("/items", params={"q": sqli}, headers=HOST), upstream)
    scanner = {**HOST, "user-agent": "Nikto/2.1.6"}
    assert_blocked(gw.get("/items", headers=scanner), upstream)
    assert gw.get("/scan/", headers=scanner).status_code == 200
    assert upstream.count == 1


def test_waf_off_on_one_route(gw: Gateway, upstream: Upstream) -> None:
    r = gw.get("/open/x", params={"id": "1' OR '1'='1' -- "}, headers=HOST)
    assert r.status_code == 200
    assert upstream.count == 1


def test_detect_mode_forwards_and_logs(gw: Gateway, upstream: Upstream) -> None:
    r = gw.request("POST", "/watch/x", data={"text": "<script>alert(1)</script>"}, headers=HOST)
    assert r.status_code == 200
    assert upstream.last().body_head.startswith(b"text=")
    [event] = events(gw, "waf_detected")
    assert event["mode"] == "detect" and event["route"] == "watch" and event["status"] is None
    assert 949110 in event["rule_ids"] and "ARGS:text" in event["variables"]
    assert events(gw, "waf_blocked", timeout=0.2) == []


def test_bodies_over_the_limit_are_refused_or_inspected_in_part(
    gateway: GatewayFactory, gw: Gateway, upstream: Upstream
) -> None:
    attack_late = b"a=" + b"x" * 5000 + b"&b=<script>alert(1)</script>"
    form = {**HOST, "content-type": "application/x-www-form-urlencoded"}
    r = gw.request("POST", "/main/x", content=attack_late, headers=form)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert upstream.count == 0

    partial = gateway(config(upstream, {"body_limit": "4KiB", "body_over_limit": "partial"}))
    r = partial.request("POST", "/main/x", content=attack_late, headers=form)
    assert r.status_code == 200
    assert upstream.last().body_head == attack_late
    upstream.reset()
    attack_early = b"b=<script>alert(1)</script>&a=" + b"x" * 5000
    assert_blocked(partial.request("POST", "/main/x", content=attack_early, headers=form), upstream)


def test_blocks_are_counted_in_metrics(gateway: GatewayFactory, upstream: Upstream) -> None:
    port = free_port()
    gw = gateway(
        {
            **config(upstream, api=None),
            "status": {"listen": f"127.0.0.1:{port}"},
            "metrics": {"publish_interval": "100ms"},
        },
        workers=1,
    )
    status = Status(gw, port)
    for _ in range(3):
        attack = {"id": "1 UNION SELECT password FROM users"}
        assert_blocked(gw.get("/api/x", params=attack), upstream)
    assert gw.get("/api/x", headers=HOST).status_code == 200
    scrape = status.until(
        lambda s: s.value("ferrogate_requests_total", route="api", status_class="2xx") == 1,
        "the benign request counted",
    )
    # Counted in the same snapshot as the benign request that came after them.
    assert scrape.value("ferrogate_errors_total", route="api", code="waf_blocked") == 3
    assert scrape.value("ferrogate_requests_total", route="api", status_class="4xx") == 3


def test_check_reports_rules_that_do_not_compile_and_bad_settings(tmp_path: Path) -> None:
    (tmp_path / "mine.conf").write_text(
        'SecRule ARGS "@rx attack" "id:10001,phase:2,deny,status:403"\n'
        'SecRule ARGS "@rx x" "id:10002,phase:2,deny,nosuchaction"\n'
    )
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "listen: ['127.0.0.1:0']\n"
        "waf:\n"
        "  rules: [crs, mine.conf]\n"
        "  paranoia: 2\n"
        "routes:\n"
        "  - paths: ['/*']\n"
        "    upstream: http://127.0.0.1:9\n"
    )
    out = run_cli("check", str(cfg))
    report = out.stdout + out.stderr
    assert out.returncode != 0
    assert "gw.yaml:3:" in report and "waf.rules" in report
    assert "do not compile" in report and "mine.conf. Line: 2" in report
    assert "nosuchaction" in report

    (tmp_path / "mine.conf").write_text('SecRule ARGS "@rx attack" "id:10001,phase:2,deny"\n')
    assert run_cli("check", str(cfg)).returncode == 0, run_cli("check", str(cfg)).stderr

    cfg.write_text(
        "listen: ['127.0.0.1:0']\n"
        "waf: {rules: missing.conf, paranoia: 5}\n"
        "routes:\n"
        "  - paths: ['/*']\n"
        "    upstream: http://127.0.0.1:9\n"
        "    waf: {exclude_args: ['a b']}\n"
    )
    out = run_cli("check", str(cfg))
    report = out.stdout + out.stderr
    assert out.returncode != 0
    assert "waf.paranoia" in report and "routes[0].waf.exclude_args[0]" in report, report


def test_reload_compiles_the_rules_again(
    tmp_path: Path, gateway: GatewayFactory, upstream: Upstream
) -> None:
    own = tmp_path / "own.conf"
    own.write_text('SecRule ARGS "@streq forbidden" "id:10001,phase:2,deny,status:403,log"\n')
    cfg = config(upstream, {"rules": [str(own)]})
    gw = gateway(cfg, workers=1)
    assert_blocked(gw.get("/x", params={"a": "forbidden"}), upstream)
    assert gw.get("/x", params={"a": "banned"}).status_code == 200
    own.write_text('SecRule ARGS "@streq banned" "id:10001,phase:2,deny,status:403,log"\n')
    gw.signal(signal.SIGHUP)
    gw.wait_for_status("/x?a=banned", 403, timeout=10)
    upstream.reset()
    assert gw.get("/x", params={"a": "forbidden"}).status_code == 200
    assert events(gw, "waf_blocked", count=2)[-1]["rule_ids"] == [10001]


def test_a_config_with_the_waf_is_refused_where_libmodsecurity_is_missing(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "listen: ['127.0.0.1:0']\n"
        "waf: {rules: crs}\n"
        "routes:\n"
        "  - paths: ['/*']\n"
        "    upstream: http://127.0.0.1:9\n"
    )
    missing = {"FERROGATE_LIBMODSECURITY": str(tmp_path / "libmodsecurity.so.3")}
    out = run_cli("check", str(cfg), env=missing)
    report = out.stdout + out.stderr
    assert out.returncode != 0
    assert "gw.yaml:2:" in report and "install libmodsecurity3 and modsecurity-crs" in report
    # Without `waf:` the library is never needed.
    cfg.write_text(cfg.read_text().replace("waf: {rules: crs}\n", ""))
    assert run_cli("check", str(cfg), env=missing).returncode == 0


def test_the_gateway_body_limit_still_holds_for_chunked_bodies_the_waf_read(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway({**config(upstream), "limits": {"max_body_bytes": 1000}}, workers=1)
    form = {**HOST, "content-type": "application/x-www-form-urlencoded"}
    body = b"a=" + b"x" * 1500
    r = gw.request("POST", "/x", content=iter([body[:700], body[700:]]), headers=form)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert upstream.count == 0
    r = gw.request("POST", "/x", content=iter([body[:400], body[400:900]]), headers=form)
    assert r.status_code == 200 and upstream.last().body_head == body[:900]
