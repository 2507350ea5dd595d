"""The AI gateway end to end: the official OpenAI SDK -> ferrogate (``ai:``) -> a test
provider speaking OpenAI's wire format on loopback."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from ai_providers.openai import OpenAIProvider, Step, start
from gateway import Gateway, GatewayFactory, run_cli

PROVIDER_KEY = "sk-test-provider"
KEY_A = "gw-key-team-a-0123456789"
KEY_B = "gw-key-team-b-0123456789"


@pytest.fixture
def provider() -> Iterator[OpenAIProvider]:
    p = start()
    yield p
    p.close()


def ai_config(provider: OpenAIProvider, **ai: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "deployments": [
            {
                "name": "main",
                "provider": "openai",
                "url": provider.url,
                "model": "gpt-test",
                "api_key": PROVIDER_KEY,
            }
        ],
        "models": {"fast": ["main"], "other": ["main"]},
    }
    section.update(ai)
    return {
        "consumers": {
            "team-a": {"credentials": [{"type": "key-auth", "key": KEY_A}]},
            "team-b": {"credentials": [{"type": "key-auth", "key": KEY_B}]},
        },
        "ai": section,
    }


def client(gw: Gateway, key: str = KEY_A, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=retries, timeout=20)


HI: Any = [{"role": "user", "content": "hi"}]


def test_completion_passes_through_with_the_deployment_model_and_key(
    gateway: GatewayFactory, provider: OpenAIProvider
) -> None:
    gw = gateway(
        ai_config(
            provider,
            usage={"log": "usage.jsonl", "metrics": False, "analytics": False},
            prices={"gpt-test": {"input": 2, "output": 10}},
        ),
        workers=1,
    )
    answer = client(gw).chat.completions.create(model="fast", messages=HI)
    assert answer.choices[0].message.content == "Hello from the test provider."
    assert answer.usage is not None and answer.usage.completion_tokens == 7
    log = gw.dir / "usage.jsonl"
    deadline = time.monotonic() + 10
    while not (log.exists() and log.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    [line] = log.read_text().splitlines()
    rec = json.loads(line)
    assert rec["consumer"] == "team-a" and rec["model"] == "fast"
    assert rec["deployment"] == "main" and rec["provider_model"] == "gpt-test"
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"]) == (8, 7, False)
    assert rec["cost_usd"] == pytest.approx((8 * 2 + 7 * 10) / 1e6)
    assert PROVIDER_KEY not in line and KEY_A not in line and '"content"' not in line
    [seen] = provider.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.body is not None and seen.body["model"] == "gpt-test"
    assert seen.body["messages"] == HI
    # The provider gets its own key, never the client's gateway key.
    assert seen.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert KEY_A not in json.dumps(seen.headers)
    assert seen.headers["host"] == f"127.0.0.1:{provider.port}"
    # Of the SDK's own headers only user-agent goes on; answers are asked for uncompressed
    # (the gateway reads them), whatever the client accepts.
    assert seen.headers["user-agent"].startswith("OpenAI/Python")
    assert "accept-encoding" not in seen.headers
    assert not [h for h in seen.headers if h.startswith("x-stainless")]


def test_streaming_event_by_event_and_usage_only_when_asked(
    gateway: GatewayFactory, provider: OpenAIProvider
) -> None:
    gw = gateway(ai_config(provider), workers=1)
    c = client(gw)
    chunks = list(c.chat.completions.create(model="fast", messages=HI, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "Hello from the test provider."
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The gateway asked for usage upstream and removed that chunk again.
    assert all(ch.choices for ch in chunks)
    assert provider.requests[-1].body["stream_options"] == {"include_usage": True}
    with_usage = list(
        c.chat.completions.create(
            model="fast",
            messages=HI,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert with_usage[-1].choices == [] and with_usage[-1].usage is not None
    assert with_usage[-1].usage.completion_tokens == 5
    # Raw: the SSE framing ends with [DONE].
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {KEY_A}"},
        json={"model": "fast", "messages": HI, "stream": True},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes())
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b'"usage":{' not in raw.replace(b" ", b"")


def test_tools_response_format_and_vision_parts_pass_through(
    gateway: GatewayFactory, provider: OpenAIProvider
) -> None:
    gw = gateway(ai_config(provider), workers=1)
    c = client(gw)
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    answer = c.chat.completions.create(
        model="fast",
        messages=HI,
        tools=tools,
        tool_choice="required",
    )
    call = answer.choices[0].message.tool_calls[0]
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert provider.requests[-1].body["tools"] == tools
    answer = c.chat.completions.create(
        model="fast",
        messages=HI,
        response_format={"type": "json_object"},
    )
    assert json.loads(answer.choices[0].message.content or "") == {"answer": 42}
    assert provider.requests[-1].body["response_format"] == {"type": "json_object"}
    parts: Any = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]
    c.chat.completions.create(model="fast", messages=[{"role": "user", "content": parts}])
    assert provider.requests[-1].body["messages"][0]["content"] == parts


def test_embeddings_and_models_list(gateway: GatewayFactory, provider: OpenAIProvider) -> None:
    gw = gateway(
        ai_config(provider, consumers={"team-b": {"models": ["other"]}}),
        workers=1,
    )
    emb = client(gw).embeddings.create(model="fast", input=["a", "b"])
    assert [d.index for d in emb.data] == [0, 1]
    assert emb.data[0].embedding == [0.1, 0.2, -0.3]
    assert provider.requests[-1].path == "/v1/embeddings"
    assert provider.requests[-1].body["model"] == "gpt-test"
    assert sorted(m.id for m in client(gw).models.list()) == ["fast", "other"]
    assert [m.id for m in client(gw, KEY_B).models.list()] == ["other"]


def test_gateway_key_and_model_allow_list(
    gateway: GatewayFactory, provider: OpenAIProvider
) -> None:
    gw = gateway(ai_config(provider, consumers={"team-b": {"models": ["other"]}}), workers=1)
    with pytest.raises(openai.AuthenticationError) as e:
        client(gw, "not-a-key").chat.completions.create(model="fast", messages=HI)
    assert e.value.code == "invalid_api_key"
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "fast", "messages": HI})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    # The Anthropic SDK's header works too.
    r = httpx.get(gw.url + "/v1/models", headers={"x-api-key": KEY_A})
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError) as nf:
        client(gw).chat.completions.create(model="nope", messages=HI)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.PermissionDeniedError) as pd:
        client(gw, KEY_B).chat.completions.create(model="fast", messages=HI)
    assert pd.value.code == "model_not_allowed"
    client(gw, KEY_B).chat.completions.create(model="other", messages=HI)
    assert len(provider.requests) == 1


def test_rpm_and_tpm_limits(gateway: GatewayFactory, provider: OpenAIProvider) -> None:
    long: Any = [{"role": "user", "content": "word " * 200}]
    gw = gateway(
        ai_config(
            provider,
            consumers={
                "team-a": {"rpm": 2},
                "team-b": {"tpm": 500, "model_limits": {"other": {"rpm": 1}}},
            },
        ),
        workers=1,
    )
    a = client(gw)
    a.chat.completions.create(model="fast", messages=HI)
    a.chat.completions.create(model="fast", messages=HI)
    with pytest.raises(openai.RateLimitError) as e:
        a.chat.completions.create(model="fast", messages=HI)
    assert e.value.code == "rate_limit_exceeded"
    assert "requests per minute" in e.value.message
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
    b = client(gw, KEY_B)
    b.chat.completions.create(model="fast", messages=long)
    # ~250 tokens were charged from 500 a minute, then reconciled with the real count.
    with pytest.raises(openai.RateLimitError) as t:
        for _ in range(3):
            b.chat.completions.create(model="fast", messages=long)
    assert "tokens per minute" in t.value.message
    b.chat.completions.create(model="other", messages=HI)
    with pytest.raises(openai.RateLimitError):
        b.chat.completions.create(model="other", messages=HI)


def budget_config(provider: OpenAIProvider) -> dict[str, Any]:
    # 100 USD per 1M tokens = 100 micro-dollars a token. An answer costs (8 + 7) tokens =
    # 1500 micro-dollars; the budget of 0.01 USD pays for six of them.
    return ai_config(
        provider,
        prices={"gpt-test": {"input": 100, "output": 100}},
        consumers={"team-a": {"budget": {"day": 0.01, "month": 1}}},
    )


def test_budget_is_spent_then_429(gateway: GatewayFactory, provider: OpenAIProvider) -> None:
    gw = gateway(budget_config(provider), workers=1)
    c = client(gw)
    ok = 0
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(10):
            c.chat.completions.create(model="fast", messages=HI, max_tokens=10)
            ok += 1
    assert e.value.code == "budget_exceeded"
    assert int(e.value.response.headers["retry-after"]) > 0
    # The reservation is (prompt estimate + 10) * 100; the settled cost is 1500 each.
    assert 5 <= ok <= 6, ok


def test_budget_under_a_burst_is_never_overspent(
    gateway: GatewayFactory, provider: OpenAIProvider
) -> None:
    # Two workers: the reservations of both count in the node's one table.
    gw = gateway(budget_config(provider), workers=2)
    provider.default = Step(delay=0.3)

    def one(_: int) -> int:
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {KEY_A}"},
            json={"model": "fast", "messages": HI, "max_tokens": 10},
            timeout=30,
        )
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "budget_exceeded"
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(one, range(20)))
    assert set(statuses) == {200, 429}, statuses
    # Never more answers than the budget pays for, all at once or not.
    assert statuses.count(200) * 1500 <= 10000
    assert len(provider.requests) == statuses.count(200)


def test_cache_answers_deterministic_requests(
    gateway: GatewayFactory, provider: OpenAIProvider
) -> None:
    gw = gateway(ai_config(provider, cache={"ttl": "60s"}), workers=1)
    c = client(gw)
    first = c.chat.completions.with_raw_response.create(
        model="fast",
        messages=HI,
        temperature=0,
    )
    second = c.chat.completions.with_raw_response.create(
        model="fast",
        messages=HI,
        temperature=0,
    )
    assert second.headers.get("x-cache") == "HIT"
    assert first.parse().choices[0].message.content == second.parse().choices[0].message.content
    assert len(provider.requests) == 1
    c.chat.completions.create(model="fast", messages=HI, temperature=0.7)
    c.chat.completions.create(model="fast", messages=HI, temperature=0.7)
    c.chat.completions.create(model="fast", messages=HI, seed=7)
    assert len(provider.requests) == 4


def test_sdk_retries_a_429(gateway: GatewayFactory, provider: OpenAIProvider) -> None:
    gw = gateway(ai_config(provider), workers=1)
    provider.script = [Step(status=429, retry_after="0")]
    answer = client(gw, retries=2).chat.completions.create(model="fast", messages=HI)
    assert answer.choices[0].message.content == "Hello from the test provider."
    assert len(provider.requests) == 2
    provider.script = [Step(status=500)] * 3
    with pytest.raises(openai.InternalServerError) as e:
        client(gw).chat.completions.create(model="fast", messages=HI)
    assert e.value.body is not None and "server had an error" in str(e.value.body)


def test_provider_credentials_never_leak(
    gateway: GatewayFactory, provider: OpenAIProvider, tmp_path: Any
) -> None:
    config = ai_config(provider)
    config["ai"]["deployments"][0]["api_key"] = "${AI_TEST_PROVIDER_KEY}"
    gw = gateway(config, workers=1, env={"AI_TEST_PROVIDER_KEY": PROVIDER_KEY})
    seen: list[str] = []
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {KEY_A}"},
        json={"model": "fast", "messages": HI},
    )
    seen.append(r.text + json.dumps(dict(r.headers)))
    provider.script = [Step(status=401), Step(status=500)]
    for _ in range(2):
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {KEY_A}"},
            json={"model": "fast", "messages": HI, "stream": True},
        )
        seen.append(r.text + json.dumps(dict(r.headers)))
    assert all(PROVIDER_KEY not in s for s in seen)
    assert "Incorrect API key provided: ***" in seen[1]
    assert provider.requests[0].headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    routes = run_cli(
        "routes", "--config", str(gw.config_path), env={"AI_TEST_PROVIDER_KEY": PROVIDER_KEY}
    )
    assert routes.returncode == 0, routes.stderr
    assert "/v1/chat/completions" in routes.stdout
    assert PROVIDER_KEY not in routes.stdout + routes.stderr
    gw.stop()
    assert PROVIDER_KEY not in gw.stderr_text() + gw.stdout_text()


def test_config_problems_name_the_line(tmp_path: Any) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        "listen: ['127.0.0.1:0']\n"
        "ai:\n"
        "  deployments:\n"
        "    - {name: a, provider: openai, url: 'http://127.0.0.1:9', model: m}\n"
        "  models:\n"
        "    fast: [a, b]\n"
        "  consumers:\n"
        "    nobody: {models: [slow]}\n"
        "  guardrails:\n"
        "    deny: [{regex: ['(unclosed']}]\n"
    )
    out = run_cli("check", str(path))
    assert out.returncode != 0
    assert f"{path}:6:15: ai.models.fast[1]: unknown deployment 'b'" in out.stdout
    assert f"{path}:8:13: ai.consumers.nobody: unknown consumer 'nobody'" in out.stdout
    assert f"{path}:8:23: ai.consumers.nobody.models[0]: unknown model 'slow'" in out.stdout
    assert f"{path}:10:21: ai.guardrails.deny[0].regex[0]: not a valid regular" in out.stdout
    # Each problem once: the plugin is not also made from the broken settings.
    assert "cannot start" not in out.stdout


def test_anthropic_sdk_reaches_an_openai_deployment(
    gateway: GatewayFactory, provider: OpenAIProvider
) -> None:
    import anthropic

    gw = gateway(ai_config(provider), workers=1)
    c = anthropic.Anthropic(base_url=gw.url, api_key=KEY_A, max_retries=0, timeout=20)
    msg = c.messages.create(
        model="fast", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    )
    assert msg.content[0].text == "Hello from the test provider."
    assert msg.model == "fast" and msg.stop_reason == "end_turn"
    assert msg.usage.output_tokens == 7
    assert provider.requests[-1].body["model"] == "gpt-test"
    with c.messages.stream(
        model="fast", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello from the test provider."
    assert final.usage.output_tokens == 5
    with pytest.raises(anthropic.NotFoundError):
        c.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    provider.script = [Step(status=500)]
    with pytest.raises(anthropic.InternalServerError):
        c.messages.create(model="fast", max_tokens=5, messages=[{"role": "user", "content": "x"}])


def test_prompt_endpoint(gateway: GatewayFactory, provider: OpenAIProvider) -> None:
    prompt = {
        "path": "/ai/answer",
        "model": "fast",
        "template": "The answer to {{question}}?",
        "input": {
            "type": "object",
            "properties": {"question": {"type": "string"}},
            "required": ["question"],
        },
        "output": {
            "type": "object",
            "properties": {"answer": {"type": "integer"}},
            "required": ["answer"],
        },
    }
    gw = gateway(ai_config(provider, prompts={"answer": prompt}), workers=1)
    auth = {"authorization": f"Bearer {KEY_A}"}
    r = httpx.post(gw.url + "/ai/answer", headers=auth, json={"question": "everything"})
    assert r.status_code == 200, r.text
    assert r.json() == {"answer": 42}
    sent = provider.requests[-1].body
    assert sent is not None and sent["model"] == "gpt-test"
    assert sent["messages"][-1] == {"role": "user", "content": "The answer to everything?"}
    r = httpx.post(gw.url + "/ai/answer", headers=auth, json={"nothing": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input"
    assert len(provider.requests) == 1
    # A model answer the output schema refuses is the model's fault: 502.
    refused = {**prompt, "path": "/ai/refused", "output": {"type": "object", "required": ["x"]}}
    plain = {**prompt, "path": "/ai/plain", "output": None}
    gw2 = gateway(ai_config(provider, prompts={"refused": refused, "plain": plain}), workers=1)
    r = httpx.post(gw2.url + "/ai/refused", headers=auth, json={"question": "x"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "invalid_model_output"
    r = httpx.post(gw2.url + "/ai/plain", headers=auth, json={"question": "x"})
    assert r.status_code == 200 and r.json() == {"text": "Hello from the test provider."}


def test_guardrails_mask_pii_and_refuse_denied_prompts(
    gateway: GatewayFactory, provider: OpenAIProvider
) -> None:
    guardrails = {
        "pii": {"mask": ["email"], "responses": True},
        "deny": [
            {"words": ["forbidden plan"], "message": "not here"},
            {"words": ["secret sauce"], "prompts": False, "responses": True, "message": "no sauce"},
        ],
    }
    gw = gateway(ai_config(provider, guardrails=guardrails), workers=1)
    provider.answer = "Write to bob@example.com today."
    c = client(gw)
    answer = c.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "I am alice@example.org, hello"}]
    )
    assert provider.requests[-1].body["messages"][0]["content"] == "I am [EMAIL], hello"  # type: ignore[index]
    assert answer.choices[0].message.content == "Write to [EMAIL] today."
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "the Forbidden  Plan"}]
        )
    assert e.value.code == "content_blocked" and "not here" in e.value.message
    assert len(provider.requests) == 1
    # Streamed answers are masked too, across delta boundaries.
    provider.answer = "Mail bob@exa mple.com or carol@example.com now"
    stream = c.chat.completions.create(model="fast", messages=HI, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == "Mail bob@exa mple.com or [EMAIL] now"
    # A deny rule on answers refuses the answer.
    provider.answer = "the secret sauce is here"
    with pytest.raises(openai.BadRequestError) as blocked:
        c.chat.completions.create(model="fast", messages=HI)
    assert blocked.value.code == "content_blocked" and "no sauce" in blocked.value.message


def test_missing_usage_is_counted_and_marked_estimated(
    gateway: GatewayFactory, provider: OpenAIProvider
) -> None:
    config = ai_config(provider, usage={"log": "usage.jsonl", "metrics": False, "analytics": False})
    config["ai"]["deployments"][0]["provider"] = "openai-compatible"
    gw = gateway(config, workers=1)
    provider.default = Step(usage=False)
    c = client(gw)
    answer = c.chat.completions.create(model="fast", messages=HI)
    assert answer.usage is None
    text = "".join(
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(model="fast", messages=HI, stream=True)
        if ch.choices
    )
    assert text == "Hello from the test provider."
    log = gw.dir / "usage.jsonl"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        not log.exists() or len(log.read_text().splitlines()) < 2
    ):
        time.sleep(0.05)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["stream"] for r in records] == [False, True]
    for r in records:
        assert r["estimated"] is True
        # "Hello from the test provider." is 6 or 7 tokens in OpenAI's vocabularies.
        assert 5 <= r["completion_tokens"] <= 8, r
        assert 5 <= r["prompt_tokens"] <= 12, r


def test_stream_heartbeat_keeps_a_silent_stream_alive(
    gateway: GatewayFactory, provider: OpenAIProvider
) -> None:
    gw = gateway(ai_config(provider, stream_heartbeat="0.2s"), workers=1)
    provider.default = Step(pause=1.0)
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {KEY_A}"},
        json={"model": "fast", "messages": HI, "stream": True},
        timeout=20,
    ) as r:
        raw = b"".join(r.iter_bytes())
    assert b"\n\n: ping\n\n" in raw
    events = [e for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == "Hello from the test provider."
    assert raw.endswith(b"data: [DONE]\n\n")
