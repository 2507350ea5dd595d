"""AI usage: offline token counts against OpenAI's published numbers, and usage records
from a plugin's on_log reaching the usage log, the master's /metrics and /api/analytics/ai
through real gateway processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ferrogate.ai import tokens
from ferrogate.ai.usage import UsageRecord, UsageRecorder, UsageSettings
from gateway import Gateway, GatewayFactory, free_port
from upstreams import UpstreamFactory

PLUGINS_DIR = str(Path(__file__).parent / "ai_usage_plugins")
TOKEN = "s3cret-token"

# OpenAI cookbook, "How to count tokens with tiktoken": the API's own prompt_tokens for these
# messages are 129 (gpt-4, gpt-3.5-turbo) and 124 (gpt-4o, gpt-4o-mini).
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]


# --- tokens ----------------------------------------------------------------------------------


def test_message_counts_match_what_the_openai_api_reported() -> None:
    assert tokens.count_messages(COOKBOOK_MESSAGES, "gpt-4o") == 124
    assert tokens.count_messages(COOKBOOK_MESSAGES, "gpt-4o-mini-2024-07-18") == 124
    assert tokens.count_messages(COOKBOOK_MESSAGES, "gpt-4-0613") == 129
    assert tokens.count_messages(COOKBOOK_MESSAGES, "gpt-3.5-turbo") == 129
    # No model (or another provider's): the newest vocabulary.
    assert tokens.count_messages(COOKBOOK_MESSAGES) == 124


def test_text_counts_match_the_published_encodings() -> None:
    # The cookbook's compare_encodings examples.
    assert tokens.count_text("antidisestablishmentarianism", "gpt-4") == 6
    assert tokens.count_text("2 + 2 = 4", "gpt-4") == 7
    assert tokens.count_text("2 + 2 = 4", "gpt-4o") == 7
    assert tokens.count_text("お誕生日おめでとう", "gpt-4") == 9
    assert tokens.count_text("お誕生日おめでとう", "gpt-4o") == 8
    assert tokens.count_text("", "gpt-4o") == 0
    # Special-token markers in user text are plain text, not a refusal to count.
    assert tokens.count_text("<|endoftext|>", "gpt-4o") > 1
    assert tokens.encoding_name("text-embedding-3-small") == "cl100k_base"
    assert tokens.encoding_name("openai/gpt-4o") == "o200k_base"
    assert tokens.encoding_name("claude-3-5-haiku") == "o200k_base"


def test_content_parts_images_and_tool_calls() -> None:
    text = "What is in this picture?"
    plain = [{"role": "user", "content": text}]
    parts = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    assert tokens.count_messages(parts, "gpt-4o") == tokens.count_messages(plain, "gpt-4o")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    low = {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}
    with_image = [{"role": "user", "content": [{"type": "text", "text": text}, image, low]}]
    assert (
        tokens.count_messages(with_image, "gpt-4o")
        == tokens.count_messages(plain, "gpt-4o") + tokens.IMAGE_TOKENS + tokens.IMAGE_TOKENS_LOW
    )
    args = '{"location": "Paris"}'
    call = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": args}}
            ],
        }
    ]
    expected = 3 + 3 + tokens.count_text("assistant") + tokens.count_text("weather")
    assert tokens.count_messages(call, "gpt-4o") == expected + tokens.count_text(args)


def test_the_estimate_is_cheap_and_close() -> None:
    prose = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()[:20000]
    real = tokens.count_text(prose, "gpt-4o")
    assert real * 0.9 <= tokens.estimate_text(prose) <= real * 1.2
    code = Path(json.__file__).read_text()
    real = tokens.count_text(code, "gpt-4o")
    assert real * 0.85 <= tokens.estimate_text(code) <= real * 1.2
    real_msgs = tokens.count_messages(COOKBOOK_MESSAGES, "gpt-4o")
    assert real_msgs <= tokens.estimate_messages(COOKBOOK_MESSAGES) <= real_msgs * 1.4
    cjk = "お誕生日おめでとう。今日はいい天気ですね。" * 20
    assert (
        tokens.count_text(cjk) * 0.95 <= tokens.estimate_text(cjk) <= tokens.count_text(cjk) * 1.3
    )
    assert tokens.estimate_text("") == 0
    # Far cheaper than the tokenizer on a long text.
    n = 50
    t0 = time.perf_counter()
    for _ in range(n):
        tokens.estimate_text(prose)
    estimate = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        tokens.count_text(prose)
    assert estimate * 10 < time.perf_counter() - t0


def test_counting_needs_no_network(tmp_path: Path) -> None:
    # A fresh process, no tiktoken cache, every connection refused: the vocabularies come
    # from the installed wheel.
    script = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('no network')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "from ferrogate.ai import tokens\n"
        "print(tokens.count_text('tiktoken is great!', 'gpt-4'),"
        " tokens.count_text('2 + 2 = 4', 'gpt-4o'))\n"
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["6", "7"]
    assert not (tmp_path / "cache").exists()


# --- recorder outside a worker -------------------------------------------------------------


def test_recorder_writes_log_lines_without_prompt_or_keys(tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    recorder = UsageRecorder(UsageSettings(log=str(log)))
    rec = UsageRecord(
        time=1700000000.5,
        request_id="r1",
        route="ai-chat",
        consumer="team-a",
        model="fast",
        deployment="oai-main",
        provider="openai",
        provider_model="gpt-4o-mini",
        prompt_tokens=12,
        completion_tokens=3,
        cost_usd=0.0000036,
        latency_ms=12.5,
        status=200,
    )
    recorder.record(rec)
    recorder.flush()
    line = json.loads(log.read_text().splitlines()[-1])
    assert line["request_id"] == "r1" and line["consumer"] == "team-a"
    assert line["prompt_tokens"] == 12 and line["completion_tokens"] == 3
    assert line["estimated"] is False and line["ttft_ms"] is None
    assert set(line) == set(UsageRecord.__struct_fields__)


# --- end to end ----------------------------------------------------------------------------


def status_url(gw: Gateway) -> str:
    import yaml

    config = yaml.safe_load(gw.config_path.read_text())
    return f"http://{config['status']['listen']}"


def poll(read: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s; last: {value!r}")
        time.sleep(0.2)
        value = read()
    return value


def scrape(gw: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{status_url(gw)}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ferrogate_ai_"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return sum(
        v for (n, ls), v in metrics.items() if n == name and labels.items() <= dict(ls).items()
    )


def ai_api(gw: Gateway, **params: Any) -> httpx.Response:
    return httpx.get(
        f"{status_url(gw)}/api/analytics/ai",
        params=params,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )


def test_usage_reaches_log_metrics_and_analytics(
    gateway: GatewayFactory, upstream_factory: UpstreamFactory, tmp_path: Path
) -> None:
    up = upstream_factory("llm")
    log = tmp_path / "ai-usage.jsonl"
    gw = gateway(
        {
            "plugins_dir": PLUGINS_DIR,
            "upstreams": {"llm": {"targets": [up.address]}},
            "routes": [
                {
                    "name": "ai",
                    "paths": ["/v1/*"],
                    "upstream": "llm",
                    "plugins": [{"name": "t-ai-usage", "config": {"usage": {"log": str(log)}}}],
                }
            ],
            "status": {"listen": f"127.0.0.1:{free_port()}", "admin_token": TOKEN},
            "analytics": {"path": str(tmp_path / "analytics.db"), "resolution": "0.5s"},
            "metrics": {"max_consumers": 2},
        },
        workers=2,
    )
    sent = [
        # consumer, model, prompt, completion, cost, upstream status
        ("team-a", "fast", 100, 20, 0.25, "200"),
        ("team-a", "fast", 50, 10, 0.125, "200"),
        ("team-b", "smart", 7, 0, 0.0, "429"),
        ("team-c", "fast", 1, 1, 0.5, "200"),  # over the metrics consumer cap
        ("team-d", "fast", 2, 2, 0.5, "200"),
    ]
    with gw.client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for consumer, model, prompt, completion, cost, status in sent:
            r = client.post(
                "/v1/chat/completions",
                headers={
                    "x-consumer": consumer,
                    "x-model": model,
                    "x-prompt": str(prompt),
                    "x-completion": str(completion),
                    "x-cost": str(cost),
                    "x-up-status": status,
                    "x-stream": "1" if consumer == "team-a" else "0",
                    "x-fallbacks": "1" if consumer == "team-b" else "0",
                },
                content=b"{}",
            )
            assert r.status_code == int(status)

    # The log: a line per request, as it happened.
    lines = poll(
        lambda: log.read_text().splitlines() if log.exists() else [],
        lambda v: len(v) == len(sent),
    )
    records = sorted((json.loads(x) for x in lines), key=lambda r: r["prompt_tokens"])
    assert [(r["consumer"], r["prompt_tokens"], r["status"]) for r in records] == [
        ("team-c", 1, 200),
        ("team-d", 2, 200),
        ("team-b", 7, 429),
        ("team-a", 50, 200),
        ("team-a", 100, 200),
    ]
    assert all(r["request_id"] and r["latency_ms"] > 0 for r in records)

    # /metrics: summed over both workers; consumers past the cap (2 per worker) may be
    # "other", but no token goes missing.
    m = poll(
        lambda: scrape(gw),
        lambda v: sample(v, "ferrogate_ai_requests_total") == len(sent),
    )
    assert sample(m, "ferrogate_ai_tokens_total", kind="prompt") == 160
    assert sample(m, "ferrogate_ai_tokens_total", kind="completion") == 33
    assert sample(m, "ferrogate_ai_tokens_total", consumer="team-a", kind="prompt") in (
        150,
        100,
        50,
    )
    assert sample(m, "ferrogate_ai_cost_usd_total") == 1.375
    assert sample(m, "ferrogate_ai_requests_total", status="429") == 1
    assert sample(m, "ferrogate_ai_requests_total", model="fast", provider="openai") == 4
    assert sample(m, "ferrogate_ai_fallbacks_total") == 1
    assert sample(m, "ferrogate_ai_request_duration_seconds_count", model="fast") == 4
    assert sample(m, "ferrogate_ai_time_to_first_token_seconds_count") == 2
    consumers = {dict(ls).get("consumer") for (n, ls) in m if n == "ferrogate_ai_requests_total"}
    assert consumers <= {"team-a", "team-b", "team-c", "team-d", "other"}

    # /api/analytics/ai: totals by consumer and model over the range.
    def totals() -> dict[str, Any]:
        r = ai_api(gw, **{"from": "-1h"})
        return r.json() if r.status_code == 200 else {}

    body = poll(totals, lambda v: v.get("total", {}).get("requests") == len(sent))
    assert body["total"]["prompt_tokens"] == 160 and body["total"]["completion_tokens"] == 33
    assert abs(body["total"]["cost_usd"] - 1.375) < 1e-9
    assert body["total"]["errors"] == 1
    by_consumer = {r["consumer"]: r for r in body["by_consumer"]}
    assert by_consumer["team-a"]["requests"] == 2 and by_consumer["team-a"]["prompt_tokens"] == 150
    assert by_consumer["team-b"]["errors"] == 1
    assert set(by_consumer) == {"team-a", "team-b", "team-c", "team-d"}
    by_model = {r["model"]: r for r in body["by_model"]}
    assert by_model["fast"]["requests"] == 4 and by_model["smart"]["requests"] == 1
    assert [r["provider"] for r in body["by_provider"]] == ["openai"]
    # Filters and ranges.
    only_a = ai_api(gw, consumer="team-a").json()
    assert only_a["total"]["requests"] == 2 and [r["model"] for r in only_a["by_model"]] == ["fast"]
    assert ai_api(gw, **{"from": "-1h", "to": "-30m"}).json()["total"]["requests"] == 0
    bad = ai_api(gw, **{"from": "yesterday"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "from"
    assert httpx.get(f"{status_url(gw)}/api/analytics/ai", timeout=10).status_code == 401

    # Nothing merged twice: later ingests leave the totals alone.
    time.sleep(1.5)
    assert totals()["total"]["requests"] == len(sent)
