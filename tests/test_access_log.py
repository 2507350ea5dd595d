"""The access log: one JSON line per request, to a file or stdout, with sampling, SIGUSR1
reopening and opt-in capture of headers and bodies with secrets redacted."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from ferrogate.observability import ACCESS_LOG_FIELDS, DEFAULT_ACCESS_LOG_FIELDS
from gateway import Gateway, GatewayFactory, run_cli
from test_health import events, wait_for
from upstreams import Upstream, UpstreamFactory, closed_port

PLUGINS_DIR = str(Path(__file__).parent / "plugins_dir")
PROBE_PATH = "/__ferrogate_probe__"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def routes(up: Upstream, **top: Any) -> dict[str, Any]:
    return {
        "upstreams": {"backend": {"targets": [up.address]}},
        "routes": [{"name": "api", "paths": ["/api/*"], "upstream": "backend"}],
        **top,
    }


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the log, each of which must be a whole JSON object."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    assert text == "" or text.endswith("\n"), f"a partial line at the end: {text[-200:]!r}"
    return [json.loads(line) for line in text.splitlines()]


def request_lines(path: Path) -> list[dict[str, Any]]:
    """The log's lines, less the gateway's readiness probes."""
    return [line for line in read_lines(path) if line.get("path") != PROBE_PATH]


def wait_lines(path: Path, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        lines = request_lines(path)
        if len(lines) >= n or time.monotonic() > deadline:
            assert len(lines) >= n, f"{len(lines)} lines in {path}, expected {n}: {lines}"
            return lines
        time.sleep(0.02)


def line_for(path: Path, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in read_lines(path) if line.get("request_id") == request_id]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, f"{len(found)} lines for {request_id} in {read_lines(path)}"
            return found[0]
        time.sleep(0.02)


def log_path(gw: Gateway) -> Path:
    return gw.dir / "access.log"


def test_client_ip_is_the_forwarded_one_only_behind_a_trusted_proxy(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    forwarded = {"x-forwarded-for": "203.0.113.7"}
    trusting = gateway(
        routes(upstream, access_log={"path": "access.log"}, trusted_proxies=["127.0.0.1/32"]),
        workers=1,
    )
    resp = trusting.get("/api/who", headers=forwarded)
    assert line_for(log_path(trusting), resp.headers["x-request-id"])["client_ip"] == "203.0.113.7"
    # Anyone else's X-Forwarded-For is just a header: the log shows the peer.
    plain = gateway(routes(upstream, access_log={"path": "access.log"}), workers=1)
    resp = plain.get("/api/who", headers=forwarded)
    assert line_for(log_path(plain), resp.headers["x-request-id"])["client_ip"] == "127.0.0.1"


def test_a_proxied_request_is_logged_with_every_field(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(
        routes(upstream, access_log={"path": "access.log", "fields": list(ACCESS_LOG_FIELDS)}),
        workers=1,
    )
    before = datetime.now(UTC)
    resp = gw.request(
        "POST",
        "/api/items?x=1&y=two",
        content=b"hello world",
        headers={"traceparent": TRACEPARENT, "user-agent": "probe/1.0"},
    )
    assert resp.status_code == 200
    line = line_for(log_path(gw), resp.headers["x-request-id"])
    assert list(line) == list(ACCESS_LOG_FIELDS)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]), line["time"]
    logged = datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    assert abs((logged - before).total_seconds()) < 2
    assert line["trace_id"] == TRACE_ID
    assert line["client_ip"] == "127.0.0.1"
    assert line["consumer"] is None
    assert line["route"] == "api"
    assert (line["method"], line["host"], line["path"]) == ("POST", gw.address, "/api/items")
    assert line["query"] == "x=1&y=two"
    assert line["protocol"] == "HTTP/1.1"
    assert line["status"] == 200
    assert line["bytes_in"] == 11
    assert line["bytes_out"] == len(resp.content) > 0
    assert 0 < line["upstream_duration"] <= line["duration"] < 5
    assert line["upstream"] == upstream.address
    assert line["retries"] == 0
    assert line["rate_limit"] is None and line["cache"] is None and line["error"] is None
    assert line["user_agent"] == "probe/1.0"
    assert line["worker"] == 0

    # No query, no traceparent: nulls, not empty strings.
    resp = gw.get("/api/plain")
    line = line_for(log_path(gw), resp.headers["x-request-id"])
    assert line["query"] is None and line["trace_id"] is None and line["bytes_in"] == 0

    # HTTP/2 (h2c): the host is the :authority.
    with httpx.Client(http1=False, http2=True, base_url=gw.url, timeout=15) as client:
        resp = client.post("/api/h2", content=b"x" * 3000)
    line = line_for(log_path(gw), resp.headers["x-request-id"])
    assert (line["protocol"], line["host"], line["bytes_in"]) == ("HTTP/2", gw.address, 3000)


def test_the_default_fields_and_a_selection_applied_by_reload(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(routes(upstream, access_log={"path": "access.log"}), workers=1)
    first = gw.get("/api/a").headers["x-request-id"]
    assert list(line_for(log_path(gw), first)) == list(DEFAULT_ACCESS_LOG_FIELDS)

    gw.write_config(
        routes(
            upstream, access_log={"path": "access.log", "fields": ["status", "request_id", "path"]}
        )
    )
    gw.signal(signal.SIGHUP)
    wait_for(lambda: events(gw, "config_applied"), what="the reload to be applied")
    second = gw.get("/api/b").headers["x-request-id"]
    # In the order of the field list, whatever the order in the config.
    assert line_for(log_path(gw), second) == {"request_id": second, "path": "/api/b", "status": 200}
    # The first writer flushed its lines before it went: the file has both.
    assert [line["request_id"] for line in request_lines(log_path(gw))] == [first, second]


def test_gateway_errors_carry_their_code(gateway: GatewayFactory, upstream: Upstream) -> None:
    dead = f"127.0.0.1:{closed_port()}"
    config = routes(upstream, access_log={"path": "access.log"})
    config["upstreams"]["dead"] = {"targets": [dead], "health": {"passive": {"enabled": False}}}
    config["routes"].append({"name": "down", "paths": ["/down/*"], "upstream": "dead"})
    gw = gateway(config, workers=1)

    resp = gw.get("/nowhere")
    assert resp.status_code == 404
    line = line_for(log_path(gw), resp.headers["x-request-id"])
    assert (line["status"], line["error"], line["route"]) == (404, "no_route", None)
    assert line["upstream"] is None and line["upstream_duration"] is None
    assert line["bytes_out"] == len(resp.content) > 0

    resp = gw.get("/down/x")
    assert resp.status_code == 502
    line = line_for(log_path(gw), resp.headers["x-request-id"])
    assert (line["status"], line["error"], line["route"]) == (502, "upstream_unreachable", "down")
    # A target was tried, but none answered.
    assert line["upstream"] == dead and line["upstream_duration"] is None


def test_a_retried_request_counts_its_retries(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    live = upstream_factory("live")
    dead = f"127.0.0.1:{closed_port()}"
    gw = gateway(
        {
            "upstreams": {
                "pool": {"targets": [dead, live.address], "health": {"passive": {"enabled": False}}}
            },
            "routes": [{"name": "all", "paths": ["/x/*"], "upstream": "pool"}],
            "access_log": {"path": "access.log"},
        },
        workers=1,
    )
    ids = []
    with gw.client() as client:
        for i in range(4):
            resp = client.get(f"/x/{i}")
            assert resp.status_code == 200
            ids.append(resp.headers["x-request-id"])
    lines = [line_for(log_path(gw), i) for i in ids]
    # Round robin: half the requests tried the dead target first, then the live one.
    assert sorted(line["retries"] for line in lines) == [0, 0, 1, 1]
    assert {line["upstream"] for line in lines} == {live.address}


def test_rate_limit_outcomes(gateway: GatewayFactory, upstream: Upstream) -> None:
    config = routes(upstream, access_log={"path": "access.log"})
    config["routes"][0]["rate_limits"] = [{"limit": 1, "per": "1m", "key": "header:x-who"}]
    gw = gateway(config, workers=1)
    first = gw.get("/api/a", headers={"x-who": "me"})
    second = gw.get("/api/a", headers={"x-who": "me"})
    assert (first.status_code, second.status_code) == (200, 429)
    allowed = line_for(log_path(gw), first.headers["x-request-id"])
    limited = line_for(log_path(gw), second.headers["x-request-id"])
    assert (allowed["rate_limit"], allowed["error"]) == ("allowed", None)
    assert (limited["rate_limit"], limited["error"], limited["status"]) == (
        "limited",
        "rate_limited",
        429,
    )
    assert limited["upstream"] is None


def test_the_consumer_a_plugin_set(gateway: GatewayFactory, upstream: Upstream) -> None:
    config = routes(upstream, access_log={"path": "access.log"}, plugins_dir=PLUGINS_DIR)
    config["routes"][0]["plugins"] = [{"name": "t-consumer"}]
    gw = gateway(config, workers=1)
    named = gw.get("/api/a", headers={"x-user": "alice"})
    anonymous = gw.get("/api/a")
    assert line_for(log_path(gw), named.headers["x-request-id"])["consumer"] == "alice"
    assert line_for(log_path(gw), anonymous.headers["x-request-id"])["consumer"] is None


def test_sampling_keeps_every_error(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(routes(upstream, access_log={"path": "access.log", "sample": 0}), workers=1)
    with gw.client() as client:
        for _ in range(20):
            assert client.get("/api/ok").status_code == 200
        failed = client.get("/api/fail", headers={"x-up-status": "503"})
        refused = client.get("/nowhere")
    assert (failed.status_code, refused.status_code) == (503, 404)
    # One worker writes in order: had any 2xx been logged, it would be in by now.
    line_for(log_path(gw), refused.headers["x-request-id"])
    lines = request_lines(log_path(gw))
    assert [(line["status"], line["path"]) for line in lines] == [
        (503, "/api/fail"),
        (404, "/nowhere"),
    ]


def test_stdout(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(routes(upstream, access_log={"path": "stdout"}), workers=2)
    with gw.client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        ids = {client.get(f"/api/{i}").headers["x-request-id"] for i in range(10)}

    def logged() -> set[str]:
        found = set()
        for text in gw.stdout_text().splitlines():
            if text.startswith("{"):
                found.add(json.loads(text)["request_id"])
        return found

    wait_for(lambda: ids <= logged(), what="the lines on stdout")
    # Nothing to reopen on stdout, and no worker dies of the signal.
    workers = sorted(gw.worker_pids())
    gw.signal(signal.SIGUSR1)
    wait_for(lambda: events(gw, "logs_reopening"), what="the master to pass the signal on")
    rid = gw.get("/api/after").headers["x-request-id"]
    wait_for(lambda: rid in logged(), what="a line after the signal")
    assert sorted(gw.worker_pids()) == workers and not events(gw, "worker_exited")


def test_sigusr1_reopens_the_moved_file(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(routes(upstream, access_log={"path": "access.log"}), workers=2)
    # A worker takes SIGUSR1 from its start on (until then it ignores it).
    wait_for(lambda: len(events(gw, "worker_started")) == 2, what="both workers to start")
    workers = sorted(gw.worker_pids())
    path = log_path(gw)
    fresh = httpx.Limits(max_keepalive_connections=0)
    with gw.client(limits=fresh) as client:
        before = [client.get(f"/api/before/{i}").headers["x-request-id"] for i in range(6)]
    wait_lines(path, 6)
    rotated = path.with_name("access.log.1")
    path.rename(rotated)
    gw.signal(signal.SIGUSR1)
    wait_for(lambda: len(events(gw, "access_log_reopened")) == 2, what="both workers to reopen")
    with gw.client(limits=fresh) as client:
        after = [client.get(f"/api/after/{i}").headers["x-request-id"] for i in range(6)]
    wait_lines(path, 6)
    assert sorted(line["request_id"] for line in request_lines(rotated)) == sorted(before)
    assert sorted(line["request_id"] for line in request_lines(path)) == sorted(after)
    assert sorted(gw.worker_pids()) == workers
    assert not events(gw, "worker_exited")


def test_a_client_gone_mid_body_still_gets_a_line(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(routes(upstream, access_log={"path": "access.log"}), workers=1)
    # Gone while sending its body.
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(
            b"POST /api/upload HTTP/1.1\r\nHost: x\r\nX-Request-Id: gone-uploading\r\n"
            b"Content-Length: 100000\r\n\r\n" + b"a" * 1000
        )
        upstream.wait_for_arrivals(1)
    uploading = line_for(log_path(gw), "gone-uploading")
    assert uploading["path"] == "/api/upload"
    assert uploading["status"] >= 400
    # Gone while reading a large response.
    size = 64 << 20
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(
            b"GET /api/download HTTP/1.1\r\nHost: x\r\nX-Request-Id: gone-downloading\r\n"
            b"X-Up-Size: " + str(size).encode() + b"\r\n\r\n"
        )
        got = s.recv(65536)
        assert got.startswith(b"HTTP/1.1 200")
        while len(got) < 1 << 20:
            got += s.recv(65536)
    downloading = line_for(log_path(gw), "gone-downloading")
    assert downloading["status"] == 200
    assert 0 < downloading["bytes_out"] < size
    # Gone while the upstream was still thinking: 499, nginx's "client closed request".
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(
            b"GET /api/slow HTTP/1.1\r\nHost: x\r\nX-Request-Id: gone-waiting\r\n"
            b"X-Up-Sleep: 2\r\n\r\n"
        )
        upstream.wait_for_arrivals(3)
    waiting = line_for(log_path(gw), "gone-waiting")
    assert (waiting["status"], waiting["route"], waiting["bytes_out"]) == (499, "api", 0)
    assert waiting["duration"] < 1.5


def test_a_stopping_worker_writes_what_it_holds(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(routes(upstream, access_log={"path": "access.log"}), workers=1)
    answered: list[str] = []

    def load() -> None:
        with gw.client() as client:
            for i in range(100_000):
                try:
                    resp = client.get(f"/api/{i}")
                except httpx.HTTPError:
                    return
                answered.append(resp.headers["x-request-id"])

    loader = threading.Thread(target=load)
    loader.start()
    wait_for(lambda: len(answered) >= 20, what="some traffic")
    # Stopped under load: answers up to the last moment, then the worker exits.
    gw.stop()
    loader.join()
    assert gw.proc is not None and gw.proc.returncode == 0
    logged = {line["request_id"] for line in request_lines(log_path(gw))}
    assert set(answered) <= logged, len(set(answered) - logged)


def test_two_workers_write_whole_lines(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(
        routes(
            upstream, access_log={"path": "access.log", "fields": ["request_id", "path", "worker"]}
        ),
        workers=2,
    )
    # Long paths make long lines, so that interleaved writes would show.
    long = "x" * 1500
    count = 400
    sent: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        with gw.client(limits=httpx.Limits(max_keepalive_connections=0)) as c:
            for i in range(n, count, 8):
                rid = f"req-{i}"
                assert c.get(f"/api/{long}/{i}", headers={"x-request-id": rid}).status_code == 200
                with lock:
                    sent.append(rid)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sent) == count
    lines = wait_lines(log_path(gw), count)
    assert sorted(line["request_id"] for line in lines) == sorted(sent)
    assert all(line["path"] == f"/api/{long}/{line['request_id'][4:]}" for line in lines)
    assert {line["worker"] for line in lines} == {0, 1}


def test_capture_redacts_secrets(gateway: GatewayFactory, upstream: Upstream) -> None:
    capture = {
        "request_headers": True,
        "response_headers": ["content-type", "x-upstream"],
        "request_body": 4096,
        "response_body": "4KiB",
        "redact_body_keys": ["pin"],
    }
    gw = gateway(
        routes(
            upstream,
            access_log={
                "path": "access.log",
                "capture": capture,
                "fields": ["request_id", "query"],
            },
        ),
        workers=1,
    )
    secrets = ["Bearer sekrit-1", "sid=sekrit-2", "sekrit-3", "sekrit-4", "sekrit-5"]
    body = json.dumps(
        {
            "user": "ann",
            "password": secrets[2],
            "nested": {"api_key": secrets[3], "n": [1]},
            "PIN": secrets[4],
        }
    )
    resp = gw.request(
        "POST",
        "/api/login?page=2",
        content=body,
        headers={
            "authorization": secrets[0],
            "cookie": secrets[1],
            "content-type": "application/json",
            "x-visible": "shown",
        },
    )
    assert resp.status_code == 200
    line = line_for(log_path(gw), resp.headers["x-request-id"])
    captured = line["captured"]
    assert captured["request_headers"]["authorization"] == "[REDACTED]"
    assert captured["request_headers"]["cookie"] == "[REDACTED]"
    assert captured["request_headers"]["x-visible"] == "shown"
    assert captured["response_headers"] == {"content-type": "application/json", "x-upstream": "up"}
    sent = json.loads(captured["request_body"])
    assert sent == {
        "user": "ann",
        "password": "[REDACTED]",
        "nested": {"api_key": "[REDACTED]", "n": [1]},
        "PIN": "[REDACTED]",
    }
    # The upstream echoes the request's headers in its JSON answer: redacted there too.
    echoed = json.loads(captured["response_body"])
    assert echoed["path"] == "/api/login"
    assert echoed["headers"]["authorization"] == "[REDACTED]"
    assert echoed["headers"]["x-visible"] == ["shown"]
    assert line["query"] == "page=2"
    # Secrets in the query string too (this one is not echoed by an upstream).
    resp = gw.get("/nowhere?token=sekrit-6&page=2")
    assert (
        line_for(log_path(gw), resp.headers["x-request-id"])["query"] == "token=[REDACTED]&page=2"
    )

    # A form body, cut short by the capture limit mid-secret: still hidden.
    form = "user=bob&password=" + "sekrit-7" * 600
    resp = gw.request(
        "POST",
        "/api/form",
        content=form,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    line = line_for(log_path(gw), resp.headers["x-request-id"])
    assert line["captured"]["request_body"] == "user=bob&password=[REDACTED]"
    # No body read: null.
    resp = gw.get("/api/nothing")
    assert line_for(log_path(gw), resp.headers["x-request-id"])["captured"]["request_body"] is None
    text = log_path(gw).read_text()
    for secret in [*secrets, "sekrit"]:
        assert secret not in text, secret


def test_a_log_file_that_cannot_be_opened_is_a_config_problem(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(routes(upstream, access_log={"path": "access.log"}), workers=1)
    gw.write_config(routes(upstream, access_log={"path": "no/such/dir/access.log"}))
    gw.signal(signal.SIGHUP)
    wait_for(lambda: events(gw, "config_reload_failed"), what="the failure to be logged")
    [failed] = events(gw, "config_reload_failed")
    [problem] = failed["problems"]
    assert "access_log.path: the directory" in problem and "no/such/dir" in problem, problem
    # The old log goes on.
    rid = gw.get("/api/still").headers["x-request-id"]
    line_for(log_path(gw), rid)
    out = run_cli("check", str(gw.config_path))
    assert out.returncode == 2 and "access_log.path" in out.stdout + out.stderr
