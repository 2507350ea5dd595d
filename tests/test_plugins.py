"""Python plugins in the real gateway: every phase, early answers, bodies both ways, streaming,
async hooks, timeouts, failures, budgets, ordering, and the log phase."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import Gateway, GatewayFactory
from upstreams import Upstream

PLUGINS_DIR = str(Path(__file__).parent / "plugins_dir")


def config(up: Upstream, *routes: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "plugins_dir": PLUGINS_DIR,
        "upstreams": {"backend": {"targets": [up.address]}},
        "routes": [{"upstream": "backend", **r} for r in routes],
        **top,
    }


def one_route(up: Upstream, *plugins: dict[str, Any], **top: Any) -> dict[str, Any]:
    return config(up, {"name": "r", "paths": ["/*"], "plugins": list(plugins)}, **top)


def test_request_edits_reach_the_upstream(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(
        one_route(upstream, {"name": "t-rewrite", "config": {"path": "/moved"}}), workers=1
    )
    r = gw.get("/orig?keep=1&drop=2", headers={"x-secret": "s3cret"})
    assert r.status_code == 200
    seen = upstream.last()
    assert seen.path == "/moved"
    assert seen.target == "/moved?keep=1&added=a%20b"
    assert seen.header("x-added") == "yes"
    assert not seen.has_header("x-secret")
    # the built-in proxy headers are still added after the plugin ran
    assert seen.header("x-forwarded-for") == "127.0.0.1"


def test_method_rewrite(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(one_route(upstream, {"name": "t-rewrite", "config": {"method": "PUT"}}), workers=1)
    assert gw.get("/m").status_code == 200
    assert upstream.last().method == "PUT"


def test_early_answer_never_reaches_the_upstream(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream, {"name": "t-stamp"}, {"name": "t-deny"}), workers=1)
    r = gw.get("/x", headers={"x-deny": "nope"})
    assert r.status_code == 403
    assert r.json() == {"denied": "nope"}
    assert r.headers["x-denied-by"] == "t-deny"
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"]
    # response hooks see early answers too (as Kong's header_filter does)
    assert r.headers["x-stamp"] == "GET /x"
    assert upstream.count == 0
    assert gw.get("/x").status_code == 200
    assert upstream.count == 1


def test_response_hooks_edit_status_and_headers_and_share_ctx(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream, {"name": "t-stamp"}), workers=1)
    r = gw.get("/ctx", headers={"x-make-201": "1"})
    assert r.status_code == 201
    assert r.headers["x-stamp"] == "GET /ctx"
    assert r.headers["x-upstream-status"] == "200"
    assert r.headers["x-served-by"] == "up"
    assert "x-upstream" not in r.headers
    assert r.json()["path"] == "/ctx"


def test_request_body_rewrite(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(one_route(upstream, {"name": "t-json-body"}), workers=1)
    r = gw.request("POST", "/b", json={"name": "ada"})
    assert r.status_code == 200
    sent = json.dumps({"name": "ada", "added_by_gateway": True}).encode()
    assert upstream.last().body_len == len(sent)
    assert upstream.last().header("content-length") == str(len(sent))
    assert upstream.last().body_head == sent


def test_chunked_request_body_is_buffered_then_rewritten(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream, {"name": "t-json-body"}), workers=1)

    def chunks() -> Iterator[bytes]:
        yield b'{"name": '
        yield b'"grace"}'

    r = gw.request("POST", "/b", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert json.loads(upstream.last().body_head) == {"name": "grace", "added_by_gateway": True}
    assert not upstream.last().has_header("transfer-encoding")


def test_buffered_request_body_over_the_plugin_cap_is_413(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream, {"name": "t-json-body"}), workers=1)
    r = gw.request("POST", "/b", content=b"x" * (64 * 1024 + 1))
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"
    assert upstream.count == 0


def test_response_body_rewrite_sets_the_new_length(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream, {"name": "t-resp-body"}), workers=1)
    r = gw.get("/rb")
    assert r.status_code == 200
    body = r.json()
    assert body["rewritten"] is True
    assert body["path"] == "/rb"
    assert "headers" not in body
    assert r.headers["content-length"] == str(len(r.content))
    assert r.headers["x-body-rewritten"] == "1"


def test_response_over_the_buffer_cap_is_502(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(one_route(upstream, {"name": "t-resp-body"}), workers=1)
    r = gw.get("/big", headers={"x-up-size": str(256 * 1024 + 1)})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "response_too_large"


def wait_for_lines(path: Path, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The first ``n`` JSON lines of ``path`` once it has them (the log phase runs after
    the answer went out)."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        lines = [json.loads(line) for line in text.splitlines()]
        if len(lines) >= n or time.monotonic() > deadline:
            return lines[:n]
        time.sleep(0.02)


def test_body_hooks_see_what_head_hooks_changed(
    gateway: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> None:
    # A buffered body and sync head hooks cross into Python once for both phases: the head
    # hooks still run first, and alone when the body cannot be handed over.
    log = tmp_path / "log.jsonl"
    gw = gateway(
        one_route(
            upstream,
            {"name": "t-log", "config": {"path": str(log)}},
            {"name": "t-head-body"},
        ),
        workers=1,
    )
    r = gw.get("/hb", headers={"x-up-size": "1000"})
    assert r.status_code == 203
    assert r.headers["x-head"] == "seen"
    assert r.json() == {"status": 203, "x-head": "seen", "length": 1000, "mark": "head 200"}
    r = gw.get("/big", headers={"x-up-size": str(256 * 1024 + 1)})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "response_too_large"
    lines = [x for x in wait_for_lines(log, 3) if x["path"] in ("/hb", "/big")]
    assert [(x["path"], x["mark"]) for x in lines] == [("/hb", "head 200"), ("/big", "head 200")]


def test_a_body_at_hand_goes_upstream_with_the_head(gateway: GatewayFactory) -> None:
    # One write for the head and a body already read (a plugin buffered it, or it is the
    # first chunk of a chunked body, read ahead to check its framing): the upstream's
    # first read has both.
    first_reads: list[bytes] = []
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        for _ in range(2):
            conn, _ = srv.accept()
            with conn:
                data = conn.recv(65536)
                first_reads.append(data)
                head, _, rest = data.partition(b"\r\n\r\n")
                lines = head.lower().split(b"\r\n")
                sized = [x for x in lines if x.startswith(b"content-length:")]
                if sized:
                    length = int(sized[0].split(b":", 1)[1])
                    while len(rest) < length:
                        rest += conn.recv(65536)
                else:
                    while not rest.endswith(b"0\r\n\r\n"):
                        rest += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    port = srv.getsockname()[1]
    gw = gateway(
        {
            "plugins_dir": PLUGINS_DIR,
            "upstreams": {"backend": {"targets": [f"127.0.0.1:{port}"]}},
            "routes": [
                {"name": "plain", "paths": ["/plain/*"], "upstream": "backend"},
                {
                    "name": "buffered",
                    "paths": ["/buffered/*"],
                    "upstream": "backend",
                    "plugins": [{"name": "t-json-body"}],
                },
            ],
        },
        workers=1,
    )
    body = json.dumps({"name": "ada", "pad": "x" * 3000}).encode()
    with socket.create_connection(("127.0.0.1", gw.port)) as c:
        c.sendall(
            b"POST /plain/x HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            + b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            + f"{len(body):x}\r\n".encode()
            + body
            + b"\r\n0\r\n\r\n"
        )
        answer = b""
        while chunk := c.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    r = gw.request(
        "POST", "/buffered/x", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 200
    t.join(5)
    srv.close()
    assert len(first_reads) == 2
    for data in first_reads:
        rest = data.partition(b"\r\n\r\n")[2]
        assert b'{"name"' in rest, data[:300]


class TrickleUpstream:
    """Sends a chunked response in two parts; the second only after ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib_suppress():
            conn, _ = self.sock.accept()
            with conn:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    buf += conn.recv(4096)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                    b"transfer-encoding: chunked\r\n\r\n6\r\nfirst \r\n"
                )
                self.release.wait(10)
                conn.sendall(b"6\r\nsecond\r\n0\r\n\r\n")
                time.sleep(0.2)

    def close(self) -> None:
        self.release.set()
        self.sock.close()


class contextlib_suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def test_streamed_body_hook_sees_chunks_as_they_arrive(gateway: GatewayFactory) -> None:
    trickle = TrickleUpstream()
    try:
        gw = gateway(
            {
                "plugins_dir": PLUGINS_DIR,
                "routes": [
                    {
                        # not "/*": the readiness probe must not use up the one connection
                        "paths": ["/s"],
                        "upstream": f"http://127.0.0.1:{trickle.port}",
                        "plugins": [{"name": "t-upper-stream"}],
                    }
                ],
            },
            workers=1,
        )
        with httpx.Client(timeout=10) as client, client.stream("GET", gw.url + "/s") as r:
            assert r.status_code == 200
            assert "content-length" not in r.headers
            parts = r.iter_raw()
            # The first chunk arrives, upper-cased, while the upstream still holds the rest.
            assert next(parts) == b"FIRST "
            trickle.release.set()
            rest = b"".join(parts)
        assert rest == b"SECOND\n#chunks=3"
    finally:
        trickle.close()


def test_async_hooks_run_concurrently_without_blocking_the_worker(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream, {"name": "t-async", "config": {"delay": 0.5}}), workers=1)
    windows: list[tuple[float, float]] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            with httpx.Client(timeout=10) as c:
                r = c.get(gw.url + "/a")
                assert r.status_code == 200
                assert r.headers["x-async-response"] == "1"
                start, end = r.json()["headers"]["x-async-window"][0].split(",")
                windows.append((float(start), float(end)))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(windows) == 8
    # One worker, eight requests each awaiting 0.5 s: they were all waiting at the same time.
    latest_start = max(s for s, _ in windows)
    earliest_end = min(e for _, e in windows)
    assert latest_start < earliest_end


def test_async_hook_timeout_gives_500_and_the_worker_keeps_serving(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(
        config(
            upstream,
            {
                "name": "slow",
                "paths": ["/slow"],
                "plugins": [{"name": "t-async", "config": {"delay": 5}, "timeout": "200ms"}],
            },
            {"name": "other", "paths": ["/other"]},
        ),
        workers=1,
    )
    r = gw.get("/slow")
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "plugin_error"
    assert "t-async" in err["message"] and "timed out" in err["message"]
    assert err["request_id"] == r.headers["x-request-id"]
    assert upstream.count == 0
    assert gw.get("/other").status_code == 200
    assert '"event":"plugin_timeout"' in gw.stderr_text()


@pytest.mark.parametrize("phase", ["request", "response"])
def test_plugin_exception_gives_500_with_traceback_logged(
    gateway: GatewayFactory, upstream: Upstream, phase: str
) -> None:
    gw = gateway(one_route(upstream, {"name": "t-boom"}), workers=1)
    worker = gw.worker_pids()
    r = gw.get("/x", headers={"x-boom": phase})
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "plugin_error"
    assert err["message"] == f"plugin 't-boom' failed in on_{phase}: " + (
        "RuntimeError" if phase == "request" else "KeyError"
    )
    assert err["request_id"] == r.headers["x-request-id"]
    events = [
        json.loads(line) for line in gw.stderr_text().splitlines() if '"plugin_failed"' in line
    ]
    assert len(events) == 1
    assert events[0]["plugin"] == "t-boom"
    assert events[0]["request_id"] == err["request_id"]
    assert "Traceback" in events[0]["traceback"] and "boom in on_" in events[0]["traceback"]
    # the same worker serves on
    assert gw.get("/x").status_code == 200
    assert gw.worker_pids() == worker


def test_a_header_a_plugin_cannot_send_is_refused_not_forwarded(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(one_route(upstream, {"name": "t-boom"}), workers=1)
    r = gw.get("/x", headers={"x-boom": "header"})
    assert r.status_code == 500
    assert r.json()["error"]["message"] == (
        'plugin chain returned an invalid value for header "x-injected"'
    )
    assert upstream.count == 0


def test_log_phase_sees_the_finished_request(
    gateway: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> None:
    log = tmp_path / "requests.jsonl"
    gw = gateway(
        one_route(upstream, {"name": "t-stamp"}, {"name": "t-log", "config": {"path": str(log)}}),
        workers=1,
    )
    r = gw.get("/logged")
    assert r.status_code == 200
    gw.get("/missing-upstream-body", headers={"x-up-status": "404"})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "missing-upstream-body" not in (
        log.read_text() if log.exists() else ""
    ):
        time.sleep(0.05)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    records = [r for r in records if r["path"] != "/__ferrogate_probe__"]
    first = records[0]
    assert first["path"] == "/logged"
    assert first["status"] == 200
    assert first["bytes_sent"] == len(r.content)
    assert first["upstream"] == upstream.address
    assert first["error"] is None
    assert first["mark"] == "GET /logged"
    assert first["request_id"] == r.headers["x-request-id"]
    assert 0 < first["duration"] < 5
    assert records[-1]["status"] == 404


def test_order_is_priority_then_config_order_with_top_level_plugins(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(
        config(
            upstream,
            {"name": "plain", "paths": ["/plain"]},
            {
                "name": "custom",
                "paths": ["/custom"],
                "plugins": [
                    {"name": "t-mark-a", "priority": 30},
                    {"name": "t-mark-b", "enabled": False},
                ],
            },
            plugins=[{"name": "t-mark-c"}, {"name": "t-mark-a"}, {"name": "t-mark-b"}],
        ),
        workers=1,
    )
    assert gw.get("/plain").json()["headers"]["x-order"] == ["t-mark-b", "t-mark-c", "t-mark-a"]
    assert gw.get("/custom").json()["headers"]["x-order"] == ["t-mark-a", "t-mark-c"]


def test_latency_budget_policies(gateway: GatewayFactory, upstream: Upstream) -> None:
    slow = {"name": "t-slow-sync", "config": {"delay": 0.05}, "budget": "10ms"}
    gw = gateway(
        config(
            upstream,
            {"name": "log", "paths": ["/log"], "plugins": [slow]},
            {"name": "fail", "paths": ["/fail"], "plugins": [{**slow, "on_over_budget": "fail"}]},
            {
                "name": "bypass",
                "paths": ["/bypass"],
                "plugins": [{**slow, "on_over_budget": "bypass", "bypass_for": "30s"}],
            },
        ),
        workers=1,
    )
    r = gw.get("/log")
    assert r.status_code == 200
    assert r.json()["headers"]["x-slow-sync"] == ["ran"]

    r = gw.get("/fail")
    assert r.status_code == 500
    assert "over its latency budget" in r.json()["error"]["message"]

    # over budget once: this request still got the plugin, the next ones skip it
    assert gw.get("/bypass").json()["headers"]["x-slow-sync"] == ["ran"]
    assert "x-slow-sync" not in gw.get("/bypass", headers={"x-fast": "1"}).json()["headers"]

    events = [json.loads(x) for x in gw.stderr_text().splitlines() if "plugin_over_budget" in x]
    assert {e["action"] for e in events} == {"log", "fail", "bypass"}
    assert all(e["plugin"] == "t-slow-sync" and e["spent_ms"] > 10 for e in events)


def test_http2_clients_go_through_plugins(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(one_route(upstream, {"name": "t-stamp"}, {"name": "t-deny"}), workers=1)
    with httpx.Client(http1=False, http2=True, timeout=10) as c:
        r = c.get(gw.url + "/h2")
        assert r.http_version == "HTTP/2"
        assert r.headers["x-stamp"] == "GET /h2"
        denied = c.get(gw.url + "/h2", headers={"x-deny": "1"})
        assert denied.status_code == 403


def test_routes_without_plugins_are_untouched(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw: Gateway = gateway(
        config(
            upstream,
            {"name": "with", "paths": ["/with"], "plugins": [{"name": "t-stamp"}]},
            {"name": "without", "paths": ["/without"]},
        ),
        workers=1,
    )
    assert "x-stamp" in gw.get("/with").headers
    r = gw.get("/without")
    assert r.status_code == 200
    assert "x-stamp" not in r.headers
    assert r.headers["content-length"] == str(len(r.content))


def test_async_log_hooks_run_on_the_hook_loop(
    gateway: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> None:
    log = tmp_path / "async.jsonl"
    gw = gateway(
        one_route(upstream, {"name": "t-async-log", "config": {"path": str(log)}}), workers=1
    )
    assert gw.get("/async-log").status_code == 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "/async-log" not in (
        log.read_text() if log.exists() else ""
    ):
        time.sleep(0.05)
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert {"path": "/async-log", "status": 200} in records


def test_one_plugin_object_per_plugin_and_config_in_a_worker(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(
        config(
            upstream,
            {"name": "a", "paths": ["/a"]},
            {"name": "b", "paths": ["/b"]},
            {
                "name": "c",
                "paths": ["/c"],
                "plugins": [{"name": "t-instance", "config": {"label": "own"}}],
            },
            plugins=[{"name": "t-instance"}],
        ),
        workers=1,
    )
    a, b, c = (gw.get(p).headers["x-instance"] for p in ("/a", "/b", "/c"))
    assert a == b
    assert c != a and c.endswith(":own")
