"""Guardrails end to end: the OpenAI SDK -> ferrogate (``ai.guardrails``) -> a test provider
that records what it was sent."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from ai_providers.openai import OpenAIProvider, start
from gateway import Gateway, GatewayFactory

KEY = "gw-key-guardrails-0123456789"


@pytest.fixture
def provider() -> Iterator[OpenAIProvider]:
    p = start()
    yield p
    p.close()


def config(provider: OpenAIProvider, guardrails: dict[str, Any]) -> dict[str, Any]:
    return {
        "consumers": {"app": {"credentials": [{"type": "key-auth", "key": KEY}]}},
        "ai": {
            "deployments": [
                {
                    "name": "main",
                    "provider": "openai",
                    "url": provider.url,
                    "model": "gpt-test",
                    "api_key": "sk-test-provider",
                }
            ],
            "models": {"fast": ["main"]},
            "guardrails": guardrails,
        },
    }


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=20)


def test_pii_is_masked_before_the_provider_sees_it(
    gateway: GatewayFactory, provider: OpenAIProvider
) -> None:
    gw = gateway(config(provider, {"pii": {"mask": ["email", "phone", "card", "iban"]}}), workers=1)
    answer = client(gw).chat.completions.create(
        model="fast",
        messages=[
            {"role": "system", "content": "Reply to jane@example.org when done."},
            {
                "role": "user",
                "content": [
                    {
                        "type": "text",
                        "text": "Card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00, "
                        "call +49 151 12345678. Order 123456789012 of 2024.",
                    },
                    {"type": "image_url", "image_url": {"url": "https://img.test/a@b.io.png"}},
                ],
            },
        ],
    )
    assert answer.choices[0].message.content == "Hello from the test provider."
    [seen] = provider.requests
    assert seen.body is not None
    system, user = seen.body["messages"]
    assert system["content"] == "Reply to [EMAIL] when done."
    assert user["content"][0]["text"] == (
        "Card [CARD], IBAN [IBAN], call [PHONE]. Order 123456789012 of 2024."
    )
    # Not text: left as it was.
    assert user["content"][1]["image_url"]["url"] == "https://img.test/a@b.io.png"


def test_deny_list_refuses_the_prompt_and_the_provider_sees_nothing(
    gateway: GatewayFactory, provider: OpenAIProvider
) -> None:
    rules = {"deny": [{"words": ["project zeus"], "message": "internal code names"}]}
    gw = gateway(config(provider, rules), workers=1)
    c = client(gw)
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "Tell me about Project   ZEUS"}]
        )
    assert info.value.status_code == 400
    body: Any = info.value.body
    assert body["code"] == "content_blocked"
    assert "internal code names" in body["message"]
    assert provider.requests == []
    # A near miss is not a match.
    ok = c.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "Tell me about project zeusly"}]
    )
    assert ok.choices[0].message.content == "Hello from the test provider."
    assert len(provider.requests) == 1


SENTIMENT: dict[str, Any] = {
    "path": "/ai/sentiment",
    "model": "fast",
    "template": "Classify the sentiment of: {{text}}",
    "input": {
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 1}},
        "required": ["text"],
    },
    "output": {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["sentiment", "confidence"],
    },
    "temperature": 0,
}


def test_prompt_as_rest_endpoint_with_pii_masked(
    gateway: GatewayFactory, provider: OpenAIProvider
) -> None:
    cfg = config(provider, {"pii": {"mask": ["email"]}})
    cfg["ai"]["prompts"] = {"sentiment": SENTIMENT}
    gw = gateway(cfg, workers=1)
    provider.json_answer = '{"sentiment": "positive", "confidence": 0.93}'
    auth = {"authorization": f"Bearer {KEY}"}
    r = httpx.post(
        gw.url + "/ai/sentiment",
        json={"text": "Loved it! Write to me at fan@example.com"},
        headers=auth,
        timeout=20,
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"sentiment": "positive", "confidence": 0.93}
    [seen] = provider.requests
    assert seen.body is not None
    assert seen.body["model"] == "gpt-test"
    assert seen.body["temperature"] == 0
    assert seen.body["response_format"]["type"] == "json_schema"
    assert seen.body["messages"][-1] == {
        "role": "user",
        "content": "Classify the sentiment of: Loved it! Write to me at [EMAIL]",
    }
    # Input checked before anything is sent.
    r = httpx.post(gw.url + "/ai/sentiment", json={"text": ""}, headers=auth, timeout=20)
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_input", "/text")
    assert "non-empty" in error["message"]
    assert len(provider.requests) == 1
    # A model answer that does not follow the output schema is the model's fault: 502.
    provider.json_answer = '{"sentiment": "ecstatic", "confidence": 0.93}'
    r = httpx.post(gw.url + "/ai/sentiment", json={"text": "Wow"}, headers=auth, timeout=20)
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "invalid_model_output"
    assert "sentiment" in r.json()["error"]["message"]


def test_answers_are_masked_when_asked(gateway: GatewayFactory, provider: OpenAIProvider) -> None:
    gw = gateway(
        config(provider, {"pii": {"mask": ["email", "card"], "responses": True}}), workers=1
    )
    provider.answer = "Write to support@example.com, card 4111 1111 1111 1111 is on file."
    answer = client(gw).chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "who do I write to?"}]
    )
    assert answer.choices[0].message.content == "Write to [EMAIL], card [CARD] is on file."


def test_streamed_answers_are_masked_across_chunks(
    gateway: GatewayFactory, provider: OpenAIProvider
) -> None:
    gw = gateway(config(provider, {"pii": {"responses": True}}), workers=1)
    # The provider streams one word a chunk: the card arrives in four pieces.
    provider.answer = "Card 4111 1111 1111 1111 and mail support@example.com today."
    chunks = list(
        client(gw).chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    deltas = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert "".join(deltas) == "Card [CARD] and mail [EMAIL] today."
    assert len([d for d in deltas if d]) >= 4  # still streamed in pieces
    # Never a fragment of the number in any event.
    assert not any("1111" in d or "4111" in d for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_deny_rule_on_answers(gateway: GatewayFactory, provider: OpenAIProvider) -> None:
    rules = {"deny": [{"words": ["confidential"], "prompts": False, "responses": True}]}
    gw = gateway(config(provider, rules), workers=1)
    c = client(gw)
    # A prompt-only word is fine in a prompt when the rule is for answers.
    ok = c.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "is this confidential?"}]
    )
    assert ok.choices[0].message.content == "Hello from the test provider."
    provider.answer = "This is CONFIDENTIAL material."
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
    body: Any = info.value.body
    assert body["code"] == "content_blocked"
    assert "CONFIDENTIAL" not in str(body)
