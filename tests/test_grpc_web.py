"""gRPC-Web through the gateway: frames built by hand per grpc/doc/PROTOCOL-WEB.md over
HTTP/1.1 (httpx), translated to gRPC towards a real grpcio server (`grpc://` upstream); the
answers are checked byte for byte."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from types import ModuleType

import httpx
import pytest

from gateway import Gateway, GatewayFactory
from grpc_service import EchoServer, generate


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    return generate(tmp_path_factory.mktemp("echo_protos_web"))


@pytest.fixture
def pb(modules: tuple[ModuleType, ModuleType]) -> ModuleType:
    return modules[0]


@pytest.fixture
def server(modules: tuple[ModuleType, ModuleType]) -> Iterator[EchoServer]:
    s = EchoServer(*modules)
    yield s
    s.stop()


def start(gateway: GatewayFactory, server: EchoServer) -> Gateway:
    return gateway(
        {
            "routes": [
                {"name": "web", "paths": ["/echo.Echo/*"], "upstream": f"grpc://{server.address}"}
            ]
        }
    )


def message(payload: bytes) -> bytes:
    """A data frame: flag 0, 4-byte big-endian length, the message."""
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def trailer_frame(lines: bytes) -> bytes:
    return b"\x80" + struct.pack(">I", len(lines)) + lines


def split_frames(body: bytes) -> list[tuple[int, bytes]]:
    frames, at = [], 0
    while at < len(body):
        flag, length = body[at], struct.unpack(">I", body[at + 1 : at + 5])[0]
        frames.append((flag, body[at + 5 : at + 5 + length]))
        at += 5 + length
    assert at == len(body), "the body ends inside a frame"
    return frames


def call(gw: Gateway, method: str, body: bytes, content_type: str) -> httpx.Response:
    with httpx.Client(base_url=gw.url, timeout=15) as client:
        return client.post(
            f"/echo.Echo/{method}",
            content=body,
            headers={"content-type": content_type, "x-grpc-web": "1", "accept": content_type},
        )


def test_unary_answer_is_a_message_frame_then_a_trailer_frame(
    gateway: GatewayFactory, server: EchoServer, pb: ModuleType
) -> None:
    gw = start(gateway, server)
    req = pb.Msg(text="hi", blob=b"\x00\x01\x02")
    resp = call(gw, "Trailing", message(req.SerializeToString()), "application/grpc-web+proto")
    assert resp.status_code == 200
    assert resp.http_version == "HTTP/1.1"
    assert resp.headers["content-type"] == "application/grpc-web+proto"
    expected = message(pb.Msg(text="ok").SerializeToString()) + trailer_frame(
        b"grpc-status: 0\r\ngrpc-message: \r\nx-trail: hi\r\n"
    )
    assert resp.content == expected


def test_text_variant_round_trips_in_base64(
    gateway: GatewayFactory, server: EchoServer, pb: ModuleType
) -> None:
    gw = start(gateway, server)
    req = pb.Msg(text="text mode", blob=bytes(range(200)))
    resp = call(
        gw, "Unary", base64.b64encode(message(req.SerializeToString())), "application/grpc-web-text"
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/grpc-web-text"
    raw = base64.b64decode(resp.content, validate=True)
    answer = pb.Msg(text="text mode", blob=bytes(range(200)), n=200).SerializeToString()
    assert raw == message(answer) + trailer_frame(b"grpc-status: 0\r\ngrpc-message: \r\n")


def test_an_error_status_is_in_the_trailer_frame(
    gateway: GatewayFactory, server: EchoServer, pb: ModuleType
) -> None:
    gw = start(gateway, server)
    req = pb.Msg(text="not here", n=5)
    resp = call(gw, "Fail", message(req.SerializeToString()), "application/grpc-web")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/grpc-web"
    assert "grpc-status" not in resp.headers
    assert resp.content == trailer_frame(b"grpc-status: 5\r\ngrpc-message: not here\r\n")


def test_server_streaming_sends_each_message_frame(
    gateway: GatewayFactory, server: EchoServer, pb: ModuleType
) -> None:
    gw = start(gateway, server)
    req = pb.Msg(text="m", n=4)
    resp = call(gw, "ServerStream", message(req.SerializeToString()), "application/grpc-web+proto")
    frames = split_frames(resp.content)
    assert [f for f, _ in frames] == [0, 0, 0, 0, 0x80]
    assert [pb.Msg.FromString(p).text for _, p in frames[:4]] == ["m-0", "m-1", "m-2", "m-3"]
    assert frames[4][1] == b"grpc-status: 0\r\ngrpc-message: \r\n"


def test_gateway_errors_reach_grpc_web_clients_as_trailer_frames(
    gateway: GatewayFactory, server: EchoServer, pb: ModuleType
) -> None:
    gw = start(gateway, server)
    with httpx.Client(base_url=gw.url, timeout=15) as client:
        resp = client.post(
            "/nowhere.Service/Method",
            content=message(b""),
            headers={"content-type": "application/grpc-web-text"},
        )
    assert resp.status_code == 200
    frames = split_frames(base64.b64decode(resp.content))
    assert len(frames) == 1 and frames[0][0] == 0x80
    assert frames[0][1].startswith(b"grpc-status: 12\r\ngrpc-message: no route matches POST ")
    assert resp.headers["x-request-id"]
