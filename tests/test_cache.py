"""The response cache (RFC 9111) on a real gateway: what is stored and served, Vary, the
key, revalidation with 304s, stale-while-revalidate / stale-if-error, coalescing, purges,
Cache-Status and the access log's cache field.

The origin here answers each path as the test says (status, headers, body, delay) and counts
what reaches it, so every assertion on "served from the cache" is a count that did not grow.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import Gateway, free_port
from test_cluster_limits import Redis

ALICE_KEY = "alice-secret-key"
BOB_KEY = "bob-secret-key"


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"hello"
    sleep: float = 0.0


class Origin:
    """An HTTP/1.1 origin on loopback: ``answer(path, request_headers) -> Answer``."""

    def __init__(self) -> None:
        self.answers: dict[str, Callable[[dict[str, str]], Answer]] = {}
        self.hits: Counter[str] = Counter()
        self.seen: dict[str, list[dict[str, str]]] = {}
        self.lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _serve(self) -> None:
                path = self.path.split("?", 1)[0]
                headers = {k.lower(): v for k, v in self.headers.items()}
                length = int(headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                with origin.lock:
                    origin.hits[path] += 1
                    origin.seen.setdefault(path, []).append(headers)
                    make = origin.answers.get(path)
                answer = make(headers) if make else Answer(status=404, body=b"none")
                if answer.status == 0:
                    # A dead upstream: the connection closes without an answer.
                    self.close_connection = True
                    return
                if answer.sleep:
                    time.sleep(answer.sleep)
                self.send_response(answer.status)
                for k, v in answer.headers.items():
                    self.send_header(k, v)
                body = b"" if answer.status == 304 or self.command == "HEAD" else answer.body
                if answer.status != 304:
                    self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_HEAD = do_POST = do_DELETE = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def on(self, path: str, answer: Answer | Callable[[dict[str, str]], Answer]) -> None:
        with self.lock:
            self.answers[path] = answer if callable(answer) else (lambda _h, a=answer: a)

    def count(self, path: str) -> int:
        with self.lock:
            return self.hits[path]

    def wait_count(self, path: str, n: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count(path) < n:
            assert time.monotonic() < deadline, f"{path}: {self.count(path)} requests, not {n}"
            time.sleep(0.01)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def origin() -> Iterator[Origin]:
    o = Origin()
    yield o
    o.close()


def config(origin: Origin, route_cache: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    return {
        "routes": [
            {"name": "cached", "paths": ["/*"], "upstream": origin.url, "cache": route_cache or {}},
        ],
        **top,
    }


def status_of(r: httpx.Response) -> str:
    return r.headers.get("cache-status", "")


def cc(value: str, **more: str) -> Answer:
    return Answer(headers={"Cache-Control": value, **more})


def test_a_fresh_response_is_served_from_the_cache_with_its_age(gateway, origin):
    origin.on("/a", cc("max-age=60", ETag='"a1"'))
    gw: Gateway = gateway(config(origin), workers=1)
    first = gw.get("/a")
    assert first.status_code == 200 and first.content == b"hello"
    assert status_of(first) == "ferrogate; fwd=miss; fwd-status=200; stored"
    second = gw.get("/a")
    assert second.status_code == 200 and second.content == b"hello"
    assert status_of(second) == "ferrogate; hit"
    assert second.headers["etag"] == '"a1"'
    assert int(second.headers["age"]) >= 0
    assert second.headers["x-request-id"] != first.headers["x-request-id"]
    # HEAD is cached under its own key; GET's entry is untouched.
    assert gw.request("HEAD", "/a").status_code == 200
    assert status_of(gw.request("HEAD", "/a")) == "ferrogate; hit"
    assert origin.count("/a") == 2


@pytest.mark.parametrize(
    ("name", "answer", "request_headers"),
    [
        ("no-store", cc("no-store, max-age=60"), {}),
        ("private", cc("private, max-age=60"), {}),
        ("set-cookie", cc("max-age=60", **{"Set-Cookie": "s=1"}), {}),
        ("no-freshness", Answer(), {}),
        ("vary-star", cc("max-age=60", Vary="*"), {}),
        ("authorized", cc("max-age=60"), {"Authorization": "Bearer t"}),
        ("server-error", Answer(status=500, headers={"ETag": '"e"'}), {}),
    ],
)
def test_responses_that_may_not_be_stored_are_not(gateway, origin, name, answer, request_headers):
    origin.on("/x", answer)
    gw: Gateway = gateway(config(origin), workers=1)
    for _ in range(2):
        r = gw.get("/x", headers=request_headers)
        assert "stored" not in status_of(r) and "fwd=miss" in status_of(r), name
    assert origin.count("/x") == 2, name


def test_authorized_requests_are_stored_when_the_response_is_public(gateway, origin):
    origin.on("/p", cc("public, max-age=60"))
    gw: Gateway = gateway(config(origin), workers=1)
    gw.get("/p", headers={"Authorization": "Bearer t"})
    assert status_of(gw.get("/p", headers={"Authorization": "Bearer t"})) == "ferrogate; hit"
    assert origin.count("/p") == 1


def test_default_ttl_and_set_cookie_when_configured(gateway, origin):
    origin.on("/d", Answer(headers={"Set-Cookie": "s=1"}))
    gw: Gateway = gateway(
        config(origin, {"default_ttl": "30s", "store_set_cookie": True}), workers=1
    )
    gw.get("/d")
    hit = gw.get("/d")
    assert status_of(hit) == "ferrogate; hit" and hit.headers["set-cookie"] == "s=1"
    assert origin.count("/d") == 1


def test_vary_keeps_one_variant_per_request_value(gateway, origin):
    origin.on(
        "/v",
        lambda h: Answer(
            headers={"Cache-Control": "max-age=60", "Vary": "Accept-Language"},
            body=h.get("accept-language", "none").encode(),
        ),
    )
    gw: Gateway = gateway(config(origin), workers=1)
    for lang in ("en", "fr", "en", "fr"):
        assert gw.get("/v", headers={"Accept-Language": lang}).content == lang.encode()
    assert origin.count("/v") == 2


def test_the_key_takes_chosen_query_parameters_and_headers(gateway, origin):
    origin.on("/k", lambda h: Answer(headers={"Cache-Control": "max-age=60"}))
    gw: Gateway = gateway(
        config(origin, {"key": {"query": ["id"], "headers": ["X-Tenant"]}}), workers=1
    )
    gw.get("/k?id=1&utm=a", headers={"X-Tenant": "t1"})
    assert status_of(gw.get("/k?utm=b&id=1", headers={"X-Tenant": "t1"})) == "ferrogate; hit"
    assert origin.count("/k") == 1
    assert "fwd=miss" in status_of(gw.get("/k?id=2", headers={"X-Tenant": "t1"}))
    assert "fwd=miss" in status_of(gw.get("/k?id=1", headers={"X-Tenant": "t2"}))
    assert origin.count("/k") == 3


def authenticated(origin: Any, cache: dict[str, Any]) -> dict[str, Any]:
    cfg = config(origin, cache)
    cfg["routes"][0]["plugins"] = [{"name": "key-auth"}]
    cfg["consumers"] = {
        "alice": {"credentials": [{"type": "key-auth", "key": ALICE_KEY}]},
        "bob": {"credentials": [{"type": "key-auth", "key": BOB_KEY}]},
    }
    return cfg


def test_by_default_the_key_holds_the_consumer_and_authentication_runs_on_hits(gateway, origin):
    origin.on("/c", lambda h: Answer(headers={"Cache-Control": "public, max-age=60"}))
    gw: Gateway = gateway(authenticated(origin, {}), workers=1)
    gw.get("/c", headers={"apikey": ALICE_KEY})
    assert status_of(gw.get("/c", headers={"apikey": ALICE_KEY})) == "ferrogate; hit"
    assert "fwd=miss" in status_of(gw.get("/c", headers={"apikey": BOB_KEY}))
    assert gw.get("/c").status_code == 401
    assert origin.count("/c") == 2


def test_consumers_share_entries_when_the_key_leaves_them_out(gateway, origin):
    origin.on("/c", lambda h: Answer(headers={"Cache-Control": "public, max-age=60"}))
    gw: Gateway = gateway(authenticated(origin, {"key": {"consumer": False}}), workers=1)
    gw.get("/c", headers={"apikey": ALICE_KEY})
    assert status_of(gw.get("/c", headers={"apikey": BOB_KEY})) == "ferrogate; hit"
    assert gw.get("/c").status_code == 401
    assert origin.count("/c") == 1


def test_request_no_cache_revalidates_and_no_store_bypasses(gateway, origin):
    origin.on("/r", cc("max-age=60"))
    gw: Gateway = gateway(config(origin), workers=1)
    gw.get("/r")
    forced = gw.get("/r", headers={"Cache-Control": "no-cache"})
    assert "fwd=request" in status_of(forced)
    assert origin.count("/r") == 2
    bypass = gw.get("/s", headers={"Cache-Control": "no-store"})
    assert status_of(bypass) == "ferrogate; fwd=bypass"
    origin.on("/s", cc("max-age=60"))
    assert "fwd=miss" in status_of(gw.get("/s"))
    assert status_of(gw.get("/s")) == "ferrogate; hit"


def test_unsafe_methods_invalidate_the_stored_response(gateway, origin):
    origin.on("/u", cc("max-age=60"))
    gw: Gateway = gateway(config(origin), workers=1)
    gw.get("/u")
    assert status_of(gw.request("POST", "/u", content=b"x")) == "ferrogate; fwd=bypass"
    assert "fwd=miss" in status_of(gw.get("/u"))


def etag_origin(version: list[str]) -> Callable[[dict[str, str]], Answer]:
    def answer(h: dict[str, str]) -> Answer:
        etag = f'"{version[0]}"'
        headers = {"Cache-Control": "max-age=0", "ETag": etag}
        if h.get("if-none-match") == etag:
            return Answer(status=304, headers=headers)
        return Answer(headers=headers, body=version[0].encode())

    return answer


def test_a_stale_entry_is_revalidated_with_its_etag(gateway, origin):
    version = ["v1"]
    origin.on("/e", etag_origin(version))
    gw: Gateway = gateway(config(origin), workers=1)
    gw.get("/e")
    again = gw.get("/e")
    assert again.status_code == 200 and again.content == b"v1"
    assert status_of(again) == "ferrogate; fwd=stale; fwd-status=304"
    assert origin.seen["/e"][-1]["if-none-match"] == '"v1"'
    version[0] = "v2"
    changed = gw.get("/e")
    assert changed.content == b"v2" and "stored" in status_of(changed)
    assert origin.count("/e") == 3


def test_a_stale_entry_is_revalidated_with_last_modified(gateway, origin):
    stamp = "Wed, 21 Oct 2015 07:28:00 GMT"

    def answer(h: dict[str, str]) -> Answer:
        headers = {"Cache-Control": "max-age=0", "Last-Modified": stamp}
        if h.get("if-modified-since") == stamp:
            return Answer(status=304, headers={**headers, "X-Refreshed": "yes"})
        return Answer(headers=headers)

    origin.on("/lm", answer)
    gw: Gateway = gateway(config(origin), workers=1)
    gw.get("/lm")
    again = gw.get("/lm")
    assert again.content == b"hello" and "fwd-status=304" in status_of(again)
    # The 304's headers update the stored ones.
    assert again.headers["x-refreshed"] == "yes"


def test_client_conditionals_against_a_fresh_entry_get_304_from_the_cache(gateway, origin):
    stamp = "Wed, 21 Oct 2015 07:28:00 GMT"
    origin.on("/f", cc("max-age=60", ETag='"f1"', **{"Last-Modified": stamp}))
    gw: Gateway = gateway(config(origin), workers=1)
    gw.get("/f")
    r = gw.get("/f", headers={"If-None-Match": '"f1"'})
    assert r.status_code == 304 and r.content == b"" and status_of(r) == "ferrogate; hit"
    assert gw.get("/f", headers={"If-None-Match": '"other"'}).status_code == 200
    assert gw.get("/f", headers={"If-Modified-Since": stamp}).status_code == 304
    assert origin.count("/f") == 1


def test_concurrent_misses_reach_the_upstream_once(gateway, origin):
    origin.on("/slow", lambda h: Answer(headers={"Cache-Control": "max-age=60"}, sleep=0.5))
    gw: Gateway = gateway(config(origin), workers=1)

    def fetch(_: int) -> httpx.Response:
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            return c.get("/slow")

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(fetch, range(20)))
    assert all(r.status_code == 200 and r.content == b"hello" for r in answers)
    assert origin.count("/slow") == 1
    assert sum("stored" in status_of(r) for r in answers) == 1


def test_stale_while_revalidate_serves_stale_and_refreshes_in_the_background(gateway, origin):
    version = ["v1"]
    origin.on(
        "/w",
        lambda h: Answer(
            headers={"Cache-Control": "max-age=0, stale-while-revalidate=60"},
            body=version[0].encode(),
        ),
    )
    gw: Gateway = gateway(config(origin), workers=1)
    gw.get("/w")
    version[0] = "v2"
    stale = gw.get("/w")
    assert stale.content == b"v1"
    assert status_of(stale) == "ferrogate; hit; detail=stale-while-revalidate"
    origin.wait_count("/w", 2)
    deadline = time.monotonic() + 5
    while gw.get("/w").content != b"v2":
        assert time.monotonic() < deadline, "the background refresh never landed"
        time.sleep(0.02)


def test_stale_if_error_serves_stale_on_5xx_and_on_a_dead_upstream(gateway, origin):
    failing = [False]

    def answer(h: dict[str, str]) -> Answer:
        if failing[0]:
            return Answer(status=503, body=b"down")
        return cc("max-age=0, stale-if-error=60")

    origin.on("/sie", answer)
    origin.on("/mr", lambda h: cc("max-age=0, stale-if-error=60, must-revalidate"))
    gw: Gateway = gateway(config(origin), workers=1)
    gw.get("/sie")
    gw.get("/mr")
    failing[0] = True
    origin.on("/mr", Answer(status=503, body=b"down"))
    stale = gw.get("/sie")
    assert stale.status_code == 200 and stale.content == b"hello"
    assert status_of(stale) == "ferrogate; fwd=stale; fwd-status=503; detail=stale-if-error"
    # must-revalidate forbids serving it stale.
    assert gw.get("/mr").status_code == 503
    origin.on("/sie", Answer(status=0))
    dead = gw.get("/sie")
    assert dead.status_code == 200 and dead.content == b"hello"
    assert "detail=stale-if-error" in status_of(dead)


def test_large_bodies_are_passed_on_not_stored(gateway, origin):
    origin.on("/big", Answer(headers={"Cache-Control": "max-age=60"}, body=b"x" * 5000))
    gw: Gateway = gateway(config(origin, {"max_body": 4000}), workers=1)
    for _ in range(2):
        r = gw.get("/big")
        assert len(r.content) == 5000 and "stored" not in status_of(r)
    assert origin.count("/big") == 2


def test_the_memory_budget_evicts_the_least_recently_used(gateway, origin):
    for p in ("/m1", "/m2", "/m3"):
        origin.on(p, Answer(headers={"Cache-Control": "max-age=60"}, body=b"x" * 3000))
    gw: Gateway = gateway(config(origin, cache={"memory": 8000}), workers=1)
    gw.get("/m1")
    gw.get("/m2")
    assert status_of(gw.get("/m1")) == "ferrogate; hit"  # m2 is now the oldest
    gw.get("/m3")
    assert status_of(gw.get("/m1")) == "ferrogate; hit"
    assert "fwd=miss" in status_of(gw.get("/m2"))


def test_the_access_log_has_the_cache_outcome(gateway, origin, tmp_path: Path):
    origin.on("/l", cc("max-age=60"))
    log = tmp_path / "gateway-0" / "access.log"
    gw: Gateway = gateway(
        config(origin, access_log={"path": "access.log", "fields": ["path", "status", "cache"]}),
        workers=1,
    )
    gw.get("/l")
    gw.get("/l")
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        lines = [x for x in lines if x["path"] == "/l"]
        if len(lines) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert [x["cache"] for x in lines] == ["miss", "hit"]


def test_purge_by_key_and_prefix_reaches_every_worker(gateway, origin):
    for p in ("/items/1", "/items/2", "/other"):
        origin.on(p, cc("max-age=600"))
    status_port = free_port()
    token = "purge-token"
    gw: Gateway = gateway(
        config(origin, status={"listen": f"127.0.0.1:{status_port}", "admin_token": token}),
        workers=2,
    )
    admin = f"http://127.0.0.1:{status_port}/cache"

    def fill(path: str, n: int) -> None:
        # Fresh connections land on either worker: go on until both have missed once.
        deadline = time.monotonic() + 10
        while origin.count(path) < n:
            assert time.monotonic() < deadline, f"{path}: {origin.count(path)} < {n}"
            with httpx.Client(base_url=gw.url) as c:
                c.get(path)

    for p in ("/items/1", "/items/2", "/other"):
        fill(p, 2)
    assert httpx.delete(admin, params={"key": "/items/1"}).status_code == 401
    auth = {"Authorization": f"Bearer {token}"}
    r = httpx.delete(admin, params={"key": "/items/1"}, headers=auth)
    assert r.status_code == 202, r.text
    fill("/items/1", 4)
    assert httpx.delete(admin, params={"prefix": "/items/"}, headers=auth).status_code == 202
    fill("/items/1", 6)
    fill("/items/2", 4)
    for _ in range(10):
        with httpx.Client(base_url=gw.url) as c:
            assert status_of(c.get("/other")) == "ferrogate; hit"
    assert origin.count("/other") == 2
    bad = httpx.delete(admin, headers=auth)
    assert bad.status_code == 400


@pytest.fixture
def redis() -> Iterator[Redis]:
    r = Redis()
    r.start()
    yield r
    r.stop()


def test_a_redis_store_is_shared_by_nodes_and_purged_for_all(gateway, origin, redis):
    origin.on("/shared", cc("max-age=600", ETag='"s1"'))
    status_port = free_port()
    token = "purge-token"
    store = {"redis": {"url": redis.url, "timeout": "500ms"}}
    node_a: Gateway = gateway(
        config(
            origin,
            cache=store,
            status={"listen": f"127.0.0.1:{status_port}", "admin_token": token},
        ),
        workers=1,
    )
    node_b: Gateway = gateway(config(origin, cache=store), workers=1)
    first = node_a.get("/shared?x=1")
    assert "stored" in status_of(first)
    other = node_b.get("/shared?x=1")
    assert status_of(other) == "ferrogate; hit" and other.headers["etag"] == '"s1"'
    assert other.content == b"hello" and int(other.headers["age"]) >= 0
    assert origin.count("/shared") == 1
    r = httpx.delete(
        f"http://127.0.0.1:{status_port}/cache",
        params={"prefix": "/shared"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 202
    deadline = time.monotonic() + 5
    while status_of(node_b.get("/shared?x=1")) == "ferrogate; hit":
        assert time.monotonic() < deadline, "the purge never reached Redis"
        time.sleep(0.05)
    assert origin.count("/shared") == 2


def test_an_unreachable_redis_store_means_misses_not_errors(gateway, origin, redis):
    origin.on("/r", cc("max-age=600"))
    gw: Gateway = gateway(
        config(origin, cache={"redis": {"url": redis.url, "timeout": "200ms"}}), workers=1
    )
    redis.stop()
    for _ in range(3):
        r = gw.get("/r")
        assert r.status_code == 200 and r.content == b"hello"
    assert origin.count("/r") == 3
    assert '"cache_store_unavailable"' in gw.stderr_text()
