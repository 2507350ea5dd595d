"""A test server speaking OpenAI's API (Chat Completions, Embeddings, Models) on loopback.

It answers like api.openai.com does: a ``chat.completion`` (tool calls when the request has
``tools`` and asks for one), a streamed answer as ``chat.completion.chunk`` server-sent events
ending with ``data: [DONE]`` (and, with ``stream_options.include_usage``, a last chunk with
empty ``choices`` and the usage), embeddings, and errors in OpenAI's shape. It records every
request (``requests``) and can be steered for the next requests (``script``): a status with
its error body, a delay before answering, or closing the connection without an answer.
"""

from __future__ import annotations

import json
import socketserver
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

ANSWER = "Hello from the test provider."


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None


@dataclass
class Step:
    """How to answer one request: ``status`` (an error body unless 200), ``delay`` seconds
    first, or ``drop`` the connection."""

    status: int = 200
    delay: float = 0.0
    drop: bool = False
    retry_after: str | None = None
    usage: bool = True
    """False: a compatible server that reports no usage."""
    pause: float = 0.0
    """Streams: seconds between the first event and the rest."""


@dataclass
class OpenAIProvider:
    server: Any = None
    requests: list[Seen] = field(default_factory=list)
    script: list[Step] = field(default_factory=list)
    default: Step = field(default_factory=Step)
    answer: str = ANSWER
    json_answer: str = '{"answer": 42}'
    """The text of answers to requests with a JSON response_format."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def next_step(self) -> Step:
        with self.lock:
            return self.script.pop(0) if self.script else self.default

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _prompt_tokens(body: dict[str, Any]) -> int:
    return max(1, len(json.dumps(body.get("messages") or body.get("input") or "")) // 4)


_ERRORS = {
    400: ("invalid_request_error", None, "Bad request"),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided"),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests"),
    500: ("server_error", None, "The server had an error while processing your request."),
    503: ("server_error", None, "The engine is currently overloaded."),
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    provider: OpenAIProvider

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read(self) -> dict[str, Any] | None:
        n = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(n) if n else b""
        return json.loads(raw) if raw else None

    def _send(self, status: int, doc: Any, extra: dict[str, str] | None = None) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._handle(None)

    def do_POST(self) -> None:
        self._handle(self._read())

    def _handle(self, body: dict[str, Any] | None) -> None:
        p = self.provider
        with p.lock:
            p.requests.append(
                Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )
        step = p.next_step()
        if step.delay:
            time.sleep(step.delay)
        if step.drop:
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if self.headers.get("authorization") != "Bearer sk-test-provider":
            step = Step(status=401)
        if step.status != 200:
            kind, code, message = _ERRORS.get(step.status, ("server_error", None, "error"))
            if step.status == 401:
                # Like some providers, it quotes the key it refused.
                given = (self.headers.get("authorization") or "").removeprefix("Bearer ")
                message = f"{message}: {given}"
            extra = {"retry-after": step.retry_after} if step.retry_after else None
            self._send(
                step.status,
                {"error": {"message": message, "type": kind, "param": None, "code": code}},
                extra,
            )
            return
        if self.path.endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": "gpt-test", "object": "model"}]})
        elif self.path.endswith("/embeddings"):
            assert body is not None
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            data = [
                {"object": "embedding", "index": i, "embedding": [0.1 * (i + 1), 0.2, -0.3]}
                for i in range(len(inputs))
            ]
            self._send(
                200,
                {
                    "object": "list",
                    "data": data,
                    "model": body["model"],
                    "usage": {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)},
                },
            )
        elif self.path.endswith("/chat/completions"):
            assert body is not None
            if body.get("stream"):
                self._stream(body, step)
            else:
                self._complete(body, step)
        else:
            self._send(404, {"error": {"message": "Not found", "type": "invalid_request_error"}})

    def _message(self, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        if body.get("tools") and body.get("tool_choice") not in (None, "none", "auto"):
            fn = body["tools"][0]["function"]["name"]
            call = {
                "id": "call_1",
                "type": "function",
                "function": {"name": fn, "arguments": '{"city": "Paris"}'},
            }
            return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
        fmt = body.get("response_format") or {}
        if fmt.get("type") in ("json_object", "json_schema"):
            return {"role": "assistant", "content": self.provider.json_answer}, "stop"
        return {"role": "assistant", "content": self.provider.answer}, "stop"

    def _complete(self, body: dict[str, Any], step: Step) -> None:
        message, finish = self._message(body)
        doc: dict[str, Any] = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        }
        if step.usage:
            doc["usage"] = _usage(_prompt_tokens(body), 7)
        self._send(200, doc)

    def _stream(self, body: dict[str, Any], step: Step) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        base = {
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body["model"],
        }
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        words = self.provider.answer.split(" ")
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        deltas += [{"content": (" " if i else "") + w} for i, w in enumerate(words)]
        for i, d in enumerate(deltas):
            chunk = {**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}
            if include_usage and step.usage:
                chunk["usage"] = None
            self._event(chunk)
            if i == 0 and step.pause:
                time.sleep(step.pause)
        last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        if include_usage and step.usage:
            last["usage"] = None
        self._event(last)
        if include_usage and step.usage:
            self._event({**base, "choices": [], "usage": _usage(_prompt_tokens(body), len(words))})
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _event(self, doc: dict[str, Any]) -> None:
        self._chunk(b"data: " + json.dumps(doc).encode() + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


def start() -> OpenAIProvider:
    """A provider on a free loopback port, serving on a thread until ``close()``."""
    provider = OpenAIProvider()
    handler = type("Handler", (_Handler,), {"provider": provider})
    provider.server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=provider.server.serve_forever, daemon=True).start()
    return provider
