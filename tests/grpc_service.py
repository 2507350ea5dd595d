"""A real grpcio server for the gRPC tests (tests/grpc/echo.proto), its modules generated with
grpc_tools.protoc into a temporary directory."""

from __future__ import annotations

import importlib
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from grpc_tools import protoc

import grpc

PROTO_DIR = Path(__file__).parent / "grpc"
MAX_MESSAGE = 32 * 1024 * 1024
OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]


def generate(out: Path) -> tuple[ModuleType, ModuleType]:
    """echo_pb2 and echo_pb2_grpc, generated into `out` and imported."""
    well_known = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO_DIR / "echo.proto"),
        ]
    )
    assert rc == 0
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("echo_pb2"), importlib.import_module("echo_pb2_grpc")
    finally:
        sys.path.remove(str(out))


@dataclass
class Seen:
    """What the server saw: the deadlines of Slow calls (seconds left, None: no deadline)."""

    deadlines: list[float | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def servicer(pb: ModuleType, pb_grpc: ModuleType, seen: Seen) -> Any:
    class Echo(pb_grpc.EchoServicer):  # type: ignore[misc, name-defined]
        def Unary(self, req: Any, context: grpc.ServicerContext) -> Any:
            return pb.Msg(text=req.text, blob=req.blob, n=len(req.blob))

        def ServerStream(self, req: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            for i in range(req.n):
                yield pb.Msg(text=f"{req.text}-{i}", blob=req.blob)

        def ClientStream(self, reqs: Iterator[Any], context: grpc.ServicerContext) -> Any:
            texts, total = [], 0
            for r in reqs:
                texts.append(r.text)
                total += len(r.blob)
            return pb.Msg(text=",".join(texts), n=total)

        def Bidi(self, reqs: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            for r in reqs:
                yield pb.Msg(text=r.text.upper(), n=r.n)

        def Fail(self, req: Any, context: grpc.ServicerContext) -> Any:
            context.abort(_code(req.n), req.text)

        def Trailing(self, req: Any, context: grpc.ServicerContext) -> Any:
            context.set_trailing_metadata((("x-trail", req.text),))
            return pb.Msg(text="ok")

        def Slow(self, req: Any, context: grpc.ServicerContext) -> Any:
            left = context.time_remaining()
            with seen.lock:
                seen.deadlines.append(left)
            end = time.monotonic() + req.n / 1000
            while time.monotonic() < end and context.is_active():
                time.sleep(0.01)
            return pb.Msg(text="late")

    return Echo()


def _code(n: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == n:
            return code
    raise ValueError(n)


class EchoServer:
    """The service on a loopback port (h2c, or h2 over TLS), until stopped."""

    def __init__(
        self, pb: ModuleType, pb_grpc: ModuleType, tls: tuple[bytes, bytes] | None = None
    ) -> None:
        """`tls`: (key PEM, certificate chain PEM) to serve h2 over TLS instead."""
        self.seen = Seen()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=OPTIONS)
        pb_grpc.add_EchoServicer_to_server(servicer(pb, pb_grpc, self.seen), self.server)
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            creds = grpc.ssl_server_credentials([tls])
            self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=None)
