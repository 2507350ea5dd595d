"""A real OTLP/HTTP trace receiver for the tests: a threaded HTTP server on 127.0.0.1 that takes
``POST /v1/traces`` with a protobuf ``ExportTraceServiceRequest`` (decoded with the
``opentelemetry-proto`` package, as a collector would) and keeps every span it got.

``status`` makes it refuse exports (e.g. 503) while a test runs.
"""

from __future__ import annotations

import contextlib
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status

SERVER = PbSpan.SPAN_KIND_SERVER
CLIENT = PbSpan.SPAN_KIND_CLIENT
INTERNAL = PbSpan.SPAN_KIND_INTERNAL
STATUS_ERROR = Status.STATUS_CODE_ERROR
STATUS_UNSET = Status.STATUS_CODE_UNSET


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind is not None else None


@dataclass
class Span:
    """One received span, ids in hex, attributes as a dict."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int
    status_message: str
    trace_state: str
    flags: int
    resource: dict[str, Any]
    scope: str


@dataclass
class Export:
    """One export request as it arrived."""

    path: str
    headers: dict[str, str]
    spans: list[Span] = field(default_factory=list)


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    receiver: OtlpReceiver


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        receiver = self.server.receiver
        status = receiver.status
        if status == 200:
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            receiver._add(self.path, {k.lower(): v for k, v in self.headers.items()}, req)
            out = ExportTraceServiceResponse().SerializeToString()
        else:
            receiver._refused(self.path)
            out = b""
        self.send_response(status)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


class OtlpReceiver:
    """``POST /v1/traces`` on ``endpoint``; ``spans()``, ``exports`` and ``wait_for`` to read."""

    def __init__(self) -> None:
        self.status = 200
        self.exports: list[Export] = []
        self.refused = 0
        self._cond = threading.Condition()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.receiver = self
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="otlp-receiver",
            daemon=True,
        )
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def _add(self, path: str, headers: dict[str, str], req: ExportTraceServiceRequest) -> None:
        export = Export(path, headers)
        for rs in req.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    export.spans.append(
                        Span(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=s.kind,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            attributes={kv.key: _value(kv.value) for kv in s.attributes},
                            status_code=s.status.code,
                            status_message=s.status.message,
                            trace_state=s.trace_state,
                            flags=s.flags,
                            resource=resource,
                            scope=ss.scope.name,
                        )
                    )
        with self._cond:
            self.exports.append(export)
            self._cond.notify_all()

    def _refused(self, path: str) -> None:
        with self._cond:
            self.refused += 1
            self._cond.notify_all()

    def spans(self) -> list[Span]:
        with self._cond:
            return [s for e in self.exports for s in e.spans]

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans() if s.trace_id == trace_id]

    def wait_for(
        self, what: Callable[[list[Span]], bool], timeout: float = 10.0, message: str = ""
    ) -> list[Span]:
        """Wait until ``what(all spans so far)`` holds; the spans then."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                spans = [s for e in self.exports for s in e.spans]
                if what(spans):
                    return spans
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"OTLP receiver: condition not met within {timeout}s {message}; "
                        f"got {len(spans)} spans: {[(s.name, s.trace_id) for s in spans][:20]}"
                    )
                self._cond.wait(left)

    def wait_for_trace(self, trace_id: str, count: int, timeout: float = 10.0) -> list[Span]:
        """The spans of ``trace_id`` once at least ``count`` have arrived."""
        self.wait_for(
            lambda spans: sum(s.trace_id == trace_id for s in spans) >= count,
            timeout,
            f"({count} spans of trace {trace_id})",
        )
        return self.trace(trace_id)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(RuntimeError):
            self._thread.join(timeout=5)
