"""``ferrogate.testing.PluginHarness`` and the dispatcher it drives, without a server."""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec
import pytest

from ferrogate import Headers, Plugin, Request, Response
from ferrogate.hooks import Host, PluginError
from ferrogate.plugin_registry import spec_of
from ferrogate.testing import PluginHarness

sys.path.insert(0, str(Path(__file__).parent / "plugins_dir"))
import probes


def test_request_edits_come_back_as_one_decision() -> None:
    h = PluginHarness(probes.Rewrite, {"path": "/new", "method": "PATCH"})
    out = h.request("GET", "/old", query="drop=1&keep=2", headers={"X-Secret": "s"})
    assert out.response is None
    assert out.decision is not None
    kind, method, path, query, headers, body, consumer, credential, routing = out.decision
    assert (kind, method, path, query, body) == (0, "PATCH", "/new", "keep=2&added=a%20b", None)
    assert (consumer, credential, routing) == (None, None, None)
    assert headers == [("x-added", "yes")]


def test_nothing_changed_means_no_decision() -> None:
    class Reader(Plugin):
        name = "reader"

        def on_request(self, req: Request) -> None:
            req.ctx["seen"] = req.headers.get("accept")

    out = PluginHarness(Reader).request(headers={"Accept": "*/*"})
    assert out.decision is None
    assert out.request.ctx == {"seen": "*/*"}


def test_early_answer() -> None:
    out = PluginHarness(probes.Deny).request(headers={"x-deny": "why"})
    assert out.response is not None
    assert out.response.status == 403
    assert out.response.json() == {"denied": "why"}
    assert out.response.headers["X-Denied-By"] == "t-deny"


def test_response_body_and_stream_hooks() -> None:
    h = PluginHarness(probes.ResponseBody)
    req = h.request().request
    resp = h.response(req, 200, headers={"content-type": "application/json"}, body=b'{"a": 1}')
    assert msgspec.json.decode(resp.body or b"") == {"a": 1, "rewritten": True}
    assert resp.headers["x-body-rewritten"] == "1"

    s = PluginHarness(probes.UpperStream)
    req = s.request().request
    resp = s.response(req, 200)
    assert s.stream(req, resp, [b"ab", b"cd"]) == [b"AB", b"CD\n#chunks=2"]


def test_async_hooks_run_in_the_harness() -> None:
    h = PluginHarness(probes.Sleepy, {"delay": 0.01})
    out = h.request()
    assert "x-async-window" in out.request.headers


def test_exceptions_become_plugin_errors_and_are_counted() -> None:
    h = PluginHarness(probes.Boom)
    with pytest.raises(PluginError, match="plugin 't-boom' failed in on_request: RuntimeError"):
        h.request(headers={"x-boom": "request"})
    assert h.slots[0].stats["on_request"].errors == 1


def test_every_call_is_timed() -> None:
    h = PluginHarness(probes.Stamp)
    for _ in range(3):
        req = h.request().request
        h.response(req, 200)
    stats = Host([h.chain]).stats()["test"]["t-stamp"]
    assert stats["on_request"]["calls"] == 3
    assert stats["on_response"]["calls"] == 3
    assert stats["on_request"]["total_ns"] >= stats["on_request"]["max_ns"] > 0


def test_chain_order_follows_priority_then_position() -> None:
    h = PluginHarness([(probes.MarkA, None), (probes.MarkB, None), (probes.MarkC, None)])
    assert h.request().request.headers.getall("x-order") == ["t-mark-b", "t-mark-a", "t-mark-c"]


def test_config_is_validated_like_config_loading() -> None:
    with pytest.raises(msgspec.ValidationError, match="delay"):
        PluginHarness(probes.Sleepy, {"delay": "soon"})


def test_headers_are_case_insensitive_and_keep_order() -> None:
    h = Headers([("A", "1"), ("b", "2"), ("a", "3")])
    assert h.getall("a") == ["1", "3"]
    assert h["B"] == "2"
    h["A"] = "x"
    assert h.items() == [("b", "2"), ("a", "x")]
    assert h.rename("b", "c") and h.items() == [("c", "2"), ("a", "x")]
    assert not h.remove("zz")
    assert "C" in h and len(h) == 2


def test_plugin_rules_are_enforced() -> None:
    class NoHooks(Plugin):
        name = "nothing"

    class Both(Plugin):
        name = "both"

        def on_response_body(self, req: Request, resp: Response, body: bytes) -> bytes | None:
            return None

        def on_response_chunk(
            self, req: Request, resp: Response, chunk: bytes, last: bool
        ) -> bytes | None:
            return None

    with pytest.raises(ValueError, match="defines no hook"):
        spec_of(NoHooks, "test")
    # Both body hooks: buffered by default, each request may pick (req.response_body_mode).
    assert spec_of(Both, "test").response_body == "buffered"


def test_async_log_hooks_run_in_the_harness(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    with PluginHarness(probes.AsyncLog, {"path": str(log)}) as h:
        req = h.request("GET", "/x").request
        h.response(req, 204)
        h.log(req)
    assert msgspec.json.decode(log.read_text()) == {"path": "/x", "status": 204}


def test_header_values_must_be_text() -> None:
    h = Headers()
    h["x-n"] = 3
    assert h["x-n"] == "3"
    with pytest.raises(TypeError, match="must be str"):
        h["x-bad"] = "abc".title  # type: ignore[assignment]
