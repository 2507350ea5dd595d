"""The AI gateway end to end with the Anthropic and Gemini adapters and the
Anthropic-compatible endpoint: the official ``openai`` SDK -> ferrogate -> the Anthropic and
Gemini test servers, and the official ``anthropic`` SDK -> ferrogate's ``/v1/messages`` -> an
OpenAI-format, an Anthropic and a Gemini test provider."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from ai_providers.anthropic import AnthropicServer
from ai_providers.gemini import GeminiServer, embedding
from ai_providers.openai import OpenAIProvider, start
from gateway import Gateway, GatewayFactory

KEY = "gw-key-claude-gemini-0123456789"
HI: Any = [{"role": "user", "content": "hello there"}]
SCHEMA: Any = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}]
ANT_TOOLS: Any = [{"name": "get_weather", "input_schema": SCHEMA}]


@pytest.fixture
def claude() -> Iterator[AnthropicServer]:
    with AnthropicServer(api_key="sk-ant-provider") as s:
        yield s


@pytest.fixture
def gemini() -> Iterator[GeminiServer]:
    with GeminiServer(api_key="goog-provider") as s:
        yield s


@pytest.fixture
def oai() -> Iterator[OpenAIProvider]:
    p = start()
    yield p
    p.close()


@pytest.fixture
def gw(
    gateway: GatewayFactory, claude: AnthropicServer, gemini: GeminiServer, oai: OpenAIProvider
) -> Gateway:
    deployments = [
        {
            "name": "claude",
            "provider": "anthropic",
            "url": claude.url,
            "model": "claude-test",
            "api_key": "sk-ant-provider",
            "options": {"max_tokens": 64},
        },
        {
            "name": "gem",
            "provider": "gemini",
            "url": gemini.url,
            "model": "gemini-test",
            "api_key": "goog-provider",
        },
        {
            "name": "gem-emb",
            "provider": "gemini",
            "url": gemini.url,
            "model": "embed-test",
            "api_key": "goog-provider",
        },
        {
            "name": "gpt",
            "provider": "openai",
            "url": oai.url,
            "model": "gpt-test",
            "api_key": "sk-test-provider",
        },
    ]
    models = {"claude": ["claude"], "gem": ["gem"], "emb": ["gem-emb"], "gpt": ["gpt"]}
    return gateway(
        {
            "consumers": {"team": {"credentials": [{"type": "key-auth", "key": KEY}]}},
            "ai": {"deployments": deployments, "models": models},
        },
        workers=1,
    )


def oai_client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=20)


def ant_client(gw: Gateway, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=20)


# -- openai SDK -> gateway -> Anthropic / Gemini -----------------------------------------------


@pytest.mark.parametrize("model", ["claude", "gem"])
def test_openai_sdk(gw: Gateway, claude: AnthropicServer, gemini: GeminiServer, model: str) -> None:
    check_openai_completion(gw, claude, gemini, model)
    check_openai_stream(gw, model)
    check_openai_tool_calls(gw, model)


def check_openai_completion(
    gw: Gateway, claude: AnthropicServer, gemini: GeminiServer, model: str
) -> None:
    answer = oai_client(gw).chat.completions.create(
        model=model, messages=[{"role": "system", "content": "be brief"}, *HI]
    )
    assert answer.choices[0].message.content == "echo: hello there"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    if model == "claude":
        seen = claude.last
        assert seen.path == "/v1/messages" and seen.headers["x-api-key"] == "sk-ant-provider"
        assert seen.json()["system"] == "be brief" and seen.json()["max_tokens"] == 64
        assert seen.json()["model"] == "claude-test"
    else:
        seen = gemini.last
        assert seen.path == "/v1beta/models/gemini-test:generateContent"
        assert seen.headers["x-goog-api-key"] == "goog-provider"
        assert seen.json()["systemInstruction"] == {"parts": [{"text": "be brief"}]}
    # the client's gateway key never reaches the provider
    assert KEY not in json.dumps(seen.headers) and "authorization" not in seen.headers


def check_openai_stream(gw: Gateway, model: str) -> None:
    stream = oai_client(gw).chat.completions.create(
        model=model, messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello there"
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    # without include_usage the client gets no usage chunk
    plain = list(oai_client(gw).chat.completions.create(model=model, messages=HI, stream=True))
    assert plain and all(c.choices for c in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == "echo: hello there"


def check_openai_tool_calls(gw: Gateway, model: str) -> None:
    ask: Any = [{"role": "user", "content": "use tool now"}]
    answer = oai_client(gw).chat.completions.create(model=model, messages=ask, tools=TOOLS)
    assert answer.choices[0].finish_reason == "tool_calls"
    calls: Any = answer.choices[0].message.tool_calls
    call = calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "x"}
    follow = oai_client(gw).chat.completions.create(
        model=model,
        tools=TOOLS,
        messages=[
            *ask,
            answer.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],
    )
    assert (follow.choices[0].message.content or "").startswith("tool said: ")


@pytest.mark.parametrize("model", ["claude", "gem"])
def test_openai_sdk_provider_errors(
    gw: Gateway, claude: AnthropicServer, gemini: GeminiServer, model: str
) -> None:
    server = claude if model == "claude" else gemini
    for status, error, client_status in (
        (429, openai.RateLimitError, 429),
        (529 if model == "claude" else 503, openai.InternalServerError, 503),
        (500, openai.InternalServerError, 500),
    ):
        server.fail(status)
        with pytest.raises(error) as e:
            oai_client(gw).chat.completions.create(model=model, messages=HI)
        assert e.value.status_code == client_status
        body = e.value.body
        assert isinstance(body, dict) and body["message"] == f"injected fault {status}"


def test_openai_sdk_stream_error_and_gemini_embeddings(
    gw: Gateway, claude: AnthropicServer, gemini: GeminiServer
) -> None:
    claude.fail(stream_error=True)
    stream = oai_client(gw).chat.completions.create(model="claude", messages=HI, stream=True)
    with pytest.raises(openai.APIError, match="Overloaded"):
        for _ in stream:
            pass
    out = oai_client(gw).embeddings.create(model="emb", input=["alpha", "beta"])
    assert [d.index for d in out.data] == [0, 1]
    assert out.data[1].embedding == pytest.approx(embedding("beta"))
    assert gemini.last.path == "/v1beta/models/embed-test:batchEmbedContents"


# -- anthropic SDK -> gateway /v1/messages -----------------------------------------------------


@pytest.mark.parametrize("model", ["gpt", "claude", "gem"])
def test_anthropic_sdk(gw: Gateway, oai: OpenAIProvider, model: str) -> None:
    check_anthropic_message(gw, oai, model)
    check_anthropic_stream(gw, model)
    if model != "gpt":
        check_anthropic_tool_round_trip(gw, model)


EXPECTED = {
    "gpt": "Hello from the test provider.",
    "claude": "echo: hello there",
    "gem": "echo: hello there",
}


def check_anthropic_message(gw: Gateway, oai: OpenAIProvider, model: str) -> None:
    msg = ant_client(gw).messages.create(
        model=model, max_tokens=100, system="be brief", messages=HI
    )
    assert msg.type == "message" and msg.role == "assistant" and msg.model == model
    assert msg.content[0].type == "text" and msg.content[0].text == EXPECTED[model]
    assert msg.stop_reason == "end_turn"
    assert msg.usage.output_tokens > 0 and msg.usage.input_tokens > 0
    if model == "gpt":
        sent = oai.requests[-1].body
        assert sent is not None and sent["model"] == "gpt-test"
        assert sent["messages"][0] == {"role": "system", "content": "be brief"}
        assert sent["max_tokens"] == 100


def check_anthropic_stream(gw: Gateway, model: str) -> None:
    with ant_client(gw).messages.stream(model=model, max_tokens=100, messages=HI) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == EXPECTED[model]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0
    assert final.usage.input_tokens > 0
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_start" in events and "message_delta" in events


def check_anthropic_tool_round_trip(gw: Gateway, model: str) -> None:
    ask: Any = [{"role": "user", "content": "use tool now"}]
    msg = ant_client(gw).messages.create(model=model, max_tokens=100, tools=ANT_TOOLS, messages=ask)
    assert msg.stop_reason == "tool_use"
    block = msg.content[0]
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "x"}
    result: Any = {"type": "tool_result", "tool_use_id": block.id, "content": "sunny"}
    follow = ant_client(gw).messages.create(
        model=model,
        max_tokens=100,
        tools=ANT_TOOLS,
        messages=[
            *ask,
            {"role": "assistant", "content": [block.model_dump()]},  # type: ignore[list-item]
            {"role": "user", "content": [result]},
        ],
    )
    assert follow.content[0].type == "text"
    assert follow.content[0].text.startswith("tool said: ")


def test_anthropic_sdk_errors(gw: Gateway, claude: AnthropicServer) -> None:
    with pytest.raises(anthropic.AuthenticationError) as auth:
        ant_client(gw, key="wrong").messages.create(model="gpt", max_tokens=5, messages=HI)
    assert auth.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        ant_client(gw).messages.create(model="nope", max_tokens=5, messages=HI)
    claude.fail(529)
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        ant_client(gw).messages.create(model="claude", max_tokens=5, messages=HI)
    assert overloaded.value.status_code == 529
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    claude.fail(429)
    with pytest.raises(anthropic.RateLimitError) as limited:
        ant_client(gw).messages.create(model="claude", max_tokens=5, messages=HI)
    assert limited.value.body["error"]["message"] == "injected fault 429"  # type: ignore[index]
