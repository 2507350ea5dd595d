"""Static analysis of one GraphQL operation: the fields it selects (fragments expanded,
``@skip``/``@include`` applied, variables resolved), its depth and its estimated cost.

Pure: no I/O, no gateway types. With a schema, fields know their parent and return types,
list fields are recognised and argument defaults apply; without one, only root fields know
their parent (the conventional ``Query``/``Mutation``/``Subscription``) and fields inside an
inline fragment take its type condition.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLField,
    GraphQLInterfaceType,
    GraphQLNamedType,
    GraphQLObjectType,
    GraphQLSchema,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    Undefined,
    get_named_type,
    get_nullable_type,
    is_list_type,
    value_from_ast_untyped,
)
from graphql.language import DirectiveNode

__all__ = [
    "HARD_MAX_DEPTH",
    "Analysis",
    "AnalysisError",
    "CostModel",
    "Field",
    "OperationType",
    "analyse",
    "select_operation",
]

OperationType = Literal["query", "mutation", "subscription"]

HARD_MAX_DEPTH = 64
"""Deeper operations are refused whatever the config says: the walk is recursive."""

_ROOT_NAMES: dict[str, str] = {
    "query": "Query",
    "mutation": "Mutation",
    "subscription": "Subscription",
}
_INTROSPECTION_ROOTS = frozenset(("__schema", "__type"))


@dataclass(frozen=True, slots=True)
class Field:
    """One selected field, as the operation would execute it."""

    name: str
    alias: str | None
    parent_type: str | None
    """The type the field is selected on (``Query``, ``User``); None when unknown."""
    type: str | None
    """The field's return type as written in the schema (``[User!]!``); None without one."""
    arguments: Mapping[str, Any]
    """Argument values with variables resolved (and the schema's defaults, when known)."""
    path: tuple[str, ...]
    """Response keys from the root to this field (no list indices)."""
    depth: int
    """1 for a root field."""
    complexity: int
    """The cost of this field and everything below it, list sizes included."""

    @property
    def response_key(self) -> str:
        return self.alias or self.name

    @property
    def coordinate(self) -> str:
        """``Type.field`` when the parent type is known, else the field's name."""
        return f"{self.parent_type}.{self.name}" if self.parent_type else self.name


@dataclass(frozen=True, slots=True)
class CostModel:
    """How much an operation costs: every field ``default_cost`` unless ``field_costs``
    (``Type.field``) says otherwise, and what is selected below a list field counted once per
    item: the first of ``list_arguments`` given as an integer, else ``default_list_size``
    when the schema says the field is a list."""

    default_cost: int = 1
    field_costs: Mapping[str, int] = field(default_factory=dict)
    list_arguments: tuple[str, ...] = ("first", "last", "limit")
    default_list_size: int = 10


@dataclass(frozen=True, slots=True)
class Analysis:
    operation_type: OperationType
    operation_name: str | None
    depth: int
    complexity: int
    aliases: int
    root_fields: int
    introspection: bool
    """Whether ``__schema`` or ``__type`` is selected."""
    fields: tuple[Field, ...]


class AnalysisError(Exception):
    """The operation cannot be analysed (or is refused while it is): ``code`` is the
    GraphQL error code, ``extensions`` what goes with it."""

    def __init__(
        self,
        message: str,
        code: str,
        extensions: Mapping[str, Any] | None = None,
        locations: list[dict[str, int]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.extensions = dict(extensions or {})
        self.locations = locations


def select_operation(document: DocumentNode, name: str | None) -> OperationDefinitionNode:
    """The operation to run, as the GraphQL spec's GetOperation picks it."""
    ops = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if name is None:
        if len(ops) == 1:
            return ops[0]
        if not ops:
            raise AnalysisError("the document has no operation", "OPERATION_RESOLUTION_FAILURE")
        raise AnalysisError(
            "the document has several operations: operationName must name one",
            "OPERATION_RESOLUTION_FAILURE",
        )
    for op in ops:
        if op.name is not None and op.name.value == name:
            return op
    raise AnalysisError(f"unknown operation named '{name}'", "OPERATION_RESOLUTION_FAILURE")


def _location(node: Any) -> list[dict[str, int]] | None:
    loc = getattr(node, "loc", None)
    if loc is None or loc.source is None:
        return None
    line, column = loc.source.get_location(loc.start)
    return [{"line": line, "column": column}]


class _Walker:
    def __init__(
        self,
        fragments: Mapping[str, FragmentDefinitionNode],
        schema: GraphQLSchema | None,
        variables: dict[str, Any],
        cost: CostModel,
        max_fields: int,
    ) -> None:
        self.fragments = fragments
        self.schema = schema
        self.variables = variables
        self.cost = cost
        self.max_fields = max_fields
        self.visited = 0
        self.aliases = 0
        self.root_fields = 0
        self.introspection = False
        self.fields: list[Field | None] = []

    def included(self, directives: tuple[DirectiveNode, ...] | None) -> bool:
        for d in directives or ():
            name = d.name.value
            if name not in ("skip", "include"):
                continue
            value = None
            for arg in d.arguments or ():
                if arg.name.value == "if":
                    value = value_from_ast_untyped(arg.value, self.variables)
            if name == "skip" and value is True:
                return False
            if name == "include" and value is False:
                return False
        return True

    def selection_set(
        self,
        node: SelectionSetNode,
        parent: GraphQLNamedType | None,
        parent_name: str | None,
        path: tuple[str, ...],
        depth: int,
        spreading: frozenset[str],
    ) -> tuple[int, int]:
        """(cost, deepest field depth) of the fields of ``node``, which sit at ``depth``."""
        total = 0
        deepest = depth - 1
        for sel in node.selections:
            if not self.included(sel.directives):
                continue
            if isinstance(sel, FieldNode):
                cost, d = self.field(sel, parent, parent_name, path, depth, spreading)
            elif isinstance(sel, InlineFragmentNode):
                t, tname = parent, parent_name
                if sel.type_condition is not None:
                    tname = sel.type_condition.name.value
                    t = self.schema.get_type(tname) if self.schema is not None else None
                cost, d = self.selection_set(sel.selection_set, t, tname, path, depth, spreading)
            elif isinstance(sel, FragmentSpreadNode):
                name = sel.name.value
                frag = self.fragments.get(name)
                if frag is None:
                    raise AnalysisError(
                        f"unknown fragment '{name}'",
                        "GRAPHQL_VALIDATION_FAILED",
                        locations=_location(sel),
                    )
                if name in spreading:
                    raise AnalysisError(
                        f"fragment '{name}' spreads itself",
                        "GRAPHQL_VALIDATION_FAILED",
                        locations=_location(sel),
                    )
                tname = frag.type_condition.name.value
                t = self.schema.get_type(tname) if self.schema is not None else None
                cost, d = self.selection_set(
                    frag.selection_set, t, tname, path, depth, spreading | {name}
                )
            else:  # pragma: no cover - the grammar has no other selection
                continue
            total += cost
            deepest = max(deepest, d)
        return total, deepest

    def _definition(self, parent: GraphQLNamedType | None, name: str) -> GraphQLField | None:
        if self.schema is None:
            return None
        if name == "__schema" or name == "__type":
            if parent is not None and parent is self.schema.query_type:
                from graphql.type.introspection import SchemaMetaFieldDef, TypeMetaFieldDef

                return SchemaMetaFieldDef if name == "__schema" else TypeMetaFieldDef
            return None
        if isinstance(parent, GraphQLObjectType | GraphQLInterfaceType):
            found: GraphQLField | None = parent.fields.get(name)
            return found
        return None

    def field(
        self,
        node: FieldNode,
        parent: GraphQLNamedType | None,
        parent_name: str | None,
        path: tuple[str, ...],
        depth: int,
        spreading: frozenset[str],
    ) -> tuple[int, int]:
        name = node.name.value
        if name == "__typename":
            return 0, depth - 1
        self.visited += 1
        if self.visited > self.max_fields:
            raise AnalysisError(
                f"the operation selects more than {self.max_fields} fields",
                "TOO_MANY_FIELDS",
                {"maxFields": self.max_fields},
            )
        if depth > HARD_MAX_DEPTH:
            raise AnalysisError(
                f"the operation is nested more than {HARD_MAX_DEPTH} levels deep",
                "QUERY_TOO_DEEP",
                {"depth": depth, "maxDepth": HARD_MAX_DEPTH},
                _location(node),
            )
        alias = node.alias.value if node.alias is not None else None
        if alias is not None:
            self.aliases += 1
        if depth == 1:
            self.root_fields += 1
        definition = self._definition(parent, name)
        arguments: dict[str, Any] = {}
        for arg in node.arguments or ():
            value = value_from_ast_untyped(arg.value, self.variables)
            arguments[arg.name.value] = None if value is Undefined else value
        is_list = False
        type_text: str | None = None
        child: GraphQLNamedType | None = None
        if definition is not None:
            for arg_name, arg_def in definition.args.items():
                if arg_name not in arguments and arg_def.default_value is not Undefined:
                    arguments[arg_name] = arg_def.default_value
            type_text = str(definition.type)
            child = get_named_type(definition.type)
            is_list = is_list_type(get_nullable_type(definition.type))  # type: ignore[arg-type]
        key = alias or name
        slot = len(self.fields)
        self.fields.append(None)
        introspection = name in _INTROSPECTION_ROOTS
        sub_cost = 0
        deepest = depth
        if introspection:
            # Introspection is allowed or refused as a whole (``introspection``); its own
            # nesting (about 13 levels for the usual query) is not counted against limits.
            self.introspection = True
        elif node.selection_set is not None:
            sub_cost, deepest = self.selection_set(
                node.selection_set,
                child,
                child.name if child is not None else None,
                (*path, key),
                depth + 1,
                spreading,
            )
            deepest = max(deepest, depth)
        coordinate = f"{parent_name}.{name}" if parent_name else name
        own = 0 if introspection else self.cost.field_costs.get(coordinate, self.cost.default_cost)
        multiplier = 1
        for list_arg in self.cost.list_arguments:
            size = arguments.get(list_arg)
            if isinstance(size, int) and not isinstance(size, bool):
                multiplier = max(size, 0)
                break
        else:
            if is_list:
                multiplier = self.cost.default_list_size
        cost = own + multiplier * sub_cost
        self.fields[slot] = Field(
            name=name,
            alias=alias,
            parent_type=parent_name,
            type=type_text,
            arguments=arguments,
            path=(*path, key),
            depth=depth,
            complexity=cost,
        )
        return cost, deepest


def analyse(
    document: DocumentNode,
    operation: OperationDefinitionNode,
    variables: Mapping[str, Any] | None = None,
    *,
    schema: GraphQLSchema | None = None,
    cost: CostModel | None = None,
    max_fields: int = 10_000,
) -> Analysis:
    """Walk ``operation`` of ``document``. Raises AnalysisError for unknown or cyclic
    fragments, more than ``max_fields`` selected fields (which bounds the work a document
    built to explode through fragments can cause) or a depth over ``HARD_MAX_DEPTH``."""
    fragments = {
        d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
    }
    values: dict[str, Any] = {}
    for definition in operation.variable_definitions or ():
        if definition.default_value is not None:
            values[definition.variable.name.value] = value_from_ast_untyped(
                definition.default_value
            )
    values.update(variables or {})
    op_type: OperationType = operation.operation.value
    root: GraphQLNamedType | None = None
    root_name: str | None = _ROOT_NAMES[op_type]
    if schema is not None:
        root = schema.get_root_type(operation.operation)
        root_name = root.name if root is not None else root_name
    walker = _Walker(fragments, schema, values, cost or CostModel(), max_fields)
    complexity, depth = walker.selection_set(
        operation.selection_set, root, root_name, (), 1, frozenset()
    )
    return Analysis(
        operation_type=op_type,
        operation_name=operation.name.value if operation.name is not None else None,
        depth=depth,
        complexity=complexity,
        aliases=walker.aliases,
        root_fields=walker.root_fields,
        introspection=walker.introspection,
        fields=tuple(f for f in walker.fields if f is not None),
    )
