"""The ``ai:`` config section and its compilation into upstreams and routes.

Every deployment becomes an upstream ``ai:<name>`` (its URL's host, TLS for https), and the
gateway's OpenAI-compatible endpoints become ordinary routes carrying the ``ai-gateway``
plugin, whose settings are the normalized section (credentials read, durations in seconds).
Like ``apis:``, nothing here is new to the data plane. Provider credentials live only in
that plugin setting: the runtime file (readable by the gateway's user only) has them, the
route table and every answer or log line do not.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ferrogate.addresses import parse_upstream_url
from ferrogate.ai.adapters import PROVIDERS
from ferrogate.consumers import SecretFile, read_secret
from ferrogate.plugin_config import _AT, _config_path
from ferrogate.problems import DataPath
from ferrogate.resilience import default_upstream_settings
from ferrogate.structcheck import did_you_mean
from ferrogate.units import Duration
from ferrogate.upstream_tls_config import default_upstream_tls

if TYPE_CHECKING:
    from ferrogate.config import Upstream
    from ferrogate.config import _Normalizer as Normalizer

__all__ = ["UPSTREAM_PREFIX", "AiSettings", "compile_ai"]

UPSTREAM_PREFIX = "ai:"
PLUGIN = "ai-gateway"

Provider = Literal[
    "openai",
    "openai-compatible",
    "azure",
    "anthropic",
    "gemini",
    "mistral",
    "cohere",
    "bedrock",
    "ollama",
]


PositiveInt = Annotated[int, Meta(ge=1)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class AiDeployment(_Section, kw_only=True, frozen=True):
    """One model at one provider."""

    name: Annotated[str, Meta(description="Unique; its upstream is named ai:<name>.")]
    provider: Annotated[Provider, Meta(description="Which API the provider speaks.")]
    url: Annotated[
        str, Meta(description="Base URL: scheme, host, port and an optional path prefix.")
    ]
    model: Annotated[str, Meta(description="The provider's model id.")]
    api_key: Annotated[
        str | SecretFile | None,
        Meta(description="The provider's key: inline (${VAR}) or {file: PATH}."),
    ] = None
    api_key_file: Annotated[
        str | None, Meta(description="A file holding the key (relative to the config file).")
    ] = None
    weight: Annotated[int, Meta(ge=0, description="Share within its tier.")] = 1
    cooldown: Annotated[
        Duration, Meta(description="After a 429 from it, skip it this long (per worker).")
    ] = 30.0
    timeout: Annotated[
        Duration, Meta(description="Waiting for its answer's headers, and between body reads.")
    ] = 120.0
    connect_timeout: Annotated[Duration, Meta(description="TCP (and TLS) connect.")] = 5.0
    options: Annotated[
        dict[str, Any], Meta(description="Provider-specific settings (api_version, region, ...).")
    ] = {}


class AiPrice(_Section, kw_only=True, frozen=True):
    """USD per million tokens."""

    input: Annotated[float, Meta(ge=0)] = 0.0
    output: Annotated[float, Meta(ge=0)] = 0.0


class AiBudget(_Section, kw_only=True, frozen=True):
    """Spending limits in USD, per UTC day and per UTC month."""

    day: Annotated[float, Meta(ge=0)] | None = None
    month: Annotated[float, Meta(ge=0)] | None = None


class AiModelLimits(_Section, kw_only=True, frozen=True):
    """Limits of one consumer on one model alias."""

    rpm: Annotated[PositiveInt | None, Meta(description="Requests per minute.")] = None
    tpm: Annotated[PositiveInt | None, Meta(description="Tokens per minute.")] = None


class AiConsumer(_Section, kw_only=True, frozen=True):
    """What one consumer may do through the AI gateway."""

    models: Annotated[
        list[str] | None, Meta(description="Model aliases it may use; absent = all.")
    ] = None
    rpm: Annotated[PositiveInt | None, Meta(description="Requests per minute, all models.")] = None
    tpm: Annotated[PositiveInt | None, Meta(description="Tokens per minute, all models.")] = None
    budget: Annotated[AiBudget | None, Meta(description="Spending limits.")] = None
    model_limits: Annotated[
        dict[str, AiModelLimits], Meta(description="rpm/tpm per model alias.")
    ] = {}


class AiCache(_Section, kw_only=True, frozen=True):
    """Exact-match answers of deterministic requests (temperature 0 or a seed), per worker."""

    ttl: Annotated[Duration, Meta(description="How long an answer is reused.")] = 60.0
    max_entries: Annotated[int, Meta(ge=1, description="Entries per worker (LRU).")] = 1000


class AiSettings(_Section, kw_only=True, frozen=True):
    """The AI gateway: an OpenAI-compatible API over model providers (docs/ai.md)."""

    deployments: Annotated[list[AiDeployment], Meta(description="Models at providers.")]
    models: Annotated[
        dict[str, list[str | list[str]]],
        Meta(
            description="Alias -> ordered fallback tiers; a tier is a deployment name or a "
            "list of them (weighted)."
        ),
    ]
    prices: Annotated[
        dict[str, AiPrice], Meta(description="By provider model id, USD per 1M tokens.")
    ] = {}
    consumers: Annotated[
        dict[str, AiConsumer],
        Meta(description="Per consumer (key-auth credentials under `consumers:`)."),
    ] = {}
    path_prefix: Annotated[str, Meta(description="Where the endpoints live.")] = "/v1"
    hosts: Annotated[list[str], Meta(description="Hosts of the endpoints; empty = any.")] = []
    stream_heartbeat: Annotated[
        Duration, Meta(description="`: ping` after this much silence in a stream; 0 = off.")
    ] = 0.0
    default_max_tokens: Annotated[
        int, Meta(ge=1, description="Assumed output size for budgets when max_tokens is unset.")
    ] = 4096
    max_body_size: Annotated[int, Meta(ge=1024, description="Request body cap in bytes.")] = (
        32 << 20
    )
    cache: Annotated[AiCache | None, Meta(description="Exact-match answer cache; off.")] = None
    guardrails: Annotated[
        dict[str, Any] | None, Meta(description="PII masking and deny rules (docs/ai.md).")
    ] = None
    prompts: Annotated[
        dict[str, dict[str, Any]], Meta(description="Prompts published as REST endpoints.")
    ] = {}
    usage: Annotated[
        dict[str, Any] | None, Meta(description="Where usage records go (docs/ai.md).")
    ] = None


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _deployment(
    n: Normalizer,
    dep: AiDeployment,
    at: DataPath,
    out_upstreams: dict[str, Any],
    base_dir: Path,
) -> dict[str, Any] | None:
    try:
        address, path_prefix, tls = parse_upstream_url(dep.url)
    except ValueError as e:
        n.report((*at, "url"), str(e))
        return None
    if dep.api_key is not None and dep.api_key_file is not None:
        n.report((*at, "api_key_file"), "give api_key or api_key_file, not both")
    key: str | None = None
    if dep.api_key is not None:
        key = read_secret(dep.api_key, base_dir, n.report, (*at, "api_key"), "API key")
    elif dep.api_key_file is not None:
        key = read_secret(SecretFile(file=dep.api_key_file), base_dir, n.report, at, "API key")
    upstream = f"{UPSTREAM_PREFIX}{dep.name}"
    timeout = n.duration(dep.timeout, (*at, "timeout"))
    out_upstreams[upstream] = {
        "targets": [{"address": address, "weight": 1}],
        "balance": "round_robin",
        "hash_on": None,
        "keepalive": 256,
        "keepalive_timeout": 60.0,
        "timeouts": {
            "connect": n.duration(dep.connect_timeout, (*at, "connect_timeout")),
            "read": timeout,
            "write": 60.0,
            "total": 0.0,
        },
        # Adapters put the prefix in front of their paths themselves (Deployment.base_path).
        "path_prefix": "",
        **default_upstream_settings(n, ("upstreams", upstream)),
        "tls": default_upstream_tls() if tls else None,
        "http2": False,
    }
    # Fallbacks between deployments are the plugin's: the engine must not also retry.
    out_upstreams[upstream]["retries"] = {**out_upstreams[upstream]["retries"], "count": 0}
    n.generated[upstream] = (*at, "url")
    return {
        "name": dep.name,
        "provider": dep.provider,
        "upstream": upstream,
        "base_path": path_prefix.rstrip("/"),
        "model": dep.model,
        "url": dep.url,
        "api_key": key,
        "options": dict(dep.options),
        "weight": dep.weight,
        "cooldown": n.duration(dep.cooldown, (*at, "cooldown")),
    }


def _check_section(n: Normalizer, value: Any, at: DataPath, module: str, type_name: str) -> Any:
    """A section another module defines: validated with its Struct when that module exists."""
    if value is None or not _module_exists(module):
        return value
    mod = importlib.import_module(module)
    struct = getattr(mod, type_name, None)
    if struct is None:
        return value
    try:
        checked = msgspec.convert(value, struct)
    except msgspec.ValidationError as e:
        m = _AT.match(str(e))
        reason, where = (m.group(1), m.group(2) or "") if m else (str(e), "")
        n.report((*at, *_config_path(where)), reason)
        return value
    problems = getattr(checked, "problems", None)
    if problems is not None:
        for path, message in problems():
            n.report((*at, *path), message)
    return msgspec.to_builtins(checked)


def normalize_ai(
    n: Normalizer, ai: AiSettings, out_upstreams: dict[str, Any], base_dir: Path
) -> tuple[dict[str, Any], list[str]]:
    """The plugin's settings and the deployment names in config order."""
    deployments: dict[str, dict[str, Any]] = {}
    for j, dep in enumerate(ai.deployments):
        at: DataPath = ("ai", "deployments", j)
        if dep.name in deployments:
            n.report((*at, "name"), f"duplicate deployment name '{dep.name}'")
            continue
        if not dep.name:
            n.report((*at, "name"), "a deployment needs a name")
            continue
        if dep.provider not in PROVIDERS:
            n.report((*at, "provider"), f"unknown provider '{dep.provider}'")
        out = _deployment(n, dep, at, out_upstreams, base_dir)
        if out is not None:
            deployments[dep.name] = out
    if not ai.deployments:
        n.report(("ai", "deployments"), "at least one deployment is needed")
    models: dict[str, list[list[str]]] = {}
    for alias, tiers in ai.models.items():
        at = ("ai", "models", alias)
        out_tiers: list[list[str]] = []
        for k, tier in enumerate(tiers):
            names = [tier] if isinstance(tier, str) else list(tier)
            if not names:
                n.report((*at, k), "an empty tier")
            for m, name in enumerate(names):
                if name not in {d.name for d in ai.deployments}:
                    hint = did_you_mean(name, [d.name for d in ai.deployments])
                    where = (*at, k) if isinstance(tier, str) else (*at, k, m)
                    n.report(where, f"unknown deployment '{name}'{hint}")
            out_tiers.append(names)
        if not tiers:
            n.report(at, "a model needs at least one deployment")
        models[alias] = out_tiers
    if not ai.models:
        n.report(("ai", "models"), "at least one model alias is needed")
    known_consumers = set(n_consumers(n))
    consumers: dict[str, Any] = {}
    for name, c in ai.consumers.items():
        at = ("ai", "consumers", name)
        if known_consumers is not None and name not in known_consumers:
            hint = did_you_mean(name, known_consumers) or " (define it under 'consumers:')"
            n.report(at, f"unknown consumer '{name}'{hint}")
        for k, alias in enumerate(c.models or []):
            if alias not in ai.models:
                n.report(
                    (*at, "models", k), f"unknown model '{alias}'{did_you_mean(alias, ai.models)}"
                )
        for alias in c.model_limits:
            if alias not in ai.models:
                n.report(
                    (*at, "model_limits", alias),
                    f"unknown model '{alias}'{did_you_mean(alias, ai.models)}",
                )
        consumers[name] = msgspec.to_builtins(c)
    prefix = ai.path_prefix.rstrip("/")
    if prefix and (not prefix.startswith("/") or "{" in prefix or "*" in prefix):
        n.report(("ai", "path_prefix"), "a plain path starting with '/': /v1")
    settings = {
        "deployments": deployments,
        "models": models,
        "prices": {k: msgspec.to_builtins(v) for k, v in ai.prices.items()},
        "consumers": consumers,
        "default_max_tokens": ai.default_max_tokens,
        "max_body_size": ai.max_body_size,
        "cache": None
        if ai.cache is None
        else {
            "ttl": n.duration(ai.cache.ttl, ("ai", "cache", "ttl")),
            "max_entries": ai.cache.max_entries,
        },
        "guardrails": _check_section(
            n, ai.guardrails, ("ai", "guardrails"), "ferrogate.ai.guardrails", "GuardrailsConfig"
        ),
        "usage": _usage_section(n, ai.usage, base_dir),
        "prompts": {
            name: _check_section(
                n, p, ("ai", "prompts", name), "ferrogate.ai.prompts", "PromptConfig"
            )
            for name, p in ai.prompts.items()
        },
    }
    return settings, [d.name for d in ai.deployments]


def _usage_section(n: Normalizer, usage: dict[str, Any] | None, base_dir: Path) -> Any:
    out = _check_section(n, usage, ("ai", "usage"), "ferrogate.ai.usage", "UsageSettings")
    # The usage log is relative to the config file, like the access log.
    if isinstance(out, dict) and isinstance(out.get("log"), str):
        out["log"] = str(base_dir / out["log"])
    return out


def n_consumers(n: Normalizer) -> set[str]:
    from ferrogate.consumers import current

    return {c.name for c in current()}


def compile_ai(
    n: Normalizer,
    ai: AiSettings,
    upstreams: Mapping[str, Upstream],
    names: dict[str, int],
    out_routes: list[dict[str, Any]],
    out_upstreams: dict[str, Any],
    timeouts: Mapping[str, float],
) -> None:
    """Append the AI endpoints' routes (after the config's routes and APIs)."""
    from ferrogate.config import PluginUse, Route

    report = n.report
    problems = 0

    def counted(path: DataPath, message: str) -> None:
        nonlocal problems
        problems += 1
        report(path, message)

    n.report = counted
    try:
        settings, order = normalize_ai(n, ai, out_upstreams, n.base_dir)
    finally:
        n.report = report
    if not order or problems:
        # The plugin could not be made from these settings; each problem is reported once.
        return
    first = f"{UPSTREAM_PREFIX}{order[0]}"
    known: dict[str, Any] = {**upstreams, **{u: None for u in out_upstreams}}
    prefix = ai.path_prefix.rstrip("/")
    endpoints: list[tuple[str, str, str, str | None]] = [
        ("chat", f"{prefix}/chat/completions", "POST", None),
        ("embeddings", f"{prefix}/embeddings", "POST", None),
        ("models", f"{prefix}/models", "GET", None),
    ]
    if _module_exists("ferrogate.ai.anthropic_api"):
        endpoints.append(("messages", f"{prefix}/messages", "POST", None))
    if _module_exists("ferrogate.ai.prompts"):
        for name, p in ai.prompts.items():
            path = p.get("path") if isinstance(p, dict) else None
            if not isinstance(path, str) or not path.startswith("/"):
                n.report(("ai", "prompts", name, "path"), "a prompt needs a path starting with '/'")
                continue
            methods = p.get("methods") or ["POST"]
            endpoints.append(("prompt", path, ",".join(methods), name))
    heartbeat = n.duration(ai.stream_heartbeat, ("ai", "stream_heartbeat"))
    has_heartbeat = "sse_heartbeat" in Route.__struct_fields__
    for endpoint, path, methods, prompt in endpoints:
        i = len(out_routes)
        at: DataPath = ("ai",)
        n.route_origins[i] = (at, at)
        config: dict[str, Any] = {"endpoint": endpoint, "settings": settings}
        if prompt is not None:
            config["prompt"] = prompt
        extra: dict[str, Any] = {}
        if has_heartbeat and endpoint in ("chat", "messages", "prompt"):
            extra["sse_heartbeat"] = heartbeat
        route = Route(
            name=f"ai-{endpoint}" if prompt is None else f"ai-prompt-{prompt}",
            paths=[path],
            hosts=list(ai.hosts),
            methods=methods.split(","),
            upstream=first,
            preserve_host=False,
            plugins=[PluginUse(name=PLUGIN, config=config)],
            **extra,
        )
        out = n.route(i, route, names, known, out_upstreams, timeouts, at)
        if endpoint == "chat" and _module_exists("ferrogate.ai.fast"):
            _pass_through(n, settings, out)
        out_routes.append(out)


def _pass_through(n: Normalizer, settings: dict[str, Any], route: dict[str, Any]) -> None:
    """Give the chat route the data plane's pass-through table (``ai/fast.py``), when its
    chain is the AI plugin alone."""
    from ferrogate.ai.fast import fast_table
    from ferrogate.consumers import current

    plugins = route.get("plugins")
    if not isinstance(plugins, dict) or len(plugins.get("entries") or ()) != 1:
        return
    skip = set(getattr(n, "consumer_plugins", None) or ())
    table = fast_table(settings, int(plugins.get("body_cap") or 0), current(), skip)
    if table is not None:
        route["ai_fast"] = table
