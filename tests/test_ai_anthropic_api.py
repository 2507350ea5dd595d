"""The Anthropic-compatible endpoint's translation (ferrogate.ai.anthropic_api): Anthropic
requests to the canonical form, canonical answers and chunks to Anthropic messages and events,
checked field by field and, over HTTP, by the official ``anthropic`` SDK's parser."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anthropic
import pytest

from ai_providers.anthropic import AnthropicServer
from ai_providers.drive import deployment, send, splits
from ferrogate.ai import anthropic_api as api
from ferrogate.ai.adapters.base import Unsupported

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}


def test_request_to_canonical() -> None:
    body = {
        "model": "fast",
        "max_tokens": 100,
        "system": [{"type": "text", "text": "be brief"}, {"type": "text", "text": "be kind"}],
        "temperature": 0.3,
        "top_p": 0.8,
        "top_k": 5,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-7"},
        "tools": [{"name": "weather", "description": "w", "input_schema": SCHEMA}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stream": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/gif", "data": "R0lG"},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://e.x/a.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hm", "signature": "s"},
                    {"type": "text", "text": "calling"},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "weather",
                        "input": {"city": "Oslo"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "cold"}],
                    },
                    {"type": "text", "text": "and now?"},
                ],
            },
        ],
    }
    assert api.to_canonical(body) == {
        "model": "fast",
        "messages": [
            {"role": "system", "content": "be brief\n\nbe kind"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lG"}},
                    {"type": "image_url", "image_url": {"url": "https://e.x/a.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": "calling",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "cold"},
            {"role": "user", "content": "and now?"},
        ],
        "max_tokens": 100,
        "temperature": 0.3,
        "top_p": 0.8,
        "stop": ["END"],
        "tools": [
            {
                "type": "function",
                "function": {"name": "weather", "description": "w", "parameters": SCHEMA},
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "user": "u-7",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for choice, expected in (
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        (
            {"type": "tool", "name": "weather"},
            {"type": "function", "function": {"name": "weather"}},
        ),
    ):
        out = api.to_canonical({**body, "tool_choice": choice})
        assert out["tool_choice"] == expected and "parallel_tool_calls" not in out
    with pytest.raises(Unsupported):
        api.to_canonical({"model": "m", "messages": []})
    with pytest.raises(Unsupported):
        api.to_canonical(
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "document"}]}]}
        )


def test_completion_to_message() -> None:
    completion = {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "let me look",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16},
    }
    assert api.to_message(completion, "fast") == {
        "id": "msg_chatcmpl-9",
        "type": "message",
        "role": "assistant",
        "model": "fast",
        "content": [
            {"type": "text", "text": "let me look"},
            {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Oslo"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 4},
    }
    for finish, stop in (
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("content_filter", "refusal"),
    ):
        c = {"id": "x", "choices": [{"message": {"content": "a"}, "finish_reason": finish}]}
        assert api.to_message(c, "m")["stop_reason"] == stop


def test_errors_to_anthropic() -> None:
    for status, kind, out in (
        (400, "invalid_request_error", 400),
        (401, "authentication_error", 401),
        (403, "permission_error", 403),
        (404, "not_found_error", 404),
        (413, "request_too_large", 413),
        (429, "rate_limit_error", 429),
        (500, "api_error", 500),
        (502, "api_error", 502),
        (503, "overloaded_error", 529),
    ):
        body = {"error": {"message": "boom", "type": "x", "param": None, "code": None}}
        assert api.to_anthropic_error(status, body) == {
            "type": "error",
            "error": {"type": kind, "message": "boom"},
        }
        assert api.anthropic_status(status) == out


def _events(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in data.decode().split("\n\n"):
        if block:
            head, body = block.split("\n", 1)
            assert head.startswith("event: ") and body.startswith("data: ")
            out.append((head[7:], json.loads(body[6:])))
    return out


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "gpt",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


CHUNKS = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hel"}),
    chunk({"content": "lo"}),
    chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "weather", "arguments": ""},
                }
            ]
        }
    ),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}),
    chunk({}, "tool_calls"),
    {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14},
    },
]


def _encode_stream(chunks: list[dict[str, Any]], model: str = "fast") -> bytes:
    enc = api.MessageStream(model)
    return b"".join(enc.feed(c) for c in chunks) + enc.close()


def test_chunks_to_event_sequence() -> None:
    events = _events(_encode_stream(CHUNKS))
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["id"] == "msg_chatcmpl-1" and start["model"] == "fast" and start["content"] == []
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert events[2][1]["delta"] == {"type": "text_delta", "text": "Hel"}
    assert events[5][1] == {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "call_a", "name": "weather", "input": {}},
    }
    assert [e[1]["delta"]["partial_json"] for e in events[6:8]] == ['{"city":', '"Oslo"}']
    assert events[9][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"input_tokens": 9, "output_tokens": 5},
    }


def test_stream_error_event() -> None:
    err = {
        "error": {
            "message": "Overloaded",
            "type": "api_error",
            "param": None,
            "code": "overloaded_error",
        }
    }
    events = _events(_encode_stream([CHUNKS[0], CHUNKS[1], err]))
    assert [n for n, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "error",
    ]
    assert events[-1][1] == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    err = {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": None}
    }
    events = _events(_encode_stream([err]))
    assert [n for n, _ in events] == ["message_start", "error"]
    assert events[-1][1]["error"]["type"] == "rate_limit_error"
    # a Gemini error mid-stream (its gRPC status as code)
    err = {"error": {"message": "busy", "type": "api_error", "param": None, "code": "UNAVAILABLE"}}
    assert _events(_encode_stream([err]))[-1][1]["error"]["type"] == "overloaded_error"


class _Canned(BaseHTTPRequestHandler):
    """Serves canonical answers as the endpoint would: translated by anthropic_api."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        req = api.to_canonical(body)
        if req["messages"][-1]["content"] == "fail":
            self._send(529, api.to_anthropic_error(503, {"error": {"message": "busy"}}))
        elif req.get("stream"):
            data = _encode_stream(CHUNKS, body["model"])
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            completion = {
                "id": "chatcmpl-2",
                "choices": [
                    {
                        "message": {"content": "hi " + req["messages"][-1]["content"]},
                        "finish_reason": "length",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2},
            }
            self._send(200, api.to_message(completion, body["model"]))

    def _send(self, status: int, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def sdk() -> Iterator[anthropic.Anthropic]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield anthropic.Anthropic(
        api_key="k", base_url=f"http://127.0.0.1:{server.server_address[1]}", max_retries=0
    )
    server.shutdown()
    server.server_close()


def test_sdk_reads_translated_answers(sdk: anthropic.Anthropic) -> None:
    msg = sdk.messages.create(
        model="fast", max_tokens=2, messages=[{"role": "user", "content": "there"}]
    )
    assert msg.content[0].text == "hi there"  # type: ignore[union-attr]
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 2 and msg.model == "fast"
    with sdk.messages.stream(
        model="fast", max_tokens=9, messages=[{"role": "user", "content": "x"}]
    ) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "Hello"
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (9, 5)
    tool = final.content[1]
    assert tool.type == "tool_use" and tool.name == "weather" and tool.input == {"city": "Oslo"}
    with pytest.raises(anthropic.APIStatusError) as e:
        sdk.messages.create(
            model="fast", max_tokens=2, messages=[{"role": "user", "content": "fail"}]
        )
    assert e.value.status_code == 529 and e.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


def test_passthrough_to_anthropic() -> None:
    with AnthropicServer(api_key="sk-ant") as server:
        dep = deployment("anthropic", server.url, "claude-real")
        dep = type(dep)(
            **{**{f: getattr(dep, f) for f in dep.__struct_fields__}, "api_key": "sk-ant"}
        )
        assert api.is_passthrough(dep)
        assert not api.is_passthrough(deployment("gemini", server.url, "g"))
        body = {"model": "fast", "max_tokens": 20, "messages": [{"role": "user", "content": "a b"}]}
        preq = api.passthrough_request(
            dep,
            body,
            [
                ("Anthropic-Version", "2023-06-01"),
                ("anthropic-beta", "x-1"),
                ("x-api-key", "client-key"),
            ],
        )
        r = send(server.url, preq)
        assert r.status_code == 200 and r.json()["content"][0]["text"] == "echo: a b"
        seen = server.last
        assert seen.json()["model"] == "claude-real" and seen.headers["x-api-key"] == "sk-ant"
        assert seen.headers["anthropic-beta"] == "x-1"
        usage = api.passthrough_usage(r.content)
        assert (usage.prompt_tokens, usage.completion_tokens) == (3, 3)
        preq = api.passthrough_request(dep, {**body, "stream": True})
        data = send(server.url, preq).content
        for pieces in splits(data)[::11]:
            tracker = api.PassthroughUsage()
            for p in pieces:
                tracker.feed(p)
            assert tracker.usage is not None
            assert (tracker.usage.prompt_tokens, tracker.usage.completion_tokens) == (3, 3)
