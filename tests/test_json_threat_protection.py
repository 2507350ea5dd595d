"""json-threat-protection through a real gateway: each limit admits a body exactly at it
and refuses one over it, before the upstream sees anything."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from gateway import Gateway, GatewayFactory
from upstreams import Upstream

LIMITS = {"max_depth": 4, "max_keys": 3, "max_array_items": 5, "max_string_length": 8}


@pytest.fixture
def gw(gateway: GatewayFactory, upstream: Upstream) -> Gateway:
    plugin = {"name": "json-threat-protection", "config": LIMITS}
    strict = {"name": "json-threat-protection", "config": {"require_json": True}}
    return gateway(
        {
            "routes": [
                {"paths": ["/*"], "upstream": upstream.url, "plugins": [plugin]},
                {"paths": ["/strict/*"], "upstream": upstream.url, "plugins": [strict]},
            ]
        },
        workers=1,
    )


def post(gw: Gateway, body: bytes, ctype: str = "application/json") -> httpx.Response:
    return httpx.post(gw.url + "/x", content=body, headers={"content-type": ctype}, timeout=10)


def nested(depth: int) -> Any:
    doc: Any = 1
    for i in range(depth):
        doc = [doc] if i % 2 else {"k": doc}
    return doc


def refused(resp: httpx.Response, code: str, words: str) -> None:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["code"] == code
    assert words in err["message"], err["message"]


@pytest.mark.parametrize(
    ("at_limit", "over", "words"),
    [
        (nested(4), nested(5), "nests 5 levels deep, above the limit of 4"),
        ({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 2, "c": 3, "d": 4}, "object of 4 entries"),
        ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6], "array of 6 items"),
        ({"k": "12345678"}, {"k": "123456789"}, "string of 9 characters"),
        ({"12345678": 1}, {"123456789": 1}, "string of 9 characters"),
    ],
)
def test_each_limit_at_its_boundary(
    gw: Gateway, upstream: Upstream, at_limit: Any, over: Any, words: str
) -> None:
    ok = post(gw, json.dumps(at_limit).encode())
    assert ok.status_code == 200, ok.text
    assert upstream.count == 1
    refused(post(gw, json.dumps(over).encode()), "json_too_complex", words)
    assert upstream.count == 1


def test_hostile_and_broken_bodies(gw: Gateway, upstream: Upstream) -> None:
    # Deep enough to overflow a recursive parser; measured without parsing.
    refused(post(gw, b"[" * 100000), "json_too_complex", "nests 100000 levels deep")
    # Brackets inside strings do not count; repeated keys do.
    assert post(gw, b'{"k": "[[[[[[[["}').status_code == 200
    refused(post(gw, b'{"a":1,"a":2,"a":3,"a":4}'), "json_too_complex", "object of 4")
    refused(post(gw, b'{"a": '), "invalid_json", "not valid JSON")
    assert post(gw, b'{"a": 1}', "application/problem+json").status_code == 200
    # Not declared JSON: not checked, unless the route requires JSON.
    assert post(gw, b"[" * 50, "text/plain").status_code == 200
    strict = httpx.post(gw.url + "/strict/x", content=b"a=1", timeout=10)
    assert strict.status_code == 415
    assert strict.json()["error"]["code"] == "not_json"
    assert httpx.get(gw.url + "/strict/x", timeout=10).status_code == 200
    assert upstream.count == 4
