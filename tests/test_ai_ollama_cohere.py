"""The Ollama (native API, NDJSON streams) and Cohere (v2 API) adapters against test servers
speaking those wire formats (requests sent with a real HTTP client), and their stream
translations."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator

import msgspec
import pytest

from ai_providers.cohere import ANSWER as COHERE_ANSWER
from ai_providers.cohere import CohereServer
from ai_providers.exchange import (
    chat,
    contents,
    embeddings,
    split_everywhere,
    stable,
    stream_bytes,
    translate_stream,
)
from ai_providers.ollama import ANSWER as OLLAMA_ANSWER
from ai_providers.ollama import OllamaServer
from ferrogate.ai.adapters import adapter_for
from ferrogate.ai.adapters.base import Deployment, Unsupported

OLLAMA = adapter_for("ollama")
COHERE = adapter_for("cohere")
HELLO = {"model": "m", "messages": [{"role": "user", "content": "Hi there"}]}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
PIXEL = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()


@pytest.fixture
def ollama() -> Iterator[OllamaServer]:
    with OllamaServer() as s:
        yield s


@pytest.fixture
def cohere() -> Iterator[CohereServer]:
    with CohereServer(api_key="co-key") as s:
        yield s


def dep(provider: str, model: str, **options: object) -> Deployment:
    return Deployment(
        name=provider,
        provider=provider,
        upstream=f"ai:{provider}",
        base_path="",
        model=model,
        api_key="co-key" if provider == "cohere" else None,
        options=dict(options),
    )


LLAMA = dep("ollama", "llama3.2", options={"num_ctx": 8192}, keep_alive="10m")
COMMAND = dep("cohere", "command-r-plus")


def test_ollama_request_options_images_and_format(ollama: OllamaServer) -> None:
    req = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}},
                ],
            },
        ],
        "temperature": 0,
        "max_tokens": 20,
        "stop": "END",
        "seed": 3,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "a",
                "schema": {"type": "object", "properties": {"n": {"type": "integer"}}},
            },
        },
    }
    out = chat(OLLAMA, LLAMA, ollama.url, req)
    sent = ollama.last.json()
    assert ollama.last.path == "/api/chat" and sent["stream"] is False
    assert sent["options"] == {
        "num_ctx": 8192,
        "temperature": 0,
        "num_predict": 20,
        "seed": 3,
        "stop": ["END"],
    }
    assert sent["keep_alive"] == "10m"
    assert sent["messages"][1] == {"role": "user", "content": "What is this?", "images": [PIXEL]}
    assert sent["format"] == {"type": "object", "properties": {"n": {"type": "integer"}}}
    assert out.status == 200 and out.body is not None
    assert json.loads(out.body["choices"][0]["message"]["content"]) == {"n": 1}
    assert out.body["object"] == "chat.completion" and out.body["model"] == "llama3.2"

    with pytest.raises(Unsupported):
        bad = {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}],
        }
        OLLAMA.chat_request(LLAMA, {"messages": [bad]}, False)


def test_ollama_usage_and_done_reason(ollama: OllamaServer) -> None:
    out = chat(OLLAMA, LLAMA, ollama.url, HELLO)
    assert out.body is not None and out.body["choices"][0]["message"]["content"] == OLLAMA_ANSWER
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens) == (
        2,
        3,
    )
    assert out.body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    out = chat(OLLAMA, LLAMA, ollama.url, {**HELLO, "max_completion_tokens": 1})
    assert out.body is not None and out.body["choices"][0]["finish_reason"] == "length"


def test_ollama_tools_round_trip(ollama: OllamaServer) -> None:
    req = {
        "model": "m",
        "messages": [{"role": "user", "content": "weather in Paris?"}],
        "tools": TOOLS,
    }
    out = chat(OLLAMA, LLAMA, ollama.url, req)
    assert out.body is not None
    choice = out.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"x"}'}
    # the answer to the call goes back with the tool's name and object arguments
    follow = {
        "model": "m",
        "messages": [
            *req["messages"],
            choice["message"],
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
        ],
        "tools": TOOLS,
    }
    out = chat(OLLAMA, LLAMA, ollama.url, follow)
    assert out.status == 200, out.body
    sent = ollama.last.json()["messages"]
    assert sent[1]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "x"}}}
    ]
    assert sent[2] == {"role": "tool", "content": "sunny", "tool_name": "get_weather"}


def test_ollama_errors(ollama: OllamaServer) -> None:
    out = chat(OLLAMA, dep("ollama", "missing-model"), ollama.url, HELLO)
    assert out.status == 404 and out.body is not None
    assert out.body["error"]["code"] == "model_not_found"
    assert out.body["error"]["message"] == 'model "missing-model" not found, try pulling it first'
    ollama.fail(503)
    out = chat(OLLAMA, LLAMA, ollama.url, HELLO)
    assert out.status == 503 and out.body is not None and out.body["error"]["type"] == "api_error"


def test_ollama_ndjson_stream(ollama: OllamaServer) -> None:
    req = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
    data = stream_bytes(OLLAMA, LLAMA, ollama.url, req)
    chunks, usage = translate_stream(OLLAMA, LLAMA, req, data)
    assert contents(chunks) == OLLAMA_ANSWER
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 5
    assert usage is not None and usage.completion_tokens == 3
    whole = stable(chunks)
    for split in split_everywhere(OLLAMA, LLAMA, req, data):
        assert stable(split) == whole

    # without include_usage no usage chunk, but the usage is known
    plain = {**HELLO, "stream": True}
    chunks, usage = translate_stream(OLLAMA, LLAMA, plain, data, split=7)
    assert all(c["choices"] for c in chunks) and usage is not None

    tool_req = {
        "model": "m",
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": TOOLS,
        "stream": True,
    }
    chunks, _ = translate_stream(
        OLLAMA, LLAMA, tool_req, stream_bytes(OLLAMA, LLAMA, ollama.url, tool_req)
    )
    calls = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if c["choices"][0]["delta"].get("tool_calls")
    ]
    assert calls[0]["index"] == 0 and calls[0]["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_ollama_stream_error_line(ollama: OllamaServer) -> None:
    ollama.fail(stream_error=True)
    req = {**HELLO, "stream": True}
    chunks, _ = translate_stream(
        OLLAMA, LLAMA, req, stream_bytes(OLLAMA, LLAMA, ollama.url, req), split=5
    )
    assert contents(chunks) == "Hello"
    assert chunks[-1]["error"]["message"] == "an error was encountered while running the model"


def test_ollama_embeddings(ollama: OllamaServer) -> None:
    emb = dep("ollama", "nomic-embed-text")
    out = embeddings(OLLAMA, emb, ollama.url, {"model": "e", "input": ["a", "b"]})
    assert ollama.last.path == "/api/embed"
    assert out.body is not None and out.usage is not None and out.usage.prompt_tokens == 4
    assert [d["embedding"] for d in out.body["data"]] == [[0.125, -0.5, 0.0], [0.125, -0.5, 1.0]]
    out = embeddings(
        OLLAMA, emb, ollama.url, {"model": "e", "input": "a", "encoding_format": "base64"}
    )
    assert out.body is not None
    assert struct.unpack("<3f", base64.b64decode(out.body["data"][0]["embedding"])) == (
        0.125,
        -0.5,
        0.0,
    )


def test_cohere_request_and_completion(cohere: CohereServer) -> None:
    req = {
        "model": "m",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
        ],
        "top_p": 0.5,
        "stop": ["END"],
        "max_completion_tokens": 30,
    }
    out = chat(COHERE, COMMAND, cohere.url, req)
    sent = cohere.last.json()
    assert cohere.last.path == "/v2/chat" and sent["stream"] is False
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert (sent["p"], sent["stop_sequences"], sent["max_tokens"]) == (0.5, ["END"], 30)
    assert out.status == 200 and out.body is not None
    assert out.body["choices"][0]["message"]["content"] == COHERE_ANSWER
    assert out.body["choices"][0]["finish_reason"] == "stop"
    # the billed units are the usage
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens) == (
        4,
        3,
    )


def test_cohere_tools(cohere: CohereServer) -> None:
    req = {
        "model": "m",
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": TOOLS,
        "tool_choice": "required",
    }
    out = chat(COHERE, COMMAND, cohere.url, req)
    assert cohere.last.json()["tool_choice"] == "REQUIRED"
    assert out.body is not None
    choice = out.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "x"}',
    }
    # a named tool: only that one is offered, and a call is required
    named = {**req, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    chat(COHERE, COMMAND, cohere.url, named)
    assert cohere.last.json()["tool_choice"] == "REQUIRED"
    auto = {**req, "tool_choice": "auto"}
    out = chat(COHERE, COMMAND, cohere.url, auto)
    assert "tool_choice" not in cohere.last.json()
    assert out.body is not None and out.body["choices"][0]["message"]["content"] == COHERE_ANSWER


def test_cohere_errors(cohere: CohereServer) -> None:
    cohere.fail(429)
    out = chat(COHERE, COMMAND, cohere.url, HELLO)
    assert out.status == 429 and out.body is not None
    assert (
        out.body["error"]["type"] == "rate_limit_error"
        and "Trial key" in out.body["error"]["message"]
    )
    # the fault was taken by one request: the next one is answered
    assert chat(COHERE, COMMAND, cohere.url, HELLO).status == 200
    bad = msgspec.structs.replace(COMMAND, api_key="nope")
    out = chat(COHERE, bad, cohere.url, HELLO)
    assert out.status == 401 and out.body is not None
    assert out.body["error"] == {
        "message": "invalid api token",
        "type": "authentication_error",
        "param": None,
        "code": None,
    }


def test_cohere_stream_events(cohere: CohereServer) -> None:
    req = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
    data = stream_bytes(COHERE, COMMAND, cohere.url, req)
    chunks, usage = translate_stream(COHERE, COMMAND, req, data)
    assert contents(chunks) == COHERE_ANSWER
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert usage is not None
    whole = stable(chunks)
    for split in split_everywhere(COHERE, COMMAND, req, data):
        assert stable(split) == whole


def test_cohere_stream_tool_calls_and_error(cohere: CohereServer) -> None:
    req = {
        "model": "m",
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": TOOLS,
        "tool_choice": "required",
        "stream": True,
    }
    chunks, _ = translate_stream(
        COHERE, COMMAND, req, stream_bytes(COHERE, COMMAND, cohere.url, req), split=3
    )
    deltas = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if c["choices"][0]["delta"].get("tool_calls")
    ]
    assert (
        deltas[0]["id"] == "get_weather_x1y2z3" and deltas[0]["function"]["name"] == "get_weather"
    )
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"city": "x"}'
    assert all(d["index"] == 0 for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    cohere.fail(stream_error=True)
    plain = {**HELLO, "stream": True}
    chunks, _ = translate_stream(
        COHERE, COMMAND, plain, stream_bytes(COHERE, COMMAND, cohere.url, plain)
    )
    assert chunks[-1]["error"]["message"] == "internal server error"


def test_cohere_embeddings(cohere: CohereServer) -> None:
    emb = dep("cohere", "embed-english-v3.0", input_type="search_query")
    out = embeddings(
        COHERE, emb, cohere.url, {"model": "e", "input": ["a", "b"], "encoding_format": "base64"}
    )
    sent = cohere.last.json()
    assert cohere.last.path == "/v2/embed"
    assert sent == {
        "model": "embed-english-v3.0",
        "texts": ["a", "b"],
        "input_type": "search_query",
        "embedding_types": ["float"],
    }
    assert out.body is not None and out.usage is not None and out.usage.prompt_tokens == 6
    assert struct.unpack("<3f", base64.b64decode(out.body["data"][1]["embedding"])) == (
        0.75,
        -0.5,
        1.0,
    )
