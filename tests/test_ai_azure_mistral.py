"""The Azure OpenAI and Mistral adapters against test servers speaking those providers' wire
formats (requests sent with a real HTTP client), and their stream translations."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator

import msgspec
import pytest

from ai_providers.azure import ANSWER as AZURE_ANSWER
from ai_providers.azure import AzureServer
from ai_providers.exchange import (
    chat,
    contents,
    embeddings,
    send,
    split_everywhere,
    stable,
    stream_bytes,
    translate_stream,
)
from ai_providers.mistral import ANSWER as MISTRAL_ANSWER
from ai_providers.mistral import MistralServer
from ferrogate.ai.adapters import adapter_for
from ferrogate.ai.adapters.base import Deployment

AZURE = adapter_for("azure")
MISTRAL = adapter_for("mistral")
HELLO = {"model": "smart", "messages": [{"role": "user", "content": "Hi there"}]}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture
def azure() -> Iterator[AzureServer]:
    with AzureServer(api_key="az-key", deployment="gpt-4o-prod") as s:
        yield s


@pytest.fixture
def mistral() -> Iterator[MistralServer]:
    with MistralServer(api_key="mi-key") as s:
        yield s


def azure_dep(**options: object) -> Deployment:
    return Deployment(
        name="az",
        provider="azure",
        upstream="ai:az",
        base_path="",
        model="gpt-4o-prod",
        api_key="az-key",
        options=dict(options),
    )


def mistral_dep(model: str = "mistral-small-latest") -> Deployment:
    return Deployment(
        name="mi",
        provider="mistral",
        upstream="ai:mi",
        base_path="",
        model=model,
        api_key="mi-key",
    )


def test_azure_request_path_version_and_key(azure: AzureServer) -> None:
    preq = AZURE.chat_request(azure_dep(api_version="2024-06-01"), HELLO, False)
    assert preq.path == "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-06-01"
    assert ("api-key", "az-key") in preq.headers
    assert not any(k == "authorization" for k, _ in preq.headers)
    # the deployment name defaults to the model; an option names another one
    named = azure_dep(deployment="other deployment")
    assert "/deployments/other%20deployment/" in AZURE.chat_request(named, HELLO, False).path


def test_azure_completion_passes_through_with_usage(azure: AzureServer) -> None:
    out = chat(AZURE, azure_dep(), azure.url, HELLO)
    assert out.status == 200 and out.body is None  # already canonical
    assert out.usage is not None and out.usage.completion_tokens == 4
    assert out.usage.prompt_tokens == 2
    assert azure.last.query["api-version"] == ["2024-10-21"]


def test_azure_errors_in_openai_shape(azure: AzureServer) -> None:
    azure.fail(429)
    out = chat(AZURE, azure_dep(), azure.url, HELLO)
    assert out.status == 429 and out.body is not None
    assert out.body["error"]["type"] == "rate_limit_error"
    assert out.body["error"]["code"] == "rate_limit_exceeded"
    assert "exceeded token rate limit" in out.body["error"]["message"]

    filtered = {"model": "x", "messages": [{"role": "user", "content": "[filtered] text"}]}
    out = chat(AZURE, azure_dep(), azure.url, filtered)
    assert out.status == 400 and out.body is not None
    err = out.body["error"]
    assert (err["code"], err["param"], err["type"]) == (
        "content_filter",
        "prompt",
        "invalid_request_error",
    )
    assert err["innererror"]["content_filter_result"]["violence"]["filtered"] is True

    out = chat(AZURE, azure_dep(deployment="missing"), azure.url, HELLO)
    assert out.status == 404 and out.body is not None
    assert out.body["error"]["code"] == "DeploymentNotFound"

    bad_key = msgspec.structs.replace(azure_dep(), api_key="wrong")
    out = chat(AZURE, bad_key, azure.url, HELLO)
    assert out.status == 401 and out.body is not None
    assert out.body["error"]["type"] == "authentication_error"
    assert out.body["error"]["code"] is None


def test_azure_stream_drops_annotations_and_keeps_usage(azure: AzureServer) -> None:
    req = {**HELLO, "stream": True}
    data = stream_bytes(AZURE, azure_dep(), azure.url, req)
    assert azure.last.json()["stream_options"] == {"include_usage": True}
    chunks, usage = translate_stream(AZURE, azure_dep(), req, data)
    assert contents(chunks) == AZURE_ANSWER + " "
    assert all(c["object"] == "chat.completion.chunk" and c["choices"] for c in chunks)
    assert not any("content_filter_results" in c["choices"][0] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (2, 4)

    # the client asked for the usage: OpenAI's last chunk without choices
    asked = {**req, "stream_options": {"include_usage": True}}
    chunks, _ = translate_stream(AZURE, azure_dep(), asked, data)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 6

    whole = stable(translate_stream(AZURE, azure_dep(), asked, data)[0])
    for split in split_everywhere(AZURE, azure_dep(), asked, data):
        assert stable(split) == whole


def test_azure_stream_error_event(azure: AzureServer) -> None:
    azure.fail(stream_error=True)
    req = {**HELLO, "stream": True}
    chunks, _ = translate_stream(
        AZURE, azure_dep(), req, stream_bytes(AZURE, azure_dep(), azure.url, req)
    )
    assert chunks[-1]["error"]["type"] == "api_error"
    assert chunks[-1]["error"]["message"] == "The server had an error."


def test_azure_embeddings(azure: AzureServer) -> None:
    req = {"model": "emb", "input": ["a", "b"]}
    out = embeddings(AZURE, azure_dep(), azure.url, req)
    assert out.status == 200 and out.body is None
    assert out.usage is not None and out.usage.prompt_tokens == 4
    assert azure.last.path == "/openai/deployments/gpt-4o-prod/embeddings"


def test_mistral_request_differences(mistral: MistralServer) -> None:
    req = {
        "model": "smart",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc123XYZ_long",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_abc123XYZ_long", "content": "sunny"},
        ],
        "tools": TOOLS,
        "tool_choice": "required",
        "seed": 7,
        "max_completion_tokens": 50,
        "stream_options": {"include_usage": True},
        "user": "u-1",
    }
    out = chat(MISTRAL, mistral_dep(), mistral.url, req)
    assert out.status == 200, out.body
    sent = mistral.last.json()
    assert sent["tool_choice"] == "any" and sent["random_seed"] == 7
    assert sent["max_tokens"] == 50 and sent["model"] == "mistral-small-latest"
    assert "user" not in sent and "stream_options" not in sent and "seed" not in sent
    assert sent["messages"][0]["role"] == "system"
    # a foreign tool call id is mapped the same way wherever it appears
    mapped = sent["messages"][2]["tool_calls"][0]["id"]
    assert len(mapped) == 9 and mapped.isalnum() and sent["messages"][3]["tool_call_id"] == mapped
    assert mistral.last.headers["authorization"] == "Bearer mi-key"
    assert out.body is not None
    choice = out.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_mistral_finish_reason_and_usage(mistral: MistralServer) -> None:
    out = chat(MISTRAL, mistral_dep(), mistral.url, {**HELLO, "max_tokens": 1})
    assert out.body is not None and out.body["choices"][0]["finish_reason"] == "length"
    out = chat(MISTRAL, mistral_dep(), mistral.url, HELLO)
    assert out.body is not None and out.body["choices"][0]["message"]["content"] == MISTRAL_ANSWER
    assert out.usage is not None and out.usage.completion_tokens == 3


def test_mistral_errors(mistral: MistralServer) -> None:
    mistral.fail(429)
    out = chat(MISTRAL, mistral_dep(), mistral.url, HELLO)
    assert out.status == 429 and out.body is not None
    assert out.body["error"]["message"] == "Requests rate limit exceeded"
    assert out.body["error"]["type"] == "rate_limit_error"
    # a 422 validation error becomes OpenAI's 400 with a readable message
    status, body, _ = send(
        mistral.url,
        MISTRAL.chat_request(mistral_dep(), HELLO, False)._replace(
            body=b'{"model":"m","messages":[],"bogus":1}'
        ),
    )
    out = MISTRAL.chat_response(mistral_dep(), status, body, HELLO)
    assert status == 422 and out.status == 400 and out.body is not None
    assert out.body["error"]["message"] == "body.bogus: Extra inputs are not permitted"
    mistral.fail(503)
    out = chat(MISTRAL, mistral_dep(), mistral.url, HELLO)
    assert out.status == 503 and out.body is not None
    assert out.body["error"] == {
        "message": "Service unavailable.",
        "type": "api_error",
        "param": None,
        "code": "1000",
    }


def test_mistral_stream_usage_in_last_chunk(mistral: MistralServer) -> None:
    req = {**HELLO, "stream": True}
    data = stream_bytes(MISTRAL, mistral_dep(), mistral.url, req)
    assert "stream_options" not in mistral.last.json()
    chunks, usage = translate_stream(MISTRAL, mistral_dep(), req, data)
    assert contents(chunks) == MISTRAL_ANSWER + " "
    assert not any("usage" in c for c in chunks)  # the client did not ask for it
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert usage is not None and usage.completion_tokens == 3

    asked = {**req, "stream_options": {"include_usage": True}}
    whole = stable(translate_stream(MISTRAL, mistral_dep(), asked, data)[0])
    assert whole[-1]["choices"] == [] and whole[-1]["usage"]["completion_tokens"] == 3
    for split in split_everywhere(MISTRAL, mistral_dep(), asked, data):
        assert stable(split) == whole


def test_mistral_stream_error(mistral: MistralServer) -> None:
    mistral.fail(stream_error=True)
    req = {**HELLO, "stream": True}
    data = stream_bytes(MISTRAL, mistral_dep(), mistral.url, req)
    chunks, _ = translate_stream(MISTRAL, mistral_dep(), req, data)
    assert chunks[-1] == {
        "error": {"message": "Internal error", "type": "api_error", "param": None, "code": None}
    }


def test_mistral_embeddings_float_and_base64(mistral: MistralServer) -> None:
    dep = mistral_dep("mistral-embed")
    out = embeddings(MISTRAL, dep, mistral.url, {"model": "e", "input": ["x", "y"]})
    assert out.status == 200 and out.body is None and out.usage is not None
    assert out.usage.prompt_tokens == 5
    out = embeddings(
        MISTRAL, dep, mistral.url, {"model": "e", "input": ["x", "y"], "encoding_format": "base64"}
    )
    assert "encoding_format" not in mistral.last.json()
    assert out.body is not None
    vec = struct.unpack("<3f", base64.b64decode(out.body["data"][1]["embedding"]))
    assert vec == (0.25, -0.5, 1.0)
