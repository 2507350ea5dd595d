"""Response compression: gzip, brotli and zstd negotiated from Accept-Encoding, streamed.

A small origin of its own answers each path with the head and body the test set for it, so
that every header the rules look at (Content-Type, Content-Encoding, ETag, Vary,
Cache-Control, Accept-Ranges) is under control. Bodies are decoded with the real libraries.
"""

from __future__ import annotations

import gzip
import json
import random
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import brotli
import httpx
import pytest
import yaml
import zstandard

from gateway import Gateway, GatewayFactory, run_cli

JSON_BODY = json.dumps(
    [{"id": i, "name": f"item {i}", "tags": ["a", "b", "c"], "ok": i % 2 == 0} for i in range(400)]
).encode()


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    body: bytes = JSON_BODY
    # Sent one write per part; a part that is an Event is waited on (10 s at most).
    parts: list[bytes | threading.Event] | None = None
    # How parts are framed: chunked, or with a Content-Length of all their bytes.
    chunked: bool = True


class Origin:
    """An HTTP/1.1 origin on loopback answering each path as ``answers`` says."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.accept_encoding: list[str | None] = []
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self.answer(head=True)

            def do_GET(self) -> None:
                self.answer(head=False)

            def answer(self, head: bool) -> None:
                origin.accept_encoding.append(self.headers.get("Accept-Encoding"))
                a = origin.answers.get(self.path.split("?")[0], Answer(status=404, body=b"{}"))
                self.send_response(a.status)
                for k, v in a.headers.items():
                    self.send_header(k, v)
                if a.parts is not None:
                    if a.chunked:
                        self.send_header("Transfer-Encoding", "chunked")
                    else:
                        size = sum(len(p) for p in a.parts if isinstance(p, bytes))
                        self.send_header("Content-Length", str(size))
                    self.end_headers()
                    if head:
                        return
                    for p in a.parts:
                        if isinstance(p, threading.Event):
                            p.wait(10)
                            continue
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(p), p) if a.chunked else p)
                        self.wfile.flush()
                    if a.chunked:
                        self.wfile.write(b"0\r\n\r\n")
                    return
                if a.status not in (204, 304):
                    self.send_header("Content-Length", str(len(a.body)))
                self.end_headers()
                if not head and a.status not in (204, 304):
                    self.wfile.write(a.body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def origin() -> Iterator[Origin]:
    o = Origin()
    yield o
    o.close()


def start(
    gateway: GatewayFactory,
    origin: Origin,
    compression: dict[str, Any] | None = None,
    routes: list[dict[str, Any]] | None = None,
) -> Gateway:
    config: dict[str, Any] = {
        "upstreams": {"origin": {"targets": [origin.address]}},
        "routes": routes or [{"name": "all", "paths": ["/*"], "upstream": "origin"}],
    }
    config["compression"] = {"min_size": "1KiB"} if compression is None else compression
    return gateway(config, workers=1)


DECODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.decompress,
    "br": brotli.decompress,
    "zstd": lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b),
}


def fetch(
    gw: Gateway, path: str, accept: str | None, method: str = "GET"
) -> tuple[httpx.Response, bytes]:
    """The response and its body exactly as it came off the wire (not decoded)."""
    headers = {"Accept-Encoding": accept} if accept is not None else {}
    with gw.client() as c:
        if accept is None:
            # httpx adds its own Accept-Encoding unless told to send none
            c.headers.pop("Accept-Encoding", None)
        with c.stream(method, path, headers=headers) as resp:
            raw = b"".join(resp.iter_raw())
    return resp, raw


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
def test_each_coding_decodes_to_the_upstream_body(
    gateway: GatewayFactory, origin: Origin, coding: str
) -> None:
    origin.answers["/data"] = Answer()
    gw = start(gateway, origin)
    resp, raw = fetch(gw, "/data", coding)
    assert resp.status_code == 200
    assert resp.headers["content-encoding"] == coding
    assert "content-length" not in resp.headers
    assert resp.headers["vary"] == "Accept-Encoding"
    assert len(raw) < len(JSON_BODY) // 4
    assert DECODERS[coding](raw) == JSON_BODY
    # The upstream is asked as the client asked: it may compress on its own.
    assert origin.accept_encoding[-1] == coding


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        ("gzip, br, zstd", "zstd"),
        ("gzip, br", "br"),
        ("gzip;q=1, br;q=0.5, zstd;q=0.4", "gzip"),
        ("br;q=0, gzip;q=0.2", "gzip"),
        ("*", "zstd"),
        ("*;q=0.5, zstd;q=0", "br"),
        ("identity;q=0, gzip", "gzip"),
        ("gzip;q=0.5, identity", None),
        ("br;q=0, gzip;q=0, zstd;q=0", None),
        ("deflate, compress", None),
        ("", None),
        (None, None),
    ],
)
def test_negotiation_follows_q_values(
    gateway: GatewayFactory, origin: Origin, accept: str | None, chosen: str | None
) -> None:
    origin.answers["/data"] = Answer()
    gw = start(gateway, origin)
    resp, raw = fetch(gw, "/data", accept)
    assert resp.headers.get("content-encoding") == chosen
    assert resp.headers["vary"] == "Accept-Encoding"
    if chosen is None:
        assert raw == JSON_BODY
        assert resp.headers["content-length"] == str(len(JSON_BODY))
    else:
        assert DECODERS[chosen](raw) == JSON_BODY


def test_server_preference_breaks_ties(gateway: GatewayFactory, origin: Origin) -> None:
    origin.answers["/data"] = Answer()
    gw = start(gateway, origin, {"encodings": ["gzip", "br"]})
    resp, raw = fetch(gw, "/data", "zstd, br, gzip")
    assert resp.headers["content-encoding"] == "gzip"
    assert gzip.decompress(raw) == JSON_BODY
    resp, raw = fetch(gw, "/data", "zstd")
    assert "content-encoding" not in resp.headers
    assert raw == JSON_BODY


def test_an_encoded_response_is_never_compressed_twice(
    gateway: GatewayFactory, origin: Origin
) -> None:
    already = gzip.compress(JSON_BODY)
    origin.answers["/gz"] = Answer(
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip", "Vary": "Origin"},
        body=already,
    )
    gw = start(gateway, origin, {"min_size": 0})
    resp, raw = fetch(gw, "/gz", "zstd, br, gzip")
    assert resp.headers["content-encoding"] == "gzip"
    assert raw == already
    assert resp.headers["content-length"] == str(len(already))
    # Its Vary is the upstream's business.
    assert resp.headers["vary"] == "Origin"


def test_min_size_and_types(gateway: GatewayFactory, origin: Origin) -> None:
    small = b'{"a": "' + b"x" * 500 + b'"}'
    origin.answers["/small"] = Answer(body=small)
    origin.answers["/png"] = Answer(headers={"Content-Type": "image/png"}, body=JSON_BODY)
    origin.answers["/html"] = Answer(
        headers={"Content-Type": "text/html; charset=utf-8"}, body=JSON_BODY
    )
    origin.answers["/svg"] = Answer(headers={"Content-Type": "image/svg+xml"}, body=JSON_BODY)
    origin.answers["/untyped"] = Answer(headers={}, body=JSON_BODY)
    gw = start(gateway, origin)

    resp, raw = fetch(gw, "/small", "gzip")
    assert "content-encoding" not in resp.headers
    assert raw == small
    # Eligible by type: a larger answer at the same URL would be compressed.
    assert resp.headers["vary"] == "Accept-Encoding"

    for path in ("/png", "/untyped"):
        resp, raw = fetch(gw, path, "gzip")
        assert "content-encoding" not in resp.headers, path
        assert "vary" not in resp.headers, path
        assert raw == JSON_BODY

    for path in ("/html", "/svg"):
        resp, raw = fetch(gw, path, "gzip")
        assert resp.headers["content-encoding"] == "gzip", path
        assert gzip.decompress(raw) == JSON_BODY

    # A route's own list replaces the top-level one.
    gw2 = start(
        gateway,
        origin,
        routes=[
            {
                "name": "images",
                "paths": ["/*"],
                "upstream": "origin",
                "compression": {"types": ["image/*"], "min_size": 0},
            }
        ],
    )
    resp, raw = fetch(gw2, "/png", "br")
    assert resp.headers["content-encoding"] == "br"
    assert brotli.decompress(raw) == JSON_BODY
    resp, raw = fetch(gw2, "/html", "br")
    assert "content-encoding" not in resp.headers
    resp, raw = fetch(gw2, "/small", "br")
    assert "content-encoding" not in resp.headers


def test_vary_is_merged_and_etag_weakened(gateway: GatewayFactory, origin: Origin) -> None:
    origin.answers["/tagged"] = Answer(
        headers={
            "Content-Type": "application/json",
            "Vary": "Origin",
            "ETag": '"v1-abc"',
            "Accept-Ranges": "bytes",
        }
    )
    origin.answers["/weak"] = Answer(
        headers={
            "Content-Type": "application/json",
            "Vary": "accept-encoding",
            "ETag": 'W/"v2"',
        }
    )
    gw = start(gateway, origin)
    resp, raw = fetch(gw, "/tagged", "gzip")
    assert resp.headers["content-encoding"] == "gzip"
    assert resp.headers.get_list("vary") == ["Origin, Accept-Encoding"]
    assert resp.headers["etag"] == 'W/"v1-abc"'
    assert "accept-ranges" not in resp.headers
    assert gzip.decompress(raw) == JSON_BODY

    # Uncompressed: the validator names these exact bytes and stays strong.
    resp, raw = fetch(gw, "/tagged", "identity")
    assert resp.headers["etag"] == '"v1-abc"'
    assert resp.headers["vary"] == "Origin, Accept-Encoding"
    assert resp.headers["accept-ranges"] == "bytes"
    assert raw == JSON_BODY

    resp, raw = fetch(gw, "/weak", "zstd")
    assert resp.headers["content-encoding"] == "zstd"
    assert resp.headers.get_list("vary") == ["accept-encoding"]
    assert resp.headers["etag"] == 'W/"v2"'


def test_responses_that_must_not_change(gateway: GatewayFactory, origin: Origin) -> None:
    origin.answers["/data"] = Answer()
    origin.answers["/nt"] = Answer(
        headers={"Content-Type": "application/json", "Cache-Control": "public, no-transform"}
    )
    origin.answers["/partial"] = Answer(
        status=206,
        headers={
            "Content-Type": "application/json",
            "Content-Range": f"bytes 0-{len(JSON_BODY) - 1}/99999",
        },
    )
    origin.answers["/empty"] = Answer(status=204, headers={"Content-Type": "application/json"})
    origin.answers["/nm"] = Answer(
        status=304, headers={"Content-Type": "application/json", "ETag": '"x"'}
    )
    gw = start(gateway, origin)

    resp, raw = fetch(gw, "/data", "gzip", method="HEAD")
    assert resp.status_code == 200
    assert "content-encoding" not in resp.headers
    assert resp.headers["content-length"] == str(len(JSON_BODY))
    assert resp.headers["vary"] == "Accept-Encoding"
    assert raw == b""

    resp, raw = fetch(gw, "/nt", "gzip")
    assert "content-encoding" not in resp.headers
    assert "vary" not in resp.headers
    assert raw == JSON_BODY

    resp, raw = fetch(gw, "/partial", "gzip")
    assert resp.status_code == 206
    assert "content-encoding" not in resp.headers
    assert raw == JSON_BODY

    for path, status in (("/empty", 204), ("/nm", 304)):
        resp, raw = fetch(gw, path, "gzip")
        assert resp.status_code == status
        assert "content-encoding" not in resp.headers
        assert raw == b""
    assert fetch(gw, "/nm", "gzip")[0].headers["etag"] == '"x"'


def test_route_off_and_on(gateway: GatewayFactory, origin: Origin) -> None:
    origin.answers["/a/data"] = Answer()
    origin.answers["/b/data"] = Answer()
    routes = [
        {"name": "off", "paths": ["/a/*"], "upstream": "origin", "compression": "off"},
        {"name": "on", "paths": ["/b/*"], "upstream": "origin"},
    ]
    gw = start(gateway, origin, routes=routes)
    resp, raw = fetch(gw, "/a/data", "gzip")
    assert "content-encoding" not in resp.headers
    assert "vary" not in resp.headers
    assert raw == JSON_BODY
    resp, raw = fetch(gw, "/b/data", "gzip")
    assert resp.headers["content-encoding"] == "gzip"

    # Without a top-level section only a route that asks compresses, with the defaults.
    gw2 = gateway(
        {
            "upstreams": {"origin": {"targets": [origin.address]}},
            "routes": [
                {"name": "plain", "paths": ["/a/*"], "upstream": "origin"},
                {"name": "on", "paths": ["/b/*"], "upstream": "origin", "compression": "on"},
            ],
        },
        workers=1,
    )
    resp, raw = fetch(gw2, "/a/data", "zstd")
    assert "content-encoding" not in resp.headers
    resp, raw = fetch(gw2, "/b/data", "zstd, gzip")
    assert resp.headers["content-encoding"] == "zstd"
    assert DECODERS["zstd"](raw) == JSON_BODY


def test_a_cache_hit_sends_its_entry_compressed_once(
    gateway: GatewayFactory, origin: Origin
) -> None:
    cached = {"Content-Type": "application/json", "Cache-Control": "max-age=60"}
    origin.answers["/data"] = Answer(headers=cached)
    doc = {"secret": "s3cr3t", "items": json.loads(JSON_BODY)}
    origin.answers["/edited"] = Answer(headers=cached, body=json.dumps(doc).encode())
    routes = [
        {"name": "cached", "paths": ["/data"], "upstream": "origin", "cache": {}},
        {
            "name": "edited",
            "paths": ["/edited"],
            "upstream": "origin",
            "cache": {},
            "plugins": [
                {"name": "response-transformer", "config": {"remove": {"body": ["secret"]}}}
            ],
        },
    ]
    gw = start(gateway, origin, routes=routes)
    # The miss streams through the encoder as any response does.
    resp, raw = fetch(gw, "/data", "gzip")
    assert "fwd=miss" in resp.headers["cache-status"]
    assert "content-length" not in resp.headers
    assert gzip.decompress(raw) == JSON_BODY
    # Hits send the entry's bytes compressed once: whole, with their length, the same each time.
    hits = [fetch(gw, "/data", "gzip") for _ in range(3)]
    for resp, raw in hits:
        assert "hit" in resp.headers["cache-status"]
        assert resp.headers["content-encoding"] == "gzip"
        assert resp.headers["vary"] == "Accept-Encoding"
        assert int(resp.headers["content-length"]) == len(raw)
        assert gzip.decompress(raw) == JSON_BODY
    assert hits[0][1] == hits[1][1] == hits[2][1]
    # Each coding has its own compressed copy; a client that wants none gets the entry as it is.
    for coding in ("br", "zstd"):
        resp, raw = fetch(gw, "/data", coding)
        assert resp.headers["content-encoding"] == coding
        assert int(resp.headers["content-length"]) == len(raw)
        assert DECODERS[coding](raw) == JSON_BODY
    resp, raw = fetch(gw, "/data", None)
    assert "content-encoding" not in resp.headers
    assert raw == JSON_BODY
    assert len(origin.accept_encoding) == 1

    # A plugin that changes the body on the way out: its body is compressed, never the
    # entry's compressed copy.
    want = json.dumps({"items": doc["items"]}, separators=(",", ":")).encode()
    for _ in range(2):
        resp, raw = fetch(gw, "/edited", "gzip")
        assert resp.headers["content-encoding"] == "gzip"
        assert json.loads(gzip.decompress(raw)) == json.loads(want)
    assert "hit" in resp.headers["cache-status"]


class StreamDecoder:
    def __init__(self, coding: str) -> None:
        if coding == "gzip":
            self._d: Any = zlib.decompressobj(wbits=31)
        elif coding == "br":
            self._d = brotli.Decompressor()
        else:
            self._d = zstandard.ZstdDecompressor().decompressobj()
        self.coding = coding

    def feed(self, chunk: bytes) -> bytes:
        if self.coding == "br":
            return bytes(self._d.process(chunk))
        return bytes(self._d.decompress(chunk))


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
def test_a_slow_stream_arrives_incrementally(
    gateway: GatewayFactory, origin: Origin, coding: str
) -> None:
    first = b"event: tick\ndata: " + b'{"n": 1}' * 200 + b"\n\n"
    rest = b"event: tick\ndata: " + b'{"n": 2}' * 200 + b"\n\n"
    seen_first = threading.Event()
    origin.answers["/events"] = Answer(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        parts=[first, seen_first, rest],
    )
    gw = start(gateway, origin)
    decoded = b""
    with gw.client() as c, c.stream("GET", "/events", headers={"Accept-Encoding": coding}) as resp:
        assert resp.headers["content-encoding"] == coding
        decoder = StreamDecoder(coding)
        for chunk in resp.iter_raw():
            decoded += decoder.feed(chunk)
            if decoded == first:
                # The upstream holds the rest until the client has seen the first event.
                seen_first.set()
    assert seen_first.is_set(), "the first event only arrived with the end of the stream"
    assert decoded == first + rest


@pytest.mark.parametrize("level", [1, 6])
def test_gzip_bodies_of_every_shape_decode(
    gateway: GatewayFactory, origin: Origin, level: int
) -> None:
    """At level 1 a body with a Content-Length up to 128 KiB is compressed whole by the
    one-shot encoder, others stream through zlib: each way, every body must decode."""
    rng = random.Random(level)
    bodies = {
        "json": JSON_BODY,
        "small": JSON_BODY[:1500],
        "noise": rng.randbytes(40_000),  # incompressible: stored blocks
        "limit": (JSON_BODY * 8)[: 128 * 1024],
        "large": JSON_BODY * 16,  # above the one-shot limit: streamed
    }
    pause = threading.Event()
    for name, body in bodies.items():
        third = len(body) // 3
        pieces = [body[:third], body[third : 2 * third], body[2 * third :]]
        origin.answers[f"/one/{name}"] = Answer(body=body)
        origin.answers[f"/split/{name}"] = Answer(
            parts=[pieces[0], pause, *pieces[1:]], chunked=False
        )
        origin.answers[f"/chunked/{name}"] = Answer(parts=pieces)
    gw = start(gateway, origin, {"min_size": 0, "level": {"gzip": level}})
    for name, body in bodies.items():
        for shape in ("one", "split", "chunked"):
            if shape == "split":
                # The upstream stops after its first third for a moment.
                pause.clear()
                threading.Timer(0.2, pause.set).start()
            resp, raw = fetch(gw, f"/{shape}/{name}", "gzip")
            assert resp.headers["content-encoding"] == "gzip", (shape, name)
            # gzip.decompress checks the trailer's CRC-32 and length too.
            assert gzip.decompress(raw) == body, (shape, name, level)
            if name == "noise":
                if level == 1 and shape != "chunked":
                    # Whole: sent as stored blocks rather than grown by fixed codes.
                    assert len(raw) <= len(body) + len(body) // 1000 + 64, (shape, len(raw))
            else:
                assert len(raw) < len(body) // 3, (shape, name, len(raw))


def test_a_large_body_streams_with_bounded_memory(gateway: GatewayFactory, origin: Origin) -> None:
    piece = JSON_BODY * 64  # ~ 2.6 MB
    count = 40
    origin.answers["/big"] = Answer(
        headers={"Content-Type": "application/json"}, parts=[piece] * count
    )
    gw = start(gateway, origin)
    with gw.client() as c:
        c.get("/big", headers={"Accept-Encoding": "gzip"}).read()  # warm up
    baseline = gw.rss()
    peak = baseline
    total = 0
    crc = 0
    with gw.client() as c, c.stream("GET", "/big", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["content-encoding"] == "gzip"
        decoder = StreamDecoder("gzip")
        last_sample = 0.0
        for chunk in resp.iter_raw():
            out = decoder.feed(chunk)
            total += len(out)
            crc = zlib.crc32(out, crc)
            now = time.monotonic()
            if now - last_sample > 0.02:
                peak = max(peak, gw.rss())
                last_sample = now
    assert total == len(piece) * count
    assert crc == zlib.crc32(piece * count)
    # 100 MB went through; the worker must not have held it.
    assert peak - baseline < 30 * 1000 * 1000


def test_config_problems_name_the_field(tmp_path: Path) -> None:
    config = {
        "listen": ["127.0.0.1:0"],
        "upstreams": {"origin": {"targets": ["127.0.0.1:9"]}},
        "compression": {"encodings": ["gzip", "deflate"], "level": {"gzip": 12}},
        "routes": [
            {"name": "a", "paths": ["/a/*"], "upstream": "origin"},
            {
                "name": "b",
                "paths": ["/b/*"],
                "upstream": "origin",
                "compression": {"types": ["json"], "min_size": "lots"},
            },
        ],
    }
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = run_cli("check", str(path))
    assert out.returncode == 2, out.stdout
    assert "compression.encodings[1]" in out.stdout
    assert "compression.level.gzip" in out.stdout
    config["compression"] = {"encodings": ["gzip", "gzip"]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = run_cli("check", str(path))
    assert out.returncode == 2, out.stdout
    assert "compression.encodings: a coding is listed twice" in out.stdout
    assert "routes[1].compression.types[0]" in out.stdout
    assert "routes[1].compression.min_size" in out.stdout
    # line numbers point into the file
    assert f"{path}:" in out.stdout or "gw.yaml:" in out.stdout
