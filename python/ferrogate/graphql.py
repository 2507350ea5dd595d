"""What the ``graphql`` plugin tells later plugins about a request's operation, and the base
class of per-field authorization plugins.

The ``graphql`` plugin parses and analyses the operation once and puts an ``Operation`` in
``req.ctx["graphql"]``. A plugin that decides per field subclasses ``FieldAuthorizer``::

    from ferrogate.graphql import Field, FieldAuthorizer

    class NoBigPages(FieldAuthorizer):
        name = "no-big-pages"

        def authorize_field(self, req, field: Field) -> bool | str:
            if field.coordinate == "Query.users" and (field.arguments.get("first") or 0) > 50:
                return "Query.users: at most 50 per page"
            return True

Every selected field goes through ``authorize_field``; any refusal answers the whole request
with 403 and one GraphQL error per refused field (nothing is executed, no partial data).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ferrogate import auth
from ferrogate.graphql_analysis import Field, OperationType
from ferrogate.graphql_http import errors_response
from ferrogate.hooks import Request, Response
from ferrogate.plugin import Plugin

__all__ = ["CTX_KEY", "Field", "FieldAuthorizer", "Operation", "denied", "operation_of"]

CTX_KEY = "graphql"
"""The ``req.ctx`` key holding the request's ``Operation``."""

PRIORITY = 900
"""The ``graphql`` plugin's priority: after authentication (1000) and acl (950), so field
rules know the consumer."""


@dataclass(frozen=True, slots=True)
class Operation:
    """The operation a request runs, as the upstream will see it."""

    type: OperationType
    name: str | None
    query: str
    """The full query text (filled in from the persisted query store when the client sent
    only its hash)."""
    variables: Mapping[str, Any]
    sha256: str
    """SHA-256 of ``query`` (hex): the Automatic Persisted Queries key."""
    persisted: bool
    """The client sent a hash or an id instead of the text."""
    depth: int
    complexity: int
    aliases: int
    root_fields: int
    fields: tuple[Field, ...]
    """Every selected field in document order, fragments expanded (``__typename`` left
    out)."""


def operation_of(req: Request) -> Operation | None:
    """The analysed operation of ``req``, when the ``graphql`` plugin ran before."""
    op = req.ctx.get(CTX_KEY)
    return op if isinstance(op, Operation) else None


def denied(req: Request, refusals: list[tuple[Field, str]]) -> Response:
    """403 with one GraphQL error per refused field, each naming its path."""
    errors = [
        {
            "message": reason,
            "path": list(f.path),
            "extensions": {"code": "FORBIDDEN", "field": f.coordinate},
        }
        for f, reason in refusals
    ]
    return errors_response(req, 403, errors)


class FieldAuthorizer(Plugin):
    """Base class of plugins that allow or refuse a GraphQL operation field by field.

    Define ``authorize_field(req, field)``: ``True`` lets the field through, ``False`` or a
    message refuses it. The request is refused (403) when any field is, with every refused
    field named. Runs after the ``graphql`` plugin (a priority below 900); a request it sees
    without an analysed operation (no ``graphql`` plugin before it on the route) gets 500,
    since letting it through would skip the checks.
    """

    priority: ClassVar[int] = PRIORITY - 10

    def authorize_field(self, req: Request, field: Field) -> bool | str:
        return True

    def on_request(self, req: Request) -> Response | None:
        op = operation_of(req)
        if op is None:
            return auth.error(
                req,
                500,
                "graphql_not_analysed",
                f"plugin '{self.name}' needs the graphql plugin before it on the route",
            )
        refusals: list[tuple[Field, str]] = []
        for f in op.fields:
            verdict = self.authorize_field(req, f)
            if verdict is True:
                continue
            reason = verdict if isinstance(verdict, str) else f"not allowed to query {f.coordinate}"
            refusals.append((f, reason))
        return denied(req, refusals) if refusals else None
