"""Parse a YAML or JSON config into plain data while remembering where every value came from.

The node tree from ``yaml.compose`` is kept so that any problem found later, by a data path
such as ``routes[2].upstream``, can be reported at the line and column it came from.
"""

import os
from collections.abc import Mapping
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.resolver import Resolver

from ferrogate.envvars import interpolate
from ferrogate.problems import ConfigError, DataPath, Problem, format_path

# libyaml is several times faster; the pure-Python loader gives identical nodes and marks.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class SourceDocument:
    """The parsed file: ``data`` (plain dicts, lists and scalars) plus its node tree."""

    def __init__(self, file: str, root: yaml.Node | None) -> None:
        self.file = file
        self.root = root
        self.problems: list[Problem] = []
        self.problem_paths: list[DataPath] = []
        # Values whose interpolation failed: later checks would only repeat that problem.
        self.tainted: set[DataPath] = set()
        self.data: Any = None

    def position(self, path: DataPath, *, key: bool = False) -> tuple[int, int]:
        """1-based (line, col) of the value at ``path``, or of its key with ``key=True``.

        A path that does not exist in the file (a missing field, a default) is reported
        at its deepest ancestor that does.
        """
        if self.root is None:
            return 1, 1
        key_node, node, matched = self._walk(path)
        mark = node.start_mark
        if key and key_node is not None and matched == len(path):
            mark = key_node.start_mark
        return mark.line + 1, mark.column + 1

    def problem(self, path: DataPath, message: str, *, key: bool = False) -> Problem:
        line, col = self.position(path, key=key)
        return Problem(self.file, line, col, format_path(path), message)

    def is_tainted(self, path: DataPath) -> bool:
        return any(path[: len(t)] == t for t in self.tainted)

    def _walk(self, path: DataPath) -> tuple[yaml.Node | None, yaml.Node, int]:
        assert self.root is not None
        node: yaml.Node = self.root
        key_node: yaml.Node | None = None
        for depth, segment in enumerate(path):
            found: tuple[yaml.Node | None, yaml.Node] | None = None
            if isinstance(node, yaml.MappingNode) and isinstance(segment, str):
                # The last occurrence wins, as it does in the data after a merge.
                for k, v in reversed(node.value):
                    if isinstance(k, yaml.ScalarNode) and k.value == segment:
                        found = (k, v)
                        break
            elif (
                isinstance(node, yaml.SequenceNode)
                and isinstance(segment, int)
                and 0 <= segment < len(node.value)
            ):
                found = (None, node.value[segment])
            if found is None:
                return key_node, node, depth
            key_node, node = found
        return key_node, node, len(path)


class _Builder:
    """Turns the node tree into plain data, collecting problems instead of stopping."""

    def __init__(self, doc: SourceDocument, env: Mapping[str, str]) -> None:
        self.doc = doc
        self.env = env
        self.constructor = SafeConstructor()
        self.resolver = Resolver()
        self.flattened: set[int] = set()
        self.active: set[int] = set()

    def report(self, node: yaml.Node, path: DataPath, message: str) -> None:
        mark = node.start_mark
        self.doc.problem_paths.append(path)
        self.doc.problems.append(
            Problem(self.doc.file, mark.line + 1, mark.column + 1, format_path(path), message)
        )

    def build(self, node: yaml.Node, path: DataPath) -> Any:
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, path)
        if id(node) in self.active:
            self.report(node, path, "an alias refers to a node that contains it")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, path)
            self.report(node, path, f"unsupported YAML node {type(node).__name__}")
            return None
        finally:
            self.active.discard(id(node))

    def mapping(self, node: yaml.MappingNode, path: DataPath) -> dict[str, Any]:
        if id(node) not in self.flattened:
            self.flattened.add(id(node))
            self.check_duplicates(node, path)
            try:
                self.constructor.flatten_mapping(node)
            except ConstructorError as e:
                self.report(node, path, f"bad merge (<<): {e.problem}")
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                self.report(key_node, path, "a key must be a plain name")
                continue
            # Keys are names in this schema, never typed values: `on:` or `8080:` stay text.
            key = str(key_node.value)
            result[key] = self.build(value_node, (*path, key))
        return result

    def check_duplicates(self, node: yaml.MappingNode, path: DataPath) -> None:
        seen: dict[str, yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            first = seen.get(key_node.value)
            if first is not None:
                self.report(
                    key_node,
                    (*path, key_node.value),
                    f"duplicate key '{key_node.value}' (first at line {first.start_mark.line + 1})",
                )
            else:
                seen[key_node.value] = key_node

    def scalar(self, node: yaml.ScalarNode, path: DataPath) -> Any:
        if node.tag == _STR_TAG and "${" in node.value:
            text, errors = interpolate(node.value, self.env)
            for message in errors:
                self.report(node, path, message)
                self.doc.tainted.add(path)
            if node.style:  # quoted or block: stays text (libyaml says '' for plain)
                return text
            # An unquoted `${PORT}` should become whatever the text it expands to would be.
            # The stubs leave Resolver.resolve untyped; it returns the tag string.
            tag: str = self.resolver.resolve(  # type: ignore[no-untyped-call]
                yaml.ScalarNode, text, (True, False)
            )
            node = yaml.ScalarNode(tag, text, node.start_mark, node.end_mark)
        try:
            return self.constructor.construct_object(node, deep=True)
        except (ConstructorError, ValueError) as e:
            detail = e.problem if isinstance(e, ConstructorError) else str(e)
            self.report(node, path, f"cannot read this value: {detail}")
            return None


def _syntax_problem(file: str, text: str, error: yaml.YAMLError) -> Problem:
    line, col = 1, 1
    message = str(error)
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        if mark is not None:
            line, col = mark.line + 1, mark.column + 1
        parts = [p for p in (error.context, error.problem) if p]
        message = ", ".join(parts) or message
    elif isinstance(error, yaml.reader.ReaderError):
        before = text[: error.position]
        line = before.count("\n") + 1
        col = error.position - (before.rfind("\n") + 1) + 1
        message = f"unacceptable character #x{error.character:04x}: {error.reason}"
    return Problem(file, line, col, "$", f"syntax error: {message}")


def parse_source(text: str, file: str, *, env: Mapping[str, str] | None = None) -> SourceDocument:
    """Parse ``text`` (YAML, or JSON which YAML reads too). Syntax errors raise ConfigError."""
    # JSON permits tabs as whitespace where YAML does not; in valid JSON a raw tab can only
    # be whitespace (tabs in strings must be escaped), and one space keeps every column.
    if file.endswith(".json"):
        text = text.replace("\t", " ")
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as e:
        raise ConfigError([_syntax_problem(file, text, e)]) from None
    doc = SourceDocument(file, root)
    if root is not None:
        doc.data = _Builder(doc, os.environ if env is None else env).build(root, ())
    return doc
