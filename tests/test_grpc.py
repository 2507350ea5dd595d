"""gRPC through the gateway: a real grpcio client over h2c to the gateway, which speaks HTTP/2
to a real grpcio server (`grpc://` upstreams). Every kind of call, trailers, statuses,
gateway-made errors as gRPC statuses, and deadlines."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import grpc
from certs import CA
from gateway import Gateway, GatewayFactory, free_port, run_cli
from grpc_service import OPTIONS, EchoServer, generate


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    return generate(tmp_path_factory.mktemp("echo_protos"))


@pytest.fixture
def server(modules: tuple[ModuleType, ModuleType]) -> Iterator[EchoServer]:
    s = EchoServer(*modules)
    yield s
    s.stop()


def route(upstream: str, **extra: Any) -> dict[str, Any]:
    return {"name": "grpc", "paths": ["/echo.Echo/*"], "upstream": upstream, **extra}


def start(gateway: GatewayFactory, server: EchoServer, **extra: Any) -> Gateway:
    return gateway({"routes": [route(f"grpc://{server.address}", **extra)]})


class Client:
    def __init__(self, gw: Gateway, modules: tuple[ModuleType, ModuleType]) -> None:
        self.pb, pb_grpc = modules
        self.channel = grpc.insecure_channel(gw.address, options=OPTIONS)
        self.stub = pb_grpc.EchoStub(self.channel)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def client_of(modules: tuple[ModuleType, ModuleType]) -> Iterator[Any]:
    made: list[Client] = []

    def make(gw: Gateway) -> Client:
        c = Client(gw, modules)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_unary_call_passes_through(
    gateway: GatewayFactory, server: EchoServer, client_of: Any
) -> None:
    c = client_of(start(gateway, server))
    resp, call = c.stub.Unary.with_call(c.pb.Msg(text="hello", blob=b"xyz"), timeout=10)
    assert resp.text == "hello"
    assert resp.n == 3
    assert call.code() == grpc.StatusCode.OK
    # the gateway's request id rides along in the response head
    assert any(k == "x-request-id" for k, _ in call.initial_metadata())


def test_server_streaming_arrives_message_by_message(
    gateway: GatewayFactory, server: EchoServer, client_of: Any
) -> None:
    c = client_of(start(gateway, server))
    got = [m.text for m in c.stub.ServerStream(c.pb.Msg(text="s", n=5), timeout=10)]
    assert got == [f"s-{i}" for i in range(5)]


def test_client_streaming_sends_every_message(
    gateway: GatewayFactory, server: EchoServer, client_of: Any
) -> None:
    c = client_of(start(gateway, server))
    msgs = (c.pb.Msg(text=str(i), blob=b"b" * 1000) for i in range(20))
    resp = c.stub.ClientStream(msgs, timeout=10)
    assert resp.text == ",".join(str(i) for i in range(20))
    assert resp.n == 20_000


def test_bidi_streaming_answers_each_message_before_the_next_is_sent(
    gateway: GatewayFactory, server: EchoServer, client_of: Any
) -> None:
    c = client_of(start(gateway, server))
    # The next request waits for the previous answer: only a proxy that streams both ways
    # at once gets through this.
    answers: list[str] = []
    turn = threading.Event()
    turn.set()

    def requests() -> Iterator[Any]:
        for word in ("alpha", "beta", "gamma"):
            assert turn.wait(5), "no answer to the previous message"
            turn.clear()
            yield c.pb.Msg(text=word)

    for m in c.stub.Bidi(requests(), timeout=10):
        answers.append(m.text)
        turn.set()
    assert answers == ["ALPHA", "BETA", "GAMMA"]


def test_trailing_metadata_and_error_details_are_intact(
    gateway: GatewayFactory, server: EchoServer, client_of: Any
) -> None:
    c = client_of(start(gateway, server))
    resp, call = c.stub.Trailing.with_call(c.pb.Msg(text="tail-value"), timeout=10)
    assert resp.text == "ok"
    assert ("x-trail", "tail-value") in call.trailing_metadata()
    with pytest.raises(grpc.RpcError) as err:
        c.stub.Fail(c.pb.Msg(text="no such book: é", n=5), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "no such book: é"


def test_large_messages_cross_both_ways(
    gateway: GatewayFactory, server: EchoServer, client_of: Any
) -> None:
    gw = gateway(
        {"routes": [route(f"grpc://{server.address}")], "limits": {"max_body_bytes": "64MiB"}}
    )
    c = client_of(gw)
    blob = bytes(range(256)) * (6 * 1024 * 1024 // 256)
    resp = c.stub.Unary(c.pb.Msg(text="big", blob=blob), timeout=30)
    assert resp.n == len(blob)
    assert resp.blob == blob


def test_many_concurrent_calls_share_one_client_connection(
    gateway: GatewayFactory, server: EchoServer, client_of: Any
) -> None:
    c = client_of(start(gateway, server))
    with futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(
            pool.map(lambda i: c.stub.Unary(c.pb.Msg(text=f"c{i}"), timeout=20).text, range(200))
        )
    assert results == [f"c{i}" for i in range(200)]


def test_gateway_errors_arrive_as_grpc_statuses(
    gateway: GatewayFactory, server: EchoServer, client_of: Any
) -> None:
    dead = free_port()
    gw = gateway(
        {
            "consumers": {"alice": {"credentials": [{"type": "key-auth", "key": "key-alice-1"}]}},
            "routes": [
                {
                    "name": "keyed",
                    "paths": ["/echo.Echo/Unary"],
                    "upstream": f"grpc://{server.address}",
                    "plugins": [{"name": "key-auth"}],
                },
                {
                    "name": "limited",
                    "paths": ["/echo.Echo/Trailing"],
                    "upstream": f"grpc://{server.address}",
                    "rate_limits": [{"limit": 1, "per": "1m"}],
                },
                {
                    "name": "down",
                    "paths": ["/echo.Echo/Fail"],
                    "upstream": f"grpc://127.0.0.1:{dead}",
                },
            ],
        }
    )
    c = client_of(gw)
    msg = c.pb.Msg(text="x")

    def code_of(call: Any, **kw: Any) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as err:
            call(msg, timeout=10, **kw)
        return err.value.code(), err.value.details()

    code, details = code_of(c.stub.Slow)
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert "no route" in details
    assert code_of(c.stub.Unary)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert c.stub.Unary(msg, timeout=10, metadata=(("apikey", "key-alice-1"),)).text == "x"
    assert c.stub.Trailing(msg, timeout=10).text == "ok"
    assert code_of(c.stub.Trailing)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code_of(c.stub.Fail)[0] == grpc.StatusCode.UNAVAILABLE


def test_a_client_deadline_ends_the_call_and_reaches_the_upstream_reduced(
    gateway: GatewayFactory, server: EchoServer, client_of: Any
) -> None:
    # A plugin holds the request 0.2 s before it goes upstream, so the deadline that reaches the
    # upstream must show those 0.2 s gone. (Without the pause the reduction is a few
    # microseconds, less than gRPC core's rounding of the client's own timeout.)
    gw = gateway(
        {
            "plugins_dir": str(Path(__file__).parent / "plugins_dir"),
            "routes": [
                route(
                    f"grpc://{server.address}",
                    plugins=[{"name": "t-async", "config": {"delay": 0.2}}],
                )
            ],
        }
    )
    c = client_of(gw)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        c.stub.Slow(c.pb.Msg(n=2000), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 1.5
    deadline = time.monotonic() + 5
    while not server.seen.deadlines and time.monotonic() < deadline:
        time.sleep(0.01)
    (left,) = server.seen.deadlines
    assert left is not None
    assert 0 < left < 0.4


def test_a_route_timeout_shorter_than_the_deadline_is_deadline_exceeded(
    gateway: GatewayFactory, server: EchoServer, client_of: Any
) -> None:
    c = client_of(start(gateway, server, timeouts={"total": 0.3}))
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        c.stub.Slow(c.pb.Msg(n=3000), timeout=10)
    elapsed = time.monotonic() - t0
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.25 < elapsed < 2.0, elapsed
    # the client's own deadline still went upstream (gRPC core rounds a timeout up to few
    # digits when it encodes it: the client's 10 s may arrive as 10.1 s)
    (left,) = server.seen.deadlines
    assert left is not None and 9 < left < 10.2


PLUGINS_DIR = str(Path(__file__).parent / "grpc" / "plugins")


def test_body_hooks_see_the_trailers_and_they_go_on(
    gateway: GatewayFactory, server: EchoServer, client_of: Any
) -> None:
    gw = gateway(
        {
            "plugins_dir": PLUGINS_DIR,
            "routes": [route(f"grpc://{server.address}", plugins=[{"name": "t-trailer-probe"}])],
        }
    )
    c = client_of(gw)
    resp, call = c.stub.Trailing.with_call(c.pb.Msg(text="abc"), timeout=10)
    assert resp.text == "ok"
    head = dict(call.initial_metadata())
    assert head["x-saw-trailers"] == "yes"
    assert head["x-saw-grpc-status"] == "0"
    assert head["x-saw-trail"] == "abc"
    # the trailers still reach the client after the hook kept the body
    assert ("x-trail", "abc") in call.trailing_metadata()
    assert call.code() == grpc.StatusCode.OK


def test_check_accepts_grpc_urls_and_refuses_bad_ones(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "listen: ['127.0.0.1:8080']\n"
        "routes:\n"
        "  - {name: a, paths: ['/a/*'], upstream: 'grpc://127.0.0.1:50051'}\n"
        "  - {name: b, paths: ['/b/*'], upstream: 'grpcs://api.example.com'}\n"
    )
    assert run_cli("check", str(good)).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "listen: ['127.0.0.1:8080']\n"
        "routes:\n"
        "  - {name: a, paths: ['/a/*'], upstream: 'grpc://127.0.0.1:50051'}\n"
        "  - {name: b, paths: ['/b/*'], upstream: 'grpc://:99999'}\n"
    )
    out = run_cli("check", str(bad))
    assert out.returncode != 0
    assert f"{bad}:4" in out.stdout + out.stderr


def h2_call(
    gw: Gateway, path: str, body: bytes
) -> tuple[dict[str, str], bytes, dict[str, str] | None]:
    """One gRPC request over a raw h2c connection: (response head, body, trailers or None)."""
    import socket

    import h2.config
    import h2.connection
    import h2.events

    sock = socket.create_connection(("127.0.0.1", int(gw.address.rsplit(":", 1)[1])), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(
        stream,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", gw.address),
            (":path", path),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    conn.send_data(stream, body, end_stream=True)
    sock.sendall(conn.data_to_send())
    head: dict[str, str] = {}
    data = b""
    trailers = None
    done = False
    try:
        while not done:
            chunk = sock.recv(65536)
            assert chunk, "the gateway closed the connection"
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    head = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h2.events.StreamEnded):
                    done = True
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return head, data, trailers


def test_a_body_a_hook_replaced_goes_out_without_the_trailers(
    gateway: GatewayFactory, server: EchoServer, modules: tuple[ModuleType, ModuleType]
) -> None:
    pb = modules[0]
    gw = gateway(
        {
            "plugins_dir": PLUGINS_DIR,
            "routes": [
                route(
                    f"grpc://{server.address}",
                    plugins=[{"name": "t-trailer-probe", "config": {"replace": True}}],
                )
            ],
        }
    )
    payload = pb.Msg(text="zz").SerializeToString()
    framed = b"\x00" + len(payload).to_bytes(4, "big") + payload
    head, body, trailers = h2_call(gw, "/echo.Echo/Trailing", framed)
    assert head[":status"] == "200"
    assert head["content-type"] == "application/json"
    seen = json.loads(body)
    assert seen["trailers"]["grpc-status"] == "0"
    assert seen["trailers"]["x-trail"] == "zz"
    assert trailers is None


def test_grpcs_upstreams_are_reached_over_tls_with_alpn_h2(
    gateway: GatewayFactory,
    modules: tuple[ModuleType, ModuleType],
    client_of: Any,
    tmp_path: Path,
) -> None:
    ca = CA("grpc upstream CA")
    issued = ca.issue("CN=localhost", dns=["localhost"])
    secure = EchoServer(*modules, tls=(issued.key_pem(), issued.cert_pem()))
    try:
        gw = gateway(
            {
                "upstreams": {
                    "secure": {
                        "targets": [secure.address],
                        "http2": True,
                        "tls": {"ca": str(ca.write(tmp_path / "ca.pem")), "sni": "localhost"},
                    }
                },
                "routes": [{"name": "s", "paths": ["/echo.Echo/*"], "upstream": "secure"}],
            }
        )
        c = client_of(gw)
        resp, call = c.stub.Trailing.with_call(c.pb.Msg(text="over tls"), timeout=10)
        assert resp.text == "ok"
        assert ("x-trail", "over tls") in call.trailing_metadata()
    finally:
        secure.stop()


class PlainH2Upstream:
    """An h2c server that is no gRPC server: every request gets 503 and a text body."""

    def __init__(self) -> None:
        import socket

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        import h2.config
        import h2.connection
        import h2.events

        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            conn.initiate_connection()
            sock.sendall(conn.data_to_send())
            with sock:
                while chunk := sock.recv(65536):
                    for event in conn.receive_data(chunk):
                        if isinstance(event, h2.events.StreamEnded):
                            conn.send_headers(
                                event.stream_id,
                                [(":status", "503"), ("content-type", "text/plain")],
                            )
                            conn.send_data(event.stream_id, b"down for maintenance", True)
                    sock.sendall(conn.data_to_send())

    def stop(self) -> None:
        self.listener.close()


def test_an_upstream_http_error_maps_by_the_grpc_spec(
    gateway: GatewayFactory, client_of: Any
) -> None:
    up = PlainH2Upstream()
    try:
        gw = gateway({"routes": [route(f"grpc://{up.address}")]})
        c = client_of(gw)
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Unary(c.pb.Msg(text="x"), timeout=10)
        # 503 from an upstream is UNAVAILABLE (a gateway-made 504 would be DEADLINE_EXCEEDED)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == "down for maintenance"
    finally:
        up.stop()
