"""Plugins steering the data plane through the real gateway: ``req.upstream``,
``req.fallbacks`` (``resp.attempt``, ``resp.skipped``), ``req.response_body_mode``, and the
node-shared counters of ``ferrogate._core`` counted by two workers at once."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from gateway import GatewayFactory
from upstreams import UpstreamFactory, closed_port

PLUGINS_DIR = str(Path(__file__).parent / "routing_plugins")


def routed(ups: dict[str, str], **plugin_config: Any) -> dict[str, Any]:
    return {
        "plugins_dir": PLUGINS_DIR,
        "upstreams": {name: {"targets": [addr]} for name, addr in ups.items()},
        "routes": [
            {
                "name": "r",
                "paths": ["/*"],
                "upstream": "a",
                "plugins": [{"name": "t-route", "config": plugin_config}],
            }
        ],
    }


def doc(r: httpx.Response) -> dict[str, Any]:
    """The upstream's description of the request, less the body hook's mark."""
    body = r.content
    assert body.endswith(b"|buffered"), body[-40:]
    return dict(json.loads(body[: -len(b"|buffered")]))


def test_a_plugin_sends_the_request_to_another_upstream(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    a, b = upstream_factory("a"), upstream_factory("b")
    gw = gateway(routed({"a": a.address, "b": b.address}), workers=1)
    r = gw.get("/x?q=1", headers={"x-to": "b"})
    assert r.status_code == 200
    assert doc(r)["upstream"] == "b"
    assert b.last().target == "/x?q=1"
    assert a.count == 0
    # the route's own upstream otherwise
    assert doc(gw.get("/y"))["upstream"] == "a"
    unknown = gw.get("/x", headers={"x-to": "nope"})
    assert unknown.status_code == 500
    # (body hooks see the gateway's own error answers too)
    assert doc(unknown)["error"]["code"] == "plugin_error"
    assert "'nope'" in doc(unknown)["error"]["message"]
    assert a.count == 1 and b.count == 1


def test_fallbacks_go_out_in_order_until_one_answers(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory, tmp_path: Path
) -> None:
    a, b, c = upstream_factory("a"), upstream_factory("b"), upstream_factory("c")
    log = tmp_path / "attempts.jsonl"
    ups = {"a": a.address, "b": b.address, "c": c.address, "gone": f"127.0.0.1:{closed_port()}"}
    gw = gateway(routed(ups, log=str(log)), workers=1)
    fallbacks = [
        {"upstream": "gone", "path": "/never"},
        {"upstream": "b", "path": "/busy", "headers": [["x-up-status", "429"]]},
        {
            "upstream": "c",
            "path": "/v1/messages?beta=1",
            "headers": [["x-api-key", "k1"], ["content-type", "text/plain"]],
            "body": "hello",
            "method": "PUT",
        },
    ]
    r = gw.request(
        "POST",
        "/v1/chat",
        content=b"original",
        headers={
            "x-up-status": "503",
            "x-client-secret": "s",
            "x-fallbacks": json.dumps(fallbacks),
        },
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-attempt"] == "3"
    assert json.loads(r.headers["x-skipped"]) == [["a", 503], ["gone", 0], ["b", 429]]
    # the buffered body hook saw the answer that was kept
    assert doc(r)["upstream"] == "c"
    assert a.count == 1 and b.count == 1 and c.count == 1
    seen = c.last()
    assert (seen.method, seen.target, seen.body_len) == ("PUT", "/v1/messages?beta=1", 5)
    assert seen.header("x-api-key") == "k1"
    # the attempt's headers are the whole list: nothing of the client's is carried over...
    assert not seen.has_header("x-client-secret")
    assert not seen.has_header("x-fallbacks")
    # ...but the gateway's own headers are added as on any request
    assert seen.header("x-request-id") == r.headers["x-request-id"]
    assert seen.header("x-forwarded-for") == "127.0.0.1"
    assert seen.header("host") == c.address
    assert "ferrogate" in (seen.header("via") or "")
    # on_log sees which attempt answered (the startup probe, a client that leaves after the
    # status line, is logged too, at a time of its own: this request's line is picked out)
    deadline = time.monotonic() + 5
    while True:
        text = log.read_text() if log.exists() else ""
        lines = [json.loads(line) for line in text.splitlines()]
        ours = [line for line in lines if line["path"] == "/v1/chat"]
        if ours:
            break
        assert time.monotonic() < deadline, f"on_log never ran for the request: {lines}"
        time.sleep(0.02)
    assert ours == [
        {"path": "/v1/chat", "attempt": 3, "skipped": [["a", 503], ["gone", 0], ["b", 429]]}
    ]


def test_an_answer_not_in_fallback_on_is_kept_and_the_last_attempt_answers_when_all_fail(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    a, b = upstream_factory("a"), upstream_factory("b")
    gw = gateway(routed({"a": a.address, "b": b.address}), workers=1)
    to_b = json.dumps([{"upstream": "b", "path": "/b", "headers": [["x-up-status", "502"]]}])
    # 404 is not a reason to fall back by default
    r = gw.get("/x", headers={"x-up-status": "404", "x-fallbacks": to_b})
    assert (r.status_code, r.headers["x-attempt"], r.headers["x-skipped"]) == (404, "0", "[]")
    assert b.count == 0
    # every attempt failed: the client gets the last one's answer
    r = gw.get("/x", headers={"x-up-status": "500", "x-fallbacks": to_b})
    assert r.status_code == 502
    assert r.headers["x-attempt"] == "1"
    assert json.loads(r.headers["x-skipped"]) == [["a", 500]]
    assert b.count == 1
    # fallback_on replaces the default statuses
    r = gw.get("/x", headers={"x-up-status": "404", "x-fallbacks": to_b, "x-fallback-on": "404"})
    assert (r.status_code, r.headers["x-attempt"]) == (502, "1")
    r = gw.get("/x", headers={"x-up-status": "503", "x-fallbacks": to_b, "x-fallback-on": "404"})
    assert (r.status_code, r.headers["x-attempt"]) == (503, "0")
    assert b.count == 2


def test_each_request_picks_the_response_body_mode(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    a = upstream_factory("a")
    gw = gateway(routed({"a": a.address}), workers=1)
    # the plugin has both body hooks: buffered unless the request says otherwise
    r = gw.get("/x", headers={"x-up-size": "100000"})
    assert r.content.endswith(b"|buffered") and len(r.content) == 100000 + 9
    assert r.headers["content-length"] == str(100000 + 9)
    r = gw.get("/x", headers={"x-up-size": "100000", "x-mode": "streamed"})
    assert r.content.endswith(b"|streamed") and len(r.content) == 100000 + 9
    assert "content-length" not in r.headers
    assert r.headers["transfer-encoding"] == "chunked"
    bad = gw.get("/x", headers={"x-mode": "sideways"})
    assert bad.status_code == 500
    assert "response_body_mode" in doc(bad)["error"]["message"]


def counters(up: str) -> dict[str, Any]:
    return {
        "plugins_dir": PLUGINS_DIR,
        "upstreams": {"a": {"targets": [up]}},
        "routes": [
            {"name": "c", "paths": ["/c"], "upstream": "a", "plugins": [{"name": "t-counter"}]}
        ],
    }


def test_counters_are_shared_by_the_workers_of_a_node(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    gw = gateway(counters(upstream_factory("a").address), workers=2)

    def call(params: dict[str, str]) -> dict[str, Any]:
        # a connection per call, so that both workers take calls
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            r = c.get("/c", params=params)
        assert r.status_code == 200, r.text
        return dict(r.json())

    # both workers add to one total
    pids = set()
    total = 0
    deadline = time.monotonic() + 15
    while len(pids) < 2:
        assert time.monotonic() < deadline, "one worker took every connection"
        got = call({"op": "reserve", "key": "shared", "amount": "3", "limit": "1000000"})
        total += 3
        assert got["value"] == total
        pids.add(got["pid"])
    assert call({"op": "used", "key": "shared"})["value"] == total

    # a burst of parallel reservations never goes over the limit
    reserve = {"op": "reserve", "key": "burst", "amount": "7", "limit": "100"}
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: call(reserve), range(48)))
    granted = sorted(r["value"] for r in results if r["value"] >= 0)
    assert granted == [7 * i for i in range(1, 15)]
    assert len({r["pid"] for r in results}) == 2
    assert call({"op": "used", "key": "burst"})["value"] == 98

    # GCRA buckets too: a burst of 10 (refilling at one per 1000 s) lets exactly 10 through
    take = {"op": "take", "key": "bucket", "amount": "1", "limit": "10"}
    with ThreadPoolExecutor(16) as pool:
        waits = [r["value"] for r in pool.map(lambda _: call(take), range(30))]
    assert sum(1 for w in waits if w == 0.0) == 10
    assert all(w > 900 for w in waits if w != 0.0)
