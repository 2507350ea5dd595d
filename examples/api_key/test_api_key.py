"""Tests of the api-key plugin: its hooks alone, then through a real gateway."""

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import msgspec
import pytest
from plugins.api_key import ApiKey

from ferrogate.testing import PluginHarness, run_gateway

PLUGINS_DIR = Path(__file__).parent / "plugins"
KEYS = {"k-alice": "alice", "k-bob": "bob"}


def test_a_known_key_names_the_consumer() -> None:
    h = PluginHarness(ApiKey, {"keys": KEYS})
    out = h.request("GET", "/orders", headers={"x-api-key": "k-bob", "x-consumer": "admin"})
    assert out.response is None  # not answered: the request goes on to the upstream
    assert out.request.consumer == "bob"
    assert out.request.headers.getall("x-consumer") == ["bob"]  # not the client's own
    assert "x-api-key" not in out.request.headers


@pytest.mark.parametrize("headers", [{}, {"x-api-key": ""}, {"x-api-key": "k-mallory"}])
def test_a_missing_or_unknown_key_is_answered_401(headers: dict[str, str]) -> None:
    h = PluginHarness(ApiKey, {"keys": KEYS})
    out = h.request("GET", "/orders", headers=headers)
    assert out.response is not None
    assert out.response.status == 401
    assert out.response.json() == {"error": "a valid x-api-key header is required"}
    assert out.response.headers["www-authenticate"] == "ApiKey"
    assert out.request.consumer is None


def test_the_response_names_the_consumer() -> None:
    h = PluginHarness(ApiKey, {"keys": KEYS})
    out = h.request("GET", "/orders", headers={"x-api-key": "k-alice"})
    resp = h.response(out.request, 200, headers={"content-type": "application/json"})
    assert resp.headers["x-consumer"] == "alice"


def test_the_header_is_configurable() -> None:
    h = PluginHarness(ApiKey, {"keys": KEYS, "header": "authorization"})
    out = h.request("GET", "/", headers={"authorization": "k-alice", "x-api-key": "k-bob"})
    assert out.request.consumer == "alice"
    assert "authorization" not in out.request.headers


def test_a_config_without_keys_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match="length >= 1"):
        PluginHarness(ApiKey, {"keys": {}})


class Upstream(BaseHTTPRequestHandler):
    """Answers every GET with the request headers it received, as a JSON object."""

    def do_GET(self) -> None:
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_through_the_gateway(upstream: str) -> None:
    config = {
        "upstreams": {"app": {"targets": [upstream]}},
        "routes": [
            {
                "paths": ["/*"],
                "upstream": "app",
                "plugins": [{"name": "api-key", "config": {"keys": KEYS}}],
            }
        ],
    }
    with run_gateway(config, plugins_dir=PLUGINS_DIR) as url:
        denied = httpx.get(url + "/orders")
        assert denied.status_code == 401
        assert denied.json() == {"error": "a valid x-api-key header is required"}

        r = httpx.get(url + "/orders", headers={"x-api-key": "k-alice"})
        assert r.status_code == 200
        assert r.headers["x-consumer"] == "alice"
        seen = r.json()  # the headers that reached the upstream
        assert seen["x-consumer"] == "alice"
        assert "x-api-key" not in seen
