"""JSON/HTTP requests transcoded to gRPC calls, and the answers back to JSON, from a proto
descriptor set and its ``google.api.http`` rules (what Envoy's grpc_json_transcoder does).

The route's upstream is the gRPC server (``grpc://host:port``). A request whose method and
path match a rule becomes a unary gRPC call: POST ``/package.Service/Method`` with the
message built from the path variables, the query parameters and the JSON body, framed as
gRPC. A request that matches no rule goes upstream unchanged, so gRPC clients (and anything
else) keep using the same route. The gRPC answer becomes JSON (proto3 JSON mapping; a
server-streaming method gives a JSON array); a non-zero ``grpc-status`` becomes the HTTP
status grpc-gateway maps it to, with ``{"code", "message", "details"}`` as the body.
"""

import json
from typing import Annotated, Any, Literal
from urllib.parse import unquote

import msgspec
from msgspec import Meta

from ferrogate import auth
from ferrogate.grpc_json import (
    Binding,
    DescriptorError,
    JsonOptions,
    TranscodeError,
    error_body,
    frame,
    http_status,
    load_bindings,
    unframe,
)
from ferrogate.hooks import Headers, Request, Response
from ferrogate.plugin import Plugin
from ferrogate.units import Size, parse_size

__all__ = ["GrpcTranscode"]

_CTX_KEY = "grpc-transcode"
# Request headers that describe the client's JSON body or HTTP/1.1 framing, not the call.
_REQUEST_DROP = ("content-length", "transfer-encoding", "accept-encoding", "content-encoding")
_GRPC_HEADERS = (
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "grpc-encoding",
    "grpc-accept-encoding",
)


class _Struct(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class GrpcTranscode(Plugin):
    """JSON/HTTP to gRPC by a descriptor set's google.api.http rules, and answers to JSON.

    Requests no rule matches pass through unchanged (gRPC clients share the route).
    """

    name = "grpc-transcode"
    # Request phase: after authentication, validation and request-transformer (801), so
    # they see the client's JSON; response phase: after response-transformer (800).
    priority = 790

    class Config(_Struct, kw_only=True, frozen=True):
        """Settings of grpc-transcode."""

        descriptor: Annotated[
            str,
            Meta(
                description="Path of a FileDescriptorSet (protoc --include_imports "
                "--descriptor_set_out), relative to the directory the gateway was started in."
            ),
        ]
        services: Annotated[
            list[str],
            Meta(description="Fully qualified services to expose (default: every one with rules)."),
        ] = []
        print_enum_as_int: Annotated[
            bool, Meta(description="Write enums as numbers instead of their names.")
        ] = False
        always_print_fields_with_no_presence: Annotated[
            bool,
            Meta(description="Write fields that hold their default value (0, '', [], false)."),
        ] = False
        preserve_proto_field_names: Annotated[
            bool, Meta(description="Write proto field names (page_count), not lowerCamelCase.")
        ] = False
        ignore_unknown_query_params: Annotated[
            bool,
            Meta(description="Skip query parameters that name no field (default: answer 400)."),
        ] = False
        max_body: Annotated[
            Size,
            Meta(description="Largest request or response body buffered (above: 413 / 502)."),
        ] = "4MiB"

    config: "GrpcTranscode.Config"

    def __init__(self, config: "GrpcTranscode.Config") -> None:
        super().__init__(config)
        try:
            parse_size(config.max_body)
        except ValueError as e:
            raise ValueError(f"max_body: {e}") from None
        try:
            self.bindings, self.pool = load_bindings(config.descriptor, list(config.services))
        except DescriptorError as e:
            raise ValueError(str(e)) from None
        self.options = JsonOptions(
            print_enum_as_int=config.print_enum_as_int,
            always_print_fields_with_no_presence=config.always_print_fields_with_no_presence,
            preserve_proto_field_names=config.preserve_proto_field_names,
            ignore_unknown_query_params=config.ignore_unknown_query_params,
        )

    @classmethod
    def request_body_mode(cls, config: Any) -> Literal["none", "buffered"]:
        return "buffered"

    @classmethod
    def max_body_size_for(cls, config: "GrpcTranscode.Config") -> int:
        return parse_size(config.max_body)

    def match(self, method: str, path: str) -> tuple[Binding, dict[tuple[str, ...], str]] | None:
        """The first rule (most specific first) for this method and path."""
        for b in self.bindings:
            if b.http_method != method:
                continue
            found = b.template.match(path)
            if found is not None:
                return b, found
        return None

    def on_request(self, req: Request) -> Response | None:
        found = self.match(req.method, req.path)
        if found is None:
            return None
        binding, variables = found
        encoding = req.headers.get("content-encoding")
        if binding.body and encoding and encoding.lower() != "identity":
            return auth.error(
                req, 415, "unsupported_encoding", f"a {encoding} request body cannot be transcoded"
            )
        try:
            msg = binding.request_message(variables, req.query, req.body, self.options)
        except TranscodeError as e:
            answer = auth.error(req, 400, "invalid_request", str(e))
            if e.field is not None:
                answer = _with_field(answer, e.field)
            return answer
        req.method = "POST"
        req.path = binding.grpc_path
        req.query = ""
        h = req.headers
        for name in _REQUEST_DROP:
            h.remove(name)
        h["content-type"] = "application/grpc"
        h["te"] = "trailers"
        req.body = frame(msg.SerializeToString())
        req.ctx[_CTX_KEY] = binding
        return None

    def on_response_body(self, req: Request, resp: Response, body: bytes) -> bytes | None:
        binding = req.ctx.get(_CTX_KEY)
        if not isinstance(binding, Binding):
            return None
        h = resp.headers
        content_type = h.get("content-type") or ""
        if not content_type.startswith("application/grpc"):
            # The gateway's own answer (upstream unreachable, ...) or not a gRPC server.
            return None
        trailers = resp.trailers
        status = _field(trailers, h, "grpc-status")
        message = unquote(_field(trailers, h, "grpc-message") or "")
        details = _field(trailers, h, "grpc-status-details-bin")
        encoding = h.get("grpc-encoding")
        # The data plane drops the upstream's trailers once the body is replaced.
        for name in _GRPC_HEADERS:
            h.remove(name)
        h["content-type"] = "application/json"
        if status is None:
            return _bad_gateway(req, resp, "the gRPC response has no grpc-status")
        try:
            code = int(status)
        except ValueError:
            return _bad_gateway(req, resp, f"the gRPC response has grpc-status '{status}'")
        if code != 0:
            resp.status = http_status(code)
            doc = error_body(code, message, details, self.pool)
            return json.dumps(doc, separators=(",", ":")).encode()
        try:
            out = binding.response_json(unframe(body, encoding), self.options)
        except ValueError as e:
            return _bad_gateway(req, resp, str(e))
        resp.status = 200
        return json.dumps(out, separators=(",", ":")).encode()


def _field(trailers: Headers | None, headers: Headers, name: str) -> str | None:
    """A gRPC status field: from the trailers, or the headers of a trailers-only answer."""
    if trailers is not None:
        value = trailers.get(name)
        if value is not None:
            return value
    return headers.get(name)


def _bad_gateway(req: Request, resp: Response, message: str) -> bytes:
    resp.status = 502
    return json.dumps(
        {
            "error": {
                "status": 502,
                "code": "bad_grpc_response",
                "message": message,
                "request_id": req.request_id,
            }
        },
        separators=(",", ":"),
    ).encode()


def _with_field(answer: Response, field: str) -> Response:
    doc = json.loads(answer.body or b"{}")
    doc["error"]["field"] = field
    return Response(answer.status, doc, answer.headers)
