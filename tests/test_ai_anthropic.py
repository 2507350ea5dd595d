"""The Anthropic adapter and test server: the server's wire format checked with the official
``anthropic`` SDK; the adapter's requests sent to it over HTTP and its answers (whole,
streamed event by event and split at every byte, errors) translated back."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from ai_providers.anthropic import AnthropicServer
from ai_providers.drive import chat, content_of, deployment, send, splits, stream_bytes, translate
from ferrogate.ai.adapters.anthropic import ADAPTER
from ferrogate.ai.adapters.base import Unsupported
from ferrogate.ai.adapters.sse import SseParser

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()


@pytest.fixture
def server() -> Iterator[AnthropicServer]:
    with AnthropicServer() as s:
        yield s


@pytest.fixture
def sdk(server: AnthropicServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="test-key", base_url=server.url, max_retries=0)


def dep(server: AnthropicServer, **options: Any) -> Any:
    return deployment("anthropic", server.url, "claude-test", **options)


# -- the test server, as the official SDK sees it ---------------------------------------------


def test_server_message_with_sdk(server: AnthropicServer, sdk: anthropic.Anthropic) -> None:
    msg = sdk.messages.create(
        model="claude-test",
        max_tokens=50,
        system="be brief",
        messages=[{"role": "user", "content": "hello there"}],
    )
    assert msg.content[0].type == "text" and msg.content[0].text == "echo: hello there"
    assert msg.stop_reason == "end_turn"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (5, 3)
    assert "test-key" in (
        server.last.headers.get("x-api-key"),
        server.last.headers.get("authorization", "")[7:],
    )
    assert server.last.headers["anthropic-version"]


def test_server_stream_with_sdk(server: AnthropicServer, sdk: anthropic.Anthropic) -> None:
    server.delay = 0.3
    started = time.monotonic()
    with sdk.messages.stream(
        model="claude-test", max_tokens=50, messages=[{"role": "user", "content": "one two"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "echo: one two"
    assert time.monotonic() - started >= 0.3
    assert final.content[0].text == "echo: one two"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 3


def test_server_streamed_tool_use_with_sdk(
    server: AnthropicServer, sdk: anthropic.Anthropic
) -> None:
    with sdk.messages.stream(
        model="claude-test",
        max_tokens=50,
        tools=[
            {
                "name": "lookup",
                "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
            }
        ],
        tool_choice={"type": "any"},
        messages=[{"role": "user", "content": "find it"}],
    ) as stream:
        final = stream.get_final_message()
    block = final.content[0]
    assert block.type == "tool_use" and block.name == "lookup" and block.input == {"q": "x"}
    assert final.stop_reason == "tool_use"


def test_server_errors_with_sdk(server: AnthropicServer, sdk: anthropic.Anthropic) -> None:
    simple = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    server.fail(429, retry_after="7")
    with pytest.raises(anthropic.RateLimitError) as rate:
        sdk.messages.create(**simple)  # type: ignore[call-overload]
    assert rate.value.response.headers["retry-after"] == "7"
    assert rate.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    server.fail(529)
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        sdk.messages.create(**simple)  # type: ignore[call-overload]
    assert overloaded.value.status_code == 529
    server.fail(500)
    with pytest.raises(anthropic.InternalServerError):
        sdk.messages.create(**simple)  # type: ignore[call-overload]
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        sdk.messages.create(model="m", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    bad = anthropic.Anthropic(api_key="wrong", base_url=server.url, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(**simple)  # type: ignore[call-overload]
    server.fail(stream_error=True)
    with (
        pytest.raises(anthropic.APIStatusError, match="Overloaded"),
        sdk.messages.stream(**simple) as stream,  # type: ignore[call-overload]
    ):
        "".join(stream.text_stream)


# -- the adapter against the server ------------------------------------------------------------


def test_text_request_translated(server: AnthropicServer) -> None:
    req = {
        "model": "alias",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": "be kind"},
            {"role": "user", "content": "first"},
            {"role": "user", "content": [{"type": "text", "text": "second"}]},
        ],
        "temperature": 1.6,
        "top_p": 0.5,
        "stop": "never",
        "user": "u-1",
    }
    t = chat(ADAPTER, dep(server, max_tokens=77), server.url, req)
    sent = server.last.json()
    assert sent["system"] == "be brief\n\nbe kind"
    assert sent["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}],
        }
    ]
    assert sent["max_tokens"] == 77 and sent["temperature"] == 1.0 and sent["top_p"] == 0.5
    assert sent["stop_sequences"] == ["never"] and sent["metadata"] == {"user_id": "u-1"}
    assert sent["model"] == "claude-test" and "stream" not in sent
    assert server.last.path == "/v1/messages"
    assert t.status == 200 and t.body is not None and t.usage is not None
    assert t.body["object"] == "chat.completion"
    assert t.body["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "echo: first second"},
        "finish_reason": "stop",
    }
    assert t.body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert (t.usage.prompt_tokens, t.usage.completion_tokens, t.usage.estimated) == (7, 3, False)


def test_max_tokens_default_and_finish_reasons(server: AnthropicServer) -> None:
    req: dict[str, Any] = {"model": "a", "messages": [{"role": "user", "content": "a b c d e"}]}
    chat(ADAPTER, dep(server), server.url, req)
    assert server.last.json()["max_tokens"] == 4096
    t = chat(ADAPTER, dep(server), server.url, {**req, "max_tokens": 2})
    assert t.body is not None and t.body["choices"][0]["finish_reason"] == "length"
    assert t.body["choices"][0]["message"]["content"] == "echo: a"
    t = chat(ADAPTER, dep(server), server.url, {**req, "max_completion_tokens": 30, "stop": ["d"]})
    assert server.last.json()["max_tokens"] == 30
    assert t.body is not None and t.body["choices"][0]["finish_reason"] == "stop"
    assert t.body["choices"][0]["message"]["content"] == "echo: a b c "


def test_images_translated(server: AnthropicServer) -> None:
    req = {
        "model": "a",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this"},
                    {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                ],
            }
        ],
    }
    t = chat(ADAPTER, dep(server), server.url, req)
    blocks = server.last.json()["messages"][0]["content"]
    assert blocks[1] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": PNG.split(",", 1)[1]},
    }
    assert blocks[2] == {
        "type": "image",
        "source": {"type": "url", "url": "https://example.com/cat.jpg"},
    }
    assert (
        t.body is not None
        and t.body["choices"][0]["message"]["content"] == "echo: what is this [2 image]"
    )


def test_tool_round_trip(server: AnthropicServer) -> None:
    first: dict[str, Any] = {
        "model": "a",
        "messages": [{"role": "user", "content": "use tool for Paris"}],
        "tools": TOOLS,
        "tool_choice": "auto",
        "parallel_tool_calls": False,
    }
    t = chat(ADAPTER, dep(server), server.url, first)
    sent = server.last.json()
    assert sent["tools"] == [
        {
            "name": "get_weather",
            "description": "The weather in a city",
            "input_schema": TOOLS[0]["function"]["parameters"],
        }
    ]
    assert sent["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert t.body is not None
    choice = t.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("toolu_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "x", "days": 1}
    second = {
        "model": "a",
        "tools": TOOLS,
        "messages": [
            *first["messages"],
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
        ],
    }
    t = chat(ADAPTER, dep(server), server.url, second)
    sent = server.last.json()
    assert sent["messages"][1]["content"] == [
        {
            "type": "tool_use",
            "id": call["id"],
            "name": "get_weather",
            "input": {"city": "x", "days": 1},
        }
    ]
    assert sent["messages"][2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "sunny"}],
    }
    assert t.body is not None and t.body["choices"][0]["message"]["content"] == "tool said: sunny"
    for choice_in, choice_out in (
        ("required", {"type": "any"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "tool", "name": "get_weather"},
        ),
    ):
        t = chat(
            ADAPTER,
            dep(server),
            server.url,
            {**first, "tool_choice": choice_in, "parallel_tool_calls": True},
        )
        assert server.last.json()["tool_choice"] == choice_out
        assert t.body is not None and t.body["choices"][0]["finish_reason"] == "tool_calls"


def test_response_format(server: AnthropicServer) -> None:
    schema = {
        "type": "object",
        "properties": {"mood": {"type": "string"}, "score": {"type": "number"}},
    }
    req = {
        "model": "a",
        "messages": [{"role": "user", "content": "rate it"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
    }
    t = chat(ADAPTER, dep(server), server.url, req)
    sent = server.last.json()
    assert sent["tool_choice"] == {"type": "tool", "name": "json_response"}
    assert sent["tools"][0]["input_schema"] == schema
    assert t.body is not None
    assert t.body["choices"][0]["finish_reason"] == "stop"
    assert "tool_calls" not in t.body["choices"][0]["message"]
    assert json.loads(t.body["choices"][0]["message"]["content"]) == {"mood": "x", "score": 1.5}
    chat(ADAPTER, dep(server), server.url, {**req, "response_format": {"type": "json_object"}})
    assert "JSON object" in server.last.json()["system"]


def test_unsupported_requests() -> None:
    d = deployment("anthropic", "http://127.0.0.1:9", "m")
    with pytest.raises(Unsupported):
        ADAPTER.chat_request(
            d, {"model": "a", "n": 2, "messages": [{"role": "user", "content": "x"}]}, False
        )
    with pytest.raises(Unsupported):
        ADAPTER.chat_request(
            d,
            {"model": "a", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            False,
        )
    with pytest.raises(Unsupported):
        ADAPTER.embeddings_request(d, {"model": "a", "input": "x"})


def test_errors_translated(server: AnthropicServer) -> None:
    req = {"model": "a", "messages": [{"role": "user", "content": "x"}]}
    for status, expected, kind in (
        (429, 429, "rate_limit_error"),
        (529, 503, "api_error"),
        (500, 500, "api_error"),
    ):
        server.fail(status)
        t = chat(ADAPTER, dep(server), server.url, req)
        assert t.status == expected and t.usage is None and t.body is not None
        err = t.body["error"]
        assert err["type"] == kind and err["message"] == f"injected fault {status}"
        assert (
            err["code"]
            == {429: "rate_limit_error", 529: "overloaded_error", 500: "api_error"}[status]
        )
    bad = deployment("anthropic", server.url, "m")
    bad = type(bad)(**{**{f: getattr(bad, f) for f in bad.__struct_fields__}, "api_key": "nope"})
    t = chat(ADAPTER, bad, server.url, req)
    assert t.status == 401 and t.body is not None
    assert t.body["error"] == {
        "message": "invalid x-api-key",
        "type": "authentication_error",
        "param": None,
        "code": "authentication_error",
    }
    t = ADAPTER.chat_response(dep(server), 502, b"<html>bad gateway</html>", req)
    assert t.status == 502 and t.body is not None and "502" in t.body["error"]["message"]


# -- streams -------------------------------------------------------------------------------------


def test_stream_event_by_event(server: AnthropicServer) -> None:
    req = {
        "model": "a",
        "messages": [{"role": "user", "content": "one two"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    data = stream_bytes(ADAPTER, dep(server), server.url, req)
    assert server.last.json()["stream"] is True
    events = [e + b"\n\n" for e in data.split(b"\n\n") if e]
    chunks = translate(ADAPTER, dep(server), req, events)
    msg_id = chunks[0]["id"]
    assert msg_id.startswith("msg_")
    assert [c["choices"] for c in chunks] == [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        [{"index": 0, "delta": {"content": "echo:"}, "finish_reason": None}],
        [{"index": 0, "delta": {"content": " one"}, "finish_reason": None}],
        [{"index": 0, "delta": {"content": " two"}, "finish_reason": None}],
        [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        [],
    ]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == msg_id for c in chunks)
    assert all(c["model"] == "claude-test" for c in chunks)
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    for pieces in splits(data):
        assert translate(ADAPTER, dep(server), req, pieces) == chunks
    # without include_usage no usage chunk, but the usage is still known
    tr = ADAPTER.chat_stream(dep(server), {**req, "stream_options": None})
    out = tr.feed(data) + tr.close()
    assert out[-1]["choices"][0]["finish_reason"] == "stop"
    assert tr.usage is not None and (tr.usage.prompt_tokens, tr.usage.completion_tokens) == (3, 3)


def test_stream_tool_calls_and_json(server: AnthropicServer) -> None:
    req = {
        "model": "a",
        "messages": [{"role": "user", "content": "use tool now"}],
        "tools": TOOLS,
        "stream": True,
    }
    data = stream_bytes(ADAPTER, dep(server), server.url, req)
    chunks = translate(ADAPTER, dep(server), req, [data])
    deltas = [c["choices"][0]["delta"] for c in chunks]
    start = deltas[1]["tool_calls"][0]
    assert start["index"] == 0 and start["id"].startswith("toolu_") and start["type"] == "function"
    assert start["function"] == {"name": "get_weather", "arguments": ""}
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[2:-1])
    assert all(d["tool_calls"][0]["index"] == 0 for d in deltas[2:-1])
    assert json.loads(args) == {"city": "x", "days": 1}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    for pieces in splits(data)[::7]:
        assert translate(ADAPTER, dep(server), req, pieces) == chunks
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    req = {
        "model": "a",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
    }
    chunks = translate(
        ADAPTER, dep(server), req, [stream_bytes(ADAPTER, dep(server), server.url, req)]
    )
    assert json.loads(content_of(chunks)) == {"ok": True}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any("tool_calls" in c["choices"][0]["delta"] for c in chunks)


def test_stream_errors(server: AnthropicServer) -> None:
    req = {"model": "a", "messages": [{"role": "user", "content": "one two three"}], "stream": True}
    server.fail(stream_error=True)
    data = stream_bytes(ADAPTER, dep(server), server.url, req)
    chunks = translate(ADAPTER, dep(server), req, [data])
    assert content_of(chunks[:-1]) == "echo:"
    assert chunks[-1] == {
        "error": {
            "message": "Overloaded",
            "type": "api_error",
            "param": None,
            "code": "overloaded_error",
        }
    }
    # a stream cut before message_stop ends with an error, not a silent success
    cut = data[: data.index(b"event: error")]
    chunks = translate(ADAPTER, dep(server), req, [cut])
    assert "error" in chunks[-1] and "message_stop" in chunks[-1]["error"]["message"]
    # an error status before the stream starts is a whole error answer
    server.fail(429)
    preq = ADAPTER.chat_request(dep(server), req, stream=True)
    resp = send(server.url, preq)
    t = ADAPTER.chat_response(dep(server), resp.status_code, resp.content, req)
    assert t.status == 429 and t.body is not None and t.body["error"]["type"] == "rate_limit_error"


def test_stream_usage_with_cache_tokens() -> None:
    d = deployment("anthropic", "http://127.0.0.1:9", "m")
    tr = ADAPTER.chat_stream(d, {"stream_options": {"include_usage": True}})
    events = [
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "model": "m",
                "usage": {
                    "input_tokens": 5,
                    "cache_read_input_tokens": 100,
                    "cache_creation_input_tokens": 20,
                    "output_tokens": 1,
                },
            },
        },
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "thinking", "thinking": ""},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "hm"},
        },
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens"},
            "usage": {"output_tokens": 9},
        },
        {"type": "message_stop"},
    ]
    data = b"".join(f"event: {e['type']}\r\ndata: {json.dumps(e)}\r\n\r\n".encode() for e in events)
    chunks = [c for p in splits(data)[-1] for c in tr.feed(p)] + tr.close()
    assert len(chunks) == 3  # role, finish, usage: thinking is not forwarded
    assert chunks[1]["choices"][0]["finish_reason"] == "length"
    assert chunks[2]["usage"] == {"prompt_tokens": 125, "completion_tokens": 9, "total_tokens": 134}


def test_sse_parser_line_ends_and_comments() -> None:
    data = b": ping\r\rdata: a\rdata: b\r\revent: x\ndata:c\n\nid: 3\r\n\r\ndata: tail"
    for pieces in splits(data):
        parser = SseParser()
        events = [e for p in pieces for e in parser.feed(p)] + parser.close()
        assert [(e.event, e.data) for e in events] == [("", "a\nb"), ("x", "c"), ("", "tail")]


def test_raw_http_answer_shape(server: AnthropicServer) -> None:
    """What the adapter reads is what the server sends (a raw look, no SDK in between)."""
    r = httpx.post(
        server.url + "/v1/messages",
        headers={"x-api-key": "test-key", "anthropic-version": "2023-06-01"},
        json={"model": "m", "max_tokens": 5, "messages": [{"role": "assistant", "content": "x"}]},
    )
    assert r.status_code == 400
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["request-id"].startswith("req_")
