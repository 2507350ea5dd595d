"""request-validation through a real gateway: requests that follow the OpenAPI document (3.0
or 3.1) or the JSON Schemas reach the upstream unchanged; each kind of failure gets its
status, names the field, and never reaches the upstream."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway import Gateway, GatewayFactory, run_cli
from upstreams import Upstream

SPEC_30 = """
openapi: 3.0.3
info: {title: pets, version: "1"}
servers: [{url: /api}]
paths:
  /pets:
    get:
      parameters:
        - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 100}}
        - name: tags
          in: query
          schema: {type: array, items: {type: string, enum: [cat, dog]}}
        - {name: x-tenant, in: header, required: true, schema: {type: string, pattern: "^[a-z]+$"}}
      responses: {"200": {description: ok}}
    post:
      requestBody:
        required: true
        content:
          application/json:
            schema: {$ref: "#/components/schemas/NewPet"}
      responses: {"201": {description: created}}
  /pets/{petId}:
    parameters: [{$ref: "#/components/parameters/PetId"}]
    get:
      responses: {"200": {description: ok}}
  /pets/mine:
    get:
      responses: {"200": {description: ok}}
components:
  parameters:
    PetId: {name: petId, in: path, required: true, schema: {type: integer, format: int64}}
  schemas:
    NewPet:
      type: object
      additionalProperties: false
      required: [name]
      properties:
        name: {type: string, minLength: 1}
        nickname: {type: string, nullable: true}
        items: {type: array, items: {$ref: "#/components/schemas/Item"}}
    Item:
      type: object
      properties:
        price: {type: number, minimum: 0}
"""

SPEC_31 = """
openapi: 3.1.0
info: {title: orders, version: "1"}
paths:
  /orders/{id}:
    put:
      parameters:
        - {name: id, in: path, required: true, schema: {type: string, format: uuid}}
        - {name: dry_run, in: query, schema: {type: boolean}}
        - name: ids
          in: query
          style: form
          explode: false
          schema: {type: array, items: {type: integer}}
      requestBody:
        content:
          application/json:
            schema:
              type: object
              required: [qty]
              properties:
                qty: {type: integer, exclusiveMinimum: 0}
                note: {type: ["string", "null"], maxLength: 10}
      responses: {"200": {description: ok}}
"""

ORDER = "/orders/6f1c5a8e-3b7d-4c2a-9e10-2b5f7d9a1c34"


@pytest.fixture
def specs(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name, text in (("pets.yaml", SPEC_30), ("orders.yaml", SPEC_31)):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        out[name] = str(path)
    return out


@pytest.fixture
def gw(gateway: GatewayFactory, upstream: Upstream, specs: dict[str, str]) -> Gateway:
    def validation(config: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"name": "request-validation", "config": config}]

    schemas = {
        "query": {"type": "object", "properties": {"page": {"type": "integer", "minimum": 1}}},
        "headers": {"type": "object", "required": ["x-client"]},
        "body": {
            "type": "object",
            "properties": {"email": {"type": "string", "maxLength": 20}},
            "required": ["email"],
        },
    }
    return gateway(
        {
            "routes": [
                {
                    "paths": ["/api/*"],
                    "upstream": upstream.url,
                    "plugins": validation({"openapi": specs["pets.yaml"]}),
                },
                {
                    "paths": ["/orders/*"],
                    "upstream": upstream.url,
                    "plugins": validation({"openapi": specs["orders.yaml"]}),
                },
                {
                    "paths": ["/lenient/*"],
                    "upstream": upstream.url,
                    "plugins": validation(
                        {
                            "openapi": specs["pets.yaml"],
                            "base_path": "/lenient",
                            "unknown_operation": "pass",
                        }
                    ),
                },
                {"paths": ["/signup"], "upstream": upstream.url, "plugins": validation(schemas)},
            ]
        },
        workers=1,
    )


def refused(
    resp: httpx.Response,
    status: int,
    code: str,
    where: str | None = None,
    field: str | None = None,
    words: str = "",
) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    err: dict[str, Any] = resp.json()["error"]
    assert err["code"] == code
    assert err["request_id"] == resp.headers["x-request-id"]
    if where is not None:
        assert (err["in"], err["field"]) == (where, field), err
    assert words in err["message"], err["message"]
    return err


def test_valid_requests_reach_the_upstream_unchanged(gw: Gateway, upstream: Upstream) -> None:
    r = httpx.get(gw.url + "/api/pets?limit=5&tags=cat&tags=dog", headers={"x-tenant": "acme"})
    assert r.status_code == 200, r.text
    assert upstream.last().target == "/api/pets?limit=5&tags=cat&tags=dog"

    body = b'{"name": "Rex", "nickname": null, "items": [{"price": 0}, {"price": 2.5}]}'
    r = httpx.post(
        gw.url + "/api/pets",
        content=body,
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 200, r.text
    assert upstream.last().body_head == body  # byte for byte

    assert httpx.get(gw.url + "/api/pets/12").status_code == 200
    assert httpx.get(gw.url + "/api/pets/mine").status_code == 200  # concrete path wins
    assert httpx.head(gw.url + "/api/pets/12").status_code == 200  # HEAD as GET

    r = httpx.put(gw.url + ORDER + "?dry_run=true&ids=1,2,3", json={"qty": 2, "note": None})
    assert r.status_code == 200, r.text
    assert httpx.put(gw.url + ORDER).status_code == 200  # the body is optional there

    r = httpx.post(gw.url + "/signup?page=2", json={"email": "a@b.c"}, headers={"x-client": "w"})
    assert r.status_code == 200, r.text
    assert upstream.count == 8


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "where", "field", "words"),
    [
        (
            "GET",
            "/api/pets/abc",
            {},
            "path",
            "/petId",
            "path.petId: 'abc' is not of type 'integer'",
        ),
        (
            "GET",
            "/api/pets?limit=500",
            {"headers": {"x-tenant": "a"}},
            "query",
            "/limit",
            "query.limit: 500 is greater than the maximum of 100",
        ),
        (
            "GET",
            "/api/pets?limit=ten",
            {"headers": {"x-tenant": "a"}},
            "query",
            "/limit",
            "'ten' is not of type 'integer'",
        ),
        (
            "GET",
            "/api/pets?tags=cat&tags=cow",
            {"headers": {"x-tenant": "a"}},
            "query",
            "/tags/1",
            "query.tags[1]: 'cow' is not one of",
        ),
        (
            "GET",
            "/api/pets",
            {"headers": {"x-tenant": "ACME"}},
            "header",
            "/x-tenant",
            "does not match",
        ),
        ("GET", "/api/pets", {}, "header", "/x-tenant", "the required parameter is missing"),
        (
            "POST",
            "/api/pets",
            {"json": {"name": "Rex", "items": [{"price": -1}]}},
            "body",
            "/items/0/price",
            "body.items[0].price: -1 is less than the minimum of 0",
        ),
        (
            "POST",
            "/api/pets",
            {"json": {"nickname": "x"}},
            "body",
            "/name",
            "'name' is a required property",
        ),
        (
            "POST",
            "/api/pets",
            {"json": {"name": 7}},
            "body",
            "/name",
            "body.name: 7 is not of type 'string'",
        ),
        (
            "POST",
            "/api/pets",
            {"json": {"name": "Rex", "colour": "red"}},
            "body",
            "/colour",
            "Additional properties are not allowed",
        ),
        (
            "POST",
            "/api/pets",
            {"headers": {"content-type": "application/json"}},
            "body",
            "",
            "a request body is required",
        ),
        ("PUT", ORDER[:-1], {"json": {"qty": 1}}, "path", "/id", "is not a 'uuid'"),
        (
            "PUT",
            ORDER + "?ids=1,x",
            {"json": {"qty": 1}},
            "query",
            "/ids/1",
            "'x' is not of type 'integer'",
        ),
        (
            "PUT",
            ORDER + "?dry_run=maybe",
            {"json": {"qty": 1}},
            "query",
            "/dry_run",
            "'maybe' is not of type 'boolean'",
        ),
        ("PUT", ORDER, {"json": {"qty": 0}}, "body", "/qty", "less than or equal to the minimum"),
        ("PUT", ORDER, {"json": {"qty": 1, "note": "x" * 11}}, "body", "/note", "is too long"),
        (
            "POST",
            "/signup?page=0",
            {"json": {"email": "a"}, "headers": {"x-client": "w"}},
            "query",
            "/page",
            "query.page: 0 is less than the minimum of 1",
        ),
        (
            "POST",
            "/signup",
            {"json": {"email": "a"}},
            "header",
            "/x-client",
            "'x-client' is a required property",
        ),
        (
            "POST",
            "/signup",
            {"json": {"email": "a" * 30}, "headers": {"x-client": "w"}},
            "body",
            "/email",
            "is too long",
        ),
    ],
)
def test_each_failure_names_its_field(
    gw: Gateway,
    upstream: Upstream,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    where: str,
    field: str,
    words: str,
) -> None:
    r = httpx.request(method, gw.url + path, **kwargs)
    err = refused(r, 400, "invalid_request", where, field, words)
    assert err["errors"][0] == {"in": where, "field": field, "message": err["message"]}
    assert upstream.count == 0


def test_several_problems_are_listed_and_long_values_cut(gw: Gateway, upstream: Upstream) -> None:
    huge = "z" * 100_000
    r = httpx.post(gw.url + "/api/pets", json={"name": "R", "items": huge, "more": 1})
    err = refused(r, 400, "invalid_request", words="(and 1 more)")
    assert {(e["in"], e["field"]) for e in err["errors"]} == {("body", "/more"), ("body", "/items")}
    assert len(r.content) < 2000  # the value is not echoed back whole
    assert upstream.count == 0


def test_body_format_failures(gw: Gateway, upstream: Upstream) -> None:
    r = httpx.post(
        gw.url + "/api/pets", content=b'{"name": ', headers={"content-type": "application/json"}
    )
    refused(r, 400, "invalid_json", words="not valid JSON")
    r = httpx.post(
        gw.url + "/api/pets", content=b"name=Rex", headers={"content-type": "text/plain"}
    )
    refused(r, 415, "unsupported_media_type", words="must be application/json, not text/plain")
    r = httpx.post(
        gw.url + "/signup",
        content=b"<a/>",
        headers={"content-type": "application/xml", "x-client": "w"},
    )
    refused(r, 415, "unsupported_media_type")
    r = httpx.post(
        gw.url + "/api/pets",
        content=b"\x1f\x8b...",
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    refused(r, 415, "unsupported_media_type", words="Content-Encoding gzip")
    r = httpx.post(
        gw.url + "/api/pets",
        content=b'{"name": "' + b"x" * (2 << 20) + b'"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413  # above max_body (1 MiB), before any parsing
    assert upstream.count == 0


def test_unknown_operations(gw: Gateway, upstream: Upstream) -> None:
    refused(httpx.get(gw.url + "/api/owners"), 404, "unknown_operation", words="/api/owners")
    r = httpx.delete(gw.url + "/api/pets/12")
    refused(r, 405, "method_not_allowed", words="allowed: GET")
    assert r.headers["allow"] == "GET"
    assert upstream.count == 0
    # unknown_operation: pass lets them through, and still checks the known ones.
    assert httpx.get(gw.url + "/lenient/owners").status_code == 200
    assert upstream.count == 1
    refused(httpx.get(gw.url + "/lenient/pets/abc"), 400, "invalid_request", "path", "/petId")
    assert upstream.count == 1


def check(tmp_path: Path, plugin_config: dict[str, Any]) -> str:
    config = {
        "listen": ["127.0.0.1:1"],
        "routes": [
            {
                "paths": ["/*"],
                "upstream": "http://127.0.0.1:9",
                "plugins": [{"name": "request-validation", "config": plugin_config}],
            }
        ],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = run_cli("check", str(path))
    assert out.returncode != 0, out.stdout
    return out.stdout + out.stderr


def test_check_refuses_bad_specs_with_file_and_reason(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("openapi: 3.0.3\ninfo: {title: x, version: '1'}\npaths: {/a: {get: {}}\n")
    out = check(tmp_path, {"openapi": str(broken)})
    assert f"{broken} does not parse" in out
    assert "gateway.yaml:10:7: routes[0].plugins[0].config: " in out  # with its place

    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps({"openapi": "3.0.3", "info": {"title": "x"}, "paths": {}}))
    out = check(tmp_path, {"openapi": str(invalid)})
    assert f"{invalid} is not a valid OpenAPI 3.0.3 document" in out
    # The spec validator words it as its JSON Schema backend does (jsonschema or jsonschema-rs).
    assert re.search(r"""['"]version['"] is a required property""", out), out

    dangling = tmp_path / "dangling.yaml"
    dangling.write_text(
        textwrap.dedent("""
        openapi: 3.1.0
        info: {title: x, version: '1'}
        paths:
          /a:
            post:
              requestBody:
                content: {application/json: {schema: {$ref: '#/components/schemas/Nope'}}}
              responses: {'200': {description: ok}}
    """)
    )
    out = check(tmp_path, {"openapi": str(dangling)})
    assert f"{dangling}: $ref '#/components/schemas/Nope'" in out and "leads nowhere" in out

    out = check(tmp_path, {"openapi": str(tmp_path / "missing.yaml")})
    assert "missing.yaml: No such file or directory" in out

    out = check(tmp_path, {"body": {"type": "objekt"}})
    assert "body: is not a valid JSON Schema" in out and "objekt" in out
