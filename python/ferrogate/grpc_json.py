"""JSON/HTTP <-> gRPC: the pieces of the ``grpc-transcode`` plugin that need no server.

- ``load_bindings`` reads a ``FileDescriptorSet`` (``protoc --include_imports
  --descriptor_set_out``) into a private descriptor pool and collects every method's
  ``google.api.http`` rule (and its ``additional_bindings``) as ``Binding``s.
- ``PathTemplate`` compiles an http rule's path template (``/v1/{name=shelves/*}:verb``)
  into a regular expression with one group per variable.
- ``Binding.request_message`` builds the gRPC request from the path variables, the query
  string and the JSON body, as the rule says.
- ``frame``/``unframe`` are the gRPC length-prefixed message framing.
- ``http_status`` and ``error_body`` turn a gRPC status into grpc-gateway's JSON error.

The mapping follows google/api/http.proto: path variables bind request fields (dotted
paths into nested messages); ``body: "*"`` maps the whole JSON body to the request (query
parameters are then not used); ``body: "field"`` maps it to that field, and the query
parameters fill the other fields; without a body every field not bound by the path may come
from the query (``a.b=1`` for nested fields, a repeated field by repeating the parameter).
"""

import base64
import gzip
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message import DecodeError, Message

__all__ = [
    "Binding",
    "DescriptorError",
    "JsonOptions",
    "PathTemplate",
    "TranscodeError",
    "error_body",
    "frame",
    "http_status",
    "load_bindings",
    "unframe",
]

# google.rpc.Code -> HTTP status, as grpc-gateway maps them (runtime.HTTPStatusFromCode).
_HTTP_STATUS = {
    0: 200,
    1: 499,
    2: 500,
    3: 400,
    4: 504,
    5: 404,
    6: 409,
    7: 403,
    8: 429,
    9: 400,
    10: 409,
    11: 400,
    12: 501,
    13: 500,
    14: 503,
    15: 500,
    16: 401,
}

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT_TYPES = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_SFIXED32,
}
_INT64_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}
_FLOAT_TYPES = {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE}
# Well-known messages whose JSON form is one string or number: a path or query value can
# name them directly.
_SCALAR_MESSAGES = {
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
    "google.protobuf.FieldMask",
    "google.protobuf.DoubleValue",
    "google.protobuf.FloatValue",
    "google.protobuf.Int64Value",
    "google.protobuf.UInt64Value",
    "google.protobuf.Int32Value",
    "google.protobuf.UInt32Value",
    "google.protobuf.BoolValue",
    "google.protobuf.StringValue",
    "google.protobuf.BytesValue",
}


class DescriptorError(ValueError):
    """The descriptor set or the rules in it cannot be used; the text names the setting."""


class TranscodeError(ValueError):
    """A request that cannot become the gRPC message (the client's mistake: 400)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class JsonOptions:
    """How messages are written as JSON (the proto3 JSON mapping's printer options)."""

    print_enum_as_int: bool = False
    always_print_fields_with_no_presence: bool = False
    preserve_proto_field_names: bool = False
    ignore_unknown_query_params: bool = False


# -- path templates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Variable:
    field_path: tuple[str, ...]
    group: str
    multi: bool
    """Whether it may span several segments (its value keeps the slashes)."""


class PathTemplate:
    """An http rule's path template compiled to a regular expression.

    Grammar (google/api/http.proto): ``"/" Segments [":" Verb]``, a segment is ``*`` (one
    segment), ``**`` (any number), a literal, or ``{field.path}`` / ``{field.path=Segments}``.
    """

    __slots__ = ("literals", "regex", "text", "variables", "verb")

    def __init__(self, text: str) -> None:
        self.text = text
        if not text.startswith("/"):
            raise ValueError(f"path template '{text}' must start with '/'")
        body, self.verb = _split_verb(text[1:])
        self.variables: list[_Variable] = []
        self.literals = 0
        pattern = self._segments(_split_top(body, text), text, inside=False)
        if self.verb is not None:
            pattern += ":" + re.escape(self.verb)
        self.regex = re.compile("/" + pattern)

    def _segments(self, segments: list[str], text: str, *, inside: bool) -> str:
        out = []
        for seg in segments:
            if seg == "*":
                out.append("[^/]+")
            elif seg == "**":
                out.append(".*")
            elif seg.startswith("{"):
                if inside or not seg.endswith("}"):
                    raise ValueError(f"path template '{text}': bad variable '{seg}'")
                out.append(self._variable(seg[1:-1], text))
            elif not seg or any(c in seg for c in "{}*"):
                raise ValueError(f"path template '{text}': bad segment '{seg}'")
            else:
                self.literals += 1
                out.append(re.escape(seg))
        return "/".join(out)

    def _variable(self, inner: str, text: str) -> str:
        name, eq, sub = inner.partition("=")
        path = tuple(name.split("."))
        if not all(_IDENT.fullmatch(p) for p in path):
            raise ValueError(f"path template '{text}': '{name}' is not a field path")
        group = f"v{len(self.variables)}"
        subs = sub.split("/") if eq else ["*"]
        multi = any(s == "**" for s in subs) or len(subs) > 1
        self.variables.append(_Variable(path, group, multi))
        return f"(?P<{group}>{self._segments(subs, text, inside=True)})"

    def match(self, path: str) -> dict[tuple[str, ...], str] | None:
        """The variables' values (percent-decoded) when ``path`` matches, else None."""
        m = self.regex.fullmatch(path)
        if m is None:
            return None
        out = {}
        for var in self.variables:
            raw = m.group(var.group)
            if var.multi:
                # Reserved expansion: an encoded slash stays encoded, so segments stay apart.
                out[var.field_path] = "/".join(
                    unquote(s).replace("/", "%2F") for s in raw.split("/")
                )
            else:
                out[var.field_path] = unquote(raw)
        return out


def _split_verb(body: str) -> tuple[str, str | None]:
    depth = 0
    colon = -1
    for i, c in enumerate(body):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "/" and depth == 0:
            colon = -1
        elif c == ":" and depth == 0:
            colon = i
    if colon < 0:
        return body, None
    verb = body[colon + 1 :]
    if not verb or "/" in verb:
        raise ValueError(f"path template '/{body}': empty verb")
    return body[:colon], verb


def _split_top(body: str, text: str) -> list[str]:
    """Segments at brace depth 0 (a variable's own slashes stay inside it)."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for c in body:
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"path template '{text}': unbalanced braces")
        if c == "/" and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if depth:
        raise ValueError(f"path template '{text}': unbalanced braces")
    out.append("".join(cur))
    return out


# -- fields -----------------------------------------------------------------------------------


# The protobuf stubs type descriptors two ways (pure Python and upb) and make every
# nested descriptor optional; the helpers below take what the pool gives them.
def _field(desc: Any, name: str) -> Any:
    f = desc.fields_by_name.get(name)
    if f is None:
        f = next((x for x in desc.fields if x.json_name == name), None)
    return f


def _resolve(desc: Any, path: tuple[str, ...]) -> list[Any] | None:
    """The fields along ``path`` (proto or JSON names) when every step but the last is a
    singular message field; else None."""
    out: list[Any] = []
    for i, name in enumerate(path):
        f = _field(desc, name)
        if f is None:
            return None
        out.append(f)
        if i < len(path) - 1:
            if f.type != FieldDescriptor.TYPE_MESSAGE or _is_repeated(f):
                return None
            desc = f.message_type
    return out


def _is_repeated(f: Any) -> bool:
    # ``label`` is gone from newer protobuf releases, ``is_repeated`` absent from older ones.
    flag = getattr(f, "is_repeated", None)
    if flag is None:
        return bool(f.label == FieldDescriptor.LABEL_REPEATED)
    return bool(flag)


def _is_map(f: Any) -> bool:
    return bool(
        _is_repeated(f)
        and f.type == FieldDescriptor.TYPE_MESSAGE
        and f.message_type.GetOptions().map_entry
    )


def _scalar_leaf(f: Any) -> bool:
    """Whether a path or query value (one string) can set ``f``."""
    if _is_map(f):
        return False
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return f.message_type.full_name in _SCALAR_MESSAGES
    return True


def _json_value(f: Any, text: str, where: str) -> Any:
    """``text`` (from the path or the query) as the JSON value of field ``f``."""
    t = f.type
    if t == FieldDescriptor.TYPE_MESSAGE:
        inner = f.message_type.fields_by_name.get("value")
        if f.message_type.full_name.endswith("Value") and inner is not None:
            return _json_value(inner, text, where)
        return text
    if t == FieldDescriptor.TYPE_BOOL:
        if text in ("true", "1"):
            return True
        if text in ("false", "0"):
            return False
        raise TranscodeError(f"{where}: '{text}' is not a boolean (true or false)", where)
    if t in _INT_TYPES or t in _INT64_TYPES:
        try:
            number = int(text)
        except ValueError:
            raise TranscodeError(f"{where}: '{text}' is not an integer", where) from None
        return number if t in _INT_TYPES else str(number)
    if t in _FLOAT_TYPES:
        if text in ("NaN", "Infinity", "-Infinity"):
            return text
        try:
            return float(text)
        except ValueError:
            raise TranscodeError(f"{where}: '{text}' is not a number", where) from None
    if t == FieldDescriptor.TYPE_ENUM:
        if text.lstrip("-").isdigit():
            return int(text)
        if f.enum_type.values_by_name.get(text) is None:
            raise TranscodeError(
                f"{where}: '{text}' is not a value of {f.enum_type.full_name}", where
            )
        return text
    return text


def _put(doc: dict[str, Any], fields: list[Any], value: Any) -> None:
    node = doc
    for f in fields[:-1]:
        child = node.setdefault(f.name, {})
        node = child
    leaf = fields[-1]
    if _is_repeated(leaf):
        node.setdefault(leaf.name, []).append(value)
    else:
        node[leaf.name] = value


def _first_line(e: Exception) -> str:
    return str(e).strip().split("\n")[0]


# -- bindings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    """One HTTP method + path template bound to one gRPC method."""

    http_method: str
    template: PathTemplate
    body: str
    """``""`` (no body), ``"*"`` (the whole request) or a top-level field name."""
    response_body: str
    grpc_path: str
    """``/package.Service/Method``."""
    method: MethodDescriptor
    input: type[Message]
    output: type[Message]
    pool: DescriptorPool
    server_streaming: bool

    @property
    def rank(self) -> tuple[int, int, int]:
        """Sort key: a rule with a verb, then with more literal segments, is tried first."""
        return (
            0 if self.template.verb is not None else 1,
            -self.template.literals,
            -len(self.template.text),
        )

    def request_message(
        self,
        variables: dict[tuple[str, ...], str],
        query: str,
        body: bytes | None,
        options: JsonOptions,
    ) -> Message:
        """The gRPC request; TranscodeError names the field a client got wrong."""
        desc = self.input.DESCRIPTOR
        msg = self.input()
        if self.body:
            text = (body or b"").decode("utf-8", errors="replace").strip()
            if text:
                try:
                    doc = json.loads(text)
                except json.JSONDecodeError as e:
                    raise TranscodeError(f"the request body is not valid JSON: {e}") from None
                target = doc if self.body == "*" else {self.body: doc}
                if self.body == "*" and not isinstance(doc, dict):
                    raise TranscodeError("the request body must be a JSON object")
                try:
                    json_format.ParseDict(target, msg, descriptor_pool=self.pool)
                except json_format.ParseError as e:
                    raise TranscodeError(_first_line(e)) from None
        bound: dict[str, Any] = {}
        for path, text in variables.items():
            fields = _resolve(desc, path)
            assert fields is not None  # checked when the rule was loaded
            _put(bound, fields, _json_value(fields[-1], text, ".".join(path)))
        if self.body != "*" and query:
            taken = {p[0] for p in variables} | {p for p in (self.body,) if p}
            for key, text in parse_qsl(query, keep_blank_values=True):
                path = tuple(key.split("."))
                fields = _resolve(desc, path)
                if fields is None or not _scalar_leaf(fields[-1]):
                    if options.ignore_unknown_query_params:
                        continue
                    raise TranscodeError(
                        f"query parameter '{key}' is not a field of {desc.full_name}", key
                    )
                if fields[0].name in taken:
                    continue
                _put(bound, fields, _json_value(fields[-1], text, key))
        if bound:
            extra = self.input()
            try:
                json_format.ParseDict(bound, extra, descriptor_pool=self.pool)
            except json_format.ParseError as e:
                raise TranscodeError(_first_line(e)) from None
            msg.MergeFrom(extra)
        return msg

    def response_json(self, messages: list[bytes], options: JsonOptions) -> Any:
        """The response message(s) as a JSON value (a list for server streaming)."""
        docs = []
        for raw in messages:
            try:
                msg = self.output.FromString(raw)
            except DecodeError as e:
                raise ValueError(
                    f"the upstream's {self.output.DESCRIPTOR.full_name} does not decode: {e}"
                ) from None
            docs.append(self._to_json(msg, options))
        if self.server_streaming:
            return docs
        if len(docs) != 1:
            raise ValueError(f"a unary gRPC response carried {len(docs)} messages")
        return docs[0]

    def _to_json(self, msg: Message, options: JsonOptions) -> Any:
        if self.response_body:
            f = msg.DESCRIPTOR.fields_by_name[self.response_body]
            if f.type == FieldDescriptor.TYPE_MESSAGE and not _is_repeated(f):
                return message_json(getattr(msg, f.name), options, self.pool)
            doc = json_format.MessageToDict(
                msg,
                always_print_fields_with_no_presence=True,
                preserving_proto_field_name=True,
                use_integers_for_enums=options.print_enum_as_int,
                descriptor_pool=self.pool,
            )
            return doc.get(f.name)
        return message_json(msg, options, self.pool)


def message_json(msg: Message, options: JsonOptions, pool: DescriptorPool | None) -> Any:
    return json_format.MessageToDict(
        msg,
        always_print_fields_with_no_presence=options.always_print_fields_with_no_presence,
        preserving_proto_field_name=options.preserve_proto_field_names,
        use_integers_for_enums=options.print_enum_as_int,
        descriptor_pool=pool,
    )


_VERBS = ("get", "put", "post", "delete", "patch")


def _rules(rule: http_pb2.HttpRule) -> list[tuple[str, str, str, str]]:
    """(HTTP method, template, body, response_body) of a rule and its additional bindings."""
    out = []
    for r in [rule, *rule.additional_bindings]:
        kind = r.WhichOneof("pattern")
        if kind is None:
            continue
        if kind == "custom":
            out.append((r.custom.kind.upper(), r.custom.path, r.body, r.response_body))
        else:
            out.append((kind.upper(), getattr(r, kind), r.body, r.response_body))
    return out


def load_bindings(path: str, services: list[str]) -> tuple[list[Binding], DescriptorPool]:
    """Every http binding of the descriptor set at ``path`` (of ``services`` when given)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DescriptorError(f"descriptor: cannot read '{path}': {e.strerror}") from None
    try:
        fds = descriptor_pb2.FileDescriptorSet.FromString(data)
    except DecodeError:
        raise DescriptorError(
            f"descriptor: '{path}' is not a FileDescriptorSet (make one with protoc "
            "--include_imports --descriptor_set_out)"
        ) from None
    if not fds.file:
        raise DescriptorError(f"descriptor: '{path}' holds no .proto file")
    pool = DescriptorPool()
    for file in fds.file:
        try:
            pool.Add(file)
        except Exception as e:
            raise DescriptorError(
                f"descriptor: '{path}': {file.name} does not load ({_first_line(e)}); was it "
                "made with --include_imports?"
            ) from None
    declared = {
        f"{f.package}.{s.name}" if f.package else s.name: s for f in fds.file for s in f.service
    }
    for i, name in enumerate(services):
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise DescriptorError(
                f"services[{i}]: no service '{name}' in the descriptor set (it has: {known})"
            )
    wanted = services or list(declared)
    bindings: list[Binding] = []
    for i, name in enumerate(wanted):
        service = declared[name]
        found = 0
        for m in service.method:
            if not m.options.HasExtension(annotations_pb2.http):
                continue
            where = f"{name}.{m.name}"
            if m.client_streaming:
                # A JSON request is one message; there is no mapping for a client stream.
                continue
            method = pool.FindMethodByName(where)
            for verb, text, body, response_body in _rules(
                m.options.Extensions[annotations_pb2.http]
            ):
                bindings.append(_binding(pool, method, verb, text, body, response_body, where))
                found += 1
        if not found and services:
            raise DescriptorError(
                f"services[{i}]: '{name}' has no method with a google.api.http rule"
            )
    if not bindings:
        raise DescriptorError(
            f"descriptor: no method of {', '.join(wanted) or 'the set'} has a google.api.http "
            "rule (import google/api/annotations.proto and add option (google.api.http))"
        )
    bindings.sort(key=lambda b: b.rank)
    return bindings, pool


def _binding(
    pool: DescriptorPool,
    method: MethodDescriptor,
    verb: str,
    text: str,
    body: str,
    response_body: str,
    where: str,
) -> Binding:
    try:
        template = PathTemplate(text)
    except ValueError as e:
        raise DescriptorError(f"descriptor: {where}: {e}") from None
    inp, outp = method.input_type, method.output_type
    for var in template.variables:
        fields = _resolve(inp, var.field_path)
        name = ".".join(var.field_path)
        if fields is None:
            raise DescriptorError(
                f"descriptor: {where}: path variable '{name}' is not a field of {inp.full_name}"
            )
        if _is_repeated(fields[-1]) or not _scalar_leaf(fields[-1]):
            raise DescriptorError(
                f"descriptor: {where}: path variable '{name}' must be a singular scalar field"
            )
    if body and body != "*" and body not in inp.fields_by_name:
        raise DescriptorError(
            f"descriptor: {where}: body '{body}' is not a field of {inp.full_name}"
        )
    if response_body and response_body not in outp.fields_by_name:
        raise DescriptorError(
            f"descriptor: {where}: response_body '{response_body}' is not a field of "
            f"{outp.full_name}"
        )
    return Binding(
        http_method=verb,
        template=template,
        body=body,
        response_body=response_body,
        grpc_path=f"/{method.containing_service.full_name}/{method.name}",
        method=method,
        input=message_factory.GetMessageClass(inp),
        output=message_factory.GetMessageClass(outp),
        pool=pool,
        server_streaming=bool(method.server_streaming),
    )


# -- framing and status -----------------------------------------------------------------------


def frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message, uncompressed."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def unframe(data: bytes, encoding: str | None) -> list[bytes]:
    """The messages of a gRPC body; ValueError when it is cut short or compressed with an
    encoding we do not know."""
    out = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 5:
            raise ValueError("the gRPC body ends inside a message prefix")
        flag = data[pos]
        size = int.from_bytes(data[pos + 1 : pos + 5], "big")
        pos += 5
        if len(data) - pos < size:
            raise ValueError("the gRPC body ends inside a message")
        chunk = data[pos : pos + size]
        pos += size
        if flag & 1:
            if encoding == "gzip":
                chunk = gzip.decompress(chunk)
            elif encoding == "deflate":
                chunk = zlib.decompress(chunk)
            else:
                raise ValueError(f"a gRPC message is compressed with '{encoding or 'none'}'")
        out.append(chunk)
    return out


def http_status(code: int) -> int:
    """The HTTP status of a google.rpc.Code (500 for codes outside the list)."""
    return _HTTP_STATUS.get(code, 500)


def error_body(
    code: int, message: str, details_bin: str | None, pool: DescriptorPool | None
) -> dict[str, Any]:
    """grpc-gateway's error body: ``{"code", "message", "details"}``. ``details_bin`` is
    the ``grpc-status-details-bin`` header (a base64 ``google.rpc.Status``)."""
    details: list[Any] = []
    if details_bin:
        from google.rpc import status_pb2

        try:
            raw = base64.b64decode(details_bin + "=" * (-len(details_bin) % 4))
            status = status_pb2.Status.FromString(raw)
        except (ValueError, DecodeError):
            status = None
        if status is not None:
            if status.message and not message:
                message = status.message
            for any_msg in status.details:
                details.append(_any_json(any_msg, pool))
    return {"code": code, "message": message, "details": details}


def _any_json(any_msg: Any, pool: DescriptorPool | None) -> Any:
    # Error detail types (google.rpc.ErrorInfo, ...) live in the default pool; the
    # service's own ones in the descriptor set's.
    from google.rpc import error_details_pb2  # noqa: F401  (registers the detail types)

    for p in (pool, None):
        try:
            return json_format.MessageToDict(any_msg, descriptor_pool=p)
        except (TypeError, KeyError, json_format.Error):
            continue
    return {
        "@type": any_msg.type_url,
        "value": base64.b64encode(any_msg.value).decode("ascii"),
    }
