"""The AI gateway's pass-through in the data plane (``ai_fast.rs``, ``ai/fast.py``): plain
chat completions to one OpenAI-format deployment are served without a Python crossing, and
must do exactly what the plugin does. Each test compares the two paths through real
gateways in front of one test provider, or checks the books they keep."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ai_providers.openai import OpenAIProvider, Step, start
from gateway import Gateway, GatewayFactory, run_cli
from test_ai_gateway import HI, KEY_A, PROVIDER_KEY, ai_config, client

USAGE = {"log": "usage.jsonl", "metrics": False, "analytics": False}
PRICES = {"gpt-test": {"input": 2, "output": 10}}
# A deny-list that matches nothing: the route then needs the plugin for every request.
PLUGIN_PATH = {"deny": [{"words": ["zebra-banana-never"]}]}


@pytest.fixture
def provider() -> Iterator[OpenAIProvider]:
    p = start()
    yield p
    p.close()


def records(gw: Gateway, n: int) -> list[dict[str, Any]]:
    log = gw.dir / "usage.jsonl"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= n:
            break
        time.sleep(0.05)
    return [json.loads(line) for line in log.read_text().splitlines()]


def both_paths(
    gateway: GatewayFactory, provider: OpenAIProvider, **ai: Any
) -> tuple[Gateway, Gateway]:
    """Two gateways in front of ``provider``: the data plane's path, and the plugin's (the
    same config with a deny-list that matches nothing)."""
    fast = gateway(ai_config(provider, usage=USAGE, **ai), workers=1)
    slow = gateway(ai_config(provider, usage=USAGE, guardrails=PLUGIN_PATH, **ai), workers=1)
    return fast, slow


def plugin_calls(gw: Gateway, phase: str) -> int:
    out = run_cli("plugins", "--stats", "--json", "--pid-file", str(gw.pid_file))
    assert out.returncode == 0, out.stderr
    rows = {(r["plugin"], r["phase"]): r for r in json.loads(out.stdout)}
    return int(rows.get(("ai-gateway", phase), {}).get("calls", 0))


def test_plain_completions_never_cross_into_python(
    gateway: GatewayFactory, provider: OpenAIProvider
) -> None:
    gw = gateway(ai_config(provider, usage=USAGE, prices=PRICES), workers=1)
    c = client(gw)
    for _ in range(5):
        answer = c.chat.completions.create(model="fast", messages=HI, max_tokens=16)
        assert answer.choices[0].message.content == "Hello from the test provider."
    # A stream takes the plugin's path.
    list(c.chat.completions.create(model="fast", messages=HI, stream=True))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and plugin_calls(gw, "on_request") < 1:
        time.sleep(0.2)
    assert plugin_calls(gw, "on_request") == 1
    recs = records(gw, 6)
    assert [r["stream"] for r in recs] == [False] * 5 + [True]
    for r in recs[:5]:
        assert (r["consumer"], r["model"], r["deployment"], r["provider"]) == (
            "team-a",
            "fast",
            "main",
            "openai",
        )
        assert (r["prompt_tokens"], r["completion_tokens"], r["estimated"]) == (8, 7, False)
        assert r["cost_usd"] == pytest.approx((8 * 2 + 7 * 10) / 1e6)
        assert r["status"] == 200


def test_both_paths_send_the_provider_the_same_request_and_answer_alike(
    gateway: GatewayFactory, provider: OpenAIProvider
) -> None:
    fast, slow = both_paths(gateway, provider, prices=PRICES)
    body = {
        "model": "fast",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Grüße, wie geht's?", "name": "ada"},
        ],
        "max_tokens": 16,
        "temperature": 0.25,
        "stream": False,
        "user": "u-1",
    }
    headers = {
        "authorization": f"Bearer {KEY_A}",
        "user-agent": "probe/1.0",
        "x-client-only": "never upstream",
        "accept-encoding": "gzip",
    }
    answers = []
    for gw in (fast, slow):
        r = httpx.post(
            gw.url + "/v1/chat/completions?ignored=1", json=body, headers=headers, timeout=10
        )
        assert r.status_code == 200, r.text
        answers.append(r.json())
    assert answers[0] == answers[1]
    a, b = provider.requests[-2:]
    assert (a.method, a.path) == (b.method, b.path) == ("POST", "/v1/chat/completions")
    assert a.body == b.body
    assert a.body is not None and a.body["model"] == "gpt-test"
    varying = {"x-request-id", "content-length", "host", "x-forwarded-host", "x-forwarded-port"}
    assert {k: v for k, v in a.headers.items() if k not in varying} == {
        k: v for k, v in b.headers.items() if k not in varying
    }
    assert a.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert a.headers["user-agent"] == "probe/1.0"
    assert "x-client-only" not in a.headers and "accept-encoding" not in a.headers
    [fr], [sr] = records(fast, 1), records(slow, 1)
    same = ("consumer", "model", "deployment", "provider", "provider_model", "status")
    numbers = ("prompt_tokens", "completion_tokens", "estimated", "cost_usd", "stream")
    for k in same + numbers:
        assert fr[k] == sr[k], k


@pytest.mark.parametrize(
    "step",
    [Step(status=500), Step(status=429, retry_after="7"), Step(status=503)],
    ids=["500", "429", "503"],
)
def test_provider_errors_come_back_the_same_on_both_paths(
    gateway: GatewayFactory, provider: OpenAIProvider, step: Step
) -> None:
    fast, slow = both_paths(gateway, provider)
    got = []
    for gw in (fast, slow):
        provider.script.append(step)
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": "fast", "messages": HI},
            headers={"authorization": f"Bearer {KEY_A}"},
            timeout=10,
        )
        got.append((r.status_code, r.headers["content-type"], r.json()))
    assert got[0] == got[1]
    assert got[0][0] == step.status
    assert got[0][2]["error"]["message"]
    assert [r["status"] for r in records(fast, 1)] == [step.status]


def test_an_unreachable_provider_is_an_openai_error_on_both_paths(
    gateway: GatewayFactory, provider: OpenAIProvider
) -> None:
    port = provider.port
    provider.close()
    dead = OpenAIProvider(server=type("S", (), {"server_address": ("127.0.0.1", port)})())
    got = []
    for extra in ({}, {"guardrails": PLUGIN_PATH}):
        gw = gateway(ai_config(dead, usage=USAGE, **extra), workers=1)
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": "fast", "messages": HI},
            headers={"authorization": f"Bearer {KEY_A}"},
            timeout=10,
        )
        doc = r.json()
        doc["error"].pop("request_id", None)
        doc["error"]["message"] = doc["error"]["message"].split(":")[0]
        got.append((r.status_code, doc))
    assert got[0] == got[1]
    assert got[0][0] == 502 and got[0][1]["error"]["type"] is None


@pytest.mark.parametrize("path", ["data plane", "plugin"])
def test_the_books_settle_on_real_usage_and_a_client_that_left_costs_nothing(
    gateway: GatewayFactory, provider: OpenAIProvider, path: str
) -> None:
    # 1 USD per output token: a request with max_tokens 10 reserves 10 USD, and the
    # answer's 7 completion tokens cost 7. A day of 15 USD fits one reservation at a time.
    extra = {"guardrails": PLUGIN_PATH} if path == "plugin" else {}
    gw = gateway(
        ai_config(
            provider,
            usage=USAGE,
            prices={"gpt-test": {"input": 0, "output": 1_000_000}},
            consumers={"team-a": {"budget": {"day": 15}}},
            **extra,
        ),
        workers=1,
    )
    url = gw.url + "/v1/chat/completions"
    auth = {"authorization": f"Bearer {KEY_A}"}
    body = {"model": "fast", "messages": HI, "max_tokens": 10}
    # The client gives up while the provider thinks: its reservation is refunded.
    provider.script.append(Step(delay=1.5))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, headers=auth, timeout=0.4)
    time.sleep(1.5)
    r = httpx.post(url, json=body, headers=auth, timeout=10)
    assert r.status_code == 200, r.text
    # 7 spent: another 10 would not fit, and the plugin says why.
    r = httpx.post(url, json=body, headers=auth, timeout=10)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "budget_exceeded"
    # A smaller one still does: 7 + (max_tokens 8) = 15.
    r = httpx.post(url, json={**body, "max_tokens": 8}, headers=auth, timeout=10)
    assert r.status_code == 200, r.text
    recs = records(gw, 3)
    assert sorted(r["status"] for r in recs) == [200, 200, 499]
    assert sum(r["cost_usd"] for r in recs) == pytest.approx(14.0)


def test_answers_without_usage_are_counted_by_the_tokenizer(
    gateway: GatewayFactory, provider: OpenAIProvider
) -> None:
    fast, slow = both_paths(gateway, provider, prices=PRICES)
    for gw in (fast, slow):
        provider.script.append(Step(usage=False))
        answer = client(gw).chat.completions.create(model="fast", messages=HI)
        assert answer.usage is None
    [fr], [sr] = records(fast, 1), records(slow, 1)
    assert fr["estimated"] is True
    for k in ("prompt_tokens", "completion_tokens", "estimated", "cost_usd"):
        assert fr[k] == sr[k], k
    assert fr["completion_tokens"] > 0


def test_requests_the_table_does_not_cover_take_the_plugin(
    gateway: GatewayFactory, provider: OpenAIProvider, tmp_path: Path
) -> None:
    gw = gateway(
        ai_config(provider, usage=USAGE, consumers={"team-b": {"models": ["other"]}}),
        workers=1,
    )
    url = gw.url + "/v1/chat/completions"

    def post(key: str, body: Any) -> httpx.Response:
        return httpx.post(url, json=body, headers={"authorization": f"Bearer {key}"}, timeout=10)

    assert post("gw-key-unknown-000000", {"model": "fast", "messages": HI}).status_code == 401
    r = post("gw-key-team-b-0123456789", {"model": "fast", "messages": HI})
    assert (r.status_code, r.json()["error"]["code"]) == (403, "model_not_allowed")
    r = post(KEY_A, {"model": "nope", "messages": HI})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")
    r = httpx.post(url, content=b"{not json", headers={"authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 400
    assert post(KEY_A, {"model": "fast", "messages": HI}).status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and plugin_calls(gw, "on_request") < 4:
        time.sleep(0.2)
    assert plugin_calls(gw, "on_request") == 4
