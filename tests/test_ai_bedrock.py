"""The AWS Bedrock adapter (Converse, SigV4, event streams) against a test server that checks
signatures with botocore and speaks the binary event stream; the server itself is checked with
the official AWS SDK (boto3) so its wire format is known right."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator

import boto3
import botocore.config
import botocore.exceptions
import msgspec
import pytest

from ai_providers.bedrock import (
    ACCESS_KEY,
    ANSWER,
    COHERE_EMBED,
    MODEL,
    REGION,
    SECRET_KEY,
    TITAN_EMBED,
    BedrockServer,
)
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
from ferrogate.ai.adapters import adapter_for
from ferrogate.ai.adapters.base import Deployment, Unsupported

BEDROCK = adapter_for("bedrock")
HELLO = {"model": "m", "messages": [{"role": "user", "content": "Hi there"}]}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture
def server() -> Iterator[BedrockServer]:
    with BedrockServer() as s:
        yield s


def dep(server: BedrockServer, **options: object) -> Deployment:
    opts = {"region": REGION, "access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY}
    return Deployment(
        name="br",
        provider="bedrock",
        upstream="ai:br",
        base_path="",
        url=server.url,
        model=MODEL,
        options={**opts, **options},
    )


def sdk(server: BedrockServer) -> object:
    return boto3.client(
        "bedrock-runtime",
        region_name=REGION,
        endpoint_url=server.url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )


def test_server_speaks_bedrock_to_boto3(server: BedrockServer) -> None:
    client = sdk(server)
    messages = [{"role": "user", "content": [{"text": "Hi there"}]}]
    out = client.converse(modelId=MODEL, messages=messages)  # type: ignore[attr-defined]
    assert out["output"]["message"]["content"] == [{"text": ANSWER}]
    assert out["usage"]["outputTokens"] == 3 and out["stopReason"] == "end_turn"
    # the model id's ':' is percent-encoded in the path, as the SDK sends it
    assert server.last.path == "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"

    stream = client.converse_stream(modelId=MODEL, messages=messages)  # type: ignore[attr-defined]
    events = list(stream["stream"])
    text = "".join(
        e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e
    )
    assert text == ANSWER
    assert events[-1]["metadata"]["usage"]["inputTokens"] == 3

    server.fail(stream_error=True)
    stream = client.converse_stream(modelId=MODEL, messages=messages)  # type: ignore[attr-defined]
    with pytest.raises(botocore.exceptions.EventStreamError, match="throttlingException"):
        list(stream["stream"])

    server.fail(429)
    with pytest.raises(botocore.exceptions.ClientError) as err:
        client.converse(modelId=MODEL, messages=messages)  # type: ignore[attr-defined]
    assert err.value.response["Error"]["Code"] == "ThrottlingException"

    server.secrets = {ACCESS_KEY: "another-secret"}
    with pytest.raises(botocore.exceptions.ClientError) as err:
        client.converse(modelId=MODEL, messages=messages)  # type: ignore[attr-defined]
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_signed_request_and_completion(server: BedrockServer) -> None:
    req = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "user", "content": "there"},
        ],
        "max_tokens": 100,
        "temperature": 0.2,
        "stop": "END",
    }
    out = chat(BEDROCK, dep(server, session_token="tok-1"), server.url, req)
    assert out.status == 200, out.body
    assert server.last.headers["x-amz-security-token"] == "tok-1"
    assert server.last.headers["authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/"
    )
    sent = server.last.json()
    assert sent["system"] == [{"text": "Be brief."}]
    # consecutive user messages merge: Converse wants the turns alternating
    assert sent["messages"] == [{"role": "user", "content": [{"text": "Hi"}, {"text": "there"}]}]
    assert sent["inferenceConfig"] == {
        "maxTokens": 100,
        "temperature": 0.2,
        "stopSequences": ["END"],
    }
    assert out.body is not None
    assert out.body["choices"][0]["message"]["content"] == ANSWER
    assert out.body["choices"][0]["finish_reason"] == "stop"
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens) == (
        4,
        3,
    )

    out = chat(BEDROCK, dep(server), server.url, {**HELLO, "max_tokens": 1})
    assert out.body is not None and out.body["choices"][0]["finish_reason"] == "length"


def test_wrong_secret_is_403(server: BedrockServer) -> None:
    out = chat(BEDROCK, dep(server, secret_access_key="not-the-secret"), server.url, HELLO)
    assert out.status == 403 and out.body is not None
    assert out.body["error"]["type"] == "permission_error"
    assert "signature we calculated does not match" in out.body["error"]["message"]
    # a body changed after signing is caught too
    preq = BEDROCK.chat_request(dep(server), HELLO, False)
    status, _, _ = send(server.url, preq._replace(body=preq.body.replace(b"Hi", b"Yo")))
    assert status == 403


def test_credentials_and_region_required() -> None:
    bare = Deployment(
        name="b",
        provider="bedrock",
        upstream="u",
        base_path="",
        model=MODEL,
        options={"region": "eu-west-1"},
    )
    with pytest.raises(Unsupported, match="credentials"):
        BEDROCK.chat_request(bare, HELLO, False)
    keyed = msgspec.structs.replace(bare, api_key="bedrock-api-key")
    preq = BEDROCK.chat_request(keyed, HELLO, False)
    assert ("authorization", "Bearer bedrock-api-key") in preq.headers


def test_tools_and_images(server: BedrockServer) -> None:
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
    req = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "weather?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                ],
            }
        ],
        "tools": TOOLS,
        "tool_choice": "required",
    }
    out = chat(BEDROCK, dep(server), server.url, req)
    sent = server.last.json()
    assert sent["messages"][0]["content"][1] == {
        "image": {"format": "png", "source": {"bytes": png}}
    }
    assert sent["toolConfig"]["toolChoice"] == {"any": {}}
    assert sent["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"]["json"]["type"] == "object"
    assert out.body is not None
    choice = out.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"x"}'}
    # the tool's answer goes back as a toolResult in a user turn
    follow = {
        "model": "m",
        "messages": [
            *req["messages"],
            choice["message"],
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
        ],
        "tools": TOOLS,
    }
    out = chat(BEDROCK, dep(server), server.url, follow)
    assert out.status == 200, out.body
    sent = server.last.json()["messages"]
    assert sent[1]["content"] == [
        {"toolUse": {"toolUseId": call["id"], "name": "get_weather", "input": {"city": "x"}}}
    ]
    assert sent[2]["content"] == [
        {"toolResult": {"toolUseId": call["id"], "content": [{"text": "sunny"}]}}
    ]


def test_errors_in_openai_shape(server: BedrockServer) -> None:
    server.fail(429)
    out = chat(BEDROCK, dep(server), server.url, HELLO)
    assert out.status == 429 and out.body is not None
    assert out.body["error"]["code"] == "ThrottlingException"
    assert out.body["error"]["type"] == "rate_limit_error"
    out = chat(
        BEDROCK, msgspec.structs.replace(dep(server), model="unknown.model"), server.url, HELLO
    )
    assert out.status == 400 and out.body is not None
    assert out.body["error"]["code"] == "ValidationException"
    assert out.body["error"]["message"] == "The provided model identifier is invalid."


def test_event_stream(server: BedrockServer) -> None:
    req = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
    data = stream_bytes(BEDROCK, dep(server), server.url, req)
    assert server.last.path.endswith("/converse-stream")
    chunks, usage = translate_stream(BEDROCK, dep(server), req, data)
    assert contents(chunks) == ANSWER
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert usage is not None and usage.prompt_tokens == 3
    whole = stable(chunks)
    for split in split_everywhere(BEDROCK, dep(server), req, data):
        assert stable(split) == whole


def test_event_stream_tool_use_and_exception(server: BedrockServer) -> None:
    req = {**HELLO, "tools": TOOLS, "tool_choice": "required", "stream": True}
    data = stream_bytes(BEDROCK, dep(server), server.url, req)
    chunks, _ = translate_stream(BEDROCK, dep(server), req, data, split=11)
    calls = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if c["choices"][0]["delta"].get("tool_calls")
    ]
    assert (
        calls[0]["id"] == "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q"
        and calls[0]["function"]["name"] == "get_weather"
    )
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "x"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    server.fail(stream_error=True)
    plain = {**HELLO, "stream": True}
    data = stream_bytes(BEDROCK, dep(server), server.url, plain)
    chunks, _ = translate_stream(BEDROCK, dep(server), plain, data, split=13)
    assert contents(chunks) == "Hello"
    assert chunks[-1]["error"]["code"] == "ThrottlingException"
    assert chunks[-1]["error"]["type"] == "rate_limit_error"

    # a corrupted stream (a flipped byte fails the CRC) is an error, not a crash
    broken = data[:20] + bytes([data[20] ^ 0xFF]) + data[21:]
    chunks, _ = translate_stream(BEDROCK, dep(server), plain, broken)
    assert chunks[-1]["error"]["message"] == "the provider sent a malformed event stream"


def test_embeddings_through_invoke_model(server: BedrockServer) -> None:
    titan = msgspec.structs.replace(dep(server), model=TITAN_EMBED)
    out = embeddings(BEDROCK, titan, server.url, {"model": "e", "input": "hello world"})
    assert server.last.path == "/model/amazon.titan-embed-text-v2%3A0/invoke"
    assert server.last.json() == {"inputText": "hello world"}
    assert out.status == 200 and out.body is not None
    assert out.body["data"] == [
        {"object": "embedding", "index": 0, "embedding": [0.375, -0.5, 0.0]}
    ]
    assert out.usage is not None and out.usage.prompt_tokens == 2
    with pytest.raises(Unsupported, match="one input"):
        BEDROCK.embeddings_request(titan, {"model": "e", "input": ["a", "b"]})

    co = msgspec.structs.replace(dep(server, input_type="search_query"), model=COHERE_EMBED)
    req = {"model": "e", "input": ["a", "b"], "encoding_format": "base64"}
    out = embeddings(BEDROCK, co, server.url, req)
    assert server.last.json()["input_type"] == "search_query"
    assert out.body is not None and len(out.body["data"]) == 2
    vec = struct.unpack("<3f", base64.b64decode(out.body["data"][1]["embedding"]))
    assert vec == (0.625, -0.5, 1.0)
    # the token count is only in a response header: the gateway counts it itself
    assert out.usage is None
