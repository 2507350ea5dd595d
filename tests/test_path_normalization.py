"""Routing decides on the normalized path: no spelling of a protected path reaches it
through another route.

A guarded route ``/admin/*`` (request-termination 403: its decision) sits beside a public
catch-all ``/*``. Every bypass attempt must get the guard's 403 or a 400, and neither
upstream may see the request. Requests go over raw sockets, since HTTP clients normalize
some of these paths themselves.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway import Gateway, GatewayFactory
from rawhttp import RawConnection, RawResponse
from upstreams import Upstream, UpstreamFactory


def raw_get(gw: Gateway, target: str, *, host: str = "gw.test") -> RawResponse:
    with RawConnection(gw.port) as conn:
        conn.send(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return conn.read_response()


@pytest.fixture
def guarded(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> tuple[Gateway, Upstream, Upstream]:
    admin = upstream_factory("admin")
    public = upstream_factory("public")
    config: dict[str, Any] = {
        "upstreams": {
            "admin": {"targets": [{"address": admin.address}]},
            "public": {"targets": [{"address": public.address}]},
        },
        "routes": [
            {
                "name": "admin",
                "paths": ["/admin/*"],
                "upstream": "admin",
                "plugins": [
                    {"name": "request-termination", "config": {"status": 403, "message": "no"}}
                ],
            },
            {"name": "public", "paths": ["/*"], "upstream": "public"},
        ],
    }
    return gateway(config, workers=1), admin, public


GUARDED = [
    "/admin/x",
    "/admin",
    "//admin/x",
    "///admin//x",
    "/./admin/x",
    "/admin/./x",
    "/public/../admin/x",
    "/public/./../admin/x",
    "/%61dmin/x",
    "/%61%64%6D%69%6E/x",
    "/public/%2e%2e/admin/x",
    "/public/%2E%2e/admin/x",
    "/public/.%2e/admin/x",
    "/public/x/%2e%2e/%2E%2E/admin/x",
    "/admin/../admin/x",
]

REFUSED = [
    "/%2e%2e/admin",
    "/..//admin/x",
    "/public/../../admin/x",
    "/public%2f..%2fadmin/x",
    "/public%2F..%2Fadmin/x",
    "/admin%2fx",
    "/%2fadmin/x",
    "/%5cadmin/x",
    "/public/..%5cadmin/x",
    "/\\admin/x",
    "/public\\..\\admin/x",
    "/%252e%252e/admin/x",
    "/public/%252e%252e/admin/x",
    "/%2561dmin/x",
    "/public/..;/admin/x",
    "/public/.;/../admin/x",
    "/admin%00/x",
    "/public/%zz/admin",
]


def test_every_spelling_of_the_protected_path_gets_its_decision_or_a_400(
    guarded: tuple[Gateway, Upstream, Upstream],
) -> None:
    gw, admin, public = guarded
    wrong = []
    for target in GUARDED:
        resp = raw_get(gw, target)
        if resp.status != 403 or resp.json() != {"message": "no"}:
            wrong.append((target, resp.status, resp.body[:200]))
    for target in REFUSED:
        resp = raw_get(gw, target)
        if resp.status != 400:
            wrong.append((target, resp.status, resp.body[:200]))
        elif resp.body:
            # The gateway's own 400 names what is wrong with the path (hyper's has no body).
            err = resp.json()
            assert isinstance(err, dict) and err["error"]["code"] == "bad_request", err
            assert "path" in err["error"]["message"], err
    assert wrong == []
    assert admin.count == 0
    assert public.count == 0


def test_absolute_form_targets_are_normalized_too(
    guarded: tuple[Gateway, Upstream, Upstream],
) -> None:
    gw, admin, public = guarded
    assert raw_get(gw, "http://gw.test//public/../admin/x").status == 403
    assert raw_get(gw, "http://gw.test/%2e%2e/admin").status == 400
    assert admin.count == 0 and public.count == 0


def test_case_is_kept_and_an_other_case_path_goes_only_to_the_public_upstream(
    guarded: tuple[Gateway, Upstream, Upstream],
) -> None:
    gw, admin, public = guarded
    resp = raw_get(gw, "/ADMIN/x")
    assert resp.status == 200
    assert resp.header("x-upstream") == "public"
    assert public.last().target == "/ADMIN/x"
    assert admin.count == 0


def test_the_upstream_gets_the_normalized_path_and_the_query_as_sent(
    guarded: tuple[Gateway, Upstream, Upstream],
) -> None:
    gw, admin, public = guarded
    cases = {
        "/public//a/./b/../c?q=%2e%2e/x&r=%2f": "/public/a/c?q=%2e%2e/x&r=%2f",
        "/admin/../public/%7euser/%41": "/public/~user/A",
        "/public/a%3fb%20c/": "/public/a%3Fb%20c/",
        "/public/a/b/..": "/public/a/",
        "/.well-known/x": "/.well-known/x",
    }
    for sent, forwarded in cases.items():
        resp = raw_get(gw, sent)
        assert resp.status == 200, (sent, resp.status, resp.body)
        assert public.last().target == forwarded, sent
    assert admin.count == 0


def test_plugins_see_the_normalized_path(gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = gateway(
        {
            "routes": [
                {
                    "paths": ["/*"],
                    "upstream": upstream.url,
                    "plugins": [
                        {"name": "request-termination", "config": {"echo": True, "status": 200}}
                    ],
                }
            ]
        },
        workers=1,
    )
    resp = raw_get(gw, "/a//b/%2e%2e/%63?x=1")
    assert resp.status == 200
    echoed = resp.json()
    assert isinstance(echoed, dict)
    assert echoed["request"]["path"] == "/a/c"
