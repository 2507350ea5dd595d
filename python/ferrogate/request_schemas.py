"""What a request is checked against: the operations of an OpenAPI 3.0/3.1 document, or plain
JSON Schemas for the query, the headers and the body. Everything is compiled once, when a
config loads; checking a request is matching its operation, decoding its parameters and
running compiled ``jsonschema`` validators.

The libraries made for this do the standards' work: ``openapi-spec-validator`` judges the
document, ``openapi-schema-validator`` supplies OpenAPI's schema dialects (3.0's ``nullable``
and formats; 3.1 is JSON Schema 2020-12), and ``referencing`` resolves ``$ref`` (in the
document, or in files beside it). What is ours is small: matching a path to its template
and decoding parameters by their ``style``, which a validator does not do. They are imported
when a config uses them, since every gateway start imports every first-party plugin.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urljoin, urlsplit

import yaml

if TYPE_CHECKING:
    from jsonschema.exceptions import ValidationError
    from jsonschema.protocols import Validator

__all__ = [
    "Api",
    "Body",
    "Operation",
    "Param",
    "Problem",
    "coerce",
    "load_api",
    "load_schema",
    "media_type",
    "schema_validator",
]

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# Header parameters of these names are ignored (OpenAPI 3: they are described elsewhere).
_IGNORED_HEADERS = frozenset({"accept", "content-type", "authorization"})
_DATA_KEYS = frozenset({"example", "default", "enum", "const"})
_VALUE_SHOWN = 60  # characters of a client's value quoted back in a message
_MESSAGE_MAX = 300


@dataclass(frozen=True)
class Problem:
    """One reason a request is not valid: where (``path``, ``query``, ``header``,
    ``cookie``, ``body``), the JSON pointer of the field inside that part, and why."""

    where: str
    pointer: str
    message: str

    def dotted(self) -> str:
        """``body.items[0].price``: the pointer as a reader would write it."""
        out = self.where
        for part in self.pointer.split("/")[1:]:
            name = part.replace("~1", "/").replace("~0", "~")
            out += f"[{name}]" if name.isdigit() else f".{name}"
        return out

    def as_dict(self) -> dict[str, str]:
        return {"in": self.where, "field": self.pointer, "message": self.text()}

    def text(self) -> str:
        return f"{self.dotted()}: {self.message}"


def _pointer(parts: Iterable[str | int], *, quoted: bool = False) -> str:
    """A JSON pointer; ``quoted`` for a URI fragment (referencing unquotes it)."""
    out = "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)
    return quote(out, safe="/~") if quoted else out


def _short(value: Any) -> str:
    text = repr(value)
    if len(text) <= _VALUE_SHOWN:
        return text
    return text[: _VALUE_SHOWN - 4] + "..." + (text[0] if text[0] in "'\"" else "")


def _explain(error: ValidationError) -> tuple[list[str | int], str]:
    """The field an error is about and a message that never quotes a long value."""
    path: list[str | int] = list(error.absolute_path)
    message = error.message
    long_value = repr(error.instance)
    if len(long_value) > _VALUE_SHOWN:
        message = message.replace(long_value, _short(error.instance))
    instance = error.instance
    if error.validator == "required" and isinstance(instance, dict):
        # The missing property is the field, not the object that lacks it.
        m = re.match(r"^('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\") is a required property$", message)
        if m:
            path.append(ast.literal_eval(m.group(1)))
    elif error.validator == "additionalProperties" and isinstance(instance, dict):
        schema = error.schema if isinstance(error.schema, Mapping) else {}
        props = schema.get("properties", {})
        patterns = [re.compile(p) for p in schema.get("patternProperties", {})]
        extra = [k for k in instance if k not in props and not any(p.search(k) for p in patterns)]
        if extra:
            path.append(extra[0])
    if len(message) > _MESSAGE_MAX:
        message = message[: _MESSAGE_MAX - 3] + "..."
    return path, message


def problems_of(
    validator: Validator, doc: Any, where: str, limit: int, base: Iterable[str | int] = ()
) -> list[Problem]:
    """At most ``limit`` problems of ``doc``; the validator stops looking after that."""
    from jsonschema.exceptions import best_match

    out: list[Problem] = []
    for error in validator.iter_errors(doc):
        if error.context:
            error = best_match(error.context) or error
        path, message = _explain(error)
        out.append(Problem(where, _pointer([*base, *path]), message))
        if len(out) >= limit:
            break
    return out


# -- loading documents ---------------------------------------------------------------------------


def _read_document(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} does not parse: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path} does not parse: {e.problem or e.context}{at}") from None
    except (ValueError, yaml.YAMLError) as e:
        raise ValueError(f"{path} does not parse: {_one_line(str(e))}") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _file_retriever(specification: Any) -> Callable[[str], Any]:
    """Resolves ``$ref`` to other files (``schemas.yaml#/Pet``) by reading them, once."""
    from referencing import Resource
    from referencing.exceptions import NoSuchResource

    def retrieve(uri: str) -> Resource[Any]:
        parts = urlsplit(uri)
        if parts.scheme != "file":
            # Never fetch from the network while a config loads.
            raise NoSuchResource(ref=uri)  # type: ignore[call-arg]
        doc = _read_document(Path(unquote(parts.path)))
        return Resource.from_contents(doc, default_specification=specification)

    return retrieve


def schema_validator(schema: Any, *, dialect: str = "2020-12", where: str = "") -> Validator:
    """A compiled validator for a plain JSON Schema (its ``$schema`` picks the draft,
    else ``dialect``); a schema that is not one raises ValueError naming ``where``."""
    from jsonschema import Draft202012Validator, FormatChecker, validators
    from jsonschema.exceptions import SchemaError

    default = Draft202012Validator
    cls = validators.validator_for(schema, default=default) if isinstance(schema, dict) else default
    try:
        cls.check_schema(schema)
    except SchemaError as e:
        at = "/".join(str(p) for p in e.absolute_path)
        raise ValueError(
            f"{where}is not a valid JSON Schema: {_one_line(e.message)}"
            + (f" (at {at})" if at else "")
        ) from None
    return cls(schema, format_checker=FormatChecker())


def load_schema(value: Mapping[str, Any], where: str) -> Validator:
    """A schema given inline, or as ``{file: PATH}`` (JSON or YAML)."""
    if set(value) == {"file"} and isinstance(value["file"], str):
        path = Path(value["file"])
        return schema_validator(_read_document(path), where=f"{where}: {path} ")
    return schema_validator(dict(value), where=f"{where}: ")


# -- parameters ----------------------------------------------------------------------------------


def coerce(value: str, schema: Mapping[str, Any]) -> Any:
    """A string read from a URL or a header, as the type the schema asks for (left a string
    when it is not one: the validator then says what is wrong)."""
    types = schema.get("type")
    if isinstance(types, str):
        types = [types]
    elif not isinstance(types, list):
        return value
    for t in types:
        if t == "integer" and re.fullmatch(r"[+-]?\d+", value):
            return int(value)
        if t == "number":
            try:
                number = float(value)
            except ValueError:
                continue
            if number == number and abs(number) != float("inf"):  # not NaN, not infinite
                return int(value) if re.fullmatch(r"[+-]?\d+", value) else number
        if t == "boolean" and value in ("true", "false"):
            return value == "true"
        if t == "null" and value in ("", "null"):
            return None
        if t == "string":
            return value
    return value


@dataclass
class Param:
    """One OpenAPI parameter, with what decoding it needs."""

    name: str
    where: str
    required: bool
    style: str
    explode: bool
    schema: Mapping[str, Any]
    """The parameter's schema with ``$ref`` followed at the top (for decoding)."""
    items: Mapping[str, Any]
    properties: Mapping[str, Mapping[str, Any]]
    validator: Validator | None
    json_content: bool = False

    def kind(self) -> str:
        t = self.schema.get("type")
        if isinstance(t, list):
            t = next((x for x in t if x != "null"), None)
        if t is None and "properties" in self.schema:
            return "object"
        if t is None and "items" in self.schema:
            return "array"
        return t if isinstance(t, str) else "primitive"

    def decode(self, values: list[str], params: list[tuple[str, str]]) -> Any:
        """The value of the parameter from its raw string(s) (``values``, every occurrence);
        ``params`` are all the query's pairs, for exploded objects."""
        if self.json_content:
            try:
                return json.loads(values[0])
            except ValueError:
                return values[0]
        kind = self.kind()
        if kind == "array":
            if self.where == "query" and self.explode and self.style == "form":
                parts = values
            else:
                sep = {"spaceDelimited": " ", "pipeDelimited": "|"}.get(self.style, ",")
                parts = values[0].split(sep) if values[0] else []
            return [coerce(p, self.items) for p in parts]
        if kind == "object":
            return self._decode_object(values, params)
        return coerce(values[0], self.schema)

    def _decode_object(self, values: list[str], params: list[tuple[str, str]]) -> Any:
        out: dict[str, Any] = {}
        if self.style == "deepObject":
            prefix = self.name + "["
            for k, v in params:
                if k.startswith(prefix) and k.endswith("]"):
                    prop = k[len(prefix) : -1]
                    out[prop] = coerce(v, self.properties.get(prop, {}))
            return out
        if self.explode and self.where in ("query", "cookie"):
            for k, v in params:
                if k in self.properties:
                    out[k] = coerce(v, self.properties[k])
            return out
        pairs = values[0].split(",") if values and values[0] else []
        if self.explode:  # simple style, exploded: k=v,k2=v2
            for pair in pairs:
                k, _, v = pair.partition("=")
                out[k] = coerce(v, self.properties.get(k, {}))
            return out
        for k, v in zip(pairs[::2], pairs[1::2], strict=False):
            out[k] = coerce(v, self.properties.get(k, {}))
        return out


def media_type(content_type: str) -> str:
    """``application/json`` of ``Application/JSON; charset=utf-8``."""
    return content_type.split(";", 1)[0].strip().lower()


def is_json(mtype: str) -> bool:
    return mtype == "application/json" or (
        mtype.startswith("application/") and mtype.endswith("+json")
    )


@dataclass
class Body:
    """What an operation accepts as its request body."""

    required: bool
    content: list[tuple[str, Validator | None, Mapping[str, Any]]]
    """(media range, validator, schema) in the order most specific first."""

    def for_type(self, mtype: str) -> tuple[str, Validator | None, Mapping[str, Any]] | None:
        major = mtype.split("/", 1)[0]
        for rng, validator, schema in self.content:
            if rng in (mtype, f"{major}/*", "*/*"):
                return rng, validator, schema
        return None

    def types(self) -> str:
        return ", ".join(rng for rng, _, _ in self.content)


@dataclass
class Operation:
    method: str
    template: str
    params: list[Param]
    body: Body | None
    has_object_params: bool = False


@dataclass
class _Template:
    template: str
    regex: re.Pattern[str]
    names: list[str]
    operations: dict[str, Operation] = field(default_factory=dict)


def _template_regex(template: str) -> tuple[re.Pattern[str], list[str]]:
    names: list[str] = []
    out = ""
    for piece in re.split(r"(\{[^{}/]+\})", template):
        if piece.startswith("{") and piece.endswith("}"):
            names.append(piece[1:-1])
            out += "([^/]+)"
        else:
            out += re.escape(piece)
    return re.compile(out + "$"), names


class Api:
    """The operations of one OpenAPI document, matched by method and path."""

    def __init__(self, templates: list[_Template], base_path: str, has_bodies: bool) -> None:
        # Concrete paths before templated ones (OpenAPI 3), then longer literal parts first.
        self.templates = sorted(
            templates, key=lambda t: (len(t.names), -len(re.sub(r"\{[^}]*\}", "", t.template)))
        )
        self.exact = {t.template: t for t in templates if not t.names}
        self.base_path = base_path
        self.has_bodies = has_bodies

    def match(self, method: str, path: str) -> tuple[Operation, dict[str, str]] | list[str] | None:
        """The operation and its raw path parameters; the methods the path allows when the
        method is not one of them; None when no path of the API matches."""
        if self.base_path:
            if path != self.base_path and not path.startswith(self.base_path + "/"):
                return None
            path = path[len(self.base_path) :] or "/"
        method = method.lower()
        candidates: list[tuple[_Template, dict[str, str]]] = []
        exact = self.exact.get(path)
        if exact is not None:
            candidates.append((exact, {}))
        for t in self.templates:
            if not t.names:
                continue
            m = t.regex.match(path)
            if m:
                candidates.append((t, dict(zip(t.names, m.groups(), strict=True))))
        if not candidates:
            return None
        for t, raw in candidates:
            op = t.operations.get(method) or (t.operations.get("get") if method == "head" else None)
            if op is not None:
                return op, raw
        allowed = {m.upper() for t, _ in candidates for m in t.operations}
        return sorted(allowed)


class _Loader:
    """Compiles one OpenAPI document (already judged valid) into an ``Api``.

    Places in the documents are absolute URIs with a JSON pointer fragment
    (``file:///specs/api.yaml#/paths/~1pets/get``): a validator is ``{"$ref": place}``
    over a registry that holds the document, so ``$ref`` inside a schema resolves from
    where that schema really is, in this file or another.
    """

    def __init__(self, doc: dict[str, Any], uri: str) -> None:
        from openapi_schema_validator import (
            OAS30Validator,
            OAS31Validator,
            oas30_format_checker,
            oas31_format_checker,
        )
        from referencing import Registry
        from referencing.jsonschema import DRAFT4, DRAFT202012

        v30 = str(doc.get("openapi", "")).startswith("3.0")
        spec = DRAFT4 if v30 else DRAFT202012
        self.cls: Any = OAS30Validator if v30 else OAS31Validator
        self.checker: Any = oas30_format_checker if v30 else oas31_format_checker
        self.uri = uri
        resource = spec.create_resource(doc)
        registry: Registry[Any] = Registry(retrieve=_file_retriever(spec))  # type: ignore[call-arg]
        self.registry = registry.with_resource(uri, resource).crawl()
        self.resolver = self.registry.resolver()
        self.doc = doc

    def resolve(self, node: Any, place: str) -> tuple[Any, str]:
        """Follow ``$ref`` at the top of ``node`` (found at ``place``): the target and its place."""
        for _ in range(32):
            if not (isinstance(node, Mapping) and isinstance(node.get("$ref"), str)):
                return node, place
            place = urljoin(place, node["$ref"])
            node = self.resolver.lookup(place).contents
        raise ValueError(f"$ref chain too long or circular at {place}")

    def check_refs(self) -> None:
        """Resolve every ``$ref`` once now: one that leads nowhere is a config problem, not a
        500 on the first request that reaches it."""
        from referencing.exceptions import Unresolvable

        seen: set[str] = set()
        todo: list[tuple[Any, str]] = [(self.doc, self.uri + "#")]
        while todo:
            node, place = todo.pop()
            if isinstance(node, Mapping):
                ref = node.get("$ref")
                if isinstance(ref, str):
                    target = urljoin(place, ref)
                    try:
                        self.resolver.lookup(target)
                    except Unresolvable:
                        where = unquote(place.partition("#")[2]) or "/"
                        raise ValueError(f"$ref {ref!r} at {where} leads nowhere") from None
                    doc_uri = target.partition("#")[0]
                    if doc_uri != place.partition("#")[0] and doc_uri not in seen:
                        seen.add(doc_uri)  # another file: check its references too
                        todo.append((self.resolver.lookup(doc_uri).contents, doc_uri + "#"))
                for k, v in node.items():
                    # Data, not schemas; and $id moves the base URI (left to the validator).
                    if k not in _DATA_KEYS and not (isinstance(v, Mapping) and "$id" in v):
                        todo.append((v, place + _pointer([k], quoted=True)))
            elif isinstance(node, list):
                todo.extend((v, f"{place}/{i}") for i, v in enumerate(node))

    def validator(self, place: str) -> Validator:
        schema, place = self.resolve({"$ref": place}, place)
        if isinstance(schema, Mapping) and not _has_ref(schema):
            # Self-contained: validated as it is, without a lookup per request.
            root: Any = schema
        else:
            root = {"$ref": place}
        out: Validator = self.cls(root, registry=self.registry, format_checker=self.checker)
        return out

    def api(self, base_path: str) -> Api:
        templates = []
        has_bodies = False
        for template, raw_item in (self.doc.get("paths") or {}).items():
            t_regex, names = _template_regex(template)
            t = _Template(template, t_regex, names)
            item, item_at = self.resolve(raw_item, _place(self.uri, ["paths", template]))
            shared = item.get("parameters", [])
            for method in METHODS:
                op_doc = item.get(method)
                if not isinstance(op_doc, Mapping):
                    continue
                op_at = f"{item_at}/{method}"
                params: dict[tuple[str, str], Param] = {}
                for i, p in enumerate(shared):
                    param = self.param(p, f"{item_at}/parameters/{i}")
                    params[(param.where, param.name.lower())] = param
                for i, p in enumerate(op_doc.get("parameters", [])):
                    param = self.param(p, f"{op_at}/parameters/{i}")
                    params[(param.where, param.name.lower())] = param
                body = None
                if "requestBody" in op_doc:
                    body = self.body(op_doc["requestBody"], f"{op_at}/requestBody")
                    has_bodies = has_bodies or bool(body.content)
                kept = [
                    p
                    for p in params.values()
                    if not (p.where == "header" and p.name.lower() in _IGNORED_HEADERS)
                ]
                t.operations[method] = Operation(method, template, kept, body)
            templates.append(t)
        return Api(templates, base_path.rstrip("/"), has_bodies)

    def param(self, node: Any, at: str) -> Param:
        p, at = self.resolve(node, at)
        where = p["in"]
        json_content = False
        raw_schema = p.get("schema")
        schema_at = f"{at}/schema"
        if raw_schema is None and isinstance(p.get("content"), Mapping):
            mtype, media = next(iter(p["content"].items()))
            json_content = is_json(media_type(mtype))
            schema_at = at + _pointer(["content", mtype, "schema"], quoted=True)
            raw_schema = media.get("schema") if isinstance(media, Mapping) else None
        schema, s_at = self.resolve(raw_schema or {}, schema_at)
        items = self.resolve(schema.get("items", {}), s_at + "/items")[0]
        properties = {
            k: self.resolve(v, s_at)[0] for k, v in (schema.get("properties") or {}).items()
        }
        default_style = {"query": "form", "cookie": "form"}.get(where, "simple")
        style = p.get("style", default_style)
        return Param(
            name=p["name"],
            where=where,
            required=bool(p.get("required", where == "path")),
            style=style,
            explode=bool(p.get("explode", style == "form")),
            schema=schema,
            items=items if isinstance(items, Mapping) else {},
            properties=properties,
            validator=self.validator(schema_at) if raw_schema is not None else None,
            json_content=json_content,
        )

    def body(self, node: Any, at: str) -> Body:
        node, at = self.resolve(node, at)
        content = []
        for mtype, media in (node.get("content") or {}).items():
            has_schema = isinstance(media, Mapping) and "schema" in media
            schema_at = at + _pointer(["content", mtype, "schema"], quoted=True)
            schema = self.resolve(media["schema"], schema_at)[0] if has_schema else {}
            validator = self.validator(schema_at) if has_schema else None
            content.append((media_type(mtype), validator, schema))
        # Exact types before ranges (type/*) before */*.
        content.sort(key=lambda c: c[0].count("*"))
        return Body(bool(node.get("required", False)), content)


def _has_ref(node: Any) -> bool:
    if isinstance(node, Mapping):
        return "$ref" in node or any(_has_ref(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_ref(v) for v in node)
    return False


def _place(uri: str, parts: Iterable[str | int]) -> str:
    return uri + "#" + _pointer(parts, quoted=True)


def _server_base_path(doc: Mapping[str, Any]) -> str:
    servers = doc.get("servers") or []
    if not servers or not isinstance(servers[0], Mapping):
        return ""
    url = str(servers[0].get("url", ""))
    if "{" in url:
        return ""
    return urlsplit(url).path.rstrip("/")


def load_api(path: str | Path, base_path: str | None = None) -> Api:
    """The operations of the OpenAPI document at ``path``, checked with
    ``openapi-spec-validator``; ValueError with the file and the reason when it is not
    usable. Cached by file identity and modification time."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise ValueError(f"cannot read {p}: {e.strerror or e}") from None
    return _load_api(str(p.resolve()), st.st_mtime_ns, st.st_size, base_path)


@cache
def _load_api(path: str, mtime: int, size: int, base_path: str | None) -> Api:
    from jsonschema_path import SchemaPath
    from openapi_spec_validator import OpenAPIV30SpecValidator, OpenAPIV31SpecValidator

    file = Path(path)
    doc = _read_document(file)
    if not isinstance(doc, dict):
        raise ValueError(f"{file} is not an OpenAPI document (not a mapping)")
    version = str(doc.get("openapi", ""))
    if version.startswith("3.0"):
        cls: Any = OpenAPIV30SpecValidator
    elif version.startswith("3.1"):
        cls = OpenAPIV31SpecValidator
    else:
        raise ValueError(f"{file} is not an OpenAPI 3.0 or 3.1 document (openapi: {version!r})")
    uri = file.as_uri()
    try:
        error = next(iter(cls(SchemaPath.from_dict(doc, base_uri=uri)).iter_errors()), None)
    except Exception as e:  # a $ref the validator cannot follow, ...
        raise ValueError(f"{file} is not a valid OpenAPI document: {_one_line(str(e))}") from None
    if error is not None:
        at = "/".join(str(x) for x in getattr(error, "absolute_path", []) or [])
        raise ValueError(
            f"{file} is not a valid OpenAPI {version} document: "
            f"{_one_line(getattr(error, 'message', str(error)))}" + (f" (at {at})" if at else "")
        )
    try:
        loader = _Loader(doc, uri)
        loader.check_refs()
        return loader.api(_server_base_path(doc) if base_path is None else base_path)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    except Exception as e:
        raise ValueError(f"{file}: {type(e).__name__}: {_one_line(str(e))[:300]}") from None


def query_pairs(query: str) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    return parse_qsl(query, keep_blank_values=True)


def cookie_pairs(header: str) -> list[tuple[str, str]]:
    out = []
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            out.append((name.strip(), unquote(value.strip().strip('"'))))
    return out


def iter_param_problems(
    op: Operation,
    raw_path: Mapping[str, str],
    query: list[tuple[str, str]],
    header: Callable[[str], list[str]],
    cookies: list[tuple[str, str]],
    limit: int,
) -> Iterator[Problem]:
    """Problems of the path, query, header and cookie parameters, in that order."""
    sources: dict[str, list[tuple[str, str]]] = {"query": query, "cookie": cookies}
    for param in op.params:
        if param.where == "path":
            values = [unquote(raw_path[param.name])] if param.name in raw_path else []
        elif param.where == "header":
            values = header(param.name)
            if len(values) > 1:
                values = [",".join(values)]
        else:
            pairs = sources[param.where]
            values = [v for k, v in pairs if k == param.name]
            if not values and param.kind() == "object" and param.style == "deepObject":
                values = [""] if any(k.startswith(param.name + "[") for k, _ in pairs) else []
            elif not values and param.kind() == "object" and param.explode:
                values = [""] if any(k in param.properties for k, _ in pairs) else []
        if not values:
            if param.required:
                yield Problem(
                    param.where, _pointer([param.name]), "the required parameter is missing"
                )
            continue
        if param.validator is None:
            continue
        value = param.decode(values, sources.get(param.where, []))
        yield from problems_of(param.validator, value, param.where, limit, [param.name])
