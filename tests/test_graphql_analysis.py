"""The numbers the graphql plugin judges operations by: depth, cost, aliases, fields."""

from __future__ import annotations

from typing import Any

import pytest
from graphql import build_schema, parse

from ferrogate.graphql_analysis import (
    HARD_MAX_DEPTH,
    Analysis,
    AnalysisError,
    CostModel,
    analyse,
    select_operation,
)
from graphql_upstream import SDL

SCHEMA = build_schema(SDL)


def run(
    text: str,
    variables: dict[str, Any] | None = None,
    *,
    schema: bool = True,
    name: str | None = None,
    **kwargs: Any,
) -> Analysis:
    doc = parse(text)
    return analyse(
        doc,
        select_operation(doc, name),
        variables,
        schema=SCHEMA if schema else None,
        **kwargs,
    )


def test_depth_and_cost_with_and_without_schema() -> None:
    text = "{ users(first: 3) { name friends { id } } hello }"
    a = run(text)
    # users: 1 + 3 * (name 1 + friends (1 + 10 * 1)); hello 1
    assert (a.depth, a.complexity, a.root_fields, a.aliases) == (3, 38, 2, 0)
    # Without a schema, friends is not known to be a list: no default size.
    b = run(text, schema=False)
    assert (b.depth, b.complexity) == (3, 1 + 3 * (1 + 2) + 1)
    assert [f.coordinate for f in b.fields] == [
        "Query.users",
        "name",
        "friends",
        "id",
        "Query.hello",
    ]
    assert [f.coordinate for f in a.fields][:4] == [
        "Query.users",
        "User.name",
        "User.friends",
        "User.id",
    ]
    friends = a.fields[2]
    assert friends.path == ("users", "friends") and friends.depth == 2
    assert friends.type == "[User!]!" and friends.arguments == {"first": 10}
    assert friends.complexity == 11


def test_fragments_variables_and_directives() -> None:
    text = """
    query Q($n: Int = 4, $skip: Boolean!) {
      ...Root
      extra: hello @skip(if: $skip)
    }
    fragment Root on Query { users(first: $n) { ... on User { p: posts(limit: 2) { title } } } }
    """
    a = run(text, {"skip": True})
    assert a.operation_name == "Q" and a.operation_type == "query"
    # users: 1 + 4 * (posts 1 + 2 * 1)
    assert (a.depth, a.complexity, a.aliases) == (3, 13, 1)
    users = a.fields[0]
    assert users.arguments == {"first": 4}
    assert a.fields[1].alias == "p" and a.fields[1].path == ("users", "p")
    b = run(text, {"skip": False, "n": 1})
    assert (b.complexity, b.aliases, b.root_fields) == (1 + 3 + 1, 2, 2)


def test_cost_overrides_and_list_arguments() -> None:
    cost = CostModel(
        default_cost=2,
        field_costs={"Query.users": 5, "User.name": 0},
        list_arguments=("limit",),
        default_list_size=3,
    )
    # first is not a size argument here: users is a list of the default size 3.
    a = run("{ users(first: 50) { name posts(limit: 7) { id } } }", cost=cost)
    assert a.complexity == 5 + 3 * (0 + (2 + 7 * 2))


def test_introspection_is_flagged_not_counted() -> None:
    a = run("{ __typename __schema { types { fields { type { ofType { name } } } } } }")
    assert a.introspection and a.depth == 1 and a.complexity == 0
    assert [f.name for f in a.fields] == ["__schema"]
    assert not run("{ __typename hello }").introspection


def test_refusals_bound_the_work() -> None:
    with pytest.raises(AnalysisError) as e:
        run("{ ...A } fragment A on Query { ...B } fragment B on Query { ...A }", schema=False)
    assert e.value.code == "GRAPHQL_VALIDATION_FAILED" and "spreads itself" in e.value.message
    with pytest.raises(AnalysisError) as e:
        run("{ ...Missing }", schema=False)
    assert e.value.code == "GRAPHQL_VALIDATION_FAILED"
    # Each fragment spreads the next twice: 2^20 fields from a few lines.
    frags = "".join(f"fragment F{i} on User {{ ...F{i + 1} ...F{i + 1} }} " for i in range(20))
    with pytest.raises(AnalysisError) as e:
        run("{ users { ...F0 } } " + frags + "fragment F20 on User { id }", max_fields=500)
    assert e.value.code == "TOO_MANY_FIELDS"
    deep = "{ " + "a { " * (HARD_MAX_DEPTH + 1) + "b" + " }" * (HARD_MAX_DEPTH + 2)
    with pytest.raises(AnalysisError) as e:
        run(deep, schema=False)
    assert e.value.code == "QUERY_TOO_DEEP"


def test_operation_selection() -> None:
    doc = parse('query A { hello } mutation B { addUser(name: "x") { id } }')
    assert select_operation(doc, "B").operation.value == "mutation"
    for name in (None, "C"):
        with pytest.raises(AnalysisError) as e:
            select_operation(doc, name)
        assert e.value.code == "OPERATION_RESOLUTION_FAILURE"
