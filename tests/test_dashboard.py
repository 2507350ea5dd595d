"""The dashboard page, in headless Chromium (Debian's package, driven by Playwright), on a real
gateway with real traffic: sign-in, charts, tables against the API, the time-range selector,
alerts. Leaves a screenshot in test-artifacts/dashboard.png."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Response, sync_playwright

from gateway import GatewayFactory, free_port
from steady import SteadyTraffic, poll
from upstreams import UpstreamFactory

TOKEN = "dashboard-test-token"
RESOLUTION = 0.25
WARMUP = 8
PLUGINS_DIR = str(Path(__file__).parent / "plugins_dir")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    assert chromium, "the chromium package is missing (apt-get install chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium)
        yield b
        b.close()


def config(ups: UpstreamFactory, status_port: int) -> dict[str, Any]:
    orders, users = ups("orders"), ups("users")
    consumer = [{"name": "t-consumer"}]
    return {
        "status": {"listen": f"127.0.0.1:{status_port}", "admin_token": TOKEN},
        "analytics": {"resolution": f"{int(RESOLUTION * 1000)}ms"},
        "alerts": {"warmup": WARMUP, "min_requests": 5, "z_threshold": 6},
        "plugins_dir": PLUGINS_DIR,
        "upstreams": {
            "orders": {"targets": [orders.address]},
            "users": {"targets": [users.address]},
        },
        "routes": [
            {"name": "orders", "paths": ["/orders"], "upstream": "orders", "plugins": consumer},
            {"name": "users", "paths": ["/users"], "upstream": "users", "plugins": consumer},
        ],
    }


def numbers(page: Page, table: str) -> dict[str, int]:
    """Key -> requests, as the page's table shows them."""
    out = {}
    for row in page.locator(f"{table} tbody tr[data-key]").all():
        key = row.get_attribute("data-key")
        assert key is not None
        out[key] = int(row.locator("td.requests").inner_text().replace(",", ""))
    return out


def api_numbers(response: Response) -> dict[str, int]:
    return {str(r["key"]): r["requests"] for r in response.json()["rows"]}


def is_top(by: str, range_: str) -> Any:
    return lambda r: (
        "/api/analytics/top" in r.url and f"by={by}" in r.url and f"from=-{range_}" in r.url
    )


def test_without_the_token_nothing_is_shown(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    status_port = free_port()
    gateway(config(upstream_factory, status_port), workers=1)
    status = f"http://127.0.0.1:{status_port}"
    page = httpx.get(f"{status}/dashboard", timeout=5)
    assert page.status_code == 401
    assert page.headers["content-type"].startswith("text/html")
    assert '<form method="post" action="/dashboard/login">' in page.text
    assert "Top routes" not in page.text
    for path in ("/api/analytics/summary", "/api/analytics/top", "/api/alerts"):
        assert httpx.get(status + path, timeout=5).status_code == 401, path
    bad = httpx.post(f"{status}/dashboard/login", data={"token": "guess"}, timeout=5)
    assert bad.status_code == 401 and "not accepted" in bad.text
    assert "set-cookie" not in bad.headers
    stale = httpx.get(f"{status}/dashboard", cookies={"ferrogate_token": "old"}, timeout=5)
    assert stale.status_code == 401 and "no longer valid" in stale.text
    good = httpx.post(f"{status}/dashboard/login", data={"token": TOKEN}, timeout=5)
    assert good.status_code == 303 and good.headers["location"] == "/dashboard"
    cookie = good.headers["set-cookie"]
    assert f"ferrogate_token={TOKEN}" in cookie
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    # the script and styles are no secret; the page and the data are
    assert httpx.get(f"{status}/dashboard/static/app.js", timeout=5).status_code == 200
    assert httpx.get(f"{status}/dashboard/static/index.html", timeout=5).status_code == 404
    assert httpx.get(f"{status}/dashboard/static/../alerts.py", timeout=5).status_code == 404


def test_the_dashboard_in_a_browser(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory, browser: Browser
) -> None:
    status_port = free_port()
    status = f"http://127.0.0.1:{status_port}"
    gw = gateway(config(upstream_factory, status_port), workers=2)
    users_up = next(u for u in upstream_factory.made if u.name == "users")
    api = httpx.Client(base_url=status, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    orders = SteadyTraffic(gw, "/orders", per_second=100, headers={"x-user": "alice"})
    users = SteadyTraffic(gw, "/users", per_second=80, headers={"x-user": "bob"})
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        # past the warmup, the users' upstream starts failing: an alert for the page to show
        poll(
            lambda: (
                (api.get("/api/alerts").json()["judged_until"] or 0)
                >= users.started + (WARMUP + 4) * RESOLUTION
            ),
            timeout=30,
            message="the alerts never judged enough buckets",
        )
        users_up.status = 500
        poll(
            lambda: any(
                a["series"] == "users" and a["ended"] is None
                for a in api.get("/api/alerts").json()["alerts"]
            ),
            timeout=15,
            message=lambda: f"no alert for the users route: {api.get('/api/alerts').json()}",
        )

        # sign in through the form
        first = page.goto(f"{status}/dashboard")
        assert first is not None and first.status == 401
        page.fill("#token", "wrong")
        page.click("button[type=submit]")
        assert "not accepted" in page.inner_text(".notice")
        page.fill("#token", TOKEN)
        with page.expect_response(is_top("route", "1h")) as shown_routes:
            page.click("button[type=submit]")
        page.uncheck("#auto-refresh")  # the test refreshes by choosing ranges
        page.wait_for_selector("#updated:not(:empty)")
        assert page.url.endswith("/dashboard#range=1h")
        cookie = next(c for c in context.cookies() if c["name"] == "ferrogate_token")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"

        # charts drawn from data
        rps = page.locator("#chart-rps svg")
        assert int(rps.get_attribute("data-points") or 0) > 0
        assert float(rps.get_attribute("data-max") or 0) > 10
        assert "L" in (page.locator("#chart-rps path.line").get_attribute("d") or "")
        latency = page.locator("#chart-latency path.line")
        assert latency.count() == 3
        assert {latency.nth(i).get_attribute("data-series") for i in range(3)} == {
            "p50",
            "p95",
            "p99",
        }
        assert float(page.locator("#chart-latency svg").get_attribute("data-max") or 0) > 0
        assert float(page.locator("#chart-errors svg").get_attribute("data-max") or 0) > 0

        # the tables show what the API answered the page
        routes = api_numbers(shown_routes.value)
        assert routes.keys() >= {"orders", "users"}
        assert numbers(page, "#top-routes") == routes
        consumers = numbers(page, "#top-consumers")
        assert consumers.keys() >= {"alice", "bob"} and consumers["alice"] > consumers["bob"]
        classes = {
            s.get_attribute("data-class") for s in page.locator("#status-bar .segment").all()
        }
        assert {"2xx", "5xx"} <= classes
        assert page.locator("#summary [data-field=requests]").inner_text() != "0"

        # the alert
        alert = page.locator('#alert-list li.active[data-series="users"][data-kind="error_rate"]')
        assert "error rate" in alert.inner_text() and "route users" in alert.inner_text()
        assert page.locator("#alerts.firing").count() == 1

        # the range selector asks for another range, and the page shows that answer
        with (
            page.expect_request(
                lambda r: "/api/analytics/timeseries" in r.url and "from=-15m" in r.url
            ) as asked,
            page.expect_response(is_top("route", "15m")) as shown_15m,
        ):
            page.click(".ranges button[data-range='15m']")
        assert "step=8" in asked.value.url
        page.wait_for_function(
            "n => [...document.querySelectorAll('#top-routes td.requests')]"
            ".map(td => +td.textContent.replace(/,/g, '')).reduce((a, b) => a + b, 0) === n",
            arg=sum(api_numbers(shown_15m.value).values()),
        )
        assert numbers(page, "#top-routes") == api_numbers(shown_15m.value)
        assert page.get_attribute(".ranges button[data-range='15m']", "aria-pressed") == "true"
        assert page.url.endswith("#range=15m")
        with page.expect_request(lambda r: "from=-7d" in r.url):
            page.click(".ranges button[data-range='7d']")
        page.wait_for_selector("#updated:not(:empty)")

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        page.click(".ranges button[data-range='15m']")
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(shot), full_page=True)
        print(f"dashboard screenshot: {shot}")
        assert shot.stat().st_size > 10_000

        # signing out drops the cookie: the page is the form again, the API refuses
        page.click("text=sign out")
        page.wait_for_selector("#token")
        assert not [c for c in context.cookies() if c["name"] == "ferrogate_token"]
        assert page.request.get(f"{status}/api/analytics/summary").status == 401
        assert errors == [], errors
    finally:
        orders.stop()
        users.stop()
        context.close()
        api.close()
    assert orders.statuses[200] > 0 and users.statuses[500] > 0
