"""The Gemini adapter against the Gemini test server over HTTP: requests the server accepts as
the API would, answers (whole, streamed event by event and split at every byte, errors,
embeddings) translated to the canonical form."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ai_providers.drive import chat, content_of, deployment, send, splits, stream_bytes, translate
from ai_providers.gemini import GeminiServer, embedding, floats_of_base64
from ferrogate.ai.adapters.base import Deployment, Unsupported
from ferrogate.ai.adapters.gemini import ADAPTER

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
                "additionalProperties": False,
            },
        },
    }
]
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()


@pytest.fixture
def server() -> Iterator[GeminiServer]:
    with GeminiServer() as s:
        yield s


def dep(server: GeminiServer, **options: Any) -> Deployment:
    return deployment("gemini", server.url, "gemini-test", **options)


def test_text_request_translated(server: GeminiServer) -> None:
    req = {
        "model": "alias",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": [{"type": "text", "text": "again"}]},
        ],
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 50,
        "stop": "never",
        "seed": 7,
    }
    t = chat(ADAPTER, dep(server), server.url, req)
    assert server.last.path == "/v1beta/models/gemini-test:generateContent"
    assert server.last.headers["x-goog-api-key"] == "test-key"
    sent = server.last.json()
    assert sent["systemInstruction"] == {"parts": [{"text": "be brief"}]}
    assert sent["contents"] == [
        {"role": "user", "parts": [{"text": "hello there"}]},
        {"role": "model", "parts": [{"text": "hi"}]},
        {"role": "user", "parts": [{"text": "again"}]},
    ]
    assert sent["generationConfig"] == {
        "maxOutputTokens": 50,
        "temperature": 0.2,
        "topP": 0.9,
        "seed": 7,
        "stopSequences": ["never"],
    }
    assert t.status == 200 and t.body is not None and t.usage is not None
    assert t.body["object"] == "chat.completion" and t.body["model"] == "gemini-test"
    assert t.body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "echo: again"},
            "finish_reason": "stop",
        }
    ]
    assert t.body["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    assert (t.usage.prompt_tokens, t.usage.completion_tokens) == (9, 2)


def test_max_tokens_and_model_path(server: GeminiServer) -> None:
    d = deployment("gemini", server.url, "models/gemini-x", api_version="v1beta")
    req = {
        "model": "a",
        "messages": [{"role": "user", "content": "a b c d"}],
        "max_completion_tokens": 2,
    }
    t = chat(ADAPTER, d, server.url, req)
    assert server.last.path == "/v1beta/models/gemini-x:generateContent"
    assert t.body is not None and t.body["choices"][0]["finish_reason"] == "length"
    assert t.body["choices"][0]["message"]["content"] == "echo: a"


def test_images_translated(server: GeminiServer) -> None:
    req = {
        "model": "a",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what"},
                    {"type": "image_url", "image_url": {"url": PNG}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/c.webp"}},
                ],
            }
        ],
    }
    t = chat(ADAPTER, dep(server), server.url, req)
    parts = server.last.json()["contents"][0]["parts"]
    assert parts[1] == {"inlineData": {"mimeType": "image/png", "data": PNG.split(",", 1)[1]}}
    assert parts[2] == {
        "fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/c.webp"}
    }
    assert (
        t.body is not None and t.body["choices"][0]["message"]["content"] == "echo: what [2 image]"
    )


def test_tool_round_trip(server: GeminiServer) -> None:
    first: dict[str, Any] = {
        "model": "a",
        "messages": [{"role": "user", "content": "use tool for Paris"}],
        "tools": TOOLS,
        "tool_choice": "auto",
    }
    t = chat(ADAPTER, dep(server), server.url, first)
    sent = server.last.json()
    decl = sent["tools"][0]["functionDeclarations"][0]
    assert decl["name"] == "get_weather" and "additionalProperties" not in decl["parameters"]
    assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    assert t.status == 200 and t.body is not None
    choice = t.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["id"] == "call_0" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "x"}
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
    assert sent["contents"][1] == {
        "role": "model",
        "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "x"}}}],
    }
    assert sent["contents"][2] == {
        "role": "user",
        "parts": [{"functionResponse": {"name": "get_weather", "response": {"content": "sunny"}}}],
    }
    assert t.body is not None
    assert t.body["choices"][0]["message"]["content"] == 'tool said: {"content": "sunny"}'
    t = chat(
        ADAPTER,
        dep(server),
        server.url,
        {
            **first,
            "messages": [{"role": "user", "content": "hm"}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        },
    )
    assert server.last.json()["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }
    assert t.body is not None and t.body["choices"][0]["finish_reason"] == "tool_calls"


def test_response_format(server: GeminiServer) -> None:
    schema = {
        "type": "object",
        "properties": {"mood": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["mood"],
        "additionalProperties": False,
    }
    req = {
        "model": "a",
        "messages": [{"role": "user", "content": "rate it"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "r", "strict": True, "schema": schema},
        },
    }
    t = chat(ADAPTER, dep(server), server.url, req)
    gen = server.last.json()["generationConfig"]
    assert gen["responseMimeType"] == "application/json"
    assert gen["responseSchema"] == {k: v for k, v in schema.items() if k != "additionalProperties"}
    assert t.body is not None and json.loads(t.body["choices"][0]["message"]["content"]) == {
        "mood": "x",
        "n": 1,
    }
    t = chat(ADAPTER, dep(server), server.url, {**req, "response_format": {"type": "json_object"}})
    assert server.last.json()["generationConfig"] == {"responseMimeType": "application/json"}
    assert t.body is not None and json.loads(t.body["choices"][0]["message"]["content"]) == {
        "echo": "rate it"
    }


def test_errors_translated(server: GeminiServer) -> None:
    req = {"model": "a", "messages": [{"role": "user", "content": "x"}]}
    for status, kind, code in (
        (429, "rate_limit_error", "RESOURCE_EXHAUSTED"),
        (500, "api_error", "INTERNAL"),
        (503, "api_error", "UNAVAILABLE"),
    ):
        server.fail(status)
        t = chat(ADAPTER, dep(server), server.url, req)
        assert t.status == status and t.usage is None
        assert t.body == {
            "error": {
                "message": f"injected fault {status}",
                "type": kind,
                "param": None,
                "code": code,
            }
        }
    wrong = Deployment(
        name="g", provider="gemini", upstream="u", base_path="", model="m", api_key="bad"
    )
    t = chat(ADAPTER, wrong, server.url, req)
    assert t.status == 400 and t.body is not None
    assert t.body["error"]["message"].startswith("API key not valid")
    assert t.body["error"]["type"] == "invalid_request_error"
    assert t.body["error"]["code"] == "INVALID_ARGUMENT"
    t = ADAPTER.chat_response(dep(server), 502, b"upstream connect error", req)
    assert t.status == 502 and t.body is not None and "502" in t.body["error"]["message"]


def test_blocked_prompt_and_finish_reasons() -> None:
    d = deployment("gemini", "http://127.0.0.1:9", "m")
    blocked = json.dumps(
        {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 4}}
    )
    t = ADAPTER.chat_response(d, 200, blocked.encode(), {})
    assert t.body is not None and t.body["choices"][0]["finish_reason"] == "content_filter"
    assert t.usage is not None and t.usage.prompt_tokens == 4
    two = {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [{"text": "thinking", "thought": True}, {"text": "a"}],
                },
                "finishReason": "STOP",
                "index": 0,
            },
            {
                "content": {"role": "model", "parts": [{"text": "b"}]},
                "finishReason": "RECITATION",
                "index": 1,
            },
        ],
        "usageMetadata": {
            "promptTokenCount": 3,
            "candidatesTokenCount": 2,
            "thoughtsTokenCount": 5,
        },
    }
    t = ADAPTER.chat_response(d, 200, json.dumps(two).encode(), {})
    assert t.body is not None
    assert [(c["message"]["content"], c["finish_reason"]) for c in t.body["choices"]] == [
        ("a", "stop"),
        ("b", "content_filter"),
    ]
    assert t.body["usage"]["completion_tokens"] == 7


def test_stream_event_by_event(server: GeminiServer) -> None:
    req = {
        "model": "a",
        "messages": [{"role": "user", "content": "one two three"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    data = stream_bytes(ADAPTER, dep(server), server.url, req)
    assert server.last.path == "/v1beta/models/gemini-test:streamGenerateContent"
    assert server.last.query == {"alt": ["sse"]}
    events = [e + b"\r\n\r\n" for e in data.split(b"\r\n\r\n") if e]
    assert len(events) == 2
    chunks = translate(ADAPTER, dep(server), req, events)
    assert [c["choices"] for c in chunks] == [
        [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": "echo: one "},
                "finish_reason": None,
            }
        ],
        [{"index": 0, "delta": {"content": "two three"}, "finish_reason": None}],
        [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        [],
    ]
    assert all(
        c["object"] == "chat.completion.chunk" and c["model"] == "gemini-test" for c in chunks
    )
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
    for pieces in splits(data):
        assert translate(ADAPTER, dep(server), req, pieces) == chunks
    tr = ADAPTER.chat_stream(dep(server), {**req, "stream_options": None})
    out = tr.feed(data) + tr.close()
    assert out[-1]["choices"][0]["finish_reason"] == "stop"
    assert tr.usage is not None and (tr.usage.prompt_tokens, tr.usage.completion_tokens) == (4, 4)


def test_stream_tool_call(server: GeminiServer) -> None:
    req = {
        "model": "a",
        "messages": [{"role": "user", "content": "use tool"}],
        "tools": TOOLS,
        "stream": True,
    }
    data = stream_bytes(ADAPTER, dep(server), server.url, req)
    chunks = translate(ADAPTER, dep(server), req, [data])
    call = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
    assert call == {
        "id": "call_0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"x"}'},
        "index": 0,
    }
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    for pieces in splits(data)[::5]:
        assert translate(ADAPTER, dep(server), req, pieces) == chunks


def test_stream_error_event(server: GeminiServer) -> None:
    req = {"model": "a", "messages": [{"role": "user", "content": "one two three"}], "stream": True}
    server.fail(stream_error=True)
    chunks = translate(
        ADAPTER, dep(server), req, [stream_bytes(ADAPTER, dep(server), server.url, req)]
    )
    assert content_of(chunks[:-1]) == "echo: one "
    assert chunks[-1] == {
        "error": {
            "message": "The model is overloaded. Please try again later.",
            "type": "api_error",
            "param": None,
            "code": "UNAVAILABLE",
        }
    }


def test_embeddings(server: GeminiServer) -> None:
    d = deployment("gemini", server.url, "text-embedding-test")
    req: dict[str, Any] = {"model": "emb", "input": ["alpha", "beta"], "dimensions": 16}
    preq = ADAPTER.embeddings_request(d, req)
    resp = send(server.url, preq)
    assert server.last.path == "/v1beta/models/text-embedding-test:batchEmbedContents"
    assert server.last.json()["requests"][0] == {
        "model": "models/text-embedding-test",
        "content": {"parts": [{"text": "alpha"}]},
        "outputDimensionality": 16,
    }
    t = ADAPTER.embeddings_response(d, resp.status_code, resp.content, req)
    assert t.status == 200 and t.body is not None and t.usage is None
    assert t.body["object"] == "list" and t.body["model"] == "text-embedding-test"
    assert [e["index"] for e in t.body["data"]] == [0, 1]
    assert t.body["data"][1]["embedding"] == embedding("beta", 16)
    req = {"model": "emb", "input": "alpha", "encoding_format": "base64"}
    d = deployment("gemini", server.url, "text-embedding-test", task_type="RETRIEVAL_QUERY")
    resp = send(server.url, ADAPTER.embeddings_request(d, req))
    assert server.last.json()["requests"][0]["taskType"] == "RETRIEVAL_QUERY"
    t = ADAPTER.embeddings_response(d, resp.status_code, resp.content, req)
    assert t.body is not None
    vec = floats_of_base64(base64.b64decode(t.body["data"][0]["embedding"]))
    assert vec == pytest.approx(embedding("alpha"), abs=1e-6)
    with pytest.raises(Unsupported):
        ADAPTER.embeddings_request(d, {"model": "emb", "input": [[1, 2, 3]]})
    server.fail(429)
    resp = send(server.url, ADAPTER.embeddings_request(d, {"model": "emb", "input": "x"}))
    t = ADAPTER.embeddings_response(d, resp.status_code, resp.content, {})
    assert t.status == 429 and t.body is not None and t.body["error"]["type"] == "rate_limit_error"


def test_server_rejects_what_gemini_rejects(server: GeminiServer) -> None:
    """The test server is strict where Gemini is, so the adapter tests above mean something."""
    url = server.url + "/v1beta/models/m:generateContent"
    h = {"x-goog-api-key": "test-key"}
    for body, needle in (
        ({"contents": []}, "contents is not specified"),
        ({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}, "valid role"),
        (
            {
                "contents": [{"role": "user", "parts": [{"text": "x"}]}],
                "generationConfig": {
                    "responseMimeType": "application/json",
                    "responseSchema": {"type": "object", "additionalProperties": False},
                },
            },
            "additionalProperties",
        ),
    ):
        r = httpx.post(url, headers=h, json=body)
        assert r.status_code == 400 and needle in r.json()["error"]["message"]
        assert r.json()["error"]["status"] == "INVALID_ARGUMENT"
