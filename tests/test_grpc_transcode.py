"""grpc-transcode: JSON/HTTP requests become gRPC calls by google.api.http rules and the
answers come back as JSON, through a real gateway to a real grpcio server
(tests/transcode/bookstore.proto; the descriptor set is made with grpc_tools.protoc here).
The template matching and the query mapping are also checked on their own."""

from __future__ import annotations

import base64
import gzip
import importlib
import re
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml
from google.api import annotations_pb2
from google.protobuf import any_pb2, empty_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_tools import protoc

import grpc
from ferrogate.grpc_json import (
    JsonOptions,
    PathTemplate,
    TranscodeError,
    error_body,
    frame,
    http_status,
    load_bindings,
    unframe,
)
from ferrogate.plugins.grpc_transcode import GrpcTranscode
from ferrogate.testing import PluginHarness
from gateway import Gateway, GatewayFactory, run_cli

PROTO_DIR = Path(__file__).parent / "transcode"


# -- the service -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def protos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, ModuleType]]:
    """The descriptor set of bookstore.proto and its generated message module."""
    out = tmp_path_factory.mktemp("protos")
    # googleapis-common-protos ships google/api/*.proto beside the generated modules.
    google_root = Path(annotations_pb2.__file__).parents[2]
    well_known = Path(protoc.__file__).parent / "_proto"
    descriptor = out / "bookstore.pb"
    rc = protoc.main(
        [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{google_root}",
            f"-I{well_known}",
            "--include_imports",
            f"--descriptor_set_out={descriptor}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO_DIR / "bookstore.proto"),
        ]
    )
    assert rc == 0
    sys.path.insert(0, str(out))
    try:
        pb = importlib.import_module("bookstore_pb2")
        importlib.import_module("bookstore_pb2_grpc")
        yield descriptor, pb
    finally:
        sys.path.remove(str(out))


class Bookstore:
    """The servicer; remembers every call it got."""

    def __init__(self, pb: ModuleType) -> None:
        self.pb = pb
        self.calls: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def _seen(self, method: str, request: Any) -> None:
        with self.lock:
            self.calls.append((method, request))

    def GetBook(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._seen("GetBook", request)
        if request.name.endswith("/404") or request.book_id == 404:
            info = error_details_pb2.ErrorInfo(reason="BOOK_MISSING", domain="bookstore")
            detail = any_pb2.Any()
            detail.Pack(info)
            status = status_pb2.Status(code=5, message="no such book", details=[detail])
            context.set_trailing_metadata([("grpc-status-details-bin", status.SerializeToString())])
            context.abort(grpc.StatusCode.NOT_FOUND, "no such book: 404")
        author = self.pb.Author(name="Ursula", born=1929)
        return self.pb.Book(
            id=request.book_id or 7,
            title=request.name or "by id",
            genre=self.pb.FICTION,
            tags=["classic", "sf"],
            author=author,
            page_count=2**40,
        )

    def ListBooks(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._seen("ListBooks", request)
        if request.shelf == "private":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "who are you?")
        if request.shelf == "down":
            context.abort(grpc.StatusCode.UNAVAILABLE, "shelf offline")
        books = [
            self.pb.Book(id=i, shelf=request.shelf, tags=list(request.tags))
            for i in range(request.page_size)
        ]
        return self.pb.ListBooksResponse(books=books, total=2**40 + 1)

    def CreateBook(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._seen("CreateBook", request)
        book = self.pb.Book()
        book.CopyFrom(request.book)
        book.id = 10**12
        book.shelf = request.shelf
        return book

    def UpdateBook(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._seen("UpdateBook", request)
        book = self.pb.Book()
        book.CopyFrom(request.book)
        book.shelf = request.shelf
        return book

    def DeleteBook(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._seen("DeleteBook", request)
        if request.id == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "id must be set")
        return empty_pb2.Empty()

    def PublishBook(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._seen("PublishBook", request)
        return self.pb.Book(id=request.id, shelf=request.shelf, published=True, title=request.note)

    def GetAuthor(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._seen("GetAuthor", request)
        return self.pb.Book(id=request.id, author=self.pb.Author(name="Stanislaw", born=1921))

    def StreamBooks(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._seen("StreamBooks", request)
        for i in range(3):
            yield self.pb.Book(id=i + 1, shelf=request.shelf)

    def Ping(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._seen("Ping", request)
        return empty_pb2.Empty()


@pytest.fixture
def store(protos: tuple[Path, ModuleType]) -> Iterator[tuple[Bookstore, int]]:
    """A running grpcio server (loopback, free port) and its servicer."""
    pb_grpc = importlib.import_module("bookstore_pb2_grpc")
    servicer = Bookstore(protos[1])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_BookstoreServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(grace=None).wait(5)


@pytest.fixture
def gw(
    gateway: GatewayFactory, store: tuple[Bookstore, int], protos: tuple[Path, ModuleType]
) -> Gateway:
    return gateway(
        {
            "routes": [
                {
                    "paths": ["/*"],
                    "upstream": f"grpc://127.0.0.1:{store[1]}",
                    "plugins": [
                        {"name": "grpc-transcode", "config": {"descriptor": str(protos[0])}}
                    ],
                },
            ]
        },
        workers=1,
    )


def calls(store: tuple[Bookstore, int]) -> list[tuple[str, Any]]:
    with store[0].lock:
        return list(store[0].calls)


# -- pure parts --------------------------------------------------------------------------------


def test_path_templates_bind_variables_verbs_and_wildcards() -> None:
    t = PathTemplate("/v1/{name=shelves/*/books/*}")
    assert t.match("/v1/shelves/s%201/books/b1") == {("name",): "shelves/s 1/books/b1"}
    assert t.match("/v1/shelves/s1/books") is None
    assert t.match("/v1/shelves/s1/books/b1/extra") is None

    t = PathTemplate("/v1/shelves/{shelf}/books/{book.id}")
    assert t.match("/v1/shelves/a%2Fb/books/9") == {("shelf",): "a/b", ("book", "id"): "9"}

    t = PathTemplate("/v1/{shelf}/books/{id}:publish")
    assert t.verb == "publish"
    assert t.match("/v1/s/books/3:publish") == {("shelf",): "s", ("id",): "3"}
    assert t.match("/v1/s/books/3") is None

    t = PathTemplate("/files/{path=**}")
    assert t.match("/files/a/b%2Fc/d.txt") == {("path",): "a/b%2Fc/d.txt"}
    t = PathTemplate("/static/*/x")
    assert t.match("/static/anything/x") == {} and t.match("/static/a/b/x") is None


@pytest.mark.parametrize("bad", ["v1/x", "/v1/{name", "/v1/{a.}", "/v1/x:", "/v1/{a={b}}"])
def test_malformed_path_templates_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="path template"):
        PathTemplate(bad)


def test_query_parameters_fill_nested_repeated_and_typed_fields(
    protos: tuple[Path, ModuleType],
) -> None:
    bindings, _ = load_bindings(str(protos[0]), [])
    by = {(b.http_method, b.template.text): b for b in bindings}
    list_books = by["GET", "/v1/shelves/{shelf}/books"]
    options = JsonOptions()
    msg = list_books.request_message(
        {("shelf",): "s1"},
        "page_size=3&tags=a&tags=b%20c&filter.genre=SCIENCE&filter.authorName=Le%20Guin"
        "&include_drafts=true",
        None,
        options,
    )
    assert msg.shelf == "s1" and msg.page_size == 3 and list(msg.tags) == ["a", "b c"]
    assert msg.filter.genre == 2 and msg.filter.author_name == "Le Guin"
    assert msg.include_drafts is True
    # The path wins over a query parameter for the same field.
    assert list_books.request_message({("shelf",): "s1"}, "shelf=s2", None, options).shelf == "s1"

    for query, field in [
        ("page_size=three", "page_size"),
        ("include_drafts=maybe", "include_drafts"),
        ("filter.genre=POETRY", "filter.genre"),
        ("nope=1", "nope"),
        ("filter.nope=1", "filter.nope"),
        ("filter=x", "filter"),
    ]:
        with pytest.raises(TranscodeError) as e:
            list_books.request_message({("shelf",): "s"}, query, None, options)
        assert e.value.field == field, query
        assert field in str(e.value)
    lenient = JsonOptions(ignore_unknown_query_params=True)
    assert list_books.request_message({("shelf",): "s"}, "nope=1", None, lenient).shelf == "s"

    # body "*": the body is the request; query parameters are not used.
    create = by["POST", "/v1/shelves/{shelf}/books"]
    msg = create.request_message(
        {("shelf",): "s9"}, "request_id=q", b'{"book": {"title": "T"}, "requestId": "b"}', options
    )
    assert (msg.shelf, msg.book.title, msg.request_id) == ("s9", "T", "b")
    with pytest.raises(TranscodeError, match="not valid JSON"):
        create.request_message({("shelf",): "s"}, "", b'{"book": ', options)
    with pytest.raises(TranscodeError, match="tittle"):
        create.request_message({("shelf",): "s"}, "", b'{"book": {"tittle": "T"}}', options)


def test_frames_statuses_and_error_bodies() -> None:
    assert frame(b"abc") == b"\x00\x00\x00\x00\x03abc"
    assert unframe(frame(b"abc") + frame(b""), None) == [b"abc", b""]
    packed = gzip.compress(b"hello")
    assert unframe(b"\x01" + len(packed).to_bytes(4, "big") + packed, "gzip") == [b"hello"]
    for cut in (b"\x00\x00\x00", b"\x00\x00\x00\x00\x05ab"):
        with pytest.raises(ValueError):
            unframe(cut, None)
    with pytest.raises(ValueError, match="compressed"):
        unframe(b"\x01\x00\x00\x00\x01x", None)
    expected = {0: 200, 3: 400, 4: 504, 5: 404, 7: 403, 8: 429, 12: 501, 14: 503, 16: 401}
    assert {c: http_status(c) for c in expected} == expected
    assert http_status(99) == 500

    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="R"))
    raw = status_pb2.Status(code=5, message="m", details=[info]).SerializeToString()
    unpadded = base64.b64encode(raw).decode().rstrip("=")
    body = error_body(5, "", unpadded, None)
    assert body == {
        "code": 5,
        "message": "m",
        "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "R"}],
    }


def test_unmatched_requests_pass_through_untouched(protos: tuple[Path, ModuleType]) -> None:
    h = PluginHarness(GrpcTranscode, {"descriptor": str(protos[0])})
    for method, path in [
        ("GET", "/v1/unknown"),
        ("PUT", "/v1/shelves/s/books"),  # the path has rules, the method none
        ("POST", "/bookstore.v1.Bookstore/GetBook"),  # a gRPC client's call
    ]:
        out = h.request(method, path, headers={"content-type": "application/grpc"}, body=b"x")
        assert out.decision is None and out.response is None
    out = h.request("GET", "/v1/books/12", query="name=n", headers={"accept-encoding": "gzip"})
    assert out.decision is not None
    _, method, path, query, _, body, *_ = out.decision
    assert (method, path, query) == ("POST", "/bookstore.v1.Bookstore/GetBook", "")
    assert out.request.headers["content-type"] == "application/grpc"
    assert out.request.headers["te"] == "trailers"
    assert "accept-encoding" not in out.request.headers
    (raw,) = unframe(body, None)
    sent = protos[1].GetBookRequest.FromString(raw)
    assert (sent.book_id, sent.name) == (12, "n")


def check(tmp_path: Path, plugin_config: dict[str, Any]) -> str:
    config = {
        "listen": ["127.0.0.1:1"],
        "routes": [
            {
                "paths": ["/*"],
                "upstream": "http://127.0.0.1:9",
                "plugins": [{"name": "grpc-transcode", "config": plugin_config}],
            }
        ],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = run_cli("check", str(path))
    assert out.returncode != 0, out.stdout
    text = out.stdout + out.stderr
    assert re.search(r"gateway\.yaml:\d+:\d+: routes\[0\]\.plugins\[0\]\.config: ", text), text
    return text


def test_config_problems_name_the_setting(tmp_path: Path, protos: tuple[Path, ModuleType]) -> None:
    descriptor = str(protos[0])
    out = check(tmp_path, {"descriptor": str(tmp_path / "missing.pb")})
    assert "descriptor: cannot read" in out and "missing.pb" in out
    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(b"\xff\xff\xff not a descriptor set")
    assert "is not a FileDescriptorSet" in check(tmp_path, {"descriptor": str(garbage)})
    out = check(tmp_path, {"descriptor": descriptor, "services": ["bookstore.v1.Nope"]})
    assert "services[0]: no service 'bookstore.v1.Nope'" in out
    assert "bookstore.v1.Bookstore" in out  # the ones it has
    # A set without any rule: google/api/http.proto alone has no service at all.
    from google.protobuf import descriptor_pb2

    whole = descriptor_pb2.FileDescriptorSet.FromString(protos[0].read_bytes())
    bare = descriptor_pb2.FileDescriptorSet(file=[f for f in whole.file if not f.service])
    empty = tmp_path / "bare.pb"
    empty.write_bytes(bare.SerializeToString())
    assert "google.api.http rule" in check(tmp_path, {"descriptor": str(empty)})
    out = check(tmp_path, {"descriptor": descriptor, "max_body": "lots"})
    assert "max_body" in out


# -- through the gateway -----------------------------------------------------------------------


def test_get_with_path_variables_and_additional_bindings(
    gw: Gateway, store: tuple[Bookstore, int]
) -> None:
    r = httpx.get(gw.url + "/v1/shelves/s1/books/b%202")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert not [h for h in r.headers if h.startswith("grpc-")]
    assert r.json() == {
        "id": "7",  # int64 as a string (proto3 JSON)
        "title": "shelves/s1/books/b 2",
        "genre": "FICTION",
        "tags": ["classic", "sf"],
        "author": {"name": "Ursula", "born": 1929},
        "pageCount": "1099511627776",
    }
    r = httpx.get(gw.url + "/v1/books/12")
    assert r.status_code == 200 and r.json()["id"] == "12"
    assert [(m, req.book_id) for m, req in calls(store)] == [("GetBook", 0), ("GetBook", 12)]


def test_query_parameters_reach_the_service(gw: Gateway, store: tuple[Bookstore, int]) -> None:
    r = httpx.get(
        gw.url + "/v1/shelves/s1/books",
        params=[("page_size", "2"), ("tags", "x"), ("tags", "y"), ("filter.genre", "SCIENCE")],
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "books": [
            {"shelf": "s1", "tags": ["x", "y"]},
            {"id": "1", "shelf": "s1", "tags": ["x", "y"]},
        ],
        "total": "1099511627777",
    }
    ((method, req),) = calls(store)
    assert method == "ListBooks" and req.filter.genre == 2 and req.page_size == 2


def test_bodies_star_and_field_delete_and_custom_verb(
    gw: Gateway, store: tuple[Bookstore, int]
) -> None:
    r = httpx.post(
        gw.url + "/v1/shelves/s1/books",
        json={"book": {"title": "Solaris", "genre": "SCIENCE", "pageCount": "204"}},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "id": "1000000000000",
        "title": "Solaris",
        "genre": "SCIENCE",
        "shelf": "s1",
        "pageCount": "204",
    }
    r = httpx.patch(gw.url + "/v1/shelves/s2/books/55", json={"title": "Eden", "tags": ["a", "b"]})
    assert r.status_code == 200, r.text
    assert r.json() == {"id": "55", "title": "Eden", "tags": ["a", "b"], "shelf": "s2"}
    r = httpx.delete(gw.url + "/v1/shelves/s2/books/55")
    assert (r.status_code, r.json()) == (200, {})
    r = httpx.post(gw.url + "/v1/shelves/s3/books/8:publish", json={"note": "out now"})
    assert r.status_code == 200, r.text
    assert r.json() == {"id": "8", "title": "out now", "shelf": "s3", "published": True}
    r = httpx.get(gw.url + "/v1/authors/3")  # response_body: "author"
    assert r.json() == {"name": "Stanislaw", "born": 1921}
    assert [m for m, _ in calls(store)] == [
        "CreateBook",
        "UpdateBook",
        "DeleteBook",
        "PublishBook",
        "GetAuthor",
    ]


def test_server_streaming_is_a_json_array(gw: Gateway) -> None:
    r = httpx.get(gw.url + "/v1/shelves/s4/books:stream")
    assert r.status_code == 200, r.text
    assert r.json() == [{"id": str(i), "shelf": "s4"} for i in (1, 2, 3)]


def test_grpc_errors_map_to_http_statuses(gw: Gateway) -> None:
    r = httpx.get(gw.url + "/v1/books/404")
    assert r.status_code == 404, r.text
    assert r.headers["content-type"] == "application/json"
    assert not [h for h in r.headers if h.startswith("grpc-")]
    assert r.json() == {
        "code": 5,
        "message": "no such book: 404",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "BOOK_MISSING",
                "domain": "bookstore",
            }
        ],
    }
    for path, status, code in [
        ("/v1/shelves/private/books", 401, 16),
        ("/v1/shelves/down/books", 503, 14),
    ]:
        r = httpx.get(gw.url + path)
        assert r.status_code == status, r.text
        assert r.json()["code"] == code
    r = httpx.delete(gw.url + "/v1/shelves/s/books/0")
    assert (r.status_code, r.json()["message"]) == (400, "id must be set")


def test_bad_requests_are_refused_without_reaching_the_service(
    gw: Gateway, store: tuple[Bookstore, int]
) -> None:
    for r, words in [
        (httpx.post(gw.url + "/v1/shelves/s/books", content=b'{"book": '), "not valid JSON"),
        (httpx.post(gw.url + "/v1/shelves/s/books", json={"bok": {}}), "bok"),
        (httpx.post(gw.url + "/v1/shelves/s/books", json={"book": {"id": "x"}}), "id"),
        (httpx.delete(gw.url + "/v1/shelves/s/books/abc"), "id"),
        (httpx.get(gw.url + "/v1/shelves/s/books?page_size=x"), "page_size"),
        (httpx.get(gw.url + "/v1/shelves/s/books?colour=red"), "colour"),
    ]:
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_request" and words in err["message"], err
        assert err["request_id"] == r.headers["x-request-id"]
    assert calls(store) == []


def test_grpc_clients_share_the_route(
    gw: Gateway, store: tuple[Bookstore, int], protos: tuple[Path, ModuleType]
) -> None:
    pb = protos[1]
    pb_grpc = importlib.import_module("bookstore_pb2_grpc")
    with grpc.insecure_channel(gw.address) as channel:
        stub = pb_grpc.BookstoreStub(channel)
        book = stub.GetBook(pb.GetBookRequest(book_id=5), timeout=10)
        assert (book.id, book.author.name) == (5, "Ursula")
        assert stub.Ping(empty_pb2.Empty(), timeout=10) == empty_pb2.Empty()
        with pytest.raises(grpc.RpcError) as e:
            stub.GetBook(pb.GetBookRequest(book_id=404), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert [m for m, _ in calls(store)] == ["GetBook", "Ping", "GetBook"]


def test_printer_options_and_lenient_query(
    gateway: GatewayFactory, store: tuple[Bookstore, int], protos: tuple[Path, ModuleType]
) -> None:
    config = {
        "descriptor": str(protos[0]),
        "services": ["bookstore.v1.Bookstore"],
        "print_enum_as_int": True,
        "always_print_fields_with_no_presence": True,
        "preserve_proto_field_names": True,
        "ignore_unknown_query_params": True,
    }
    gw = gateway(
        {
            "routes": [
                {
                    "paths": ["/*"],
                    "upstream": f"grpc://127.0.0.1:{store[1]}",
                    "plugins": [{"name": "grpc-transcode", "config": config}],
                }
            ]
        },
        workers=1,
    )
    r = httpx.get(gw.url + "/v1/books/3?utm_source=mail")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "id": "3",
        "title": "by id",
        "genre": 1,
        "tags": ["classic", "sf"],
        "author": {"name": "Ursula", "born": 1929},
        "shelf": "",
        "published": False,
        "page_count": "1099511627776",
    }
