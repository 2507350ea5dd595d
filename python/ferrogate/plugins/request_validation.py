"""Refuses requests that do not follow the API's OpenAPI document or JSON Schemas, before
the upstream sees them, with a 400 that names the field and the reason."""

import json
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ferrogate import auth
from ferrogate.hooks import Headers, Request, Response
from ferrogate.plugin import Plugin
from ferrogate.request_schemas import (
    Api,
    Body,
    Problem,
    coerce,
    cookie_pairs,
    is_json,
    iter_param_problems,
    load_api,
    load_schema,
    media_type,
    problems_of,
    query_pairs,
)
from ferrogate.units import Size, parse_size

__all__ = ["RequestValidation"]

Schema = Annotated[
    dict[str, Any],
    Meta(description="A JSON Schema (draft 2020-12 unless its $schema says), or {file: PATH}."),
]


class RequestValidation(Plugin):
    """Checks requests against an OpenAPI 3.0/3.1 document or JSON Schemas.

    With ``openapi``, the request's operation (method and path template) is found and its
    path, query, header and cookie parameters and its body are checked; a request that
    matches no operation gets 404 or 405 (or passes, ``unknown_operation: pass``). Without
    it, ``query``, ``headers`` and ``body`` are JSON Schemas of the query parameters (an
    object), the headers (an object, lower-case names) and the JSON body. Failures: 400
    ``invalid_request`` naming the field (``in``, ``field`` as a JSON pointer, and up to
    ``max_errors`` in ``errors``), 400 ``invalid_json``, 415 ``unsupported_media_type``.
    The body is buffered only when there is a body schema (up to ``max_body``: 413).
    """

    name = "request-validation"
    priority = 850  # after authentication and authorization, before the transformers (801)

    class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
        """Settings of request-validation."""

        openapi: Annotated[
            str | None,
            Meta(
                description="An OpenAPI 3.0 or 3.1 document (YAML or JSON): absolute, or "
                "relative to the directory the gateway was started in."
            ),
        ] = None
        base_path: Annotated[
            str | None,
            Meta(
                description="Where the document's paths start in the request path "
                "(default: the path of its first server URL, else /)."
            ),
        ] = None
        query: Annotated[
            Schema | None,
            Meta(description="Without openapi: JSON Schema of the query parameters (an object)."),
        ] = None
        headers: Annotated[
            Schema | None,
            Meta(description="Without openapi: JSON Schema of the headers (lower-case names)."),
        ] = None
        body: Annotated[
            Schema | None, Meta(description="Without openapi: JSON Schema of the JSON body.")
        ] = None
        body_required: Annotated[
            bool, Meta(description="Without openapi: refuse requests without a body.")
        ] = False
        unknown_operation: Annotated[
            Literal["reject", "pass"],
            Meta(description="A request that no operation of the document matches."),
        ] = "reject"
        max_body: Annotated[
            Size, Meta(description="Largest body buffered for validation; above: 413.")
        ] = "1MiB"
        max_errors: Annotated[
            int, Meta(ge=1, le=50, description="Problems listed in one answer.")
        ] = 5

    config: "RequestValidation.Config"

    def __init__(self, config: "RequestValidation.Config") -> None:
        super().__init__(config)
        if config.openapi is not None and (config.query or config.headers or config.body):
            raise ValueError("give either openapi or the query/headers/body schemas, not both")
        if config.openapi is None and not (config.query or config.headers or config.body):
            raise ValueError("nothing to check: give openapi, or query, headers or body schemas")
        if config.base_path is not None and config.openapi is None:
            raise ValueError("base_path: only with openapi")
        try:
            parse_size(config.max_body)
        except ValueError as e:
            raise ValueError(f"max_body: {e}") from None
        self.api: Api | None = None
        if config.openapi is not None:
            try:
                self.api = load_api(config.openapi, config.base_path)
            except ValueError as e:
                raise ValueError(f"openapi: {e}") from None
        self.query = load_schema(config.query, "query") if config.query else None
        self.headers = load_schema(config.headers, "headers") if config.headers else None
        self.body = load_schema(config.body, "body") if config.body else None

    @classmethod
    def request_body_mode(cls, config: "RequestValidation.Config") -> Literal["none", "buffered"]:
        if config.openapi is not None:
            return "buffered" if load_api(config.openapi, config.base_path).has_bodies else "none"
        return "buffered" if config.body else "none"

    @classmethod
    def max_body_size_for(cls, config: "RequestValidation.Config") -> int:
        return parse_size(config.max_body)

    def on_request(self, req: Request) -> Response | None:
        if self.api is not None:
            return self._check_operation(req, self.api)
        return self._check_schemas(req)

    def _check_operation(self, req: Request, api: Api) -> Response | None:
        found = api.match(req.method, req.path)
        if not isinstance(found, tuple):
            if self.config.unknown_operation == "pass":
                return None
            if found is None:
                return auth.error(
                    req,
                    404,
                    "unknown_operation",
                    f"no operation of the API has the path {req.path}",
                )
            allow = ", ".join(found)
            return auth.error(
                req,
                405,
                "method_not_allowed",
                f"{req.method} is not an operation of {req.path} (allowed: {allow})",
                Headers([("allow", allow)]),
            )
        op, raw_path = found
        limit = self.config.max_errors
        headers = req.headers
        problems = []
        for problem in iter_param_problems(
            op,
            raw_path,
            query_pairs(req.query) if req.query else [],
            headers.getall,
            cookie_pairs(", ".join(headers.getall("cookie"))) if "cookie" in headers else [],
            limit,
        ):
            problems.append(problem)
            if len(problems) >= limit:
                break
        if problems:
            return self._invalid(req, problems)
        if op.body is not None:
            return self._check_body(req, op.body)
        return None

    def _check_body(self, req: Request, body: Body) -> Response | None:
        data = req.body or b""
        if not data:
            if body.required:
                return self._invalid(req, [Problem("body", "", "a request body is required")])
            return None
        if not body.content:
            return None
        refused = self._undecodable(req)
        if refused is not None:
            return refused
        mtype = media_type(req.headers.get("content-type") or "")
        found = body.for_type(mtype)
        if found is None:
            return auth.error(
                req,
                415,
                "unsupported_media_type",
                f"the body must be {body.types()}, not {mtype or 'without a Content-Type'}",
            )
        _, validator, schema = found
        if validator is None:
            return None
        if is_json(mtype):
            doc = self._json(req, data)
            if isinstance(doc, Response):
                return doc
        elif mtype == "application/x-www-form-urlencoded":
            doc = _form(data, schema)
        else:
            return None  # other media types are passed on as they are
        problems = problems_of(validator, doc, "body", self.config.max_errors)
        return self._invalid(req, problems) if problems else None

    def _check_schemas(self, req: Request) -> Response | None:
        limit = self.config.max_errors
        problems: list[Problem] = []
        if self.query is not None:
            props = _properties(self.query.schema)
            pairs = query_pairs(req.query) if req.query else []
            problems += problems_of(self.query, _as_object(pairs, props), "query", limit)
        if self.headers is not None and len(problems) < limit:
            props = _properties(self.headers.schema)
            pairs = [(k, v) for k, v in req.headers.items()]
            doc = _as_object(pairs, props, join=", ")
            problems += problems_of(self.headers, doc, "header", limit - len(problems))
        if problems:
            return self._invalid(req, problems)
        if self.body is None:
            return None
        data = req.body or b""
        if not data:
            if self.config.body_required:
                return self._invalid(req, [Problem("body", "", "a request body is required")])
            return None
        refused = self._undecodable(req)
        if refused is not None:
            return refused
        mtype = media_type(req.headers.get("content-type") or "")
        if not is_json(mtype):
            return auth.error(
                req,
                415,
                "unsupported_media_type",
                f"the body must be application/json, not {mtype or 'without a Content-Type'}",
            )
        doc = self._json(req, data)
        if isinstance(doc, Response):
            return doc
        problems = problems_of(self.body, doc, "body", limit)
        return self._invalid(req, problems) if problems else None

    def _undecodable(self, req: Request) -> Response | None:
        # A compressed body cannot be read here; passing it on unchecked would be a way round.
        encoding = (req.headers.get("content-encoding") or "identity").strip().lower()
        if encoding != "identity":
            return auth.error(
                req,
                415,
                "unsupported_media_type",
                f"a body with Content-Encoding {encoding} cannot be validated; send it unencoded",
            )
        return None

    def _json(self, req: Request, data: bytes) -> Any:
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as e:
            where = (
                f" ({e.msg} at line {e.lineno} column {e.colno})"
                if isinstance(e, json.JSONDecodeError)
                else ""
            )
            return auth.error(
                req, 400, "invalid_json", f"the request body is not valid JSON{where}"
            )

    def _invalid(self, req: Request, problems: list[Problem]) -> Response:
        first = problems[0]
        message = first.text()
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more)"
        body = {
            "error": {
                "status": 400,
                "code": "invalid_request",
                "message": message,
                "request_id": req.request_id,
                "in": first.where,
                "field": first.pointer,
                "errors": [p.as_dict() for p in problems],
            }
        }
        return Response(400, body, Headers([("content-type", "application/json")]))


def _properties(schema: Any) -> dict[str, Any]:
    props = schema.get("properties") if isinstance(schema, dict) else None
    return props if isinstance(props, dict) else {}


def _as_object(
    pairs: list[tuple[str, str]], props: dict[str, Any], join: str | None = None
) -> dict[str, Any]:
    """Parameters as the object their schema describes: repeated names become a list where
    the property is an array, values are coerced to the property's type."""
    values: dict[str, list[str]] = {}
    for k, v in pairs:
        values.setdefault(k, []).append(v)
    out: dict[str, Any] = {}
    for k, vs in values.items():
        prop = props.get(k, {})
        prop = prop if isinstance(prop, dict) else {}
        if prop.get("type") == "array" or (
            isinstance(prop.get("type"), list) and "array" in prop["type"]
        ):
            items = prop.get("items")
            items = items if isinstance(items, dict) else {}
            parts: list[str] = vs if join is None else [p.strip() for v in vs for p in v.split(",")]
            out[k] = [coerce(p, items) for p in parts]
        else:
            out[k] = coerce(vs[0] if join is None else join.join(vs), prop)
    return out


def _form(data: bytes, schema: Any) -> Any:
    """An urlencoded form as the object its schema describes."""
    return _as_object(
        query_pairs(data.decode("utf-8", "replace")),
        _properties(schema),
    )
