"""The AI gateway's deployment choice: fallbacks between deployments, cooldown after a 429,
weighted split within a tier (the OpenAI SDK -> ferrogate -> two test providers)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from ai_providers.openai import OpenAIProvider, Step, start
from gateway import Gateway, GatewayFactory

KEY = "gw-key-fallbacks-0123456789"
HI: Any = [{"role": "user", "content": "hi"}]


@pytest.fixture
def providers() -> Iterator[tuple[OpenAIProvider, OpenAIProvider]]:
    a, b = start(), start()
    b.answer = "Hello from b."
    yield a, b
    a.close()
    b.close()


def dep(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "provider": "openai",
        "url": url,
        "model": f"model-{name}",
        "api_key": "sk-test-provider",
        **extra,
    }


def config(deployments: list[dict[str, Any]], models: dict[str, Any]) -> dict[str, Any]:
    return {
        "consumers": {"c": {"credentials": [{"type": "key-auth", "key": KEY}]}},
        "ai": {"deployments": deployments, "models": models},
    }


def ask(gw: Gateway, stream: bool = False) -> str:
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=20)
    if stream:
        return "".join(
            ch.choices[0].delta.content or ""
            for ch in c.chat.completions.create(model="m", messages=HI, stream=True)
            if ch.choices
        )
    return c.chat.completions.create(model="m", messages=HI).choices[0].message.content or ""


@pytest.mark.parametrize("failure", [Step(status=429), Step(status=500), Step(status=503)])
def test_falls_back_to_the_next_tier(
    gateway: GatewayFactory, providers: tuple[OpenAIProvider, OpenAIProvider], failure: Step
) -> None:
    a, b = providers
    gw = gateway(config([dep("a", a.url), dep("b", b.url)], {"m": ["a", "b"]}), workers=1)
    a.script = [failure]
    assert ask(gw) == "Hello from b."
    assert [r.body["model"] for r in a.requests + b.requests] == ["model-a", "model-b"]
    assert b.requests[0].headers["authorization"] == "Bearer sk-test-provider"


def test_falls_back_on_refused_and_timeout(
    gateway: GatewayFactory, providers: tuple[OpenAIProvider, OpenAIProvider]
) -> None:
    a, b = providers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    gw = gateway(
        config(
            [dep("dead", dead), dep("slow", a.url, timeout="0.5s"), dep("b", b.url)],
            {"m": ["dead", "slow", "b"]},
        ),
        workers=1,
    )
    a.default = Step(delay=2)
    assert ask(gw, stream=True) == "Hello from b."
    assert len(a.requests) == 1 and len(b.requests) == 1


def test_cooldown_after_a_429(
    gateway: GatewayFactory, providers: tuple[OpenAIProvider, OpenAIProvider]
) -> None:
    a, b = providers
    gw = gateway(
        config([dep("a", a.url, cooldown="60s"), dep("b", b.url)], {"m": [["a", "b"]]}),
        workers=1,
    )
    a.default = Step(status=429)
    answers = [ask(gw) for _ in range(10)]
    assert set(answers) == {"Hello from b."}
    # a is tried at most once, then skipped while it cools down.
    assert len(a.requests) <= 1


def test_weighted_split_within_a_tier(
    gateway: GatewayFactory, providers: tuple[OpenAIProvider, OpenAIProvider]
) -> None:
    a, b = providers
    gw = gateway(
        config([dep("a", a.url, weight=3), dep("b", b.url, weight=1)], {"m": [["a", "b"]]}),
        workers=1,
    )
    for _ in range(80):
        ask(gw)
    assert len(a.requests) + len(b.requests) == 80
    assert 45 <= len(a.requests) <= 75, len(a.requests)
