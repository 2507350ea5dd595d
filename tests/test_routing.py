"""Routing: path patterns, precedence, hosts, predicates, priority, and path rewriting."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import Gateway, GatewayFactory
from upstreams import Upstream, UpstreamFactory


@pytest.fixture
def abc(upstream_factory: UpstreamFactory) -> dict[str, Upstream]:
    """Three upstreams; each answers with its own name, so the route taken is visible."""
    return {name: upstream_factory(name) for name in ("a", "b", "c")}


def config(ups: dict[str, Upstream], *routes: dict[str, Any]) -> dict[str, Any]:
    return {
        "upstreams": {name: {"targets": [u.address]} for name, u in ups.items()},
        "routes": list(routes),
    }


def routed_to(gw: Gateway, path: str, method: str = "GET", **kwargs: Any) -> str | int:
    """The name of the upstream that answered, or the status if the gateway answered itself."""
    resp = gw.request(method, path, **kwargs)
    if resp.status_code == 200 and "x-upstream" in resp.headers:
        return resp.headers["x-upstream"]
    return resp.status_code


def test_param_matches_exactly_one_segment(
    gateway: GatewayFactory, abc: dict[str, Upstream]
) -> None:
    gw = gateway(config(abc, {"paths": ["/users/{id}"], "upstream": "a"}))
    assert routed_to(gw, "/users/42") == "a"
    assert abc["a"].last().target == "/users/42"
    assert routed_to(gw, "/users/42/orders") == 404
    assert routed_to(gw, "/users") == 404


def test_catch_all_matches_the_rest_of_the_path(
    gateway: GatewayFactory, abc: dict[str, Upstream]
) -> None:
    gw = gateway(config(abc, {"paths": ["/static/{*file}"], "upstream": "a"}))
    assert routed_to(gw, "/static/css/site/app.css") == "a"
    assert abc["a"].last().target == "/static/css/site/app.css"
    assert routed_to(gw, "/static/x") == "a"
    assert routed_to(gw, "/other/x") == 404


def test_prefix_pattern_matches_itself_and_everything_below(
    gateway: GatewayFactory, abc: dict[str, Upstream]
) -> None:
    gw = gateway(config(abc, {"paths": ["/api/*"], "upstream": "a"}))
    for path in ["/api", "/api/", "/api/v1", "/api/v1/users/7"]:
        assert routed_to(gw, path) == "a", path
        assert abc["a"].last().target == path
    assert routed_to(gw, "/apix") == 404
    assert routed_to(gw, "/ap") == 404


def test_static_beats_param_beats_catch_all(
    gateway: GatewayFactory, abc: dict[str, Upstream]
) -> None:
    # listed in the opposite order of their precedence
    gw = gateway(
        config(
            abc,
            {"name": "catch-all", "paths": ["/u/{*rest}"], "upstream": "c"},
            {"name": "param", "paths": ["/u/{id}"], "upstream": "b"},
            {"name": "static", "paths": ["/u/me"], "upstream": "a"},
        )
    )
    assert routed_to(gw, "/u/me") == "a"
    assert routed_to(gw, "/u/7") == "b"
    assert routed_to(gw, "/u/7/photos") == "c"


def test_exact_host_beats_wildcard_beats_no_host(
    gateway: GatewayFactory, abc: dict[str, Upstream]
) -> None:
    gw = gateway(
        config(
            abc,
            {"name": "any", "paths": ["/h"], "upstream": "c"},
            {"name": "wild", "paths": ["/h"], "hosts": ["*.example.test"], "upstream": "b"},
            {"name": "exact", "paths": ["/h"], "hosts": ["api.example.test"], "upstream": "a"},
        )
    )
    assert routed_to(gw, "/h", headers={"Host": "api.example.test"}) == "a"
    assert routed_to(gw, "/h", headers={"Host": "shop.example.test"}) == "b"
    assert routed_to(gw, "/h", headers={"Host": "elsewhere.test"}) == "c"


def test_longest_wildcard_host_wins(gateway: GatewayFactory, abc: dict[str, Upstream]) -> None:
    gw = gateway(
        config(
            abc,
            {"paths": ["/h"], "hosts": ["*.example.test"], "upstream": "b"},
            {"paths": ["/h"], "hosts": ["*.eu.example.test"], "upstream": "a"},
        )
    )
    assert routed_to(gw, "/h", headers={"Host": "shop.eu.example.test"}) == "a"
    assert routed_to(gw, "/h", headers={"Host": "shop.us.example.test"}) == "b"
    assert routed_to(gw, "/h", headers={"Host": "example.org"}) == 404


def test_host_tier_falls_back_when_no_route_in_it_matches(
    gateway: GatewayFactory, abc: dict[str, Upstream]
) -> None:
    gw = gateway(
        config(
            abc,
            {"paths": ["/only-exact"], "hosts": ["api.example.test"], "upstream": "a"},
            {"paths": ["/shared"], "upstream": "c"},
        )
    )
    assert routed_to(gw, "/only-exact", headers={"Host": "api.example.test"}) == "a"
    assert routed_to(gw, "/shared", headers={"Host": "api.example.test"}) == "c"
    assert routed_to(gw, "/only-exact", headers={"Host": "other.test"}) == 404


def test_host_match_ignores_the_port(gateway: GatewayFactory, abc: dict[str, Upstream]) -> None:
    gw = gateway(config(abc, {"paths": ["/h"], "hosts": ["api.example.test"], "upstream": "a"}))
    assert routed_to(gw, "/h", headers={"Host": "api.example.test:8080"}) == "a"


def test_methods_restrict_a_route(gateway: GatewayFactory, abc: dict[str, Upstream]) -> None:
    gw = gateway(
        config(
            abc,
            {"paths": ["/m"], "upstream": "b"},
            {"paths": ["/m"], "methods": ["POST", "PUT"], "upstream": "a"},
            {"paths": ["/get-only"], "methods": ["GET"], "upstream": "c"},
        )
    )
    assert routed_to(gw, "/m", "POST", content=b"{}") == "a"
    assert routed_to(gw, "/m", "PUT", content=b"{}") == "a"
    assert routed_to(gw, "/m") == "b"
    assert routed_to(gw, "/get-only") == "c"
    assert routed_to(gw, "/get-only", "DELETE") == 404


def test_header_predicate_exact_value(gateway: GatewayFactory, abc: dict[str, Upstream]) -> None:
    gw = gateway(
        config(
            abc,
            {"paths": ["/e"], "upstream": "b"},
            {"paths": ["/e"], "headers": [{"name": "X-Env", "value": "prod"}], "upstream": "a"},
        )
    )
    assert routed_to(gw, "/e", headers={"x-env": "prod"}) == "a"
    assert routed_to(gw, "/e", headers={"X-ENV": "prod"}) == "a"
    assert routed_to(gw, "/e", headers={"X-Env": "prod2"}) == "b"
    assert routed_to(gw, "/e", headers={"X-Env": "staging"}) == "b"
    assert routed_to(gw, "/e") == "b"


def test_header_predicate_regex(gateway: GatewayFactory, abc: dict[str, Upstream]) -> None:
    gw = gateway(
        config(
            abc,
            {"paths": ["/r"], "upstream": "c"},
            {
                "paths": ["/r"],
                "headers": [{"name": "X-Version", "regex": "^v[12]$"}],
                "upstream": "a",
            },
            {"paths": ["/r"], "headers": [{"name": "X-Channel", "regex": "beta"}], "upstream": "b"},
        )
    )
    assert routed_to(gw, "/r", headers={"X-Version": "v1"}) == "a"
    assert routed_to(gw, "/r", headers={"X-Version": "v2"}) == "a"
    assert routed_to(gw, "/r", headers={"X-Version": "v3"}) == "c"
    assert routed_to(gw, "/r", headers={"X-Version": "v12"}) == "c"
    # unanchored: a match anywhere in the value
    assert routed_to(gw, "/r", headers={"X-Channel": "pre-beta-2"}) == "b"
    assert routed_to(gw, "/r", headers={"X-Channel": "stable"}) == "c"


def test_query_predicate_on_decoded_value(
    gateway: GatewayFactory, abc: dict[str, Upstream]
) -> None:
    gw = gateway(
        config(
            abc,
            {"paths": ["/q"], "upstream": "c"},
            {"paths": ["/q"], "query": [{"name": "debug", "value": "1"}], "upstream": "a"},
            {"paths": ["/q"], "query": [{"name": "who", "value": "a b"}], "upstream": "b"},
        )
    )
    assert routed_to(gw, "/q?debug=1") == "a"
    assert abc["a"].last().target == "/q?debug=1"
    assert routed_to(gw, "/q?x=2&debug=1") == "a"
    assert routed_to(gw, "/q?debug=0") == "c"
    assert routed_to(gw, "/q") == "c"
    assert routed_to(gw, "/q?who=a%20b") == "b"


def test_higher_priority_wins_on_the_same_pattern(
    gateway: GatewayFactory, abc: dict[str, Upstream]
) -> None:
    gw = gateway(
        config(
            abc,
            {"paths": ["/p"], "upstream": "a"},
            {"paths": ["/p"], "priority": 5, "upstream": "b"},
            {"paths": ["/p"], "priority": 1, "upstream": "c"},
        )
    )
    assert routed_to(gw, "/p") == "b"


def test_priority_outranks_predicate_count(
    gateway: GatewayFactory, abc: dict[str, Upstream]
) -> None:
    gw = gateway(
        config(
            abc,
            {"paths": ["/p"], "headers": [{"name": "X-A", "value": "1"}], "upstream": "a"},
            {"paths": ["/p"], "priority": 1, "upstream": "b"},
        )
    )
    assert routed_to(gw, "/p", headers={"X-A": "1"}) == "b"


def test_more_predicates_win_then_file_order(
    gateway: GatewayFactory, abc: dict[str, Upstream]
) -> None:
    gw = gateway(
        config(
            abc,
            {"paths": ["/p"], "upstream": "c"},
            {"paths": ["/p"], "methods": ["GET"], "upstream": "b"},
            {"paths": ["/p"], "upstream": "a"},
            {
                "paths": ["/p"],
                "methods": ["GET"],
                "headers": [{"name": "X-A", "value": "1"}],
                "upstream": "a",
            },
        )
    )
    assert routed_to(gw, "/p", headers={"X-A": "1"}) == "a"
    assert routed_to(gw, "/p") == "b"
    # among the predicate-less routes, the first in the file wins
    assert routed_to(gw, "/p", "POST", content=b"") == "c"


def test_strip_prefix_removes_the_prefix(gateway: GatewayFactory, abc: dict[str, Upstream]) -> None:
    gw = gateway(config(abc, {"paths": ["/svc/*"], "strip_prefix": True, "upstream": "a"}))
    assert routed_to(gw, "/svc/users/7") == "a"
    assert abc["a"].last().target == "/users/7"
    assert routed_to(gw, "/svc/users/7?x=1&y=2") == "a"
    assert abc["a"].last().target == "/users/7?x=1&y=2"
    assert routed_to(gw, "/svc") == "a"
    assert abc["a"].last().target == "/"


def test_rewrite_fills_in_path_params(gateway: GatewayFactory, abc: dict[str, Upstream]) -> None:
    gw = gateway(
        config(
            abc,
            {"paths": ["/api/users/{id}"], "rewrite": "/v2/accounts/{id}/profile", "upstream": "a"},
            {"paths": ["/files/{*path}"], "rewrite": "/store/{path}", "upstream": "b"},
        )
    )
    assert routed_to(gw, "/api/users/42") == "a"
    assert abc["a"].last().target == "/v2/accounts/42/profile"
    assert routed_to(gw, "/files/img/2024/cat.png") == "b"
    assert abc["b"].last().target == "/store/img/2024/cat.png"


def test_rewrite_keeps_the_query_string(gateway: GatewayFactory, abc: dict[str, Upstream]) -> None:
    gw = gateway(config(abc, {"paths": ["/u/{id}"], "rewrite": "/users/{id}", "upstream": "a"}))
    assert routed_to(gw, "/u/9?fields=name") == "a"
    assert abc["a"].last().target == "/users/9?fields=name"


def test_upstream_url_with_base_path(gateway: GatewayFactory, abc: dict[str, Upstream]) -> None:
    a = abc["a"]
    gw = gateway(
        {
            "routes": [
                {"paths": ["/x/{*rest}"], "upstream": f"{a.url}/base"},
                {"paths": ["/y/*"], "strip_prefix": True, "upstream": f"{a.url}/mounted/"},
            ]
        }
    )
    assert routed_to(gw, "/x/a/b?k=v") == "a"
    assert a.last().target == "/base/x/a/b?k=v"
    assert routed_to(gw, "/y/items/3") == "a"
    assert a.last().target == "/mounted/items/3"


def test_path_is_forwarded_without_decoding(
    gateway: GatewayFactory, abc: dict[str, Upstream]
) -> None:
    gw = gateway(config(abc, {"paths": ["/files/{name}"], "upstream": "a"}))
    assert routed_to(gw, "/files/a%20b%3Fc") == "a"
    assert abc["a"].last().target == "/files/a%20b%3Fc"
    # An encoded slash is refused (see test_path_normalization.py), never decoded.
    assert routed_to(gw, "/files/a%20b%2Fc") == 400


def test_no_route_is_404_json_with_request_id(
    gateway: GatewayFactory, abc: dict[str, Upstream]
) -> None:
    gw = gateway(config(abc, {"paths": ["/known"], "upstream": "a"}))
    resp = gw.get("/unknown/path")
    assert resp.status_code == 404
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["status"] == 404
    assert error["code"] == "no_route"
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["request_id"]
    assert resp.headers["x-request-id"] == error["request_id"]
    assert abc["a"].count == 0
