"""A REST/JSON facade over a SOAP service described by a WSDL 1.1 document.

A request is mapped to one operation of the chosen service port (by ``operations``, or by
the last segment of its path), its JSON body, path and query parameters are checked against
the operation's input (XSD types, required and unknown fields: 400 naming the field, never
sent upstream) and turned into the SOAP envelope the upstream gets. The answer comes back as
JSON: the operation's output, or the fault as an error in the gateway's shape.
"""

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlparse

import msgspec
from msgspec import Meta

from ferrogate import auth
from ferrogate.hooks import Headers, Request, Response
from ferrogate.plugin import Plugin
from ferrogate.request_schemas import query_pairs
from ferrogate.soap_json import (
    InputError,
    arguments,
    check_arguments,
    from_text,
    to_json,
    xml_to_json,
)
from ferrogate.soap_wsdl import SoapFault, SoapService, load_service
from ferrogate.units import Size, parse_size

__all__ = ["Soap", "SoapOperation"]

_CTX = "soap.operation"
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.-]*)\}")


class SoapOperation(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One REST endpoint of the facade."""

    method: Annotated[
        Literal["GET", "POST", "PUT", "PATCH", "DELETE"],
        Meta(description="The HTTP method clients use."),
    ] = "POST"
    path: Annotated[
        str,
        Meta(
            description="The request path, as clients send it; {name} matches one segment "
            "and passes it as the operation's argument of that name."
        ),
    ]
    operation: Annotated[str, Meta(description="The SOAP operation called.")]


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    params: tuple[str, ...]
    operation: str


def _compile(index: int, op: SoapOperation, service: SoapService) -> _Route:
    where = f"operations[{index}]"
    if not op.path.startswith("/"):
        raise ValueError(f"{where}.path: must start with /")
    if service.operation(op.operation) is None:
        raise ValueError(
            f"{where}.operation: no operation {op.operation!r} in the WSDL's port "
            f"(it has {', '.join(service.operations())})"
        )
    args = arguments(service.operation(op.operation).input.body)
    params: list[str] = []
    regex = ""
    pos = 0
    for m in _PARAM.finditer(op.path):
        name = m.group(1)
        if name not in args:
            raise ValueError(f"{where}.path: {{{name}}} is not an argument of {op.operation}")
        if name in params:
            raise ValueError(f"{where}.path: {{{name}}} appears twice")
        params.append(name)
        regex += re.escape(op.path[pos : m.start()]) + "([^/]+)"
        pos = m.end()
    regex += re.escape(op.path[pos:])
    return _Route(op.method, re.compile(regex + r"\Z"), tuple(params), op.operation)


class Soap(Plugin):
    """Serves a SOAP service as a JSON API: JSON to a SOAP envelope, the reply back to JSON.

    ``wsdl`` is read with zeep from local files only (imports too). Each entry of
    ``operations`` maps a method and path (``{name}`` segments are arguments) to an
    operation; without them, ``POST .../{Operation}`` calls the operation its last path
    segment names. The upstream gets ``POST`` to the port's soap:address path (or
    ``endpoint``). Faults: client faults 400, server faults 502, code ``soap_fault``.
    """

    name = "soap"
    priority = 1  # last before the upstream: other plugins see the client's JSON request

    class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
        """Settings of soap."""

        wsdl: Annotated[
            str,
            Meta(
                description="The WSDL 1.1 file: absolute, or relative to the directory the "
                "gateway was started in. Imported documents must be local files."
            ),
        ]
        service: Annotated[
            str | None, Meta(description="The wsdl:service used (default: the first).")
        ] = None
        port: Annotated[
            str | None,
            Meta(description="The wsdl:port of that service (default: its first SOAP port)."),
        ] = None
        operations: Annotated[
            list[SoapOperation],
            Meta(
                description="REST endpoints -> operations. Empty: POST to a path whose last "
                "segment is an operation's name calls it."
            ),
        ] = []
        endpoint: Annotated[
            str | None,
            Meta(
                description="The path requests are sent to upstream (default: the path of "
                "the port's soap:address)."
            ),
        ] = None
        max_body: Annotated[
            Size, Meta(description="Largest JSON request and SOAP response buffered.")
        ] = "1MiB"

    config: "Soap.Config"

    def __init__(self, config: "Soap.Config") -> None:
        super().__init__(config)
        try:
            parse_size(config.max_body)
        except ValueError as e:
            raise ValueError(f"max_body: {e}") from None
        self.service = load_service(config.wsdl, config.service, config.port)
        self.routes = [_compile(i, op, self.service) for i, op in enumerate(config.operations)]
        if config.endpoint is not None and not config.endpoint.startswith("/"):
            raise ValueError("endpoint: must be a path starting with /")
        address = urlparse(self.service.address)
        default = (address.path or "/") + (f"?{address.query}" if address.query else "")
        path, _, query = (config.endpoint or default).partition("?")
        self.endpoint_path = path
        self.endpoint_query = query

    @classmethod
    def request_body_mode(cls, config: "Soap.Config") -> Literal["none", "buffered"]:
        return "buffered"

    @classmethod
    def max_body_size_for(cls, config: "Soap.Config") -> int:
        return parse_size(config.max_body)

    # -- request ---------------------------------------------------------------------------
    def _match(self, req: Request) -> tuple[str, dict[str, str]] | Response:
        if not self.routes:
            name = req.path.rstrip("/").rpartition("/")[2]
            if self.service.operation(name) is None:
                return auth.error(
                    req,
                    404,
                    "unknown_operation",
                    f"no SOAP operation is named {name!r} "
                    f"(known: {', '.join(self.service.operations())})",
                )
            if req.method != "POST":
                return auth.error(
                    req,
                    405,
                    "method_not_allowed",
                    f"call {name} with POST",
                    Headers([("allow", "POST")]),
                )
            return name, {}
        allowed: list[str] = []
        for route in self.routes:
            m = route.pattern.match(req.path)
            if m is None:
                continue
            if route.method != req.method:
                allowed.append(route.method)
                continue
            return route.operation, {
                n: unquote(v) for n, v in zip(route.params, m.groups(), strict=True)
            }
        if allowed:
            allow = ", ".join(dict.fromkeys(allowed))
            return auth.error(
                req,
                405,
                "method_not_allowed",
                f"{req.method} is not mapped for {req.path} (allowed: {allow})",
                Headers([("allow", allow)]),
            )
        return auth.error(
            req, 404, "unknown_operation", f"no SOAP operation is mapped to {req.path}"
        )

    def _arguments(
        self, req: Request, operation: str, path_args: dict[str, str]
    ) -> dict[str, Any] | Response:
        """The operation's arguments from the JSON body, the path and the query, checked."""
        known = arguments(self.service.operation(operation).input.body)
        data = req.body or b""
        doc: Any = {}
        if data.strip():
            encoding = (req.headers.get("content-encoding") or "identity").strip().lower()
            if encoding != "identity":
                return auth.error(
                    req,
                    415,
                    "unsupported_media_type",
                    f"a body with Content-Encoding {encoding} cannot be read; send it unencoded",
                )
            try:
                doc = json.loads(data)
            except (ValueError, RecursionError):
                return auth.error(req, 400, "invalid_json", "the request body is not valid JSON")
            if not isinstance(doc, dict):
                return _invalid(req, "body", "", "the request body must be a JSON object")
        source = dict.fromkeys(doc, "body")
        given: dict[str, Any] = {}
        params = [("path", n, v) for n, v in path_args.items()]
        params += [("query", n, v) for n, v in (query_pairs(req.query) if req.query else [])]
        for where, name, text in params:
            if name in source:
                return _invalid(
                    req, where, name, f"{name}: given twice (in the {source[name]} and the {where})"
                )
            source[name] = where
            if name not in known:
                return _invalid(
                    req,
                    where,
                    name,
                    f"{name}: is not an argument of {operation} (known: {', '.join(known)})",
                )
            elm, is_attr = known[name]
            try:
                given[name] = from_text(text, elm, is_attr, name)
            except InputError as e:
                return _invalid(req, where, e.field, str(e))
        try:
            return check_arguments(known, doc, given)
        except InputError as e:
            return _invalid(req, "body", e.field, str(e))

    def on_request(self, req: Request) -> Response | None:
        found = self._match(req)
        if isinstance(found, Response):
            return found
        operation, path_args = found
        args = self._arguments(req, operation, path_args)
        if isinstance(args, Response):
            return args
        try:
            envelope, headers = self.service.request(operation, args)
        except (ValueError, TypeError) as e:
            # What the checks above let through and zeep still refuses (a choice, a facet).
            return _invalid(req, "body", "", f"the arguments do not fit {operation}: {e}")
        req.method = "POST"
        req.path = self.endpoint_path
        req.query = self.endpoint_query
        h = req.headers
        for name in ("content-encoding", "content-length", "accept-encoding", "soapaction"):
            h.remove(name)  # the gateway reads the reply: it must come unencoded
        for name, value in headers.items():
            h[name] = value
        h["accept"] = headers["content-type"].partition(";")[0]
        req.body = envelope
        req.ctx[_CTX] = operation
        return None

    # -- response --------------------------------------------------------------------------
    def on_response_body(self, req: Request, resp: Response, body: bytes) -> bytes | None:
        operation = req.ctx.get(_CTX)
        if operation is None or _own_error(req, resp, body):
            return None  # an answer that never came from the SOAP service
        h = resp.headers
        encoding = (h.get("content-encoding") or "identity").strip().lower()
        try:
            if encoding != "identity":
                raise ValueError(f"the answer is encoded ({encoding})")
            reply = self.service.reply(operation, resp.status, body)
        except SoapFault as f:
            return self._fault(req, resp, f)
        except ValueError as e:
            return self._answer(
                req, resp, 502, _error(req, 502, "soap_bad_response", f"{operation}: {e}")
            )
        return self._answer(req, resp, 200, to_json(reply.value))

    def _fault(self, req: Request, resp: Response, f: SoapFault) -> bytes:
        status = 400 if f.from_client else 502
        doc = _error(req, status, "soap_fault", f.message or f.code or "SOAP fault")
        fault: dict[str, Any] = {
            "code": f.code,
            "message": f.message,
            "detail": xml_to_json(f.detail) if f.detail is not None else None,
        }
        if f.subcodes:
            fault["subcodes"] = f.subcodes
        doc["error"]["fault"] = fault
        return self._answer(req, resp, status, doc)

    @staticmethod
    def _answer(req: Request, resp: Response, status: int, doc: Any) -> bytes:
        resp.status = status
        h = resp.headers
        # Validators and codings of the XML do not describe the JSON.
        for name in ("content-encoding", "etag", "last-modified", "content-md5", "digest"):
            h.remove(name)
        h["content-type"] = "application/json"
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _error(req: Request, status: int, code: str, message: str) -> dict[str, Any]:
    return {
        "error": {
            "status": status,
            "code": code,
            "message": message,
            "request_id": req.request_id,
        }
    }


def _invalid(req: Request, where: str, field: str, message: str) -> Response:
    doc = _error(req, 400, "invalid_request", message)
    doc["error"]["in"] = where
    doc["error"]["field"] = field
    return Response(400, doc, Headers([("content-type", "application/json")]))


def _own_error(req: Request, resp: Response, body: bytes) -> bool:
    """The gateway's own error (the upstream unreachable, a plugin's answer)."""
    ctype = (resp.headers.get("content-type") or "").partition(";")[0].strip().lower()
    if ctype != "application/json":
        return False
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    err = doc.get("error") if isinstance(doc, dict) else None
    return isinstance(err, dict) and err.get("request_id") == req.request_id
