"""The AI gateway's pass-through in the data plane (``rust/engine/src/ai_fast.rs``).

A chat completion whose model alias is served by one OpenAI-format deployment needs nothing
the plugin adds on the way: its body goes on with ``model`` renamed, the answer comes back as
it is. The data plane serves such requests without a Python crossing, from a table this module
builds with the plugin's own pieces (the adapter's request line and headers, ``quota_of`` for
the counters, the tokenizer's constants), so both paths count the same way under the same keys.
Whatever the table does not cover (streams, guardrails, the answer cache, several
deployments, consumers with plugins of their own, any refusal) takes the plugin's path.

The data plane queues a usage row per request; the usage thread takes them
(:func:`drain`, from ``usage.py``), counts with the tokenizer the answers that came without
``usage`` and settles those, and records every row with the route's recorder.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ferrogate import _core
from ferrogate.ai import tokens
from ferrogate.ai.adapters.base import _ERROR_TYPES
from ferrogate.ai.usage import UsageRecord, UsageRecorder
from ferrogate.events import emit

__all__ = ["PASSTHROUGH", "drain", "fast_table", "register"]

PASSTHROUGH = frozenset({"openai", "openai-compatible"})
"""Providers whose chat requests and answers are OpenAI's as they are."""

_recorders: dict[str, UsageRecorder | None] = {}


def fast_table(
    settings: dict[str, Any], body_cap: int, consumers: Any, skip: set[str]
) -> dict[str, Any] | None:
    """The ``ai_fast`` table of the chat route, or None when nothing qualifies.

    ``consumers`` is the config's registry, ``skip`` the consumers with plugins of their own
    (those need the plugin's crossing)."""
    from ferrogate.ai.plugin import _Dep, quota_of

    if settings.get("guardrails") is not None or settings.get("cache") is not None:
        return None
    prices = settings.get("prices", {})
    aliases: dict[str, Any] = {}
    for alias, tiers in settings["models"].items():
        names = [name for tier in tiers for name in tier]
        d = settings["deployments"].get(names[0]) if len(names) == 1 else None
        if d is None or d["provider"] not in PASSTHROUGH:
            continue
        dep = _Dep(d, prices)
        line = dep.get_adapter().chat_request(dep.dep, {"model": alias}, False)
        if line.method != "POST" or "?" in line.path:
            continue
        aliases[alias] = {
            "upstream": dep.dep.upstream,
            "path": line.path,
            "model": dep.dep.model,
            "headers": [list(h) for h in line.headers],
            "deployment": dep.dep.name,
            "provider": dep.dep.provider,
            "price_in": dep.price_in,
            "price_out": dep.price_out,
            "api_key": dep.dep.api_key or "",
        }
    if not aliases:
        return None
    # The registry's index: the first credential with a key wins, as in by_api_key.
    owners: dict[str, tuple[str, str]] = {}
    for c in consumers:
        for cred in c.credentials:
            if cred.type == "key-auth":
                owners.setdefault(cred.data["key_sha256"], (c.name, cred.id))
    keys = {k: list(v) for k, v in owners.items() if v[0] not in skip}
    policies: dict[str, Any] = {}
    for who, policy in settings["consumers"].items():
        allowed = policy.get("models")
        limits: dict[str, Any] = {}
        budgets: list[dict[str, Any]] = []
        for alias, a in aliases.items():
            if allowed is not None and alias not in allowed:
                continue
            q = quota_of(who, alias, policy, (a["price_in"], a["price_out"]))
            limits[alias] = [
                {"key": k, "per_second": rate, "burst": burst, "tokens": per_token}
                for k, rate, burst, per_token in q.rates
            ]
            budgets = [
                {"key": k, "month": index == 1, "limit": int(limit * 1e6)}
                for k, index, _, limit in q.budgets
            ]
        policies[who] = {"models": allowed, "limits": limits, "budgets": budgets}
    return {
        "keys": keys,
        "consumers": policies,
        "aliases": aliases,
        "default_max_tokens": int(settings["default_max_tokens"]),
        "body_cap": body_cap,
        "tokens": {
            "reply_priming": tokens.REPLY_PRIMING,
            "per_message": tokens.TOKENS_PER_MESSAGE,
            "per_name": tokens.TOKENS_PER_NAME,
            "image": tokens.IMAGE_TOKENS,
            "image_low": tokens.IMAGE_TOKENS_LOW,
            "other_part": tokens.OTHER_PART_TOKENS,
        },
        "error_types": {str(k): v for k, v in _ERROR_TYPES.items()},
    }


def register(route: str, recorder: UsageRecorder | None) -> None:
    """Where the rows of ``route`` are recorded (each plugin build of the route says)."""
    _recorders[route] = recorder


def drain() -> int:
    """Take the data plane's rows: settle those counted here, record all (usage thread).
    Returns how many were recorded."""
    rows, dropped = _core.ai_usage_take()
    recorded = 0
    if dropped:
        emit("warning", "ai_usage_dropped", records=dropped, where="data plane")
    for ident, numbers, estimate in rows:
        started, request_id, route, consumer, model, deployment, provider, provider_model = ident
        prompt, completion, cost, latency_ms, status = numbers
        estimated = False
        if estimate is not None:
            prompt, completion, cost = _settle(estimate, provider_model)
            estimated = True
        recorder = _recorders.get(route)
        if recorder is None:
            continue
        recorded += 1
        recorder.record(
            UsageRecord(
                time=started,
                request_id=request_id,
                route=route,
                consumer=consumer,
                model=model,
                deployment=deployment,
                provider=provider,
                provider_model=provider_model,
                prompt_tokens=prompt,
                completion_tokens=completion,
                estimated=estimated,
                cost_usd=cost / 1e6,
                latency_ms=latency_ms,
                status=status,
            )
        )
    return recorded


def _settle(estimate: tuple[Any, ...], model: str) -> tuple[int, int, int]:
    """Count an answer that came without usage, as the plugin's log phase does, and settle
    its counters: (prompt, completion, cost in micro-USD)."""
    request, answer, limits, budgets, reserved, price_in, price_out = estimate
    try:
        messages = msgspec.json.decode(request).get("messages")
    except (msgspec.DecodeError, AttributeError):
        messages = None
    prompt = tokens.count_messages(messages, model) if isinstance(messages, list) else 0
    completion = completion_tokens(answer) if answer else 0
    cost = int(prompt * price_in + completion * price_out + 0.5)
    used = prompt + completion
    for key, rate, burst, charged in limits:
        if used != charged:
            _core.rate_adjust(key, rate, burst, used - charged)
    if reserved:
        for key, window in budgets:
            _core.budget_adjust(key, window, cost - reserved)
    return prompt, completion, cost


def completion_tokens(answer: bytes) -> int:
    """Tokens of a whole chat completion's choices (text and tool calls), counted."""
    try:
        doc = msgspec.json.decode(answer)
    except msgspec.DecodeError:
        return 0
    text: list[str] = []
    for choice in (doc.get("choices") or []) if isinstance(doc, dict) else []:
        message = (choice.get("message") or {}) if isinstance(choice, dict) else {}
        if isinstance(message.get("content"), str):
            text.append(message["content"])
        for call in message.get("tool_calls") or ():
            fn = (call.get("function") or {}) if isinstance(call, dict) else {}
            text.append(str(fn.get("name") or "") + str(fn.get("arguments") or ""))
    return tokens.count_text("".join(text))
