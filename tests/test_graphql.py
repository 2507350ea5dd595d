"""The graphql plugin on a real gateway in front of a real GraphQL server (graphql-core):
parsing, schema validation, depth and cost limits, persisted queries (automatic and
allow-list), field rules by consumer group and a field authorization plugin."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import Gateway, GatewayFactory, run_cli
from graphql_upstream import SDL, GraphQLUpstream

PLUGINS_DIR = str(Path(__file__).parent / "graphql_plugins")
ALICE_KEY = "alice-graphql-key-1234"
BOB_KEY = "bob-graphql-key-5678"
GRAPHQL_RESPONSE = "application/graphql-response+json"


@pytest.fixture
def gql() -> Iterator[GraphQLUpstream]:
    server = GraphQLUpstream()
    yield server
    server.close()


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def start(
    gateway: GatewayFactory,
    up: GraphQLUpstream,
    tmp_path: Path,
    config: dict[str, Any] | None = None,
    *,
    plugins: list[dict[str, Any]] | None = None,
    with_schema: bool = True,
    **top: Any,
) -> Gateway:
    schema = tmp_path / "schema.graphql"
    schema.write_text(SDL)
    settings: dict[str, Any] = {"schema": str(schema)} if with_schema else {}
    settings.update(config or {})
    doc: dict[str, Any] = {
        "routes": [
            {
                "name": "graphql",
                "paths": ["/graphql"],
                "upstream": f"http://{up.address}",
                # Listed last, run before the field authorizers: priorities decide the order.
                "plugins": [*(plugins or []), {"name": "graphql", "config": settings}],
            }
        ],
        **top,
    }
    gw = gateway(doc, workers=1)
    up.reset()
    return gw


def post(gw: Gateway, body: Any, **headers: str) -> httpx.Response:
    return gw.request("POST", "/graphql", json=body, headers=headers)


def error_of(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    errors = resp.json()["errors"]
    assert len(errors) == 1, errors
    assert errors[0]["extensions"]["code"] == code, errors
    assert "data" not in resp.json()
    return dict(errors[0])


def test_queries_and_mutations_reach_the_upstream(
    gateway: GatewayFactory, gql: GraphQLUpstream, tmp_path: Path
) -> None:
    gw = start(gateway, gql, tmp_path)
    resp = post(gw, {"query": "{ users(first: 2) { name friends(first: 1) { name } } }"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "data": {
            "users": [
                {"name": "ada", "friends": [{"name": "bob"}]},
                {"name": "bob", "friends": [{"name": "cyd"}]},
            ]
        }
    }
    # Variables and operationName go through as sent.
    query = "query Greet($n: String) { hello(name: $n) } query Other { secret }"
    resp = post(gw, {"query": query, "operationName": "Greet", "variables": {"n": "x"}})
    assert resp.json() == {"data": {"hello": "hello x"}}
    assert gql.last().body == {"query": query, "operationName": "Greet", "variables": {"n": "x"}}

    resp = post(gw, {"query": 'mutation { addUser(name: "zed") { id name } }'})
    assert resp.json() == {"data": {"addUser": {"id": "0", "name": "zed"}}}

    resp = gw.get("/graphql", params={"query": "{ hello }"})
    assert resp.json() == {"data": {"hello": "hello world"}}
    assert gql.last().method == "GET"
    assert len(gql.seen) == 4

    # A mutation over GET is refused (GET must be safe), as the spec says.
    resp = gw.get("/graphql", params={"query": 'mutation { addUser(name: "x") { id } }'})
    assert error_of(resp, 405, "METHOD_NOT_ALLOWED")
    assert resp.headers["allow"] == "POST"
    # Batches and other methods are refused clearly.
    error_of(post(gw, [{"query": "{ hello }"}]), 400, "BATCHING_NOT_SUPPORTED")
    resp = gw.request("PUT", "/graphql", json={"query": "{ hello }"})
    assert error_of(resp, 405, "METHOD_NOT_ALLOWED") and resp.headers["allow"] == "GET, POST"
    resp = gw.request("POST", "/graphql", content=b"{ hello }", headers={"content-type": "text/x"})
    error_of(resp, 415, "BAD_REQUEST")
    assert len(gql.seen) == 4


def test_syntax_errors_are_answered_at_the_gateway(
    gateway: GatewayFactory, gql: GraphQLUpstream, tmp_path: Path
) -> None:
    gw = start(gateway, gql, tmp_path, with_schema=False)
    resp = post(gw, {"query": "{ users { name }"})
    err = error_of(resp, 400, "GRAPHQL_PARSE_FAILED")
    assert err["locations"] == [{"line": 1, "column": 17}]
    assert "Expected Name" in err["message"] or "Syntax Error" in err["message"]
    assert resp.headers["content-type"] == "application/json; charset=utf-8"
    # A client that accepts the GraphQL response media type gets it.
    resp = post(gw, {"query": "{ users {"}, accept=f"{GRAPHQL_RESPONSE}, application/json;q=0.9")
    error_of(resp, 400, "GRAPHQL_PARSE_FAILED")
    assert resp.headers["content-type"] == f"{GRAPHQL_RESPONSE}; charset=utf-8"
    resp = gw.get("/graphql", params={"query": "{"})
    error_of(resp, 400, "GRAPHQL_PARSE_FAILED")
    error_of(post(gw, {"variables": {}}), 400, "BAD_REQUEST")
    assert gql.seen == []
    # Without a schema, fields the upstream does not know still go through: it answers.
    resp = post(gw, {"query": "{ nosuchfield }"})
    assert resp.status_code == 200 and resp.json()["errors"]
    assert len(gql.seen) == 1


def test_operations_are_validated_against_the_schema(
    gateway: GatewayFactory, gql: GraphQLUpstream, tmp_path: Path
) -> None:
    gw = start(gateway, gql, tmp_path)
    resp = post(gw, {"query": "{ users { name nosuchfield } }"})
    err = error_of(resp, 400, "GRAPHQL_VALIDATION_FAILED")
    assert "nosuchfield" in err["message"] and err["locations"] == [{"line": 1, "column": 16}]
    error_of(post(gw, {"query": "{ user { name } }"}), 400, "GRAPHQL_VALIDATION_FAILED")
    resp = post(gw, {"query": "query A { hello } query B { secret }"})
    error_of(resp, 400, "OPERATION_RESOLUTION_FAILURE")
    assert gql.seen == []
    assert post(gw, {"query": '{ user(id: "3") { name } }'}).json() == {
        "data": {"user": {"name": "dee"}}
    }


def test_depth_limit_counts_fragments(
    gateway: GatewayFactory, gql: GraphQLUpstream, tmp_path: Path
) -> None:
    gw = start(gateway, gql, tmp_path, {"max_depth": 3})
    ok = "{ users { friends { name } } }"
    assert post(gw, {"query": ok}).status_code == 200
    deep = "{ users { friends { friends { name } } } }"
    err = error_of(post(gw, {"query": deep}), 400, "QUERY_TOO_DEEP")
    assert err["extensions"] == {"code": "QUERY_TOO_DEEP", "depth": 4, "maxDepth": 3}
    # The same depth hidden in fragments is measured the same.
    hidden = (
        "{ users { ...F } } fragment F on User { friends { ...G } } "
        "fragment G on User { friends { name } }"
    )
    err = error_of(post(gw, {"query": hidden}), 400, "QUERY_TOO_DEEP")
    assert err["extensions"]["depth"] == 4
    assert len(gql.seen) == 1 and gql.last().document == ok


def test_complexity_limit_with_list_sizes(
    gateway: GatewayFactory, gql: GraphQLUpstream, tmp_path: Path
) -> None:
    config = {"max_complexity": 200, "cost": {"fields": {"Query.secret": 150}}}
    gw = start(gateway, gql, tmp_path, config)
    # users(first: 100) { name friends(first: 100) { name } }: 1 + 100 * (1 + 1 + 100 * 1)
    big = "query Big { users(first: 100) { name friends(first: 100) { name } } }"
    err = error_of(post(gw, {"query": big}), 400, "QUERY_TOO_COMPLEX")
    assert err["extensions"] == {
        "code": "QUERY_TOO_COMPLEX",
        "complexity": 10201,
        "maxComplexity": 200,
    }
    # Sizes given as variables count the same.
    by_var = "query V($n: Int) { users(first: $n) { name friends(first: $n) { name } } }"
    resp = post(gw, {"query": by_var, "variables": {"n": 100}})
    assert error_of(resp, 400, "QUERY_TOO_COMPLEX")["extensions"]["complexity"] == 10201
    small = post(gw, {"query": by_var, "variables": {"n": 3}})
    assert small.status_code == 200 and len(small.json()["data"]["users"]) == 3
    # Without a size argument a list counts as the default list size (10), the schema's
    # argument default applying: users(first = 10) { friends(first = 10) { id } } = 1 + 10 * 11.
    assert post(gw, {"query": "{ users { friends { id } } }"}).status_code == 200
    frag = "{ users { ...U } } fragment U on User { friends { ...V } } fragment V on User { id }"
    assert post(gw, {"query": frag}).status_code == 200
    three = "{ users { friends { posts { id } } } }"  # 1 + 10 * (1 + 10 * (1 + 10 * 1))
    err = error_of(post(gw, {"query": three}), 400, "QUERY_TOO_COMPLEX")
    assert err["extensions"]["complexity"] == 1111
    # Per-field costs.
    assert post(gw, {"query": "{ secret }"}).status_code == 200
    err = error_of(post(gw, {"query": "{ secret a: secret }"}), 400, "QUERY_TOO_COMPLEX")
    assert err["extensions"]["complexity"] == 300
    assert len(gql.seen) == 4


def test_aliases_and_introspection(
    gateway: GatewayFactory, gql: GraphQLUpstream, tmp_path: Path
) -> None:
    gw = start(gateway, gql, tmp_path, {"max_aliases": 2, "introspection": False})
    assert post(gw, {"query": "{ a: hello b: hello }"}).status_code == 200
    err = error_of(post(gw, {"query": "{ a: hello b: hello c: hello }"}), 400, "TOO_MANY_ALIASES")
    assert err["extensions"] == {"code": "TOO_MANY_ALIASES", "aliases": 3, "maxAliases": 2}
    error_of(post(gw, {"query": "{ __schema { types { name } } }"}), 400, "INTROSPECTION_DISABLED")
    error_of(
        post(gw, {"query": '{ __type(name: "User") { name } }'}), 400, "INTROSPECTION_DISABLED"
    )
    assert post(gw, {"query": "{ __typename hello }"}).status_code == 200
    assert len(gql.seen) == 2


def test_automatic_persisted_queries(
    gateway: GatewayFactory, gql: GraphQLUpstream, tmp_path: Path
) -> None:
    gw = start(gateway, gql, tmp_path, {"persisted_queries": {"mode": "automatic"}})
    query = 'query Hi { hello(name: "apq") }'
    ext = {"persistedQuery": {"version": 1, "sha256Hash": sha(query)}}

    # Unknown hash: the client is asked for the text (200 under application/json, as
    # Apollo's protocol has it; 4xx under the GraphQL response media type).
    resp = post(gw, {"extensions": ext})
    err = error_of(resp, 200, "PERSISTED_QUERY_NOT_FOUND")
    assert err["message"] == "PersistedQueryNotFound"
    resp = post(gw, {"extensions": ext}, accept=GRAPHQL_RESPONSE)
    error_of(resp, 400, "PERSISTED_QUERY_NOT_FOUND")
    assert gql.seen == []

    # A wrong hash with the text is refused and not stored.
    wrong = {"persistedQuery": {"version": 1, "sha256Hash": sha("{ secret }")}}
    error_of(post(gw, {"query": query, "extensions": wrong}), 400, "PERSISTED_QUERY_HASH_MISMATCH")
    error_of(post(gw, {"extensions": wrong}), 200, "PERSISTED_QUERY_NOT_FOUND")

    # Text and hash: runs and registers.
    assert post(gw, {"query": query, "extensions": ext}).json() == {"data": {"hello": "hello apq"}}
    # Now the hash alone works, by POST and by GET (cacheable URLs); the upstream gets the text.
    assert post(gw, {"extensions": ext}).json() == {"data": {"hello": "hello apq"}}
    assert gql.last().body == {"extensions": ext, "query": query}
    resp = gw.get("/graphql", params={"extensions": json.dumps(ext), "operationName": "Hi"})
    assert resp.json() == {"data": {"hello": "hello apq"}}
    assert gql.last().method == "GET" and gql.last().document == query
    assert len(gql.seen) == 3

    # A hash that is not SHA-256 hex, or another version, is refused.
    bad = {"persistedQuery": {"version": 1, "sha256Hash": "abc"}}
    error_of(post(gw, {"extensions": bad}), 400, "PERSISTED_QUERY_INVALID")
    v2 = {"persistedQuery": {"version": 2, "sha256Hash": sha(query)}}
    error_of(post(gw, {"extensions": v2}), 400, "PERSISTED_QUERY_INVALID")


def test_hash_only_requests_need_persisted_queries_configured(
    gateway: GatewayFactory, gql: GraphQLUpstream, tmp_path: Path
) -> None:
    gw = start(gateway, gql, tmp_path)
    ext = {"persistedQuery": {"version": 1, "sha256Hash": sha("{ hello }")}}
    error_of(post(gw, {"extensions": ext}), 400, "PERSISTED_QUERY_NOT_SUPPORTED")
    assert gql.seen == []


def test_allowlist_runs_only_the_manifest(
    gateway: GatewayFactory, gql: GraphQLUpstream, tmp_path: Path
) -> None:
    listed = "query Listed { users(first: 1) { name } }"
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "format": "apollo-persisted-query-manifest",
                "version": 1,
                "operations": [{"id": "op-1", "name": "Listed", "type": "query", "body": listed}],
            }
        )
    )
    config = {"persisted_queries": {"mode": "allowlist", "manifest": str(manifest)}}
    gw = start(gateway, gql, tmp_path, config)
    expected = {"data": {"users": [{"name": "ada"}]}}
    assert post(gw, {"documentId": "op-1"}).json() == expected
    assert gql.last().body == {"documentId": "op-1", "query": listed}
    ext = {"persistedQuery": {"version": 1, "sha256Hash": sha(listed)}}
    assert post(gw, {"extensions": ext}).json() == expected
    assert gw.get("/graphql", params={"documentId": "op-1"}).json() == expected
    assert post(gw, {"query": listed}).json() == expected
    assert len(gql.seen) == 4

    error_of(post(gw, {"query": "{ secret }"}), 400, "PERSISTED_QUERY_NOT_ALLOWED")
    error_of(post(gw, {"documentId": "op-2"}), 400, "PERSISTED_QUERY_NOT_ALLOWED")
    other = {"persistedQuery": {"version": 1, "sha256Hash": sha("{ secret }")}}
    error_of(post(gw, {"extensions": other}), 400, "PERSISTED_QUERY_NOT_ALLOWED")
    assert len(gql.seen) == 4


def test_field_rules_by_consumer_group(
    gateway: GatewayFactory, gql: GraphQLUpstream, tmp_path: Path
) -> None:
    consumers = {
        "alice": {"groups": ["staff"], "credentials": [{"type": "key-auth", "key": ALICE_KEY}]},
        "bob": {"groups": ["users"], "credentials": [{"type": "key-auth", "key": BOB_KEY}]},
    }
    rules = {
        "field_rules": [
            {"field": "Query.secret", "allow": {"groups": ["staff"]}},
            {"field": "User.posts", "allow": {"consumers": ["bob"], "groups": ["staff"]}},
        ]
    }
    gw = start(gateway, gql, tmp_path, rules, plugins=[{"name": "key-auth"}], consumers=consumers)
    alice, bob = {"apikey": ALICE_KEY}, {"apikey": BOB_KEY}
    assert post(gw, {"query": "{ secret }"}, **alice).json() == {"data": {"secret": "the secret"}}
    assert post(gw, {"query": "{ hello }"}, **bob).json() == {"data": {"hello": "hello world"}}
    resp = post(gw, {"query": "{ hello s: secret }"}, **bob)
    err = error_of(resp, 403, "FORBIDDEN")
    assert err["path"] == ["s"] and err["extensions"]["field"] == "Query.secret"
    assert "Query.secret" in err["message"]
    # Nested fields are matched by their parent type, through fragments too.
    query = "{ users(first: 1) { ...P } } fragment P on User { posts { title } }"
    assert post(gw, {"query": query}, **bob).status_code == 200
    assert post(gw, {"query": query}, **alice).status_code == 200
    assert len(gql.seen) == 4


def test_field_authorization_plugin(
    gateway: GatewayFactory, gql: GraphQLUpstream, tmp_path: Path
) -> None:
    gw = start(
        gateway,
        gql,
        tmp_path,
        plugins=[{"name": "t-page-limit", "config": {"max_first": 5}}],
        plugins_dir=PLUGINS_DIR,
    )
    query = "query Page($n: Int) { users(first: 2) { name friends(first: $n) { name } } }"
    resp = post(gw, {"query": query, "variables": {"n": 1}})
    assert resp.status_code == 200, resp.text
    # The plugin read the operation the graphql plugin published: 1 + 2 * (1 + 1 * (1 + 1)).
    assert gql.last().headers["x-graphql-operation"] == "query Page 7"
    mutation = 'mutation { addUser(name: "q") { id } }'
    assert post(gw, {"query": mutation}).status_code == 200
    assert gql.last().headers["x-graphql-operation"] == "mutation - 2"
    resp = post(gw, {"query": query, "variables": {"n": 50}})
    err = error_of(resp, 403, "FORBIDDEN")
    assert err["message"] == "User.friends: at most 5 per page"
    assert err["path"] == ["users", "friends"]
    assert len(gql.seen) == 2


def test_config_problems_are_reported(tmp_path: Path) -> None:
    schema = tmp_path / "schema.graphql"
    schema.write_text(SDL)
    bad = {
        "listen": ["127.0.0.1:0"],
        "routes": [
            {
                "name": "g",
                "paths": ["/graphql"],
                "upstream": "http://127.0.0.1:9",
                "plugins": [
                    {
                        "name": "graphql",
                        "config": {
                            "schema": str(schema),
                            "field_rules": [{"field": "User.nope", "allow": {"groups": ["a"]}}],
                        },
                    }
                ],
            }
        ],
    }
    path = tmp_path / "g.yaml"
    path.write_text(json.dumps(bad))
    out = run_cli("check", str(path))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "field_rules[0].field: 'User.nope': User has no field nope" in out.stdout
