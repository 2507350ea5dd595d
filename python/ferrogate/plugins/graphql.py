"""GraphQL routes: operations parsed and judged at the gateway (syntax, schema, depth,
cost, aliases, introspection, persisted queries, per-field rules) before the upstream GraphQL
server executes them."""

from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from graphql import (
    DocumentNode,
    GraphQLError,
    GraphQLInterfaceType,
    GraphQLObjectType,
    GraphQLSchema,
    GraphQLSyntaxError,
    build_schema,
    parse,
    validate,
)
from msgspec import Meta

from ferrogate.consumers import current
from ferrogate.graphql import CTX_KEY, PRIORITY, Operation, denied
from ferrogate.graphql_analysis import (
    HARD_MAX_DEPTH,
    Analysis,
    AnalysisError,
    CostModel,
    Field,
    analyse,
    select_operation,
)
from ferrogate.graphql_http import (
    GraphQLParams,
    RequestError,
    errors_response,
    read_params,
    wants_graphql_response,
)
from ferrogate.graphql_persisted import Manifest, QueryStore, is_sha256, sha256_hex
from ferrogate.hooks import Request, Response
from ferrogate.plugin import Plugin
from ferrogate.units import Size, parse_size

__all__ = ["GraphQL"]

_ROOTS = ("Query", "Mutation", "Subscription")
_MAX_ERRORS = 10
_PARSED_MAX = 1000


class _Cost(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The cost model of max_complexity."""

    default: Annotated[int, Meta(ge=0, description="Cost of a field not in fields.")] = 1
    fields: Annotated[
        dict[str, Annotated[int, Meta(ge=0)]],
        Meta(description='Cost by "Type.field" (root fields without a schema).'),
    ] = {}
    list_arguments: Annotated[
        list[str],
        Meta(description="Arguments whose integer value is a list field's size."),
    ] = msgspec.field(default_factory=lambda: ["first", "last", "limit"])
    default_list_size: Annotated[
        int,
        Meta(ge=0, description="Size of a list field without a size argument (needs schema)."),
    ] = 10


class _PersistedQueries(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Automatic Persisted Queries, or an allow-list of operations."""

    mode: Annotated[
        Literal["automatic", "allowlist"],
        Meta(
            description="automatic: clients register queries by hash (Apollo's APQ); "
            "allowlist: only the manifest's operations run."
        ),
    ] = "automatic"
    max_entries: Annotated[
        int, Meta(ge=1, description="automatic: queries kept per worker (LRU).")
    ] = 10_000
    manifest: Annotated[
        str | None,
        Meta(description="allowlist: the manifest file (Apollo's format, or {id: query})."),
    ] = None


class _Allow(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    consumers: Annotated[list[str], Meta(description="Consumers let through.")] = []
    groups: Annotated[list[str], Meta(description="Consumer groups let through.")] = []


class _FieldRule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    field: Annotated[
        str,
        Meta(
            pattern=r"^[_A-Za-z][_0-9A-Za-z]*\.[_A-Za-z][_0-9A-Za-z]*$",
            description='The field, as "Type.field".',
        ),
    ]
    allow: Annotated[_Allow, Meta(description="Who may select it (anyone else: 403).")]


class GraphQL(Plugin):
    """Judges GraphQL operations before the upstream executes them.

    Requests follow GraphQL over HTTP: GET with ``query``, ``operationName``, ``variables``
    and ``extensions`` in the query string, or POST with a JSON object; batches (a JSON array)
    are refused. The query is parsed once; a syntax error (400 ``GRAPHQL_PARSE_FAILED``) or,
    with ``schema``, a validation error (400 ``GRAPHQL_VALIDATION_FAILED``) never reaches the
    upstream. Then the limits (400 ``QUERY_TOO_DEEP``, ``QUERY_TOO_COMPLEX``,
    ``TOO_MANY_ALIASES``, ``TOO_MANY_ROOT_FIELDS``, ``TOO_MANY_TOKENS``, ``TOO_MANY_FIELDS``,
    ``INTROSPECTION_DISABLED``), persisted queries and ``field_rules`` (403). The analysed
    operation is left in ``req.ctx["graphql"]`` for later plugins (``ferrogate.graphql``).
    Answers are GraphQL errors, ``application/graphql-response+json`` when the client
    accepts it, else ``application/json``.
    """

    name = "graphql"
    priority = PRIORITY
    request_body = "buffered"

    class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
        """Settings of graphql."""

        schema: Annotated[
            str | None,
            Meta(
                description="SDL file of the upstream's schema: operations are validated "
                "against it, and its types feed the cost and field rules. An absolute path or "
                "relative to the directory the gateway was started in."
            ),
        ] = None
        max_depth: Annotated[
            int,
            Meta(ge=0, le=HARD_MAX_DEPTH, description="Deepest field (root fields: 1); 0: off."),
        ] = 10
        max_complexity: Annotated[
            int, Meta(ge=0, description="Highest cost under the cost model; 0: off.")
        ] = 0
        cost: Annotated[_Cost, Meta(description="The cost model of max_complexity.")] = _Cost()
        max_aliases: Annotated[int, Meta(ge=0, description="Aliased fields; 0: off.")] = 15
        max_root_fields: Annotated[int, Meta(ge=0, description="Root fields; 0: off.")] = 0
        max_tokens: Annotated[
            int, Meta(ge=0, description="Lexical tokens of the document; 0: off.")
        ] = 5000
        max_fields: Annotated[
            int,
            Meta(ge=1, description="Selected fields, fragments expanded (bounds the work)."),
        ] = 2000
        introspection: Annotated[
            bool, Meta(description="Let __schema and __type queries through.")
        ] = True
        persisted_queries: Annotated[
            _PersistedQueries | None,
            Meta(description="Automatic Persisted Queries, or an allow-list of operations."),
        ] = None
        field_rules: Annotated[
            list[_FieldRule],
            Meta(
                description='Fields only some consumers may select: {field: "Type.field", '
                "allow: {consumers, groups}}."
            ),
        ] = []
        max_body: Annotated[Size, Meta(description="Largest POST body; above: 413.")] = "1MiB"

    config: "GraphQL.Config"

    def __init__(self, config: "GraphQL.Config") -> None:
        super().__init__(config)
        c = config
        try:
            parse_size(c.max_body)
        except ValueError as e:
            raise ValueError(f"max_body: {e}") from None
        self.schema: GraphQLSchema | None = None
        if c.schema is not None:
            self.schema = _load_schema(c.schema)
        for coordinate in c.cost.fields:
            self._check_coordinate(coordinate, "cost.fields")
        self.rules: dict[str, list[_Allow]] = {}
        for i, rule in enumerate(c.field_rules):
            self._check_coordinate(rule.field, f"field_rules[{i}].field")
            if not rule.allow.consumers and not rule.allow.groups:
                raise ValueError(f"field_rules[{i}].allow: name consumers or groups")
            known = current()
            for name in rule.allow.consumers:
                if known.get(name) is None:
                    raise ValueError(f"field_rules[{i}].allow.consumers: unknown consumer '{name}'")
            self.rules.setdefault(rule.field, []).append(rule.allow)
        self.cost = CostModel(
            default_cost=c.cost.default,
            field_costs=dict(c.cost.fields),
            list_arguments=tuple(c.cost.list_arguments),
            default_list_size=c.cost.default_list_size,
        )
        pq = c.persisted_queries
        self.store: QueryStore | None = None
        self.manifest: Manifest | None = None
        if pq is not None:
            if pq.mode == "allowlist":
                if pq.manifest is None:
                    raise ValueError("persisted_queries.manifest: the allowlist mode needs one")
                try:
                    self.manifest = Manifest.load(pq.manifest)
                except ValueError as e:
                    raise ValueError(f"persisted_queries.manifest: {e}") from None
            else:
                if pq.manifest is not None:
                    raise ValueError("persisted_queries.manifest: only with mode: allowlist")
                self.store = QueryStore(pq.max_entries)
        # Parsed (and validated) documents by the hash of their text, least recently used
        # dropped first: clients repeat a few operations, so most requests skip parsing.
        self._parsed: OrderedDict[str, tuple[DocumentNode, list[GraphQLError]]] = OrderedDict()

    def _check_coordinate(self, coordinate: str, where: str) -> None:
        type_name, _, field_name = coordinate.partition(".")
        if self.schema is None:
            if type_name not in _ROOTS:
                raise ValueError(
                    f"{where}: '{coordinate}': without schema only root fields "
                    "(Query.*, Mutation.*, Subscription.*) can be named"
                )
            return
        t = self.schema.get_type(type_name)
        if not isinstance(t, GraphQLObjectType | GraphQLInterfaceType):
            raise ValueError(f"{where}: '{coordinate}': the schema has no type {type_name}")
        if field_name not in t.fields:
            raise ValueError(f"{where}: '{coordinate}': {type_name} has no field {field_name}")

    @classmethod
    def max_body_size_for(cls, config: "GraphQL.Config") -> int:
        return parse_size(config.max_body)

    def on_request(self, req: Request) -> Response | None:
        try:
            return self._judge(req)
        except RequestError as e:
            if e.code == "PERSISTED_QUERY_NOT_FOUND" and not wants_graphql_response(req):
                # Apollo's protocol: a 200 whose error asks the client to send the text.
                e.status = 200
            return errors_response(req, e.status, [e.error()], e.headers)
        except AnalysisError as e:
            if e.code == "QUERY_TOO_DEEP" and self.config.max_depth:
                e.extensions["maxDepth"] = self.config.max_depth
            err = RequestError(400, e.message, e.code, e.extensions, e.locations)
            return errors_response(req, 400, [err.error()])

    # --- the steps -------------------------------------------------------------------------

    def _judge(self, req: Request) -> Response | None:
        params = read_params(req)
        text, persisted = self._query_text(params)
        digest = sha256_hex(text)
        document, problems = self._document(text, digest)
        if problems:
            errors = [_graphql_error(p, "GRAPHQL_VALIDATION_FAILED") for p in problems]
            return errors_response(req, 400, errors[:_MAX_ERRORS])
        operation = select_operation(document, params.operation_name)
        if params.get and operation.operation.value != "query":
            raise RequestError(
                405,
                f"a {operation.operation.value} cannot be sent with GET",
                "METHOD_NOT_ALLOWED",
                headers={"allow": "POST"},
            )
        analysis = analyse(
            document,
            operation,
            params.variables,
            schema=self.schema,
            cost=self.cost,
            max_fields=self.config.max_fields,
        )
        self._check_limits(analysis)
        refusals = self._field_rules(req, analysis.fields)
        if refusals:
            return denied(req, refusals)
        req.ctx[CTX_KEY] = Operation(
            type=analysis.operation_type,
            name=analysis.operation_name,
            query=text,
            variables=params.variables,
            sha256=digest,
            persisted=persisted,
            depth=analysis.depth,
            complexity=analysis.complexity,
            aliases=analysis.aliases,
            root_fields=analysis.root_fields,
            fields=analysis.fields,
        )
        if self.store is not None and not persisted and "persistedQuery" in params.extensions:
            self.store.put(digest, text)
        if persisted:
            # The upstream gets the text: it need not know persisted queries.
            if params.get:
                req.query_params["query"] = text
            else:
                req.body = _encode({**params.payload, "query": text})
        return None

    def _query_text(self, params: GraphQLParams) -> tuple[str, bool]:
        """The query to run and whether it came from the store or manifest."""
        ext = params.extensions.get("persistedQuery")
        digest: str | None = None
        if ext is not None:
            if not isinstance(ext, dict) or ext.get("version") != 1:
                raise RequestError(
                    400, "unsupported persistedQuery version (only 1)", "PERSISTED_QUERY_INVALID"
                )
            digest = ext.get("sha256Hash")
            if not is_sha256(digest):
                raise RequestError(
                    400,
                    "persistedQuery.sha256Hash must be 64 lower-case hex digits",
                    "PERSISTED_QUERY_INVALID",
                )
        query = params.query
        if query is not None and digest is not None and sha256_hex(query) != digest:
            raise RequestError(
                400, "provided sha does not match query", "PERSISTED_QUERY_HASH_MISMATCH"
            )
        if self.manifest is not None:
            if query is not None:
                if self.manifest.allows(query):
                    return query, False
                raise RequestError(
                    400, "this operation is not in the allow-list", "PERSISTED_QUERY_NOT_ALLOWED"
                )
            key = digest or params.document_id
            text = self.manifest.find(key) if key else None
            if text is None:
                raise RequestError(
                    400,
                    "no operation of the allow-list has this id"
                    if key
                    else "only operations of the allow-list run: send an id or a hash",
                    "PERSISTED_QUERY_NOT_ALLOWED",
                )
            return text, True
        if query is not None:
            return query, False
        if digest is None:
            raise RequestError(400, "the request has no query", "BAD_REQUEST")
        if self.store is None:
            raise RequestError(400, "PersistedQueryNotSupported", "PERSISTED_QUERY_NOT_SUPPORTED")
        text = self.store.get(digest)
        if text is None:
            # The message, not only the code, is what Apollo clients look for.
            raise RequestError(400, "PersistedQueryNotFound", "PERSISTED_QUERY_NOT_FOUND")
        return text, True

    def _document(self, text: str, digest: str) -> tuple[DocumentNode, list[GraphQLError]]:
        cached = self._parsed.get(digest)
        if cached is not None:
            self._parsed.move_to_end(digest)
            return cached
        max_tokens = self.config.max_tokens or None
        try:
            document = parse(text, max_tokens=max_tokens)
        except GraphQLSyntaxError as e:
            if max_tokens is not None and "Parsing aborted" in e.message:
                raise RequestError(
                    400,
                    f"the document has more than {max_tokens} tokens",
                    "TOO_MANY_TOKENS",
                    {"maxTokens": max_tokens},
                ) from None
            raise RequestError(
                400, e.message, "GRAPHQL_PARSE_FAILED", locations=_locations(e)
            ) from None
        except RecursionError:
            raise RequestError(
                400, "the document is nested too deeply to parse", "GRAPHQL_PARSE_FAILED"
            ) from None
        problems: list[GraphQLError] = []
        if self.schema is not None:
            problems = validate(self.schema, document, max_errors=_MAX_ERRORS)
        self._parsed[digest] = (document, problems)
        if len(self._parsed) > _PARSED_MAX:
            self._parsed.popitem(last=False)
        return document, problems

    def _check_limits(self, a: Analysis) -> None:
        c = self.config
        if a.introspection and not c.introspection:
            raise RequestError(400, "introspection is disabled", "INTROSPECTION_DISABLED")
        checks = (
            (c.max_depth, a.depth, "QUERY_TOO_DEEP", "depth", "maxDepth", "nested"),
            (
                c.max_complexity,
                a.complexity,
                "QUERY_TOO_COMPLEX",
                "complexity",
                "maxComplexity",
                "costs",
            ),
            (c.max_aliases, a.aliases, "TOO_MANY_ALIASES", "aliases", "maxAliases", "has aliases"),
            (
                c.max_root_fields,
                a.root_fields,
                "TOO_MANY_ROOT_FIELDS",
                "rootFields",
                "maxRootFields",
                "has root fields",
            ),
        )
        for limit, actual, code, key, max_key, verb in checks:
            if limit and actual > limit:
                raise RequestError(
                    400,
                    f"the operation {verb} {actual}, above the limit of {limit}",
                    code,
                    {key: actual, max_key: limit},
                )

    def _field_rules(self, req: Request, fields: tuple[Field, ...]) -> list[tuple[Field, str]]:
        if not self.rules:
            return []
        refusals = []
        groups: frozenset[str] | None = None
        for f in fields:
            allows = self.rules.get(f.coordinate)
            if allows is None:
                continue
            if groups is None:
                consumer = current().get(req.consumer)
                groups = consumer.groups if consumer is not None else frozenset()
            ok = req.consumer is not None and any(
                req.consumer in a.consumers or not groups.isdisjoint(a.groups) for a in allows
            )
            if not ok:
                refusals.append((f, f"not allowed to query {f.coordinate}"))
        return refusals


def _load_schema(path: str) -> GraphQLSchema:
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as e:
        raise ValueError(f"schema: cannot read {file}: {e.strerror}") from None
    try:
        return build_schema(text)
    except GraphQLError as e:
        where = ""
        if e.locations:
            where = f" (line {e.locations[0].line}, column {e.locations[0].column})"
        raise ValueError(f"schema: {file} is not a valid schema: {e.message}{where}") from None
    except TypeError as e:
        raise ValueError(f"schema: {file} is not a valid schema: {e}") from None


def _locations(e: GraphQLError) -> list[dict[str, int]] | None:
    if not e.locations:
        return None
    return [{"line": loc.line, "column": loc.column} for loc in e.locations]


def _graphql_error(e: GraphQLError, code: str) -> dict[str, Any]:
    return RequestError(400, e.message, code, locations=_locations(e)).error()


def _encode(payload: dict[str, Any]) -> bytes:
    return msgspec.json.encode(payload)
