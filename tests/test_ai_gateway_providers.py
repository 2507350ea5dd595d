"""The AI gateway end to end over the non-OpenAI providers: the official OpenAI SDK ->
ferrogate (``ai:``) -> test servers speaking Azure OpenAI's, Mistral's, Ollama's, Cohere's and
AWS Bedrock's wire formats on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from ai_providers import azure, bedrock, cohere, mistral, ollama
from ai_providers.loopback import ProviderServer
from gateway import GatewayFactory

KEY = "gw-key-team-a-0123456789"
HI: Any = [{"role": "user", "content": "Hi there"}]
TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def deployment(provider: str, server: ProviderServer) -> dict[str, Any]:
    dep: dict[str, Any] = {"name": provider, "provider": provider, "url": server.url}
    if provider == "azure":
        dep.update(
            model="gpt-4o-prod", api_key=server.api_key, options={"api_version": "2024-10-21"}
        )
    elif provider == "mistral":
        dep.update(model="mistral-small-latest", api_key=server.api_key)
    elif provider == "ollama":
        dep.update(model="llama3.2")
    elif provider == "cohere":
        dep.update(model="command-r-plus", api_key=server.api_key)
    else:
        dep.update(
            model=bedrock.MODEL,
            options={
                "region": bedrock.REGION,
                "access_key_id": bedrock.ACCESS_KEY,
                "secret_access_key": bedrock.SECRET_KEY,
            },
        )
    return dep


SERVERS = {
    "azure": (azure.AzureServer, azure.ANSWER),
    "mistral": (mistral.MistralServer, mistral.ANSWER),
    "ollama": (ollama.OllamaServer, ollama.ANSWER),
    "cohere": (cohere.CohereServer, cohere.ANSWER),
    "bedrock": (bedrock.BedrockServer, bedrock.ANSWER),
}


@pytest.fixture(params=sorted(SERVERS))
def provider(request: pytest.FixtureRequest) -> Iterator[tuple[str, ProviderServer, str]]:
    cls, answer = SERVERS[request.param]
    server = cls()
    yield request.param, server, answer
    server.close()


def sdk(gateway: GatewayFactory, name: str, server: ProviderServer) -> openai.OpenAI:
    config = {
        "consumers": {"team-a": {"credentials": [{"type": "key-auth", "key": KEY}]}},
        "ai": {"deployments": [deployment(name, server)], "models": {"fast": [name]}},
    }
    gw = gateway(config, workers=1)
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=20)


def test_completion_stream_and_errors(
    gateway: GatewayFactory, provider: tuple[str, ProviderServer, str]
) -> None:
    name, server, answer = provider
    client = sdk(gateway, name, server)

    out = client.chat.completions.create(model="fast", messages=HI)
    assert out.choices[0].message.content == answer
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None and out.usage.completion_tokens == 3 + (name == "azure")

    chunks = list(
        client.chat.completions.create(
            model="fast", messages=HI, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None

    tool = client.chat.completions.create(
        model="fast",
        messages=[{"role": "user", "content": "weather?"}],
        tools=TOOLS,
        tool_choice="required",
    )
    if name != "azure":  # the Azure test server does not call tools
        call = tool.choices[0].message.tool_calls
        assert call is not None and call[0].function.name == "get_weather"
        assert tool.choices[0].finish_reason == "tool_calls"

    server.fail(429)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="fast", messages=HI)
    assert err.value.status_code == 429
    assert isinstance(err.value.body, dict) and err.value.body["type"] == "rate_limit_error"

    server.fail(stream_error=True)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="fast", messages=HI, stream=True):
            pass


FIRST_VECTOR = {
    "azure": [0.5, -0.25, 0.0],
    "mistral": [0.25, -0.5, 0.0],
    "ollama": [0.125, -0.5, 0.0],
    "cohere": [0.75, -0.5, 0.0],
}


@pytest.mark.parametrize("name", sorted(FIRST_VECTOR))
def test_embeddings(gateway: GatewayFactory, name: str) -> None:
    cls, _ = SERVERS[name]
    with cls() as server:
        if name == "ollama":
            server_dep = deployment(name, server) | {"model": "nomic-embed-text"}
        else:
            server_dep = deployment(name, server)
        config = {
            "consumers": {"team-a": {"credentials": [{"type": "key-auth", "key": KEY}]}},
            "ai": {"deployments": [server_dep], "models": {"emb": [name]}},
        }
        gw = gateway(config, workers=1)
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=20)
        # the SDK asks for base64 vectors unless told otherwise: both must come back right
        out = client.embeddings.create(model="emb", input=["a", "b"])
        assert [round(x, 6) for x in out.data[0].embedding] == FIRST_VECTOR[name]
        assert len(out.data) == 2 and out.data[1].index == 1
        assert out.usage.prompt_tokens > 0
        floats = client.embeddings.create(model="emb", input="a", encoding_format="float")
        assert floats.data[0].embedding == FIRST_VECTOR[name]
