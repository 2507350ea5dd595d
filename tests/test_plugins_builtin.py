"""The first-party plugins, driven through ``PluginHarness`` (no server)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from ferrogate.hooks import PluginError, Request
from ferrogate.plugin_registry import BUILTIN, discover
from ferrogate.plugins.cors import Cors
from ferrogate.plugins.request_termination import RequestTermination
from ferrogate.plugins.request_transformer import RequestTransformer
from ferrogate.plugins.response_transformer import ResponseTransformer
from ferrogate.testing import Outcome, PluginHarness

JSON = {"content-type": "application/json"}


def jbody(data: Any) -> bytes:
    return json.dumps(data).encode()


def sent_body(out: Outcome) -> Any:
    """The JSON body the upstream would get, after the plugin."""
    assert out.decision is not None and out.decision[0] == 0
    assert out.decision[5] is not None, "the body was not changed"
    return json.loads(out.decision[5])


def transform(config: dict[str, Any], body: Any, headers: dict[str, str] | None = None) -> Any:
    h = PluginHarness(RequestTransformer, config)
    return sent_body(h.request("POST", "/", headers=headers or JSON, body=jbody(body)))


# -- all plugins -----------------------------------------------------------------------------


def test_builtin_plugins_are_registered_with_a_summary_and_described_settings() -> None:
    reg = discover()
    assert reg.problems == []
    for name in BUILTIN:
        spec = reg.plugins[name]
        assert spec.source == "builtin"
        assert spec.doc and "\n" not in spec.doc.strip()
        schema = msgspec.json.schema(spec.config_type)
        defs = schema["$defs"]
        for struct_name, struct in defs.items():
            for field, prop in struct.get("properties", {}).items():
                assert prop.get("description"), f"{name}: {struct_name}.{field} has none"


def test_priorities_put_cors_first_and_termination_last() -> None:
    assert Cors.priority > RequestTransformer.priority > ResponseTransformer.priority
    assert ResponseTransformer.priority > RequestTermination.priority


@pytest.mark.parametrize(
    "plugin", [RequestTransformer, ResponseTransformer, Cors, RequestTermination]
)
def test_unknown_settings_are_rejected(plugin: Any) -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        PluginHarness(plugin, {"nonsense": 1})


# -- request-transformer: headers --------------------------------------------------------------


def test_request_headers_every_operation_case_insensitively() -> None:
    h = PluginHarness(
        RequestTransformer,
        {
            "remove": {"headers": ["X-REMOVE-Me"]},
            "rename": {"headers": {"X-Old": "X-New"}},
            "replace": {"headers": {"x-replace": "new", "X-Absent": "never"}},
            "add": {"headers": {"X-EXISTS": "not-set", "x-added": "yes", "x-version": 2}},
            "append": {"headers": {"X-Multi": ["b", "c"], "x-one": "1"}},
        },
    )
    sent = [
        ("x-remove-me", "1"),
        ("X-Remove-Me", "2"),
        ("X-OLD", "old-value"),
        ("X-Replace", "before"),
        ("x-exists", "kept"),
        ("x-multi", "a"),
    ]
    out = h.request("GET", "/", headers=sent)
    assert out.response is None
    headers = out.request.headers
    assert "x-remove-me" not in headers
    assert "x-old" not in headers and headers["X-NEW"] == "old-value"
    assert headers["x-replace"] == "new"
    assert "x-absent" not in headers
    assert headers["x-exists"] == "kept"
    assert headers["x-added"] == "yes" and headers["x-version"] == "2"
    assert headers.getall("x-multi") == ["a", "b", "c"]
    assert headers.getall("x-one") == ["1"]
    assert out.decision is not None
    # The data plane gets a diff: the names touched, dropped whole, then their fields now;
    # x-exists was left alone, so it is not part of it.
    removed, added = out.decision[4]
    assert "x-exists" not in removed
    kept = [(n.lower(), v) for n, v in sent if n.lower() not in removed]
    assert sorted(kept + added) == sorted(headers.items())
    assert out.decision[1:4] == (None, None, None) and out.decision[5] is None


def test_request_header_rename_replaces_a_header_that_had_the_new_name() -> None:
    h = PluginHarness(RequestTransformer, {"rename": {"headers": {"x-a": "x-b"}}})
    out = h.request(headers=[("x-a", "1"), ("x-a", "2"), ("x-b", "old")])
    assert out.request.headers.getall("x-b") == ["1", "2"]
    assert "x-a" not in out.request.headers


def test_request_header_rename_to_the_same_name_in_other_case_keeps_the_header() -> None:
    h = PluginHarness(RequestTransformer, {"rename": {"headers": {"x-token": "X-Token"}}})
    out = h.request(headers={"x-token": "t"})
    assert out.request.headers["x-token"] == "t"
    assert out.decision is None


def test_request_operations_run_in_kong_order() -> None:
    # remove, rename, replace, add, append: each sees what the previous ones did.
    h = PluginHarness(
        RequestTransformer,
        {
            "remove": {"headers": ["x-a"]},
            "rename": {"headers": {"x-b": "x-c"}},
            "replace": {"headers": {"x-c": "replaced"}},
            "add": {"headers": {"x-a": "added", "x-c": "not-added"}},
            "append": {"headers": {"x-a": "appended"}},
        },
    )
    out = h.request(headers={"x-a": "client", "x-b": "client"})
    assert out.request.headers.getall("x-a") == ["added", "appended"]
    assert out.request.headers.getall("x-c") == ["replaced"]


def test_request_header_names_and_values_are_checked() -> None:
    with pytest.raises(ValueError, match=r"add\.headers: 'bad name' is not a valid header name"):
        PluginHarness(RequestTransformer, {"add": {"headers": {"bad name": "x"}}})
    with pytest.raises(ValueError, match=r"replace\.headers\.x-a: .*CR, LF"):
        PluginHarness(RequestTransformer, {"replace": {"headers": {"x-a": "a\r\nx-b: 1"}}})


def test_header_only_config_does_not_buffer_or_touch_the_body() -> None:
    config = {"add": {"headers": {"x-a": "1"}}, "remove": {"query": ["q"]}}
    assert RequestTransformer.request_body_mode(config) == "none"
    parsed = msgspec.convert(config, RequestTransformer.Config)
    assert RequestTransformer.request_body_mode(parsed) == "none"
    assert RequestTransformer.request_body_mode({}) == "none"
    h = PluginHarness(RequestTransformer, config)
    out = h.request("POST", "/", headers=JSON, body=b'{"q": 1}')
    assert out.decision is not None and out.decision[5] is None
    assert out.request.body == b'{"q": 1}'


@pytest.mark.parametrize(
    "config",
    [
        {"remove": {"body": ["a"]}},
        {"rename": {"body": {"a": "b"}}},
        {"replace": {"body": {"a": 1}}},
        {"add": {"body": {"a": 1}}},
        {"map": [{"from": "a", "to": "b"}]},
    ],
)
def test_any_body_rule_buffers_the_request_body(config: dict[str, Any]) -> None:
    assert RequestTransformer.request_body_mode(config) == "buffered"
    parsed = msgspec.convert(config, RequestTransformer.Config)
    assert RequestTransformer.request_body_mode(parsed) == "buffered"


# -- request-transformer: query ----------------------------------------------------------------


def test_request_query_every_operation() -> None:
    h = PluginHarness(
        RequestTransformer,
        {
            "remove": {"query": ["debug"]},
            "rename": {"query": {"old": "new"}},
            "replace": {"query": {"page": "2", "absent": "never"}},
            "add": {"query": {"page": "not-set", "lang": "en us", "n": 5}},
            "append": {"query": {"tag": ["b", "c/d"]}},
        },
    )
    out = h.request(query="debug=1&debug=2&old=x&page=1&tag=a")
    assert out.decision is not None
    # A replaced parameter moves to the end, as with ``Params.__setitem__``.
    assert out.decision[3] == "new=x&tag=a&page=2&lang=en%20us&n=5&tag=b&tag=c%2Fd"
    assert out.request.query == out.decision[3]
    params = out.request.query_params
    assert "debug" not in params and "absent" not in params
    assert params.getall("tag") == ["a", "b", "c/d"]
    assert out.decision[4] is None  # headers untouched


def test_request_query_names_are_case_sensitive() -> None:
    h = PluginHarness(RequestTransformer, {"remove": {"query": ["Debug"]}})
    out = h.request(query="debug=1")
    assert out.decision is None
    assert out.request.query == "debug=1"


def test_request_query_rename_replaces_an_existing_parameter() -> None:
    h = PluginHarness(RequestTransformer, {"rename": {"query": {"q": "search"}}})
    out = h.request(query="search=old&q=new")
    assert out.request.query == "search=new"


# -- request-transformer: JSON body ------------------------------------------------------------


def test_request_body_remove_rename_replace_add_with_nested_paths() -> None:
    body = {
        "id": 7,
        "user": {"name": "Ann", "password": "pw", "address": {"city": "Oslo", "zip": "0150"}},
        "flags": {"beta": False},
    }
    out = transform(
        {
            "remove": {"body": ["user.password", "user.missing.deep", "nope"]},
            "rename": {"body": {"user.name": "full_name", "user.address.zip": "postcode"}},
            "replace": {"body": {"user.address.city": "Bergen", "flags.beta": True, "x.y": 1}},
            "add": {
                "body": {
                    "meta.source.kind": "gateway",
                    "id": 8,
                    "tags": ["a", {"b": None}],
                    "user.address.country": "NO",
                }
            },
        },
        body,
    )
    assert out == {
        "id": 7,
        "user": {
            "full_name": "Ann",
            "address": {"city": "Bergen", "postcode": "0150", "country": "NO"},
        },
        "flags": {"beta": True},
        "meta": {"source": {"kind": "gateway"}},
        "tags": ["a", {"b": None}],
    }
    # A renamed key keeps its place.
    assert list(out["user"]) == ["full_name", "address"]
    assert list(out["user"]["address"]) == ["city", "postcode", "country"]


def test_request_body_rules_do_not_go_through_values_that_are_not_objects() -> None:
    out = transform(
        {"add": {"body": {"name.first": "x", "ok": 1}}, "remove": {"body": ["list.0"]}},
        {"name": "Ann", "list": [1, 2]},
    )
    assert out == {"name": "Ann", "list": [1, 2], "ok": 1}


def test_request_body_map_moves_and_copies_values() -> None:
    out = transform(
        {
            "map": [
                {"from": "user.id", "to": "account.owner.id"},
                {"from": "user.email", "to": "contact", "copy": True},
                {"from": "absent", "to": "never"},
                {"from": "user.name", "to": "title"},
                {"from": "n", "to": "s.t"},
            ]
        },
        {"user": {"id": 1, "email": "a@b.c", "name": "Ann"}, "title": "old", "s": "scalar", "n": 2},
    )
    assert out == {
        "user": {"email": "a@b.c"},
        "title": "Ann",
        "s": "scalar",
        "n": 2,  # the destination runs through a string: the value stays where it was
        "account": {"owner": {"id": 1}},
        "contact": "a@b.c",
    }


def test_request_body_map_runs_after_the_other_rules() -> None:
    out = transform(
        {"add": {"body": {"b": 2}}, "map": [{"from": "b", "to": "c.d", "copy": True}]},
        {"a": 1},
    )
    assert out == {"a": 1, "b": 2, "c": {"d": 2}}


def test_request_body_copies_are_independent_of_later_rules_and_requests() -> None:
    config = {"add": {"body": {"meta": {"v": 1}, "meta.extra": True}}}
    h = PluginHarness(RequestTransformer, config)
    for _ in range(2):
        out = h.request("POST", "/", headers=JSON, body=b"{}")
        assert sent_body(out) == {"meta": {"v": 1, "extra": True}}
    copied = transform(
        {"map": [{"from": "a", "to": "b", "copy": True}, {"from": "b.x", "to": "c"}]},
        {"a": {"x": 1}},
    )
    assert copied == {"a": {"x": 1}, "b": {}, "c": 1}


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "application/problem+json", "APPLICATION/JSON"],
)
def test_request_body_rules_apply_to_json_media_types(content_type: str) -> None:
    out = transform({"add": {"body": {"a": 1}}}, {}, {"content-type": content_type})
    assert out == {"a": 1}


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"content-type": "text/plain"}, b'{"a": 0}'),
        ({}, b'{"a": 0}'),
        ({"content-type": "application/x-www-form-urlencoded"}, b"a=0"),
        (JSON, b'{"a": 0'),  # not valid JSON
        (JSON, b"[1, 2]"),  # not an object
        ({**JSON, "content-encoding": "gzip"}, b"\x1f\x8b..."),
    ],
)
def test_request_body_rules_leave_other_bodies_unchanged(
    headers: dict[str, str], body: bytes
) -> None:
    h = PluginHarness(RequestTransformer, {"add": {"body": {"a": 1}}})
    out = h.request("POST", "/", headers=headers, body=body)
    assert out.decision is None
    assert out.request.body == body


def test_request_empty_json_body_counts_as_an_empty_object() -> None:
    h = PluginHarness(RequestTransformer, {"add": {"body": {"a": 1}}})
    assert sent_body(h.request("POST", "/", headers=JSON, body=b"")) == {"a": 1}
    h = PluginHarness(RequestTransformer, {"remove": {"body": ["a"]}})
    assert h.request("POST", "/", headers=JSON, body=b"").decision is None


def test_request_json_too_deep_to_decode_is_refused() -> None:
    h = PluginHarness(RequestTransformer, {"remove": {"body": ["is_admin"]}})
    deep = b'{"a":' * 100_000 + b"{}" + b"}" * 100_000
    out = h.request("POST", "/", headers=JSON, body=deep)
    assert out.response is not None and out.response.status == 400


def test_request_body_without_effect_is_not_rewritten() -> None:
    h = PluginHarness(RequestTransformer, {"remove": {"body": ["absent"]}})
    out = h.request("POST", "/", headers=JSON, body=b'{ "kept":  "as sent" }')
    assert out.decision is None
    assert out.request.body == b'{ "kept":  "as sent" }'


def test_request_body_paths_are_checked() -> None:
    with pytest.raises(ValueError, match=r"remove\.body: 'a\.\.b' is not a field path"):
        PluginHarness(RequestTransformer, {"remove": {"body": ["a..b"]}})
    with pytest.raises(ValueError, match=r"rename\.body\.a\.b: 'c\.d' must be a key name"):
        PluginHarness(RequestTransformer, {"rename": {"body": {"a.b": "c.d"}}})
    with pytest.raises(ValueError, match=r"map\[0\]: cannot move 'a' into itself"):
        PluginHarness(RequestTransformer, {"map": [{"from": "a", "to": "a.b"}]})
    with pytest.raises(ValueError, match=r"map\[1\]\.to"):
        PluginHarness(
            RequestTransformer, {"map": [{"from": "a", "to": "b"}, {"from": "a", "to": ""}]}
        )


# -- request-transformer: templates ------------------------------------------------------------


def test_request_templates_fill_values_from_the_request() -> None:
    h = PluginHarness(
        RequestTransformer,
        {
            "add": {
                "headers": {
                    "x-client": "$(client_ip)",
                    "x-id": "req-$(request_id)",
                    "x-route": "$(route)",
                    "x-who": "$(headers.X-User) from $(query.src)",
                    "x-missing": "[$(headers.x-nope)][$(query.nope)]",
                    "x-where": "$(method) $(host)$(path)",
                },
                "query": {"user": "$(headers.x-user)"},
                "body": {"who.ip": "$( client_ip )", "count": 3},
            },
        },
    )
    out = h.request(
        "POST",
        "/orders",
        query="src=web",
        headers={**JSON, "X-User": "ann"},
        body=b"{}",
        client_ip="10.0.0.9",
        request_id="r1",
        host="api.example.com",
    )
    headers = out.request.headers
    assert headers["x-client"] == "10.0.0.9"
    assert headers["x-id"] == "req-r1"
    assert headers["x-route"] == "test"
    assert headers["x-who"] == "ann from web"
    assert headers["x-missing"] == "[][]"
    assert headers["x-where"] == "POST api.example.com/orders"
    assert out.request.query == "src=web&user=ann"
    assert sent_body(out) == {"who": {"ip": "10.0.0.9"}, "count": 3}


def test_request_templates_read_the_request_as_it_arrived() -> None:
    h = PluginHarness(
        RequestTransformer,
        {
            "remove": {"headers": ["x-secret"], "query": ["token"]},
            "add": {
                "headers": {"x-had-secret": "$(headers.x-secret)"},
                "query": {"t": "$(query.token)"},
            },
        },
    )
    out = h.request(query="token=abc", headers={"x-secret": "s"})
    assert out.request.headers["x-had-secret"] == "s"
    assert out.request.query == "t=abc"


def test_request_templates_cannot_put_line_breaks_into_headers() -> None:
    h = PluginHarness(RequestTransformer, {"add": {"headers": {"x-v": "$(query.v)"}}})
    out = h.request(query="v=a%0D%0Ax-injected:%201%00")
    assert out.request.headers.getall("x-v") == ["ax-injected: 1"]


def test_request_templates_are_checked() -> None:
    with pytest.raises(ValueError, match=r"add\.headers\.x-a: unknown template \$\(cookie\.s\)"):
        PluginHarness(RequestTransformer, {"add": {"headers": {"x-a": "$(cookie.s)"}}})
    with pytest.raises(ValueError, match=r"replace\.query\.q: .* does not form a template"):
        PluginHarness(RequestTransformer, {"replace": {"query": {"q": "$(headers.x"}}})
    with pytest.raises(ValueError, match=r"add\.body\.a: unknown template \$\(headers\.\)"):
        PluginHarness(RequestTransformer, {"add": {"body": {"a": "$(headers.)"}}})


# -- request-transformer: path and method ------------------------------------------------------


def test_request_fixed_path_and_method() -> None:
    h = PluginHarness(RequestTransformer, {"path": "/v2/users", "method": "put"})
    out = h.request("POST", "/users", query="a=1")
    assert out.decision == (0, "PUT", "/v2/users", None, None, None, None, None, None)


def test_request_regex_path_rewrite_with_groups() -> None:
    h = PluginHarness(
        RequestTransformer,
        {"path": {"pattern": r"^/api/(?P<ver>v\d)/(.*)$", "replacement": r"/\2/\g<ver>"}},
    )
    out = h.request("GET", "/api/v1/users/7", query="a=1")
    assert out.decision == (0, None, "/users/7/v1", None, None, None, None, None, None)
    h = PluginHarness(RequestTransformer, {"path": {"pattern": "^/old", "replacement": r"/new"}})
    assert h.request("GET", "/old/x").request.path == "/new/x"
    h = PluginHarness(RequestTransformer, {"path": {"pattern": "/+", "replacement": "/"}})
    assert h.request("GET", "//a///b").request.path == "/a/b"


def test_request_regex_path_result_always_starts_with_a_slash() -> None:
    h = PluginHarness(
        RequestTransformer, {"path": {"pattern": r"^/svc/(.*)", "replacement": r"\1"}}
    )
    assert h.request("GET", "/svc/items").request.path == "/items"


def test_request_regex_path_that_does_not_match_leaves_the_path_alone() -> None:
    h = PluginHarness(RequestTransformer, {"path": {"pattern": "^/api/", "replacement": "/"}})
    out = h.request("GET", "/health")
    assert out.decision is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"path": {"pattern": "(unclosed", "replacement": "/"}}, r"path\.pattern: invalid regular"),
        (
            {"path": {"pattern": "^/(a)", "replacement": r"/\2"}},
            r"path\.replacement: invalid group",
        ),
        ({"path": "no-slash"}, r"path: 'no-slash' must start with /"),
        ({"path": "/a?b=1"}, r"path: '/a\?b=1' must start with /"),
        ({"method": "GE T"}, r"method: 'GE T' is not a valid HTTP method"),
    ],
)
def test_request_path_and_method_are_checked(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PluginHarness(RequestTransformer, config)


def test_request_transformer_by_registered_name() -> None:
    h = PluginHarness("request-transformer", {"add": {"headers": {"x-a": "1"}}})
    assert isinstance(h.plugin, RequestTransformer)
    assert h.request().request.headers["x-a"] == "1"


# -- response-transformer ----------------------------------------------------------------------


def test_response_headers_every_operation_and_status() -> None:
    h = PluginHarness(
        ResponseTransformer,
        {
            "remove": {"headers": ["Server", "x-powered-by"]},
            "rename": {"headers": {"X-Upstream-Id": "x-request-id"}},
            "replace": {"headers": {"cache-control": "no-store", "x-absent": "never"}},
            "add": {"headers": {"content-type": "text/html", "X-Frame-Options": "DENY"}},
            "append": {"headers": {"set-cookie": ["a=1", "b=2"]}},
            "status": 299,
        },
    )
    req = h.request().request
    resp = h.response(
        req,
        200,
        headers=[
            ("server", "upstream/1.0"),
            ("X-Powered-By", "php"),
            ("x-upstream-id", "u1"),
            ("Cache-Control", "max-age=60"),
            ("content-type", "text/plain"),
            ("set-cookie", "z=0"),
        ],
    )
    assert resp.status == 299
    assert "server" not in resp.headers and "x-powered-by" not in resp.headers
    assert resp.headers["x-request-id"] == "u1" and "x-upstream-id" not in resp.headers
    assert resp.headers["cache-control"] == "no-store"
    assert "x-absent" not in resp.headers
    assert resp.headers["content-type"] == "text/plain"
    assert resp.headers["x-frame-options"] == "DENY"
    assert resp.headers.getall("set-cookie") == ["z=0", "a=1", "b=2"]


def test_response_header_only_config_streams_the_body_untouched() -> None:
    config = {"add": {"headers": {"x-a": "1"}}, "status": 201}
    assert ResponseTransformer.response_body_mode(config) == "none"
    assert ResponseTransformer.response_body_mode({}) == "none"
    h = PluginHarness(ResponseTransformer, config)
    resp = h.response(h.request().request, 200, headers=JSON, body=b'{"a": 1}')
    assert resp.body == b'{"a": 1}'
    assert resp.status == 201


@pytest.mark.parametrize(
    "config",
    [
        {"remove": {"body": ["a"]}},
        {"rename": {"body": {"a": "b"}}},
        {"replace": {"body": {"a": 1}}},
        {"add": {"body": {"a": 1}}},
        {"strip": ["password"]},
    ],
)
def test_response_body_rules_buffer_the_body(config: dict[str, Any]) -> None:
    assert ResponseTransformer.response_body_mode(config) == "buffered"
    parsed = msgspec.convert(config, ResponseTransformer.Config)
    assert ResponseTransformer.response_body_mode(parsed) == "buffered"


def response_json(config: dict[str, Any], body: bytes, headers: Any = None) -> Any:
    h = PluginHarness(ResponseTransformer, config)
    resp = h.response(h.request().request, 200, headers=headers or JSON, body=body)
    assert resp.body is not None
    return json.loads(resp.body)


def test_response_body_operations_with_nested_paths() -> None:
    body = jbody(
        {
            "data": {"user": {"id": 1, "internal": "x", "name": "Ann"}},
            "debug": {"trace": "..."},
            "status": "ok",
        }
    )
    out = response_json(
        {
            "remove": {"body": ["debug", "data.user.internal"]},
            "rename": {"body": {"data.user.name": "display_name"}},
            "replace": {"body": {"status": "fine", "data.missing": 1}},
            "add": {"body": {"data.user.id": 2, "meta.version": "2", "meta.tags": ["x"]}},
        },
        body,
    )
    assert out == {
        "data": {"user": {"id": 1, "display_name": "Ann"}},
        "status": "fine",
        "meta": {"version": "2", "tags": ["x"]},
    }


def test_response_body_values_are_not_templates() -> None:
    out = response_json({"add": {"body": {"a": "$(client_ip)"}}}, b"{}")
    assert out == {"a": "$(client_ip)"}


def test_response_strip_removes_fields_at_any_depth() -> None:
    body = jbody(
        [
            {"name": "a", "password": "p", "profile": {"ssn": "1", "pets": [{"ssn": "2"}]}},
            {"name": "b", "nested": [[{"password": "q", "ok": True}]]},
            "password",
        ]
    )
    out = response_json({"strip": ["password", "ssn"]}, body)
    assert out == [
        {"name": "a", "profile": {"pets": [{}]}},
        {"name": "b", "nested": [[{"ok": True}]]},
        "password",
    ]


def test_response_strip_runs_after_the_other_rules() -> None:
    out = response_json(
        {"add": {"body": {"user.password": "x"}}, "strip": ["password"]},
        jbody({"user": {"name": "a"}}),
    )
    assert out == {"user": {"name": "a"}}


def test_response_strip_fails_closed_on_json_too_deep_to_decode() -> None:
    h = PluginHarness(ResponseTransformer, {"strip": ["secret"]})
    shallow = b'{"a":' * 200 + b'{"secret":1,"b":2}' + b"}" * 200
    resp = h.response(h.request().request, 200, headers=JSON, body=shallow)
    assert resp.body == b'{"a":' * 200 + b'{"b":2}' + b"}" * 200
    deep = b"[" * 100_000 + b'{"secret":1}' + b"]" * 100_000
    with pytest.raises(PluginError, match="response-transformer"):
        h.response(h.request().request, 200, headers=JSON, body=deep)


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"content-type": "text/html"}, b'{"password": 1}'),
        ({}, b'{"password": 1}'),
        (JSON, b'{"password": 1'),
        (JSON, b""),
        ({**JSON, "content-encoding": "br"}, b'{"password": 1}'),
    ],
)
def test_response_body_rules_leave_other_bodies_unchanged(
    headers: dict[str, str], body: bytes
) -> None:
    h = PluginHarness(ResponseTransformer, {"strip": ["password"], "add": {"body": {"a": 1}}})
    resp = h.response(h.request().request, 200, headers=headers, body=body)
    assert resp.body == body


def test_response_body_format_is_the_one_the_upstream_declared() -> None:
    h = PluginHarness(
        ResponseTransformer,
        {"replace": {"headers": {"content-type": "text/plain"}}, "strip": ["password"]},
    )
    resp = h.response(
        h.request().request,
        200,
        headers={"content-type": "application/vnd.api+json"},
        body=b'{"password": 1, "a": 2}',
    )
    assert resp.headers["content-type"] == "text/plain"
    assert resp.body == b'{"a":2}'


def test_response_status_is_checked() -> None:
    with pytest.raises(msgspec.ValidationError, match="status"):
        PluginHarness(ResponseTransformer, {"status": 99})
    with pytest.raises(msgspec.ValidationError, match="unknown field `query`"):
        PluginHarness(ResponseTransformer, {"remove": {"query": ["a"]}})
    with pytest.raises(ValueError, match=r"strip\[1\]"):
        PluginHarness(ResponseTransformer, {"strip": ["a", ""]})


# -- cors --------------------------------------------------------------------------------------

PREFLIGHT = {
    "origin": "https://app.example.com",
    "access-control-request-method": "PUT",
    "access-control-request-headers": "x-token, content-type",
}


def cors_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith("access-control-")}


def test_cors_preflight_is_answered_with_204_and_echoes_the_requested_headers() -> None:
    h = PluginHarness(Cors, {"max_age": 600})
    out = h.request("OPTIONS", "/items", headers=PREFLIGHT)
    assert out.response is not None
    assert out.response.status == 204
    assert out.response.body == b""
    assert cors_headers(out.response.headers) == {
        "access-control-allow-origin": "*",
        "access-control-allow-methods": "GET, HEAD, PUT, PATCH, POST, DELETE, OPTIONS",
        "access-control-allow-headers": "x-token, content-type",
        "access-control-max-age": "600",
    }
    assert "vary" not in out.response.headers


def test_cors_preflight_with_configured_headers_and_methods() -> None:
    h = PluginHarness(
        Cors,
        {
            "origins": ["https://app.example.com"],
            "methods": ["get", "POST"],
            "headers": ["Authorization", "Content-Type"],
        },
    )
    out = h.request("OPTIONS", "/", headers=PREFLIGHT)
    assert out.response is not None and out.response.status == 204
    headers = out.response.headers
    assert headers["access-control-allow-origin"] == "https://app.example.com"
    assert headers["access-control-allow-methods"] == "GET, POST"
    assert headers["access-control-allow-headers"] == "Authorization, Content-Type"
    assert headers["vary"] == "Origin"
    assert "access-control-max-age" not in headers
    assert "access-control-allow-credentials" not in headers


def test_cors_preflight_without_requested_headers_allows_none() -> None:
    h = PluginHarness(Cors, {})
    out = h.request(
        "OPTIONS", "/", headers={"origin": "https://a.test", "access-control-request-method": "GET"}
    )
    assert out.response is not None
    assert "access-control-allow-headers" not in out.response.headers


def test_cors_preflight_from_a_disallowed_origin_gets_no_cors_headers() -> None:
    h = PluginHarness(Cors, {"origins": ["https://app.example.com"], "credentials": True})
    out = h.request("OPTIONS", "/", headers={**PREFLIGHT, "origin": "https://evil.test"})
    assert out.response is not None and out.response.status == 204
    assert cors_headers(out.response.headers) == {}
    assert out.response.headers["vary"] == "Origin"


def test_cors_own_preflight_answer_gets_no_second_set_of_headers() -> None:
    h = PluginHarness(Cors, {"origins": ["https://app.example.com"], "exposed_headers": ["x-a"]})
    out = h.request("OPTIONS", "/", headers=PREFLIGHT)
    assert out.response is not None
    resp = h.response(out.request, 204, headers=out.response.headers.items())
    assert resp.headers.getall("vary") == ["Origin"]
    assert resp.headers.getall("access-control-allow-origin") == ["https://app.example.com"]
    assert "access-control-expose-headers" not in resp.headers


def test_cors_preflight_continue_sends_the_preflight_upstream_untouched() -> None:
    h = PluginHarness(Cors, {"preflight_continue": True, "origins": ["https://app.example.com"]})
    out = h.request("OPTIONS", "/", headers=PREFLIGHT)
    assert out.response is None and out.decision is None
    resp = h.response(out.request, 200, headers={"allow": "GET"})
    assert cors_headers(resp.headers) == {}
    assert "vary" not in resp.headers


def test_cors_options_without_request_method_is_an_actual_request() -> None:
    h = PluginHarness(Cors, {})
    out = h.request("OPTIONS", "/", headers={"origin": "https://app.example.com"})
    assert out.response is None
    resp = h.response(out.request, 200)
    assert resp.headers["access-control-allow-origin"] == "*"


def test_cors_actual_request_from_an_allowed_origin() -> None:
    h = PluginHarness(
        Cors,
        {
            "origins": ["https://app.example.com", "https://admin.example.com"],
            "exposed_headers": ["X-Total-Count", "ETag"],
            "credentials": True,
            "max_age": 60,
        },
    )
    out = h.request("GET", "/items", headers={"Origin": "https://admin.example.com"})
    assert out.response is None and out.decision is None
    resp = h.response(out.request, 200, headers={"vary": "Accept-Encoding", "etag": '"1"'})
    assert cors_headers(resp.headers) == {
        "access-control-allow-origin": "https://admin.example.com",
        "access-control-allow-credentials": "true",
        "access-control-expose-headers": "X-Total-Count, ETag",
    }
    assert resp.headers.getall("vary") == ["Accept-Encoding", "Origin"]


def test_cors_actual_request_replaces_upstream_cors_headers() -> None:
    h = PluginHarness(Cors, {"origins": ["https://app.example.com"]})
    req = h.request("GET", "/", headers={"origin": "https://app.example.com"}).request
    resp = h.response(
        req,
        200,
        headers={"access-control-allow-origin": "*", "Vary": "accept-encoding, origin"},
    )
    assert resp.headers.getall("access-control-allow-origin") == ["https://app.example.com"]
    assert resp.headers.getall("vary") == ["accept-encoding, origin"]


def test_cors_actual_request_from_a_disallowed_origin_is_proxied_without_cors_headers() -> None:
    h = PluginHarness(Cors, {"origins": ["https://app.example.com"], "exposed_headers": ["x-a"]})
    out = h.request("POST", "/", headers={"origin": "https://app.example.com.evil.test"})
    assert out.response is None
    resp = h.response(out.request, 200)
    assert cors_headers(resp.headers) == {}
    assert resp.headers["vary"] == "Origin"


def test_cors_request_without_origin() -> None:
    h = PluginHarness(Cors, {})
    resp = h.response(h.request("GET", "/").request, 200)
    assert cors_headers(resp.headers) == {} and "vary" not in resp.headers
    h = PluginHarness(Cors, {"origins": ["https://app.example.com"]})
    resp = h.response(h.request("GET", "/").request, 200)
    assert cors_headers(resp.headers) == {}
    assert resp.headers["vary"] == "Origin"  # a cache must not reuse it for a CORS request


def test_cors_credentials_with_any_origin_echo_the_origin() -> None:
    h = PluginHarness(Cors, {"origins": ["*"], "credentials": True})
    out = h.request("OPTIONS", "/", headers=PREFLIGHT)
    assert out.response is not None
    assert out.response.headers["access-control-allow-origin"] == "https://app.example.com"
    assert out.response.headers["access-control-allow-credentials"] == "true"
    assert out.response.headers["vary"] == "Origin"
    req = h.request("GET", "/", headers={"origin": "https://other.test"}).request
    resp = h.response(req, 200)
    assert resp.headers["access-control-allow-origin"] == "https://other.test"
    assert resp.headers["access-control-allow-credentials"] == "true"


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://app.example.com", True),
        ("https://a.b.example.com", True),
        ("HTTPS://APP.EXAMPLE.COM", True),
        ("http://app.example.com", False),
        ("https://example.com", False),
        ("https://app.example.com.evil.test", False),
        ("https://evil.test/https://app.example.com", False),
        ("http://localhost:3000", True),
        ("http://localhost:30000", False),
        ("https://exact.test", True),
        ("https://EXACT.test", True),
        ("https://exact.test:8443", False),
        ("null", False),
    ],
)
def test_cors_origin_matching(origin: str, allowed: bool) -> None:
    h = PluginHarness(
        Cors,
        {
            "origins": [
                r"~https://([a-z0-9-]+\.)+example\.com",
                r"~http://localhost:\d{1,4}",
                "https://exact.test/",
            ]
        },
    )
    plugin = h.plugin
    assert isinstance(plugin, Cors)
    assert plugin.allowed(origin) is allowed
    resp = h.response(h.request("GET", "/", headers={"origin": origin}).request, 200)
    assert (resp.headers.get("access-control-allow-origin") == origin) is allowed


def test_cors_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"origins\[1\]: invalid regular expression '\(x'"):
        PluginHarness(Cors, {"origins": ["https://a.test", "~(x"]})
    with pytest.raises(msgspec.ValidationError, match="origins"):
        PluginHarness(Cors, {"origins": []})
    with pytest.raises(ValueError, match=r"headers\[0\]: 'x a' is not a valid header name"):
        PluginHarness(Cors, {"headers": ["x a"]})
    with pytest.raises(ValueError, match=r"methods\[0\]"):
        PluginHarness(Cors, {"methods": ["GE T"]})
    with pytest.raises(msgspec.ValidationError, match="max_age"):
        PluginHarness(Cors, {"max_age": -1})


def test_cors_answers_preflights_before_other_plugins_and_decorates_their_answers() -> None:
    h = PluginHarness([(RequestTermination, {"status": 401}), (Cors, {})])
    preflight = h.request("OPTIONS", "/", headers=PREFLIGHT)
    assert preflight.response is not None and preflight.response.status == 204
    out = h.request("GET", "/", headers={"origin": "https://app.example.com"})
    assert out.response is not None and out.response.status == 401
    # The data plane runs on_response on the early answer too.
    resp = h.response(out.request, 401, headers=out.response.headers.items())
    assert resp.headers["access-control-allow-origin"] == "*"


def test_cors_uses_the_origin_the_client_sent_even_if_a_later_plugin_drops_it() -> None:
    h = PluginHarness(
        [
            (RequestTransformer, {"remove": {"headers": ["origin"]}}),
            (Cors, {"origins": ["https://app.example.com"]}),
        ]
    )
    out = h.request("GET", "/", headers={"origin": "https://app.example.com"})
    assert "origin" not in out.request.headers
    resp = h.response(out.request, 200)
    assert resp.headers["access-control-allow-origin"] == "https://app.example.com"


# -- request-termination -----------------------------------------------------------------------


def test_termination_default_is_503_with_a_json_message() -> None:
    out = PluginHarness(RequestTermination, {}).request("GET", "/anything")
    assert out.response is not None
    assert out.response.status == 503
    assert out.response.headers["content-type"] == "application/json"
    assert json.loads(out.response.body or b"") == {"message": "Service Unavailable"}


def test_termination_with_message_status_and_headers() -> None:
    h = PluginHarness(
        RequestTermination,
        {"status": 403, "message": "Go away", "headers": {"Retry-After": "3600", "X-Reason": "x"}},
    )
    out = h.request("POST", "/")
    assert out.response is not None and out.response.status == 403
    assert json.loads(out.response.body or b"") == {"message": "Go away"}
    assert out.response.headers["retry-after"] == "3600"
    assert out.response.headers["x-reason"] == "x"


def test_termination_raw_body_and_content_type() -> None:
    h = PluginHarness(
        RequestTermination,
        {"status": 200, "body": "<h1>Maintenance</h1>", "content_type": "text/html"},
    )
    out = h.request()
    assert out.response is not None
    assert out.response.status == 200
    assert out.response.body == b"<h1>Maintenance</h1>"
    assert out.response.headers["content-type"] == "text/html"
    out = PluginHarness(RequestTermination, {"body": "down"}).request()
    assert out.response is not None
    assert out.response.headers["content-type"] == "text/plain; charset=utf-8"
    h = PluginHarness(RequestTermination, {"body": "x", "headers": {"content-type": "text/csv"}})
    out = h.request()
    assert out.response is not None
    assert out.response.headers.getall("content-type") == ["text/csv"]


def test_termination_statuses_without_a_body() -> None:
    out = PluginHarness(RequestTermination, {"status": 204}).request()
    assert out.response is not None and out.response.status == 204
    assert out.response.body == b""
    assert "content-type" not in out.response.headers
    with pytest.raises(ValueError, match="status: a 304 response has no body"):
        PluginHarness(RequestTermination, {"status": 304, "message": "x"})


def test_termination_echo_returns_the_request() -> None:
    h = PluginHarness(RequestTermination, {"status": 200, "echo": True, "message": "hi"})
    out = h.request(
        "PATCH",
        "/items/7",
        query="a=1&b=2&a=3&empty=",
        headers=[("X-Tag", "one"), ("x-tag", "two"), ("accept", "*/*")],
        client_ip="10.1.2.3",
        request_id="rid",
        host="api.test",
    )
    assert out.response is not None and out.response.status == 200
    assert out.response.headers["content-type"] == "application/json"
    assert json.loads(out.response.body or b"") == {
        "message": "hi",
        "request": {
            "method": "PATCH",
            "path": "/items/7",
            "query": {"a": ["1", "3"], "b": "2", "empty": ""},
            "headers": {"x-tag": ["one", "two"], "accept": "*/*"},
            "host": "api.test",
            "scheme": "http",
            "http_version": "HTTP/1.1",
            "client_ip": "10.1.2.3",
            "request_id": "rid",
        },
        "route": "test",
    }


@pytest.mark.parametrize(
    ("query", "headers", "terminated"),
    [
        ("", {}, False),
        ("other=1", {"x-other": "1"}, False),
        ("", {"X-Maintenance": "on"}, True),
        ("", {"x-maintenance": ""}, True),
        ("x-maintenance", {}, True),
        ("x-maintenance=1", {}, True),
        ("X-Maintenance=1", {}, False),  # query parameter names are case-sensitive
    ],
)
def test_termination_trigger(query: str, headers: dict[str, str], terminated: bool) -> None:
    h = PluginHarness(RequestTermination, {"trigger": "x-maintenance", "status": 418})
    out = h.request("GET", "/", query=query, headers=headers)
    if terminated:
        assert out.response is not None and out.response.status == 418
    else:
        assert out.response is None and out.decision is None


def test_termination_answers_are_fresh_for_every_request() -> None:
    h = PluginHarness(RequestTermination, {"headers": {"x-a": "1"}})
    first = h.request()
    assert first.response is not None
    resp = h.response(first.request, 503, headers=first.response.headers.items())
    resp.headers["x-a"] = "changed"
    second = h.request()
    assert second.response is not None and second.response.headers["x-a"] == "1"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"message": "a", "body": "b"}, "message and body"),
        ({"content_type": "text/plain"}, "content_type: only applies to `body`"),
        ({"echo": True, "body": "b"}, "echo: "),
        ({"headers": {"x a": "1"}}, "headers: 'x a' is not a valid header name"),
        ({"headers": {"x-a": "1\r\nx-b: 2"}}, r"headers\.x-a: .*CR, LF"),
        ({"status": 204, "echo": True}, "status: a 204 response has no body"),
        ({"trigger": ""}, "trigger: "),
    ],
)
def test_termination_settings_are_checked(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PluginHarness(RequestTermination, config)


def test_termination_status_range() -> None:
    with pytest.raises(msgspec.ValidationError, match="status"):
        PluginHarness(RequestTermination, {"status": 600})


def test_plugins_hold_no_state_between_requests() -> None:
    h = PluginHarness(RequestTransformer, {"append": {"headers": {"x-a": "1"}}})
    for _ in range(3):
        req: Request = h.request().request
        assert req.headers.getall("x-a") == ["1"]
