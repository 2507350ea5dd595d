"""The ``ai-gateway`` plugin: the OpenAI-compatible endpoints compiled from ``ai:``.

``on_request`` authenticates the gateway key, resolves the model alias, counts the
consumer's limits and reserves budget, picks a deployment (weighted within a tier, later
tiers and the rest of the tier as ``req.fallbacks``) and rewrites the request into that
provider's. The answer is handled chunk by chunk: OpenAI answers pass through (usage read
on the side), other providers' are translated. ``on_log`` settles the books: real tokens
against the estimate charged, real cost against the reservation, the usage record.

Per worker (said in docs/ai.md): the cooldown of a deployment after its 429 and the answer
cache. Limits and budgets count in the node-wide tables of ``_core``.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import OrderedDict
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta

from ferrogate import _core
from ferrogate.ai import adapters, fast
from ferrogate.ai.adapters.base import Adapter, Deployment, Unsupported, Usage, error_body
from ferrogate.ai.adapters.openai import usage_of
from ferrogate.ai.tokens import count_messages, count_text, estimate_messages, estimate_text
from ferrogate.ai.usage import UsageRecord, _sink
from ferrogate.consumers import current as current_consumers
from ferrogate.hooks import Attempt, Request, Response
from ferrogate.plugin import Plugin

__all__ = ["AiGateway"]

_decode = msgspec.json.decode
_encode = msgspec.json.encode
_now = time.monotonic

# Headers of the client that may reach a provider, unless the adapter sets them;
# everything else (its gateway key first of all) is dropped. Not accept-encoding: answers
# are read here (usage, translation), so they come uncompressed.
_KEEP = ("content-type", "accept", "user-agent")

_WINDOWS: list[tuple[int, tuple[int, int]]] = [(-1, (0, 0))]


def _windows(now: float) -> tuple[int, int]:
    """(day, month) numbers of the UTC calendar (worked out once a day)."""
    day = int(now // 86400)
    cached = _WINDOWS[0]
    if cached[0] == day:
        return cached[1]
    t = time.gmtime(now)
    out = (day, t.tm_year * 12 + t.tm_mon)
    _WINDOWS[0] = (day, out)
    return out


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> Response:
    return Response(status, error_body(status, message, code=code), headers=headers)


class _Dep:
    __slots__ = ("adapter", "cooldown", "dep", "price_in", "price_out", "weight")

    def __init__(self, d: dict[str, Any], prices: dict[str, dict[str, float]]) -> None:
        self.dep = Deployment(
            name=d["name"],
            provider=d["provider"],
            upstream=d["upstream"],
            base_path=d["base_path"],
            model=d["model"],
            url=d.get("url", ""),
            api_key=d["api_key"],
            options=d["options"],
        )
        self.adapter: Adapter | None = None
        self.weight = int(d["weight"])
        self.cooldown = float(d["cooldown"])
        price = prices.get(d["model"], {})
        # USD per million tokens is micro-dollars per token.
        self.price_in = float(price.get("input", 0.0))
        self.price_out = float(price.get("output", 0.0))

    def get_adapter(self) -> Adapter:
        if self.adapter is None:
            self.adapter = adapters.adapter_for(self.dep.provider)
        return self.adapter


class _Cache:
    """Answers of deterministic requests, per worker, least recently used out first."""

    def __init__(self, ttl: float, max_entries: int) -> None:
        self.ttl = ttl
        self.max = max_entries
        self.entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        hit = self.entries.get(key)
        if hit is None:
            return None
        if hit[0] < _now():
            del self.entries[key]
            return None
        self.entries.move_to_end(key)
        return hit[1]

    def put(self, key: str, body: bytes) -> None:
        self.entries[key] = (_now() + self.ttl, body)
        self.entries.move_to_end(key)
        while len(self.entries) > self.max:
            self.entries.popitem(last=False)


class _State:
    """What the routes of one config share: deployments, cooldowns, cache, recorder."""

    def __init__(self, s: dict[str, Any]) -> None:
        prices = s.get("prices", {})
        self.deps = {name: _Dep(d, prices) for name, d in s["deployments"].items()}
        self.models: dict[str, list[list[str]]] = s["models"]
        self.consumers: dict[str, dict[str, Any]] = s["consumers"]
        self.default_max_tokens = int(s["default_max_tokens"])
        self.cooling: dict[str, float] = {}
        cache = s.get("cache")
        self.cache = None if cache is None else _Cache(cache["ttl"], cache["max_entries"])
        self.guardrails = _make_guardrails(s.get("guardrails"))
        self.masks_responses = bool(getattr(self.guardrails, "masks_responses", False))
        self.recorder = _make_recorder(s.get("usage"))
        self.max_price = {
            alias: (
                max((self.deps[n].price_in for t in tiers for n in t if n in self.deps), default=0),
                max(
                    (self.deps[n].price_out for t in tiers for n in t if n in self.deps), default=0
                ),
            )
            for alias, tiers in self.models.items()
        }

    def plan(self, alias: str) -> list[_Dep]:
        """Deployments to try in order: a weighted pick per tier, cooling ones last."""
        now = _now()
        order: list[_Dep] = []
        cooling: list[_Dep] = []
        for tier in self.models[alias]:
            deps = [self.deps[n] for n in tier]
            if len(deps) > 1:
                # Weighted order without replacement (Efraimidis-Spirakis keys).
                deps.sort(key=lambda d: -(random.random() ** (1.0 / d.weight)) if d.weight else 0)
            for d in deps:
                if self.cooling.get(d.dep.name, 0.0) > now:
                    cooling.append(d)
                else:
                    order.append(d)
        return order or cooling

    def cool(self, upstream: str) -> None:
        for d in self.deps.values():
            if d.dep.upstream == upstream:
                self.cooling[d.dep.name] = _now() + d.cooldown


_states: dict[bytes, _State] = {}


def _state_for(settings: dict[str, Any]) -> _State:
    # The routes of one config share one state; a reload with other settings makes another.
    key = hashlib.sha256(_encode(settings)).digest()
    state = _states.get(key)
    if state is None:
        if len(_states) > 8:
            _states.clear()
        state = _states[key] = _State(settings)
    return state


def _make_guardrails(cfg: Any) -> Any:
    if not cfg:
        return None
    try:
        from ferrogate.ai import guardrails
    except ImportError:
        return None
    return guardrails.Guardrails(msgspec.convert(cfg, guardrails.GuardrailsConfig))


def _make_recorder(cfg: Any) -> Any:
    try:
        from ferrogate.ai import usage
    except ImportError:
        return None
    settings = msgspec.convert(cfg or {}, usage.UsageSettings)
    return usage.UsageRecorder(settings)


def _estimate_prompt(body: dict[str, Any]) -> int:
    """A quick count for reservations (the real tokenizer runs in the log phase)."""
    if "messages" in body:
        return int(estimate_messages(body["messages"]))
    inp = body.get("input")
    if isinstance(inp, str):
        return int(estimate_text(inp))
    if isinstance(inp, list):
        return sum(int(estimate_text(x)) if isinstance(x, str) else len(x) for x in inp)
    return 1


def _count_prompt(f: _Flight) -> int:
    """The prompt counted with the real tokenizer (the log phase can afford it)."""
    messages = f.body.get("messages")
    if not isinstance(messages, list):
        return f.est_tokens
    return int(count_messages(messages, f.dep.dep.model if f.dep else None))


class _Quota:
    """The limits of one consumer on one model alias: rate counters (key, rate per second,
    burst, counted in tokens), budgets (key, window index, period, limit in USD) and the
    alias's highest prices."""

    __slots__ = ("budgets", "price", "rates")

    def __init__(
        self,
        rates: list[tuple[str, float, float, bool]],
        budgets: list[tuple[str, int, str, float]],
        price: tuple[float, float],
    ) -> None:
        self.rates = rates
        self.budgets = budgets
        self.price = price


def quota_of(who: str, alias: str, policy: dict[str, Any], price: tuple[float, float]) -> _Quota:
    """The counters ``who`` takes on ``alias`` (rpm and tpm per consumer, then per consumer
    and model), and its budgets; the data plane's pass-through counts with the same
    (``ai/fast.py``)."""
    rates: list[tuple[str, float, float, bool]] = []
    if policy.get("rpm"):
        rates.append((f"ai:rpm:{who}", policy["rpm"] / 60.0, float(policy["rpm"]), False))
    if policy.get("tpm"):
        rates.append((f"ai:tpm:{who}", policy["tpm"] / 60.0, float(policy["tpm"]), True))
    per_model = policy.get("model_limits", {}).get(alias)
    if per_model:
        if per_model.get("rpm"):
            rpm = per_model["rpm"]
            rates.append((f"ai:rpm:{who}:{alias}", rpm / 60.0, float(rpm), False))
        if per_model.get("tpm"):
            tpm = per_model["tpm"]
            rates.append((f"ai:tpm:{who}:{alias}", tpm / 60.0, float(tpm), True))
    budgets: list[tuple[str, int, str, float]] = []
    budget = policy.get("budget") or {}
    for index, period in enumerate(("day", "month")):
        limit = budget.get(period)
        if limit is not None:
            budgets.append((f"ai:budget:{period}:{who}", index, period, limit))
    return _Quota(rates, budgets, price)


class _Flight:
    """One request's state from on_request to on_log (``req.ctx["ai"]``)."""

    __slots__ = (
        "alias",
        "answer",
        "body",
        "budgets",
        "cache_key",
        "cached",
        "consumer",
        "dep",
        "deps",
        "est_tokens",
        "include_usage",
        "limits",
        "maskers",
        "messages",
        "pending",
        "reserved",
        "started",
        "status",
        "stream",
        "texts",
        "translator",
        "ttft",
        "usage",
    )

    def __init__(self) -> None:
        self.alias = ""
        self.answer: list[bytes] = []
        self.body: dict[str, Any] = {}
        self.cache_key: str | None = None
        self.cached = False
        self.consumer = ""
        self.deps: list[_Dep] = []
        self.dep: _Dep | None = None
        self.est_tokens = 0
        self.include_usage = False
        self.pending = b""
        self.reserved = 0
        self.started = _now()
        self.status = 0
        self.stream = False
        self.texts: list[bytes] | None = None
        self.translator: Any = None
        self.ttft: float | None = None
        self.usage: Usage | None = None
        self.budgets: list[tuple[str, int]] = []
        """The budget counters reserved in, with their windows."""
        self.limits: list[tuple[str, float, float, float]] = []
        """The token limits charged: key, rate, burst, tokens."""
        self.messages: Any = None
        self.maskers: dict[int, Any] | None = None
        """Per choice, the guardrails' stream maskers (when answers are masked)."""
        """The Anthropic-compatible endpoint: its MessageStream, or True for whole answers."""


class AiGateway(Plugin):
    """The AI gateway's endpoints (compiled from ``ai:``; see docs/ai.md)."""

    name = "ai-gateway"
    priority = 0
    request_body = "buffered"

    class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
        """Written by the ``ai:`` section's compilation, not by hand."""

        endpoint: Annotated[
            Literal["chat", "embeddings", "models", "messages", "prompt"],
            Meta(description="Which endpoint the route serves."),
        ]
        settings: Annotated[dict[str, Any], Meta(description="The normalized `ai:` section.")]
        prompt: Annotated[str | None, Meta(description="The prompt of a prompt endpoint.")] = None

    config: AiGateway.Config
    max_body_size: ClassVar[int] = 32 << 20

    @classmethod
    def max_body_size_for(cls, config: Any) -> int:
        return int(config.settings.get("max_body_size", cls.max_body_size))

    def __init__(self, config: AiGateway.Config) -> None:
        super().__init__(config)
        self.state = _state_for(config.settings)
        self.endpoint = config.endpoint
        self.registry = current_consumers()
        self._quotas: dict[tuple[str, str], _Quota] = {}
        if config.endpoint == "chat" and config.prompt is None:
            # Rows of requests the data plane passed through (`ai/fast.py`) go to this
            # route's recorder; the usage thread takes them even when nothing is recorded.
            fast.register("ai-chat", self.state.recorder)
            _sink.start()
        self.prompt: Any = None
        self.cache_scope = f"{config.endpoint}:{config.prompt or ''}:"
        if config.prompt is not None:
            from ferrogate.ai.prompts import PromptConfig, PromptEndpoint

            cfg = config.settings["prompts"][config.prompt]
            self.prompt = PromptEndpoint(config.prompt, msgspec.convert(cfg, PromptConfig))

    # --- the request ----------------------------------------------------------------

    def _consumer(self, req: Request) -> str | Response:
        headers = req.headers
        key = headers.get("authorization")
        if key is not None:
            key = key[7:].strip() if key[:7].lower() == "bearer " else None
        if key is None:
            key = headers.get("x-api-key")
        if not key:
            return _error(401, "no API key given (Authorization: Bearer KEY)", "missing_api_key")
        cred = self.registry.by_api_key(key)
        if cred is None:
            return _error(401, "invalid API key", "invalid_api_key")
        req.consumer = cred.consumer
        req.credential = cred.id
        return cred.consumer

    def on_request(self, req: Request) -> Response | None:
        answer = self._request(req)
        if answer is not None and self.endpoint == "messages" and answer.status >= 400:
            # Anthropic SDK clients read Anthropic's error shape.
            from ferrogate.ai import anthropic_api

            doc = _decode(answer.body or b"{}")
            return Response(
                anthropic_api.anthropic_status(answer.status),
                anthropic_api.to_anthropic_error(answer.status, doc),
                headers=[(k, v) for k, v in answer.headers.items() if k == "retry-after"],
            )
        return answer

    def _request(self, req: Request) -> Response | None:
        who = self._consumer(req)
        if isinstance(who, Response):
            return who
        policy = self.state.consumers.get(who)
        if self.endpoint == "models":
            allowed = None if policy is None else policy.get("models")
            data = [
                {"id": a, "object": "model", "created": 0, "owned_by": "ferrogate"}
                for a in self.state.models
                if allowed is None or a in allowed
            ]
            return Response(200, {"object": "list", "data": data})
        if self.prompt is not None:
            from ferrogate.ai.prompts import PromptInputError

            try:
                body = self.prompt.build(req.body or b"")
            except PromptInputError as e:
                return Response(
                    400, error_body(400, e.message, code="invalid_input", param=e.field or None)
                )
            body["model"] = self.prompt.cfg.model
        else:
            try:
                body = _decode(req.body or b"")
            except msgspec.DecodeError:
                return _error(400, "the body is not valid JSON", "invalid_json")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object", "invalid_json")
        messages = self.endpoint == "messages"
        if messages:
            from ferrogate.ai import anthropic_api

            try:
                body = anthropic_api.to_canonical(body)
            except Unsupported as e:
                return _error(400, str(e), "unsupported")
        alias = body.get("model")
        if not isinstance(alias, str) or not alias:
            return _error(400, "'model' is required", "missing_model")
        state = self.state
        if alias not in state.models:
            return _error(404, f"The model '{alias}' does not exist", "model_not_found")
        if (
            policy is not None
            and policy.get("models") is not None
            and alias not in policy["models"]
        ):
            return _error(403, f"you may not use the model '{alias}'", "model_not_allowed")
        f = _Flight()
        f.alias = alias
        f.consumer = who
        f.body = body
        f.messages = True if messages else None
        embeddings = self.endpoint == "embeddings"
        f.stream = bool(body.get("stream")) and not embeddings
        if f.stream:
            opts = body.get("stream_options")
            f.include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        g = state.guardrails
        if g is not None:
            reason = g.check_request(body)
            if reason is not None:
                return _error(400, reason, "content_blocked")
            g.mask_request(body)
        f.est_tokens = _estimate_prompt(body)
        max_out = body.get("max_completion_tokens") or body.get("max_tokens")
        if not isinstance(max_out, int) or max_out <= 0:
            max_out = 0 if embeddings else state.default_max_tokens
        if policy is not None:
            refused = self._limits(f, policy, alias, max_out)
            if refused is not None:
                return refused
        if (
            state.cache is not None
            and not f.stream
            and (body.get("temperature") == 0 or body.get("seed") is not None)
        ):
            f.cache_key = self.cache_scope + hashlib.sha256(_encode(body)).hexdigest()
            hit = state.cache.get(f.cache_key)
            if hit is not None:
                f.cached = True
                f.usage = usage_of(hit)
                req.ctx["ai"] = f
                return Response(
                    200, hit, headers={"content-type": "application/json", "x-cache": "HIT"}
                )
        planned = state.plan(alias)
        deps: list[_Dep] = []
        attempts = []
        refusal = ""
        for d in planned:
            try:
                if embeddings:
                    attempts.append(d.get_adapter().embeddings_request(d.dep, body))
                else:
                    attempts.append(d.get_adapter().chat_request(d.dep, body, f.stream))
            except Unsupported as e:
                # This deployment cannot express the request; the others may.
                refusal = refusal or str(e)
                continue
            deps.append(d)
        if not attempts:
            self._refund(f)
            return _error(400, refusal or "no deployment serves this request", "unsupported")
        f.deps = deps
        first = attempts[0]
        req.method = first.method
        path, _, query = first.path.partition("?")
        req.path = path
        req.query = query
        headers = req.headers
        sets = {name for name, _ in first.headers}
        kept = [
            (name, v) for name in _KEEP if name not in sets and (v := headers.get(name)) is not None
        ]
        headers.replace(kept + first.headers if kept else first.headers)
        req.body = first.body
        req.response_body_mode = "streamed" if f.stream else "buffered"
        req.upstream = deps[0].dep.upstream
        if len(attempts) > 1:
            req.fallbacks = [
                Attempt(
                    upstream=d.dep.upstream,
                    path=a.path,
                    headers=a.headers,
                    body=a.body,
                    method=a.method,
                )
                for d, a in zip(deps[1:], attempts[1:], strict=False)
            ]
        req.ctx["ai"] = f
        return None

    def _quota(self, who: str, alias: str, policy: dict[str, Any]) -> _Quota:
        """``quota_of``, worked out on first use (the plugin is rebuilt with each config, so
        this never goes stale)."""
        quota = quota_of(who, alias, policy, self.state.max_price.get(alias, (0.0, 0.0)))
        self._quotas[(who, alias)] = quota
        return quota

    def _limits(
        self, f: _Flight, policy: dict[str, Any], alias: str, max_out: int
    ) -> Response | None:
        """rpm and tpm per consumer and per consumer+model, then the budgets."""
        q = self._quotas.get((f.consumer, alias)) or self._quota(f.consumer, alias, policy)
        tokens = float(f.est_tokens)
        taken: list[tuple[str, float, float, float]] = []
        for key, rate, burst, per_token in q.rates:
            cost = tokens if per_token else 1.0
            wait = _core.rate_take(key, rate, burst, cost)
            if wait > 0:
                for k, r, b, c in taken:
                    _core.rate_adjust(k, r, b, -c)
                kind = "tokens" if per_token else "requests"
                retry = max(1, int(wait + 0.999))
                return _error(
                    429,
                    f"rate limit of {kind} per minute reached; retry in {retry}s",
                    "rate_limit_exceeded",
                    {"retry-after": str(retry)},
                )
            if per_token:
                f.limits.append((key, rate, burst, cost))
            taken.append((key, rate, burst, cost))
        if q.budgets:
            pin, pout = q.price
            amount = int(f.est_tokens * pin + max_out * pout + 0.999)
            windows = _windows(time.time())
            reserved: list[tuple[str, int]] = []
            for key, index, period, limit in q.budgets:
                window = windows[index]
                if _core.budget_reserve(key, window, amount, int(limit * 1e6)) < 0:
                    for k, w in reserved:
                        _core.budget_adjust(k, w, -amount)
                    for k, r, b, c in taken:
                        _core.rate_adjust(k, r, b, -c)
                    f.limits = []
                    retry = _seconds_to_next(period)
                    return _error(
                        429,
                        f"the {period}ly budget of {limit} USD is spent (or this request "
                        "could exceed it)",
                        "budget_exceeded",
                        {"retry-after": str(retry)},
                    )
                reserved.append((key, window))
            f.budgets = reserved
            f.reserved = amount
        return None

    def _refund(self, f: _Flight) -> None:
        self._settle(f, 0, 0)

    # --- the answer -----------------------------------------------------------------

    def on_response(self, req: Request, resp: Response) -> None:
        f: _Flight | None = req.ctx.get("ai")
        if f is None or f.cached:
            return
        attempt = getattr(resp, "attempt", 0) or 0
        for upstream, status in getattr(resp, "skipped", None) or ():
            if status == 429:
                self.state.cool(upstream)
        if attempt < len(f.deps):
            f.dep = f.deps[attempt]
        f.status = resp.status
        if resp.status == 429 and f.dep is not None:
            self.state.cool(f.dep.dep.upstream)
        dep = f.dep
        if dep is None or not f.stream:
            return
        # Streams: the head is on its way now; whole answers are shaped in on_response_body.
        adapter = dep.get_adapter()
        ok = 200 <= resp.status < 300
        if not ok:
            # A stream refused before it began: an error body, shaped at its end.
            resp.headers.remove("content-length")
            resp.headers["content-type"] = "application/json"
            if f.messages is not None:
                from ferrogate.ai import anthropic_api

                resp.status = anthropic_api.anthropic_status(
                    503 if resp.status == 529 else resp.status
                )
            elif resp.status == 529:
                resp.status = 503
            return
        resp.headers.remove("content-length")
        if f.messages is not None:
            from ferrogate.ai import anthropic_api

            f.translator = adapter.chat_stream(dep.dep, f.body)
            f.messages = anthropic_api.MessageStream(f.alias)
            resp.headers["content-type"] = "text/event-stream"
        elif not adapter.passthrough:
            f.translator = adapter.chat_stream(dep.dep, f.body)
            resp.headers["content-type"] = "text/event-stream"
        if self.state.masks_responses:
            f.maskers = {}

    def on_response_body(self, req: Request, resp: Response, body: bytes) -> bytes | None:
        """A whole answer: usage read, translated when the provider is not OpenAI's kind,
        guardrails applied, shaped for the endpoint."""
        f: _Flight | None = req.ctx.get("ai")
        if f is None or f.cached or f.dep is None:
            return None
        return self._whole(f, resp, body)

    def on_response_chunk(
        self, req: Request, resp: Response, chunk: bytes, last: bool
    ) -> bytes | None:
        f: _Flight | None = req.ctx.get("ai")
        if f is None or f.cached or f.dep is None:
            return None
        if f.ttft is None and chunk:
            f.ttft = _now()
        if 200 <= f.status < 300:
            if f.messages is not None:
                return self._anthropic_stream(f, chunk, last)
            if f.translator is not None:
                return self._translate_stream(f, chunk, last)
            return self._pass_stream(f, chunk, last)
        # An error instead of a stream: collected, then shaped like a whole answer.
        f.answer.append(chunk)
        if not last:
            return b""
        return self._whole(f, resp, b"".join(f.answer), head_sent=True)

    def _whole(
        self, f: _Flight, resp: Response, body: bytes, head_sent: bool = False
    ) -> bytes | None:
        dep = f.dep
        assert dep is not None
        adapter = dep.get_adapter()
        status = f.status
        if self.endpoint == "embeddings":
            out = adapter.embeddings_response(dep.dep, status, body, f.body)
        else:
            out = adapter.chat_response(dep.dep, status, body, f.body)
        f.usage = out.usage
        status = out.status
        if out.usage is None and 200 <= status < 300:
            f.answer = [body]  # counted in the log phase
        doc: Any = out.body
        g = self.state.guardrails if self.endpoint != "embeddings" else None
        shaped = f.messages is not None or self.prompt is not None or g is not None
        if doc is None and (shaped or head_sent):
            try:
                doc = _decode(body)
            except msgspec.DecodeError:
                doc, status = error_body(502, "the provider's answer is not JSON"), 502
        if doc is None:
            # OpenAI's kind, unchanged.
            self._keep(f, status, body)
            return None
        ok = 200 <= status < 300 and isinstance(doc, dict) and "error" not in doc
        if ok and g is not None:
            reason = g.check_response(doc)
            if reason is not None:
                doc, status, ok = error_body(400, reason, code="content_blocked"), 400, False
            else:
                g.mask_response(doc)
        result: Any = doc
        if f.messages is not None:
            from ferrogate.ai import anthropic_api

            if ok:
                result = anthropic_api.to_message(doc, f.alias)
            else:
                result = anthropic_api.to_anthropic_error(status, doc)
                status = anthropic_api.anthropic_status(status)
        elif self.prompt is not None and ok:
            status, result = self.prompt.answer(doc)
        encoded = _encode(result)
        key = dep.dep.api_key
        if not ok and key and key.encode() in encoded:
            # Some providers quote the key they refused; the client never sees it.
            encoded = encoded.replace(key.encode(), b"***")
        if not head_sent:
            resp.status = status
            resp.headers["content-type"] = "application/json"
        self._keep(f, status, encoded)
        return encoded

    def _anthropic_stream(self, f: _Flight, chunk: bytes, last: bool) -> bytes:
        t = f.translator
        chunks = t.feed(chunk) if chunk else []
        if last:
            chunks += t.close()
        if f.maskers is not None:
            for c in chunks:
                self._mask_chunk(f, c)
        out = [f.messages.feed(c) for c in chunks]
        if last:
            out.append(f.messages.close())
            if t.usage is not None:
                f.usage = t.usage
        return b"".join(out)

    def _keep(self, f: _Flight, status: int, answer: bytes) -> None:
        # Stored as soon as the answer is whole: the log phase comes too late for a
        # request right behind this one.
        cache = self.state.cache
        if cache is not None and f.cache_key is not None and status == 200:
            cache.put(f.cache_key, answer)

    def _pass_stream(self, f: _Flight, chunk: bytes, last: bool) -> bytes | None:
        """An OpenAI stream: events pass as they complete; the usage chunk is read, and
        dropped again when the client did not ask for it."""
        data = f.pending + chunk if f.pending else chunk
        cut = data.rfind(b"\n\n")
        if cut < 0 and not last:
            f.pending = data
            return b""
        done, f.pending = (data, b"") if last else (data[: cut + 2], data[cut + 2 :])
        if f.dep is not None and f.dep.dep.provider != "openai":
            # Compatible servers may not report usage: keep the text to count it then.
            if f.texts is None:
                f.texts = []
            f.texts.append(done)
        if f.maskers is not None:
            done = self._mask_events(f, done)
        if b'"usage":{' not in done and b'"usage": {' not in done:
            return None if done is chunk else done
        out: list[bytes] = []
        for event in done.split(b"\n\n"):
            if b'"usage":{' in event or b'"usage": {' in event:
                payload = event.partition(b"data:")[2].strip()
                u = usage_of(payload)
                if u is not None:
                    f.usage = u
                if not f.include_usage and b'"choices":[]' in event.replace(b" ", b""):
                    continue
            out.append(event)
        return b"\n\n".join(out)

    def _mask_events(self, f: _Flight, done: bytes) -> bytes:
        out: list[bytes] = []
        for event in done.split(b"\n\n"):
            head, sep, payload = event.partition(b"data:")
            payload = payload.strip()
            if sep and payload and payload != b"[DONE]":
                try:
                    c = _decode(payload)
                except msgspec.DecodeError:
                    c = None
                if isinstance(c, dict):
                    self._mask_chunk(f, c)
                    event = head + b"data: " + _encode(c)
            out.append(event)
        return b"\n\n".join(out)

    def _mask_chunk(self, f: _Flight, c: dict[str, Any]) -> None:
        """PII in a streamed answer, masked across delta boundaries (the masker holds a
        bounded tail back; it comes out with the choice's last chunk)."""
        maskers = f.maskers
        if maskers is None:
            return
        for choice in c.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            i = choice.get("index", 0)
            m = maskers.get(i)
            if m is None:
                m = maskers[i] = self.state.guardrails.stream_masker()
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice["delta"] = {}
            text = delta.get("content")
            if isinstance(text, str) and text:
                delta["content"] = m.feed(text)
            if choice.get("finish_reason") is not None:
                rest = m.flush()
                if rest:
                    delta["content"] = (delta.get("content") or "") + rest

    def _translate_stream(self, f: _Flight, chunk: bytes, last: bool) -> bytes:
        t = f.translator
        chunks = t.feed(chunk) if chunk else []
        if last:
            chunks += t.close()
        out: list[bytes] = []
        for c in chunks:
            if not f.include_usage and c.get("usage") and not c.get("choices"):
                continue
            if f.maskers is not None:
                self._mask_chunk(f, c)
            out.append(b"data: " + _encode(c) + b"\n\n")
        if last:
            out.append(b"data: [DONE]\n\n")
            if t.usage is not None:
                f.usage = t.usage
        return b"".join(out)

    # --- the books ------------------------------------------------------------------

    def on_log(self, req: Request, resp: Response, info: Any) -> None:
        f: _Flight | None = req.ctx.get("ai")
        if f is None:
            return
        usage = f.usage
        if usage is None and not f.cached:
            usage = self._estimate(f)
        prompt = usage.prompt_tokens if usage else 0
        completion = usage.completion_tokens if usage else 0
        cost = 0
        dep = f.dep
        if dep is not None and not f.cached:
            cost = int(prompt * dep.price_in + completion * dep.price_out + 0.5)
        self._settle(f, prompt + completion, cost)
        if self.state.recorder is not None:
            self._record(req, f, info, usage, cost)

    def _estimate(self, f: _Flight) -> Usage | None:
        if f.dep is None or not (200 <= f.status < 300):
            return None
        completion = 0
        if f.texts:
            from ferrogate.ai.adapters.sse import SseParser

            text: list[str] = []
            for ev in SseParser().feed(b"".join(f.texts) + b"\n\n"):
                try:
                    c = _decode(ev.data)
                except msgspec.DecodeError:
                    continue
                for choice in (c.get("choices") or []) if isinstance(c, dict) else []:
                    content = (choice.get("delta") or {}).get("content")
                    if isinstance(content, str):
                        text.append(content)
            completion = count_text("".join(text))
        elif f.answer and not f.stream:
            completion = fast.completion_tokens(f.answer[0])
        return Usage(prompt_tokens=_count_prompt(f), completion_tokens=completion, estimated=True)

    def _settle(self, f: _Flight, tokens: int, cost: int) -> None:
        for key, rate, burst, charged in f.limits:
            if tokens != charged:
                _core.rate_adjust(key, rate, burst, tokens - charged)
        f.limits = []
        if f.reserved:
            for key, window in f.budgets:
                _core.budget_adjust(key, window, cost - f.reserved)
            f.reserved = 0

    def _record(self, req: Request, f: _Flight, info: Any, usage: Usage | None, cost: int) -> None:
        dep = f.dep
        skipped = getattr(req.response, "skipped", None) or ()
        rec = UsageRecord(
            time=time.time() - (_now() - f.started),
            request_id=req.request_id,
            route=req.route,
            consumer=f.consumer,
            model=f.alias,
            deployment=dep.dep.name if dep else "",
            provider=dep.dep.provider if dep else "",
            provider_model=dep.dep.model if dep else "",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            estimated=bool(usage.estimated) if usage else False,
            cost_usd=cost / 1e6,
            latency_ms=(_now() - f.started) * 1000.0,
            ttft_ms=None if f.ttft is None or not f.stream else (f.ttft - f.started) * 1000.0,
            status=info.status,
            stream=f.stream,
            cached=f.cached,
            fallbacks=len(skipped),
        )
        self.state.recorder.record(rec)


def _seconds_to_next(period: str) -> int:
    now = time.time()
    if period == "day":
        return int(86400 - now % 86400) + 1
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    import calendar

    return int(calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0)) - now) + 1
