"""GraphQL over HTTP: reading a request's parameters (GET query string or POST JSON body)
and answering with GraphQL-shaped errors in the media type the client accepts."""

import json
from dataclasses import dataclass, field
from typing import Any

from ferrogate.hooks import Headers, Request, Response

__all__ = [
    "GRAPHQL_RESPONSE",
    "JSON",
    "GraphQLParams",
    "RequestError",
    "errors_response",
    "read_params",
    "wants_graphql_response",
]

GRAPHQL_RESPONSE = "application/graphql-response+json"
JSON = "application/json"


@dataclass
class GraphQLParams:
    """The GraphQL-over-HTTP request parameters."""

    query: str | None
    operation_name: str | None
    variables: dict[str, Any]
    extensions: dict[str, Any]
    document_id: str | None
    """``documentId`` (or ``id``) naming a persisted document, when sent."""
    get: bool
    payload: dict[str, Any] = field(default_factory=dict)
    """The POST body as sent, to forward with the query filled in."""


class RequestError(Exception):
    """A request the gateway answers itself with a GraphQL error."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        extensions: dict[str, Any] | None = None,
        locations: list[dict[str, int]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extensions = extensions or {}
        self.locations = locations
        self.headers = headers or {}

    def error(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message}
        if self.locations:
            out["locations"] = self.locations
        out["extensions"] = {"code": self.code, **self.extensions}
        return out


def _media_ranges(accept: str) -> list[tuple[str, float]]:
    out = []
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media:
            out.append((media.lower(), q))
    return out


def wants_graphql_response(req: Request) -> bool:
    """Whether the answer should be ``application/graphql-response+json``: the client
    accepts it at least as much as ``application/json`` (without Accept: no, as the spec
    says for legacy clients)."""
    accept = req.headers.get("accept")
    if not accept:
        return False
    graphql_q = json_q = 0.0
    for media, q in _media_ranges(accept):
        if media == GRAPHQL_RESPONSE:
            graphql_q = max(graphql_q, q)
        elif media in (JSON, "application/*", "*/*"):
            json_q = max(json_q, q)
    return graphql_q > 0 and graphql_q >= json_q


def errors_response(
    req: Request,
    status: int,
    errors: list[dict[str, Any]],
    headers: dict[str, str] | None = None,
) -> Response:
    media = GRAPHQL_RESPONSE if wants_graphql_response(req) else JSON
    out = Headers(headers or {})
    out["content-type"] = f"{media}; charset=utf-8"
    out["cache-control"] = "private, no-cache, must-revalidate"
    return Response(status, {"errors": errors}, out)


def _json_param(name: str, value: str | None) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    try:
        doc = json.loads(value)
    except ValueError:
        raise RequestError(400, f"{name} is not valid JSON", "BAD_REQUEST") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise RequestError(400, f"{name} must be a JSON object", "BAD_REQUEST")
    return doc


def _document_id(container: dict[str, Any]) -> str | None:
    for key in ("documentId", "id"):
        value = container.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def read_params(req: Request) -> GraphQLParams:
    """The request's GraphQL parameters; RequestError when they are malformed."""
    if req.method == "GET":
        params = req.query_params
        return GraphQLParams(
            query=params.get("query") or None,
            operation_name=params.get("operationName") or None,
            variables=_json_param("variables", params.get("variables")),
            extensions=_json_param("extensions", params.get("extensions")),
            document_id=params.get("documentId") or params.get("id") or None,
            get=True,
        )
    if req.method != "POST":
        raise RequestError(
            405,
            "GraphQL requests are GET or POST",
            "METHOD_NOT_ALLOWED",
            headers={"allow": "GET, POST"},
        )
    ctype = (req.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype != JSON:
        raise RequestError(
            415, "a GraphQL POST request must have Content-Type: application/json", "BAD_REQUEST"
        )
    try:
        payload = json.loads(req.body or b"")
    except ValueError:
        raise RequestError(400, "the request body is not valid JSON", "BAD_REQUEST") from None
    if isinstance(payload, list):
        raise RequestError(400, "batched requests are not supported", "BATCHING_NOT_SUPPORTED")
    if not isinstance(payload, dict):
        raise RequestError(400, "the request body must be a JSON object", "BAD_REQUEST")
    query = payload.get("query")
    name = payload.get("operationName")
    variables = payload.get("variables")
    extensions = payload.get("extensions")
    if query is not None and not isinstance(query, str):
        raise RequestError(400, "query must be a string", "BAD_REQUEST")
    if name is not None and not isinstance(name, str):
        raise RequestError(400, "operationName must be a string", "BAD_REQUEST")
    if variables is not None and not isinstance(variables, dict):
        raise RequestError(400, "variables must be an object", "BAD_REQUEST")
    if extensions is not None and not isinstance(extensions, dict):
        raise RequestError(400, "extensions must be an object", "BAD_REQUEST")
    return GraphQLParams(
        query=query or None,
        operation_name=name or None,
        variables=variables or {},
        extensions=extensions or {},
        document_id=_document_id(payload),
        get=False,
        payload=payload,
    )
