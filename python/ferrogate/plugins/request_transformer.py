"""Rewrites requests on their way upstream: headers, query parameters, the JSON body, the
path and the method.

Each of ``headers``, ``query`` and ``body`` goes through the operations in this order:
remove, rename, replace, add, append (headers and query only), then ``map`` (body only);
``method`` and ``path`` are applied last.

- ``remove``: drop the field (every value of a header or parameter).
- ``rename``: give the field a new name and keep its value(s); a field that already had the
  new name is dropped first. Nothing happens when the old name is absent.
- ``replace``: set a new value, only when the field is present.
- ``add``: set a value, only when the field is absent.
- ``append``: add one more value (or each value of a list), present or not.
- ``map``: move a body value from one field path to another (or copy it, ``copy: true``),
  overwriting what the destination held; objects missing on the destination path are
  created.

Header names are case-insensitive; query parameter names are not. Body fields are named by
paths of object keys separated by dots (``user.address.city``); a body rule renames a key in
place (``{"user.name": "full_name"}``), and ``map`` moves values between objects.

Body rules apply to requests whose content type is JSON (``application/json`` or
``*/*+json``) and that are not content-encoded; the top-level value must be an object (an
empty body counts as ``{}``). A body that is not valid JSON goes upstream unchanged; one
nested too deeply to decode is refused with 400, since its fields could not be edited.

Values of ``replace``, ``add`` and ``append`` may contain templates, filled in from the
request as it reached this plugin: ``$(headers.NAME)``, ``$(query.NAME)``, ``$(client_ip)``,
``$(request_id)``, ``$(route)``, ``$(host)``, ``$(method)``, ``$(path)``, ``$(consumer)``. An
absent source gives an empty string. In the body only string values are templated (a value
that is one template stays a string).

The other modules of this package reuse the building blocks defined here (``FieldEdits``,
``BodyEdits``, ``Template``, ``json_body``).
"""

import copy
import re
from typing import Annotated, Any, ClassVar, Literal, Protocol

import msgspec
from msgspec import Meta

from ferrogate.hooks import Headers, Request, Response
from ferrogate.plugin import Plugin

__all__ = [
    "AppendRules",
    "BodyEdits",
    "BodyMove",
    "FieldEdits",
    "PathRewrite",
    "RemoveRules",
    "RenameRules",
    "RequestTransformer",
    "Template",
    "ValueRules",
    "check_header_name",
    "field_path",
    "json_body",
]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TEMPLATE = re.compile(r"\$\(([^()]*)\)")
_PLAIN_SOURCES = ("client_ip", "request_id", "route", "host", "method", "path", "consumer")
_NO_CONTROLS = {ord("\r"): None, ord("\n"): None, 0: None}
_MISSING: Any = object()

FieldValue = str | int | float
"""A header or query value as written in the config; numbers are sent as their text."""


class _Struct(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


# -- config ----------------------------------------------------------------------------------


class RemoveRules(_Struct, kw_only=True, frozen=True):
    """Fields to drop."""

    headers: Annotated[list[str], Meta(description="Header names.")] = []
    query: Annotated[list[str], Meta(description="Query parameter names.")] = []
    body: Annotated[list[str], Meta(description="JSON body field paths (a.b.c).")] = []


class RenameRules(_Struct, kw_only=True, frozen=True):
    """Fields to rename: old name -> new name."""

    headers: Annotated[dict[str, str], Meta(description="Old header name -> new name.")] = {}
    query: Annotated[dict[str, str], Meta(description="Old parameter name -> new name.")] = {}
    body: Annotated[
        dict[str, str],
        Meta(description="Field path -> the field's new key, in the same object."),
    ] = {}


class ValueRules(_Struct, kw_only=True, frozen=True):
    """Fields to set: name -> value."""

    headers: Annotated[dict[str, FieldValue], Meta(description="Header name -> value.")] = {}
    query: Annotated[dict[str, FieldValue], Meta(description="Parameter name -> value.")] = {}
    body: Annotated[
        dict[str, Any], Meta(description="JSON body field path -> any JSON value.")
    ] = {}


class AppendRules(_Struct, kw_only=True, frozen=True):
    """Values to add to a field, whether or not it is present."""

    headers: Annotated[
        dict[str, FieldValue | list[FieldValue]],
        Meta(description="Header name -> value or list of values."),
    ] = {}
    query: Annotated[
        dict[str, FieldValue | list[FieldValue]],
        Meta(description="Parameter name -> value or list of values."),
    ] = {}


class BodyMove(_Struct, kw_only=True, frozen=True):
    """One JSON body value moved (or copied) to another field path."""

    from_: Annotated[str, Meta(description="Field path of the value (a.b.c).")] = msgspec.field(
        name="from"
    )
    to: Annotated[str, Meta(description="Field path it goes to; overwritten if present.")]
    copy: Annotated[
        bool, Meta(description="Keep the value at `from` too (copy instead of move).")
    ] = False


class PathRewrite(_Struct, kw_only=True, frozen=True):
    """A regular-expression rewrite of the path (Python `re` syntax)."""

    pattern: Annotated[str, Meta(description="Regular expression searched in the path.")]
    replacement: Annotated[
        str, Meta(description="What every match becomes; \\1 or \\g<name> insert groups.")
    ]


def _body_rules(cfg: "RequestTransformer.Config") -> bool:
    return bool(cfg.remove.body or cfg.rename.body or cfg.replace.body or cfg.add.body or cfg.map)


# -- building blocks -------------------------------------------------------------------------


def check_header_name(name: str, where: str) -> str:
    """``name`` lower-cased; ValueError naming ``where`` when it is not an HTTP token."""
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"{where}: '{name}' is not a valid header name")
    return name.lower()


def field_path(path: str, where: str) -> tuple[str, ...]:
    """The keys of a dotted JSON field path; ValueError naming ``where`` when malformed."""
    keys = tuple(path.split("."))
    if not all(keys):
        raise ValueError(f"{where}: '{path}' is not a field path (keys separated by dots)")
    return keys


class _Sources:
    """What templates read: the request as it reached the plugin, before any change."""

    __slots__ = ("headers", "query", "values")

    def __init__(self, req: Request, headers: bool, query: bool) -> None:
        self.headers: dict[str, str] = {}
        self.query: dict[str, str] = {}
        if headers:
            for name, value in req.headers.items():
                self.headers.setdefault(name, value)
        if query:
            for name, value in req.query_params.items():
                self.query.setdefault(name, value)
        self.values = {
            "client_ip": req.client_ip,
            "request_id": req.request_id,
            "route": req.route,
            "host": req.host,
            "method": req.method,
            "path": req.path,
            "consumer": req.consumer or "",
        }

    def get(self, kind: str, name: str) -> str:
        if kind == "headers":
            return self.headers.get(name, "")
        if kind == "query":
            return self.query.get(name, "")
        return self.values[kind]


class Template:
    """A config value with ``$(...)`` templates, parsed once; ``render`` fills them in."""

    __slots__ = ("header", "parts", "sources", "static")

    def __init__(
        self, text: str, where: str, *, header: bool = False, dynamic: bool = True
    ) -> None:
        self.header = header
        self.parts: list[str | tuple[str, str]] = []
        pos = 0
        if dynamic:
            for m in _TEMPLATE.finditer(text):
                if m.start() > pos:
                    self.parts.append(text[pos : m.start()])
                self.parts.append(self._source(m.group(1), where))
                pos = m.end()
        if pos < len(text):
            self.parts.append(text[pos:])
        literal = "".join(p for p in self.parts if isinstance(p, str))
        if dynamic and "$(" in literal:
            raise ValueError(
                f"{where}: '{text}' has a '$(' that does not form a template such as "
                "$(headers.x-name)"
            )
        if header and any(c in literal for c in "\r\n\0"):
            raise ValueError(f"{where}: a header value cannot contain CR, LF or NUL")
        self.sources = {p[0] for p in self.parts if isinstance(p, tuple)}
        self.static = literal if not self.sources else None

    @staticmethod
    def _source(raw: str, where: str) -> tuple[str, str]:
        name = raw.strip()
        kind, dot, arg = name.partition(".")
        if kind in ("headers", "query") and dot and arg:
            return kind, arg.lower() if kind == "headers" else arg
        if name in _PLAIN_SOURCES:
            return name, ""
        raise ValueError(
            f"{where}: unknown template $({raw}); use $(headers.NAME), $(query.NAME), "
            + ", ".join(f"$({s})" for s in _PLAIN_SOURCES)
        )

    def render(self, src: "_Sources | None") -> str:
        if self.static is not None:
            return self.static
        assert src is not None
        out = "".join(p if isinstance(p, str) else src.get(*p) for p in self.parts)
        # A query value is percent-decoded and could carry a line break into a header.
        return out.translate(_NO_CONTROLS) if self.header else out


class _Fields(Protocol):
    """What ``Headers`` and ``Params`` have in common."""

    def __contains__(self, name: object) -> bool: ...
    def __setitem__(self, name: str, value: str) -> None: ...
    def add(self, name: str, value: str) -> None: ...
    def remove(self, name: str) -> bool: ...
    def rename(self, old: str, new: str) -> bool: ...


class FieldEdits:
    """remove/rename/replace/add/append for headers or query parameters, checked once."""

    __slots__ = ("add", "append", "remove", "rename", "replace", "sources")

    def __init__(
        self,
        section: str,
        remove: list[str],
        rename: dict[str, str],
        replace: dict[str, FieldValue],
        add: dict[str, FieldValue],
        append: dict[str, FieldValue | list[FieldValue]],
        *,
        header: bool,
        templates: bool,
    ) -> None:
        def name_of(name: str, where: str) -> str:
            if header:
                return check_header_name(name, where)
            if not name:
                raise ValueError(f"{where}: a parameter name cannot be empty")
            return name

        def value_of(value: FieldValue, where: str) -> Template:
            return Template(str(value), where, header=header, dynamic=templates)

        self.remove = [name_of(n, f"remove.{section}") for n in remove]
        self.rename = [
            (name_of(old, f"rename.{section}"), name_of(new, f"rename.{section}.{old}"))
            for old, new in rename.items()
        ]
        self.rename = [(old, new) for old, new in self.rename if old != new]
        self.replace = [
            (name_of(n, f"replace.{section}"), value_of(v, f"replace.{section}.{n}"))
            for n, v in replace.items()
        ]
        self.add = [
            (name_of(n, f"add.{section}"), value_of(v, f"add.{section}.{n}"))
            for n, v in add.items()
        ]
        self.append = [
            (name_of(n, f"append.{section}"), value_of(v, f"append.{section}.{n}"))
            for n, values in append.items()
            for v in (values if isinstance(values, list) else [values])
        ]
        self.sources: set[str] = set()
        for _, t in (*self.replace, *self.add, *self.append):
            self.sources |= t.sources

    def __bool__(self) -> bool:
        return bool(self.remove or self.rename or self.replace or self.add or self.append)

    def apply(self, fields: _Fields, src: _Sources | None) -> None:
        for name in self.remove:
            fields.remove(name)
        for old, new in self.rename:
            if old in fields:
                fields.remove(new)
                fields.rename(old, new)
        for name, value in self.replace:
            if name in fields:
                fields[name] = value.render(src)
        for name, value in self.add:
            if name not in fields:
                fields[name] = value.render(src)
        for name, value in self.append:
            fields.add(name, value.render(src))


def _parent(doc: dict[str, Any], keys: tuple[str, ...], create: bool) -> dict[str, Any] | None:
    """The object holding the last key of ``keys``, or None when the path runs through a
    value that is not an object (or through a missing one, unless ``create``)."""
    node = doc
    for key in keys[:-1]:
        child = node.get(key, _MISSING)
        if child is _MISSING:
            if not create:
                return None
            child = node[key] = {}
        elif not isinstance(child, dict):
            return None
        node = child
    return node


def _get(doc: dict[str, Any], keys: tuple[str, ...]) -> Any:
    parent = _parent(doc, keys, False)
    return _MISSING if parent is None else parent.get(keys[-1], _MISSING)


def _pop(doc: dict[str, Any], keys: tuple[str, ...]) -> Any:
    parent = _parent(doc, keys, False)
    return _MISSING if parent is None else parent.pop(keys[-1], _MISSING)


def _set(doc: dict[str, Any], keys: tuple[str, ...], value: Any) -> bool:
    parent = _parent(doc, keys, True)
    if parent is None:
        return False
    parent[keys[-1]] = value
    return True


_Value = Template | Any


def _fresh(value: _Value, src: _Sources | None) -> Any:
    if isinstance(value, Template):
        return value.render(src)
    # A constant object or list must not be changed in place by a later rule.
    return copy.deepcopy(value) if isinstance(value, (dict, list)) else value


class BodyEdits:
    """remove/rename/replace/add/map for a JSON object, with field paths checked once."""

    __slots__ = ("add", "moves", "remove", "rename", "replace", "sources")

    def __init__(
        self,
        remove: list[str],
        rename: dict[str, str],
        replace: dict[str, Any],
        add: dict[str, Any],
        moves: list[BodyMove],
        *,
        templates: bool,
    ) -> None:
        def value_of(value: Any, where: str) -> _Value:
            return Template(value, where, dynamic=True) if isinstance(value, str) else value

        self.remove = [field_path(p, "remove.body") for p in remove]
        self.rename: list[tuple[tuple[str, ...], str]] = []
        for old, new in rename.items():
            if not new or "." in new:
                raise ValueError(
                    f"rename.body.{old}: '{new}' must be a key name without dots "
                    "(use map to move a value to another path)"
                )
            keys = field_path(old, "rename.body")
            if keys[-1] != new:
                self.rename.append((keys, new))
        self.replace: list[tuple[tuple[str, ...], _Value]] = []
        self.add: list[tuple[tuple[str, ...], _Value]] = []
        for section, rules, out in (("replace", replace, self.replace), ("add", add, self.add)):
            for path, value in rules.items():
                keys = field_path(path, f"{section}.body")
                out.append(
                    (keys, value_of(value, f"{section}.body.{path}") if templates else value)
                )
        self.moves: list[tuple[tuple[str, ...], tuple[str, ...], bool]] = []
        for i, move in enumerate(moves):
            src = field_path(move.from_, f"map[{i}].from")
            dst = field_path(move.to, f"map[{i}].to")
            if not move.copy and dst[: len(src)] == src:
                raise ValueError(f"map[{i}]: cannot move '{move.from_}' into itself")
            self.moves.append((src, dst, move.copy))
        self.sources: set[str] = set()
        for _, v in (*self.replace, *self.add):
            if isinstance(v, Template):
                self.sources |= v.sources

    def __bool__(self) -> bool:
        return bool(self.remove or self.rename or self.replace or self.add or self.moves)

    def apply(self, doc: dict[str, Any], src: _Sources | None) -> bool:
        """Edit ``doc`` in place; True when anything changed."""
        changed = False
        for keys in self.remove:
            changed |= _pop(doc, keys) is not _MISSING
        for keys, new in self.rename:
            parent = _parent(doc, keys, False)
            if parent is None or keys[-1] not in parent:
                continue
            old = keys[-1]
            renamed = {(new if k == old else k): v for k, v in parent.items() if k != new}
            parent.clear()
            parent.update(renamed)
            changed = True
        for keys, value in self.replace:
            parent = _parent(doc, keys, False)
            if parent is not None and keys[-1] in parent:
                parent[keys[-1]] = _fresh(value, src)
                changed = True
        for keys, value in self.add:
            if _get(doc, keys) is _MISSING and _set(doc, keys, _fresh(value, src)):
                changed = True
        for from_keys, to_keys, keep in self.moves:
            value = _get(doc, from_keys)
            if value is _MISSING:
                continue
            if keep:
                changed |= _set(doc, to_keys, copy.deepcopy(value))
                continue
            _pop(doc, from_keys)
            if _set(doc, to_keys, value):
                changed = True
            else:
                _set(doc, from_keys, value)
        return changed


def json_body(headers: Headers) -> bool:
    """Whether a message with these headers has a JSON body the transformers may edit: a
    JSON media type (``application/json``, ``*/*+json``) and no content coding."""
    content_type = headers.get("content-type")
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not ("/" in media and media.endswith("+json")):
        return False
    coding = headers.get("content-encoding")
    return coding is None or coding.strip().lower() in ("", "identity")


# -- the plugin ------------------------------------------------------------------------------


class RequestTransformer(Plugin):
    """Rewrites requests before the upstream: headers, query, JSON body, path and method.

    Operations run in Kong's order (remove, rename, replace, add, append; then the body's
    ``map``; then ``method`` and ``path``), and ``replace``/``add``/``append`` values may use
    templates such as ``$(headers.x-user)`` or ``$(client_ip)``. The body is buffered only
    when the config has body rules; see the module documentation for the details.
    """

    name = "request-transformer"
    priority = 801
    # The plugin can use the body; request_body_mode says whether a given config does.
    request_body: ClassVar[Literal["none", "buffered"]] = "buffered"

    class Config(_Struct, kw_only=True, frozen=True):
        """Settings of request-transformer."""

        remove: Annotated[
            RemoveRules,
            Meta(
                description="{headers, query, body}: names, and body field paths (a.b.c), to drop."
            ),
        ] = msgspec.field(default_factory=RemoveRules)
        rename: Annotated[
            RenameRules,
            Meta(
                description="{headers, query, body}: old name -> new name, when the old one "
                "is present."
            ),
        ] = msgspec.field(default_factory=RenameRules)
        replace: Annotated[
            ValueRules,
            Meta(
                description="{headers, query, body}: name -> new value, when the field is present."
            ),
        ] = msgspec.field(default_factory=ValueRules)
        add: Annotated[
            ValueRules,
            Meta(
                description="{headers, query, body}: name -> value, when the field is absent "
                "(missing objects on a body path are created)."
            ),
        ] = msgspec.field(default_factory=ValueRules)
        append: Annotated[
            AppendRules,
            Meta(description="{headers, query}: name -> value or list, added even when present."),
        ] = msgspec.field(default_factory=AppendRules)
        map: Annotated[
            list[BodyMove],
            Meta(
                description="[{from, to, copy}]: JSON body values moved (or copied) between paths."
            ),
        ] = []
        path: Annotated[
            str | PathRewrite | None,
            Meta(description="A new path (/v2/users), or {pattern, replacement} (regex)."),
        ] = None
        method: Annotated[str | None, Meta(description="A new HTTP method, e.g. POST.")] = None

    config: "RequestTransformer.Config"

    def __init__(self, config: "RequestTransformer.Config") -> None:
        super().__init__(config)
        c = config
        self._headers = FieldEdits(
            "headers",
            c.remove.headers,
            c.rename.headers,
            c.replace.headers,
            c.add.headers,
            c.append.headers,
            header=True,
            templates=True,
        )
        self._query = FieldEdits(
            "query",
            c.remove.query,
            c.rename.query,
            c.replace.query,
            c.add.query,
            c.append.query,
            header=False,
            templates=True,
        )
        self._body = BodyEdits(
            c.remove.body, c.rename.body, c.replace.body, c.add.body, c.map, templates=True
        )
        sources = self._headers.sources | self._query.sources | self._body.sources
        self._templated = bool(sources)
        self._template_headers = "headers" in sources
        self._template_query = "query" in sources
        self._method: str | None = None
        if c.method is not None:
            if not _TOKEN.fullmatch(c.method):
                raise ValueError(f"method: '{c.method}' is not a valid HTTP method")
            self._method = c.method.upper()
        self._path: str | None = None
        self._pattern: re.Pattern[str] | None = None
        self._replacement = ""
        if isinstance(c.path, str):
            if not c.path.startswith("/") or any(ch in c.path for ch in " ?#\r\n\t\0"):
                raise ValueError(
                    f"path: '{c.path}' must start with / and hold no spaces, '?' or '#'"
                )
            self._path = c.path
        elif c.path is not None:
            try:
                self._pattern = re.compile(c.path.pattern)
            except re.error as e:
                raise ValueError(f"path.pattern: invalid regular expression: {e}") from None
            try:
                self._pattern.sub(c.path.replacement, "")
            except (re.error, IndexError) as e:
                raise ValueError(f"path.replacement: {e}") from None
            self._replacement = c.path.replacement

    @classmethod
    def request_body_mode(cls, config: Any) -> Literal["none", "buffered"]:
        """Buffered only when the config has body rules (``body`` in remove, rename,
        replace or add, or ``map``); otherwise requests stream to the upstream."""
        cfg = config if isinstance(config, cls.Config) else msgspec.convert(config, cls.Config)
        return "buffered" if _body_rules(cfg) else "none"

    def on_request(self, req: Request) -> Response | None:
        src = None
        if self._templated:
            src = _Sources(req, self._template_headers, self._template_query)
        is_json = bool(self._body) and json_body(req.headers)
        if self._headers:
            self._headers.apply(req.headers, src)
        if self._query:
            self._query.apply(req.query_params, src)
        if is_json and req.body is not None:
            refusal = self._edit_body(req, src)
            if refusal is not None:
                return refusal
        if self._method is not None:
            req.method = self._method
        if self._path is not None:
            req.path = self._path
        elif self._pattern is not None:
            path = self._pattern.sub(self._replacement, req.path)
            req.path = path if path.startswith("/") else "/" + path
        return None

    def _edit_body(self, req: Request, src: _Sources | None) -> Response | None:
        body = req.body or b""
        doc: Any = {}
        if body.strip():
            try:
                doc = msgspec.json.decode(body)
            except msgspec.DecodeError:
                return None
            except RecursionError:
                # Valid JSON the rules cannot be applied to must not reach the upstream as is.
                return Response(400, {"message": "JSON request body nested too deeply"})
        if isinstance(doc, dict) and self._body.apply(doc, src):
            req.body = msgspec.json.encode(doc)
        return None
