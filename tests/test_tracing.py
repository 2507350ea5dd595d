"""Distributed tracing: W3C trace context in and out, and spans exported over OTLP/HTTP to a
real receiver that decodes the protobuf (``otlp_receiver.py``), against a real gateway and
real upstreams."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import Gateway, GatewayFactory
from otlp_receiver import CLIENT, INTERNAL, SERVER, STATUS_ERROR, STATUS_UNSET, OtlpReceiver, Span
from upstreams import Upstream, closed_port

PLUGINS_DIR = str(Path(__file__).parent / "plugins_dir")
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])$")
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
PROBE = "/__ferrogate_probe__"
SLACK_NS = 1_000_000


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


def tracing(endpoint: str, **over: Any) -> dict[str, Any]:
    return {
        "endpoint": endpoint,
        "sample": 1.0,
        "service_name": "edge-gw",
        "flush_interval": "100ms",
        "headers": {"X-Api-Key": "k-123"},
        **over,
    }


def config(up: Upstream, endpoint: str, **over: Any) -> dict[str, Any]:
    return {
        "plugins_dir": PLUGINS_DIR,
        "upstreams": {"backend": {"targets": [up.address]}},
        "routes": [
            {"name": "users", "paths": ["/users/{id}"], "upstream": "backend"},
            {"name": "api", "paths": ["/api/*"], "upstream": "backend"},
            {
                "name": "plugged",
                "paths": ["/plugged/*"],
                "upstream": "backend",
                "plugins": [{"name": "t-stamp"}, {"name": "t-boom"}],
            },
        ],
        "tracing": tracing(endpoint, **over),
    }


def upstream_traceparent(up: Upstream) -> tuple[str, str, str]:
    """(trace id, parent span id, flags) of the traceparent the upstream last received."""
    value = up.last().header("traceparent")
    assert value is not None, "the upstream got no traceparent"
    m = TRACEPARENT.match(value)
    assert m, f"invalid traceparent sent upstream: {value!r}"
    return m.group(1), m.group(2), m.group(3)


def without_probes(spans: list[Span]) -> list[Span]:
    """The spans of the requests a test sent (not of the fixture's readiness probe)."""
    probes = {s.trace_id for s in spans if s.attributes.get("url.path") == PROBE}
    return [s for s in spans if s.trace_id not in probes]


def by_kind(spans: list[Span], kind: int) -> list[Span]:
    return [s for s in spans if s.kind == kind]


def marker(gw: Gateway, receiver: OtlpReceiver, n: int) -> None:
    """Send a request of a sampled client trace and wait for its spans: spans of requests
    sent before it (to the same single worker) have been exported by then."""
    trace_id = f"{n:032x}"
    gw.get("/api/marker", headers={"traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"})
    receiver.wait_for_trace(trace_id, 2)


def test_a_request_gives_a_server_span_and_a_client_span_linked_to_the_upstream(
    gateway: GatewayFactory, upstream: Upstream, receiver: OtlpReceiver
) -> None:
    gw = gateway(config(upstream, receiver.endpoint), workers=1)
    r = gw.get("/users/42?full=1", headers={"user-agent": "trace-test/1"})
    assert r.status_code == 200
    trace_id, parent, flags = upstream_traceparent(upstream)
    assert flags == "01"
    spans = receiver.wait_for_trace(trace_id, 2)
    assert len(spans) == 2
    [server] = by_kind(spans, SERVER)
    [client] = by_kind(spans, CLIENT)

    # the gateway started the trace; the upstream's parent is the client span
    assert server.parent_span_id == ""
    assert client.parent_span_id == server.span_id
    assert client.span_id == parent
    assert server.span_id != client.span_id
    assert server.start_ns <= client.start_ns <= client.end_ns <= server.end_ns
    assert server.status_code == STATUS_UNSET

    assert server.name == "GET /users/{id}"
    a = server.attributes
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == "/users/42"
    assert a["url.query"] == "full=1"
    assert a["url.scheme"] == "http"
    assert a["http.route"] == "/users/{id}"
    assert a["http.response.status_code"] == 200
    assert a["client.address"] == "127.0.0.1"
    assert a["network.protocol.version"] == "1.1"
    assert a["server.address"] == "127.0.0.1"
    assert a["server.port"] == gw.port
    assert a["user_agent.original"] == "trace-test/1"
    assert a["ferrogate.route"] == "users"
    assert a["ferrogate.request_id"] == r.headers["x-request-id"]
    assert a["http.response.body.size"] == len(r.content)
    assert "error.type" not in a

    c = client.attributes
    assert c["http.request.method"] == "GET"
    assert c["server.address"] == "127.0.0.1"
    assert c["server.port"] == upstream.port
    assert c["http.response.status_code"] == 200
    assert "http.request.resend_count" not in c

    # resource and scope as a collector groups them; the export request's own head
    assert server.resource["service.name"] == "edge-gw"
    assert server.resource["service.instance.id"]
    assert server.resource["process.pid"] in gw.worker_pids()
    assert server.scope == "ferrogate"
    export = receiver.exports[0]
    assert export.path == "/v1/traces"
    assert export.headers["content-type"] == "application/x-protobuf"
    assert export.headers["x-api-key"] == "k-123"


def test_a_client_trace_is_continued_with_its_tracestate(
    gateway: GatewayFactory, upstream: Upstream, receiver: OtlpReceiver
) -> None:
    gw = gateway(config(upstream, receiver.endpoint), workers=1)
    r = gw.get(
        "/api/x",
        headers={
            "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
            "tracestate": "vendor=abc,other=1",
        },
    )
    assert r.status_code == 200
    trace_id, parent, flags = upstream_traceparent(upstream)
    assert (trace_id, flags) == (CLIENT_TRACE, "01")
    assert parent != CLIENT_SPAN
    assert upstream.last().header("tracestate") == "vendor=abc,other=1"

    spans = receiver.wait_for_trace(CLIENT_TRACE, 2)
    [server] = by_kind(spans, SERVER)
    [client] = by_kind(spans, CLIENT)
    assert server.parent_span_id == CLIENT_SPAN
    assert client.parent_span_id == server.span_id
    assert client.span_id == parent
    assert server.trace_state == "vendor=abc,other=1"
    # the parent of the server span is remote (OTLP span flags)
    assert server.flags & 0x300 == 0x300
    assert server.name == "GET /api/*"


def test_an_unsampled_client_trace_is_propagated_but_not_exported(
    gateway: GatewayFactory, upstream: Upstream, receiver: OtlpReceiver
) -> None:
    gw = gateway(config(upstream, receiver.endpoint), workers=1)
    unsampled = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    r = gw.get("/api/x", headers={"traceparent": f"00-{unsampled}-{CLIENT_SPAN}-00"})
    assert r.status_code == 200
    trace_id, parent, flags = upstream_traceparent(upstream)
    assert (trace_id, flags) == (unsampled, "00")
    assert parent != CLIENT_SPAN
    marker(gw, receiver, 1)
    assert receiver.trace(unsampled) == []


def test_sample_zero_exports_nothing_but_the_upstream_still_gets_a_new_trace(
    gateway: GatewayFactory, upstream: Upstream, receiver: OtlpReceiver
) -> None:
    gw = gateway(config(upstream, receiver.endpoint, sample=0.0), workers=1)
    seen = set()
    for _ in range(20):
        assert gw.get("/api/x").status_code == 200
        trace_id, _, flags = upstream_traceparent(upstream)
        assert flags == "00"
        seen.add(trace_id)
    assert len(seen) == 20  # a new trace per request
    # a client's sampled flag is followed even at sample 0
    marker(gw, receiver, 2)
    assert {s.trace_id for s in receiver.spans()} == {f"{2:032x}"}


def test_an_invalid_traceparent_starts_a_new_trace(
    gateway: GatewayFactory, upstream: Upstream, receiver: OtlpReceiver
) -> None:
    gw = gateway(config(upstream, receiver.endpoint), workers=1)
    bad = f"00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN}-01"
    r = gw.get("/api/x", headers={"traceparent": bad, "tracestate": "vendor=abc"})
    assert r.status_code == 200
    trace_id, _, flags = upstream_traceparent(upstream)
    assert trace_id != CLIENT_TRACE.lower()
    assert flags == "01"
    # the tracestate of a trace that was not continued is not passed on
    assert upstream.last().header("tracestate") is None
    spans = receiver.wait_for_trace(trace_id, 2)
    [server] = by_kind(spans, SERVER)
    assert server.parent_span_id == ""
    assert server.trace_state == ""


def test_a_gateway_error_gives_error_spans(
    gateway: GatewayFactory, upstream: Upstream, receiver: OtlpReceiver
) -> None:
    doc = config(upstream, receiver.endpoint)
    doc["upstreams"]["backend"]["targets"] = [f"127.0.0.1:{closed_port()}"]
    gw = gateway(doc, workers=1)
    r = gw.get("/api/down", headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    assert r.status_code == 502
    spans = receiver.wait_for_trace(CLIENT_TRACE, 2)
    [server] = by_kind(spans, SERVER)
    [client] = by_kind(spans, CLIENT)
    assert server.status_code == STATUS_ERROR
    assert server.attributes["error.type"] == "upstream_unreachable"
    assert server.attributes["http.response.status_code"] == 502
    assert client.status_code == STATUS_ERROR
    assert client.attributes["error.type"] == "upstream_unreachable"
    assert "http.response.status_code" not in client.attributes
    # no route: a 404 from the gateway is no server error, and there is no upstream call
    r = gw.get("/nowhere", headers={"traceparent": f"00-{'b' * 32}-{CLIENT_SPAN}-01"})
    assert r.status_code == 404
    [server] = receiver.wait_for_trace("b" * 32, 1)
    assert server.name == "GET"
    assert server.status_code == STATUS_UNSET
    assert server.attributes["error.type"] == "no_route"


def test_retries_are_counted_on_the_client_span(
    gateway: GatewayFactory, upstream: Upstream, receiver: OtlpReceiver
) -> None:
    doc = config(upstream, receiver.endpoint)
    # the default policy retries a refused connection once, on the other target
    doc["upstreams"]["backend"] = {
        "targets": [f"127.0.0.1:{closed_port()}", upstream.address],
        "health": {"passive": {"enabled": False}},
    }
    gw = gateway(doc, workers=1)
    retried = None
    for _ in range(4):
        assert gw.get("/api/r").status_code == 200
        trace_id, _, _ = upstream_traceparent(upstream)
        [client] = by_kind(receiver.wait_for_trace(trace_id, 2), CLIENT)
        if "http.request.resend_count" in client.attributes:
            retried = client
            break
    assert retried is not None, "no request went to the closed target first"
    assert retried.attributes["http.request.resend_count"] == 1
    assert retried.attributes["server.port"] == upstream.port
    assert retried.status_code == STATUS_UNSET


def test_plugin_hooks_become_spans_under_the_server_span(
    gateway: GatewayFactory, upstream: Upstream, receiver: OtlpReceiver
) -> None:
    gw = gateway(config(upstream, receiver.endpoint), workers=1)
    r = gw.get("/plugged/a")
    assert r.status_code == 200
    assert r.headers["x-stamp"] == "GET /plugged/a"
    trace_id, _, _ = upstream_traceparent(upstream)
    # server, client, and on_request + on_response of each of the two plugins
    spans = receiver.wait_for_trace(trace_id, 6)
    [server] = by_kind(spans, SERVER)
    hooks = {s.name: s for s in by_kind(spans, INTERNAL)}
    assert set(hooks) == {
        "plugin t-stamp on_request",
        "plugin t-stamp on_response",
        "plugin t-boom on_request",
        "plugin t-boom on_response",
    }
    for span in hooks.values():
        assert span.parent_span_id == server.span_id
        # hooks are timed on the wall clock, the server span from a monotonic clock: allow 1ms
        assert (
            server.start_ns - SLACK_NS <= span.start_ns <= span.end_ns <= server.end_ns + SLACK_NS
        )
        assert span.status_code == STATUS_UNSET
        assert span.attributes["ferrogate.route"] == "plugged"
    stamp = hooks["plugin t-stamp on_request"]
    assert stamp.attributes["ferrogate.plugin"] == "t-stamp"
    assert stamp.attributes["ferrogate.phase"] == "on_request"
    assert hooks["plugin t-stamp on_request"].end_ns <= hooks["plugin t-boom on_request"].start_ns

    # a hook that raises: an error span, and the 500 is an error server span
    r = gw.get("/plugged/b", headers={"x-boom": "request"})
    assert r.status_code == 500

    def failed(spans: list[Span]) -> list[Span]:
        return [s for s in spans if s.kind == INTERNAL and s.status_code == STATUS_ERROR]

    [boom] = failed(receiver.wait_for(lambda spans: bool(failed(spans))))
    assert boom.name == "plugin t-boom on_request"
    assert "RuntimeError: boom in on_request" in boom.status_message
    spans = receiver.wait_for(
        lambda spans: any(s.trace_id == boom.trace_id and s.kind == SERVER for s in spans)
    )
    [server] = by_kind([s for s in spans if s.trace_id == boom.trace_id], SERVER)
    assert boom.parent_span_id == server.span_id
    assert server.status_code == STATUS_ERROR
    assert server.attributes["error.type"] == "plugin_error"


def test_async_hooks_become_spans_that_cover_their_wait(
    gateway: GatewayFactory, upstream: Upstream, receiver: OtlpReceiver
) -> None:
    doc = config(upstream, receiver.endpoint)
    doc["routes"].append(
        {
            "name": "slow",
            "paths": ["/slow/*"],
            "upstream": "backend",
            "plugins": [{"name": "t-async", "config": {"delay": 0.1}}],
        }
    )
    gw = gateway(doc, workers=1)
    assert gw.get("/slow/a").status_code == 200
    trace_id, _, _ = upstream_traceparent(upstream)
    spans = receiver.wait_for_trace(trace_id, 4)
    [server] = by_kind(spans, SERVER)
    hooks = {s.name: s for s in by_kind(spans, INTERNAL)}
    assert set(hooks) == {"plugin t-async on_request", "plugin t-async on_response"}
    request_hook = hooks["plugin t-async on_request"]
    assert request_hook.parent_span_id == server.span_id
    assert request_hook.end_ns - request_hook.start_ns >= 90_000_000


def test_unsampled_plugin_requests_export_no_hook_spans(
    gateway: GatewayFactory, upstream: Upstream, receiver: OtlpReceiver
) -> None:
    gw = gateway(config(upstream, receiver.endpoint, sample=0.0), workers=1)
    for _ in range(5):
        assert gw.get("/plugged/a").status_code == 200
    marker(gw, receiver, 3)
    assert {s.trace_id for s in receiver.spans()} == {f"{3:032x}"}


def test_spans_are_batched(
    gateway: GatewayFactory, upstream: Upstream, receiver: OtlpReceiver
) -> None:
    gw = gateway(config(upstream, receiver.endpoint, flush_interval="300ms"), workers=1)
    with gw.client() as c:
        for i in range(50):
            assert c.get(f"/users/{i}").status_code == 200
    receiver.wait_for(lambda spans: len(without_probes(spans)) >= 100)
    assert len(without_probes(receiver.spans())) == 100
    assert len(receiver.exports) < 50


def test_a_full_batch_is_exported_before_the_flush_interval(
    gateway: GatewayFactory, upstream: Upstream, receiver: OtlpReceiver
) -> None:
    gw = gateway(
        config(upstream, receiver.endpoint, flush_interval="60s", batch_size=20), workers=1
    )
    with gw.client() as c:
        for i in range(10):
            assert c.get(f"/users/{i}").status_code == 200
    # 10 requests are 20 spans: a full batch, sent long before the minute is up
    receiver.wait_for(lambda spans: len(without_probes(spans)) >= 20, timeout=10)
    assert all(len(e.spans) <= 20 for e in receiver.exports)


def test_waiting_spans_are_exported_when_the_gateway_stops(
    gateway: GatewayFactory, upstream: Upstream, receiver: OtlpReceiver
) -> None:
    gw = gateway(config(upstream, receiver.endpoint, flush_interval="60s"), workers=1)
    for i in range(3):
        assert gw.get(f"/users/{i}").status_code == 200
    assert receiver.spans() == []
    gw.stop()
    receiver.wait_for(lambda spans: len(without_probes(spans)) == 6, timeout=5)


def test_requests_do_not_notice_a_collector_that_is_down(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(config(upstream, f"http://127.0.0.1:{closed_port()}/v1/traces"), workers=1)
    [worker] = gw.worker_pids()
    with gw.client() as c:
        for i in range(200):
            assert c.get(f"/users/{i}").status_code == 200
    deadline = time.monotonic() + 10
    while "trace_export_failed" not in gw.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    failures = gw.stderr_text().count("trace_export_failed")
    # logged, but not per span or per export: at most every few seconds
    assert 1 <= failures <= 2
    assert gw.worker_pids() == [worker]
    assert gw.get("/users/x").status_code == 200


def test_a_collector_that_refuses_is_reported_and_recovery_is_noticed(
    gateway: GatewayFactory, upstream: Upstream, receiver: OtlpReceiver
) -> None:
    receiver.status = 503
    gw = gateway(config(upstream, receiver.endpoint), workers=1)
    assert gw.get("/users/1").status_code == 200
    deadline = time.monotonic() + 10
    while "trace_export_failed" not in gw.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "503" in gw.stderr_text()
    receiver.status = 200
    r = gw.get("/users/2")
    assert r.status_code == 200
    trace_id, _, _ = upstream_traceparent(upstream)
    receiver.wait_for_trace(trace_id, 2)
    deadline = time.monotonic() + 5
    while "trace_export_recovered" not in gw.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "trace_export_recovered" in gw.stderr_text()


def test_sampling_keeps_about_the_configured_fraction(
    gateway: GatewayFactory, upstream: Upstream, receiver: OtlpReceiver
) -> None:
    gw = gateway(config(upstream, receiver.endpoint, sample=0.1), workers=1)
    n = 500
    sent: set[str] = set()
    with gw.client() as c:
        for i in range(n):
            assert c.get(f"/users/{i}").status_code == 200
            sent.add(upstream_traceparent(upstream)[0])
    assert len(sent) == n
    marker(gw, receiver, 4)
    exported = {s.trace_id for s in by_kind(without_probes(receiver.spans()), SERVER)}
    exported.discard(f"{4:032x}")
    assert exported <= sent
    # binomial(500, 0.1): mean 50, standard deviation under 7
    assert 20 <= len(exported) <= 90, len(exported)
    # and each exported trace is whole, with the flag the upstream saw
    sampled_upstream = set()
    for rec in upstream.requests:
        m = TRACEPARENT.match(rec.header("traceparent") or "")
        if m and m.group(3) == "01":
            sampled_upstream.add(m.group(1))
    assert exported == sampled_upstream - {f"{4:032x}"}


def test_a_reload_can_move_or_stop_the_export(
    gateway: GatewayFactory, upstream: Upstream, receiver: OtlpReceiver
) -> None:
    gw = gateway(config(upstream, receiver.endpoint), workers=1)
    marker(gw, receiver, 5)
    other = OtlpReceiver()
    try:
        gw.write_config(config(upstream, other.endpoint, service_name="moved"))
        gw.signal(signal.SIGHUP)
        # requests keep flowing while the worker swaps tracers; the new collector gets them
        deadline = time.monotonic() + 10
        while not other.spans() and time.monotonic() < deadline:
            assert gw.get("/users/1").status_code == 200
            time.sleep(0.05)
        assert other.spans(), "no span reached the new collector"
        assert {s.resource["service.name"] for s in other.spans()} == {"moved"}
    finally:
        other.close()

    doc = config(upstream, receiver.endpoint)
    del doc["tracing"]
    gw.write_config(doc)
    gw.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert gw.get("/users/1").status_code == 200
        if upstream.last().header("traceparent") is None:
            break
        time.sleep(0.05)
    assert upstream.last().header("traceparent") is None
    before = len(receiver.spans())
    for _ in range(5):
        assert gw.get("/plugged/a").status_code == 200
    time.sleep(0.5)  # two flush intervals: anything queued would have been sent by now
    assert len(receiver.spans()) == before


def test_http_2_clients_are_traced(
    gateway: GatewayFactory, upstream: Upstream, receiver: OtlpReceiver
) -> None:
    gw = gateway(config(upstream, receiver.endpoint), workers=1)
    with httpx.Client(http1=False, http2=True, base_url=gw.url, timeout=15) as c:
        assert c.get("/users/1").status_code == 200
    trace_id, _, _ = upstream_traceparent(upstream)
    [server] = by_kind(receiver.wait_for_trace(trace_id, 2), SERVER)
    assert server.attributes["network.protocol.version"] == "2"


def test_https_endpoints_are_refused_at_check(tmp_path: Path) -> None:
    from gateway import run_cli

    path = tmp_path / "gw.yaml"
    path.write_text(
        "listen: ['127.0.0.1:0']\n"
        "upstreams: {b: {targets: ['127.0.0.1:1']}}\n"
        "routes: [{name: r, paths: ['/*'], upstream: b}]\n"
        "tracing: {endpoint: 'https://collector.example:4318/v1/traces'}\n"
    )
    out = run_cli("check", str(path))
    assert out.returncode != 0
    assert "tracing.endpoint" in out.stderr + out.stdout
    assert "https is not supported" in out.stderr + out.stdout
