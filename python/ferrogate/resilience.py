"""Upstream resilience settings: health checks, circuit breakers, retries, route timeouts and
fallbacks. The user-facing schema (msgspec Structs, used by ``ferrogate.config``) and their
normalization into what ``rust/engine/src/config.rs`` reads.

Status code lists accept numbers (``503``), classes (``"5xx"``) and ranges (``"500-504"``);
they are normalized to inclusive ``[low, high]`` pairs.
"""

import re
from collections.abc import Callable, Collection
from typing import Annotated, Any, Literal, Protocol

import msgspec
from msgspec import Meta

from ferrogate.problems import DataPath
from ferrogate.structcheck import did_you_mean
from ferrogate.units import Duration, Size

__all__ = [
    "ActiveHealthCheck",
    "CircuitBreaker",
    "Fallback",
    "HealthChecks",
    "PassiveHealthCheck",
    "Retries",
    "RetryBudget",
    "RetryPolicy",
    "RouteTimeouts",
    "route_settings",
    "upstream_settings",
]

STATUS_PATTERN = r"^\s*([1-5]xx|[1-5][0-9][0-9]\s*-\s*[1-5][0-9][0-9])\s*$"
_STATUS = re.compile(STATUS_PATTERN)
StatusCodes = Annotated[
    list[
        Annotated[int, Meta(ge=100, le=599)]
        | Annotated[str, Meta(extra_json_schema={"pattern": STATUS_PATTERN})]
    ],
    Meta(description='HTTP statuses: 503, "5xx" or "500-504".'),
]
IDEMPOTENT_METHODS = ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"]
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class ActiveHealthCheck(_Section, kw_only=True, frozen=True):
    """An HTTP GET sent to every target on a schedule, once per node (not per worker)."""

    path: Annotated[str, Meta(description="The path probed, e.g. /healthz.")] = "/"
    host: Annotated[
        str | None, Meta(description="The probe's Host header; default: the target's host:port.")
    ] = None
    interval: Annotated[Duration, Meta(description="Time between two probes of a target.")] = 5.0
    timeout: Annotated[
        Duration, Meta(description="A probe without a response head within this fails.")
    ] = 2.0
    healthy_threshold: Annotated[
        int, Meta(ge=1, description="Successes in a row that bring a down target back.")
    ] = 2
    unhealthy_threshold: Annotated[
        int, Meta(ge=1, description="Failures in a row that take a target out of rotation.")
    ] = 3
    expected_statuses: Annotated[
        StatusCodes, Meta(description="Statuses that count as healthy.")
    ] = msgspec.field(default_factory=lambda: ["2xx", "3xx"])


class PassiveHealthCheck(_Section, kw_only=True, frozen=True):
    """Real traffic marks a target down after consecutive failures (per worker)."""

    enabled: Annotated[bool, Meta(description="false turns passive checks off.")] = True
    failures: Annotated[
        int,
        Meta(
            ge=1,
            description="Consecutive failures (connect errors, timeouts, broken connections, "
            "`statuses`) that take a target out.",
        ),
    ] = 3
    down_for: Annotated[
        Duration,
        Meta(description="How long it stays out; then one failure is enough to take it out again."),
    ] = 10.0
    statuses: Annotated[
        StatusCodes, Meta(description="Response statuses that count as failures.")
    ] = []


class HealthChecks(_Section, kw_only=True, frozen=True):
    """How the gateway finds out that a target is down."""

    active: Annotated[
        ActiveHealthCheck | None, Meta(description="Probes; off unless configured.")
    ] = None
    passive: Annotated[
        PassiveHealthCheck, Meta(description="Failures of real traffic; on by default.")
    ] = msgspec.field(default_factory=PassiveHealthCheck)


class CircuitBreaker(_Section, kw_only=True, frozen=True):
    """A breaker per target (and worker): closed, open, half-open."""

    failure_ratio: Annotated[
        float,
        Meta(gt=0, le=1, description="Opens when failures / requests in `window` reach this."),
    ] = 0.5
    min_requests: Annotated[
        int, Meta(ge=1, description="...provided `window` holds at least this many requests.")
    ] = 20
    window: Annotated[Duration, Meta(description="The rolling window the ratio is taken over.")] = (
        10.0
    )
    open_for: Annotated[
        Duration, Meta(description="How long an open breaker refuses requests.")
    ] = 30.0
    half_open_requests: Annotated[
        int,
        Meta(
            ge=1,
            description="Then this many probe requests go through; all succeed: closed, "
            "one fails: open again.",
        ),
    ] = 3
    statuses: Annotated[
        StatusCodes,
        Meta(description="Response statuses that count as failures (errors always do)."),
    ] = msgspec.field(default_factory=lambda: [500, 502, 503, 504])


class RetryBudget(_Section, kw_only=True, frozen=True):
    """Retries may add at most `ratio` to the requests of the last `window`, plus a reserve."""

    ratio: Annotated[float, Meta(ge=0, description="0.2: at most 20% more requests.")] = 0.2
    window: Annotated[Duration, Meta(description="The requests counted are this recent.")] = 10.0
    min_per_second: Annotated[
        float, Meta(ge=0, description="Retries always allowed per second (per worker).")
    ] = 3.0


class RetryPolicy(_Section, kw_only=True, frozen=True):
    """When a failed attempt is tried again, on another target when there is one."""

    count: Annotated[
        int, Meta(ge=0, le=10, description="Retries after the first attempt; 0 = none.")
    ] = 1
    on: Annotated[
        list[Literal["connect", "reset", "timeout"]],
        Meta(
            description="connect: the connection failed (nothing was sent; any method) | "
            "reset: closed before any response byte | timeout: read or write timeout."
        ),
    ] = msgspec.field(default_factory=lambda: ["connect", "reset"])
    statuses: Annotated[StatusCodes, Meta(description="Upstream statuses retried.")] = []
    methods: Annotated[
        list[str],
        Meta(description="Methods retried once the request may have reached the upstream."),
    ] = msgspec.field(default_factory=lambda: list(IDEMPOTENT_METHODS))
    backoff: Annotated[
        Duration,
        Meta(description="Base wait before a retry; doubles each retry; random in [0, wait]."),
    ] = 0.025
    backoff_max: Annotated[Duration, Meta(description="The most a wait can grow to.")] = 0.25
    body_buffer: Annotated[
        Size,
        Meta(
            description="Request bodies up to this size are kept so that a retry can send them "
            "again; a larger one is never retried once it started to go out."
        ),
    ] = 64 * 1024


class Retries(RetryPolicy, kw_only=True, frozen=True):
    """An upstream's retry policy, and the budget that caps its retries."""

    budget: Annotated[
        RetryBudget | None, Meta(description="The cap on retries; null = no cap (not advised).")
    ] = msgspec.field(default_factory=RetryBudget)


class Fallback(_Section, kw_only=True, frozen=True):
    """What a request gets when no target can take it: another upstream, or a response."""

    upstream: Annotated[
        str | None, Meta(description="Another upstream (its own fallback is not followed).")
    ] = None
    status: Annotated[
        Annotated[int, Meta(ge=100, le=599)] | None,
        Meta(description="The static response's status; default 503."),
    ] = None
    headers: Annotated[dict[str, str], Meta(description="The static response's headers.")] = {}
    body: Annotated[str, Meta(description="The static response's body.")] = ""


class RouteTimeouts(_Section, kw_only=True, frozen=True):
    """A route's own timeouts; an absent one is the upstream's."""

    connect: Annotated[Duration | None, Meta(description="TCP connect to a target.")] = None
    read: Annotated[
        Duration | None,
        Meta(description="Waiting for the response headers, then for each read of the body."),
    ] = None
    write: Annotated[
        Duration | None, Meta(description="Each wait for the upstream to take more of the request.")
    ] = None
    total: Annotated[
        Duration | None,
        Meta(description="The whole exchange up to the response headers, retries included."),
    ] = None


# --- normalization ------------------------------------------------------------------------


class Checks(Protocol):
    """What the config normalizer offers: problem reporting and unit parsing."""

    report: Callable[[DataPath, str], None]

    def duration(self, value: float | str, path: DataPath) -> float: ...

    def size(self, value: int | str, path: DataPath) -> int: ...


class _HasResilience(Protocol):
    @property
    def health(self) -> HealthChecks: ...
    @property
    def breaker(self) -> CircuitBreaker | None: ...
    @property
    def retries(self) -> Retries: ...
    @property
    def fallback(self) -> Fallback | None: ...


def statuses(n: Checks, codes: list[int | str], at: DataPath) -> list[list[int]]:
    """Status codes as sorted, inclusive ``[low, high]`` ranges."""
    ranges = []
    for i, code in enumerate(codes):
        if isinstance(code, int):
            ranges.append([code, code])
            continue
        match = _STATUS.match(code)
        if match is None:
            n.report((*at, i), f'invalid status {code!r}: use 503, "5xx" or "500-504"')
            continue
        text = match.group(1).replace(" ", "")
        if text.endswith("xx"):
            low = int(text[0]) * 100
            ranges.append([low, low + 99])
            continue
        low, high = (int(part) for part in text.split("-"))
        if low > high:
            n.report((*at, i), f"invalid status range {code!r}: {low} is above {high}")
            continue
        ranges.append([low, high])
    return sorted(ranges)


def _positive(n: Checks, value: float | str, at: DataPath, what: str) -> float:
    seconds = n.duration(value, at)
    if seconds <= 0:
        n.report(at, f"{what} must be longer than zero")
    return seconds


def health(n: Checks, h: HealthChecks, at: DataPath) -> dict[str, Any]:
    active = None
    if h.active is not None:
        a, where = h.active, (*at, "active")
        if not a.path.startswith("/"):
            n.report((*where, "path"), f"the probe path must start with '/', got {a.path!r}")
        if a.host is not None and not a.host.strip():
            n.report((*where, "host"), "the Host header cannot be empty")
        active = {
            "path": a.path,
            "host": a.host,
            "interval": _positive(n, a.interval, (*where, "interval"), "the interval"),
            "timeout": _positive(n, a.timeout, (*where, "timeout"), "the timeout"),
            "healthy_threshold": a.healthy_threshold,
            "unhealthy_threshold": a.unhealthy_threshold,
            "statuses": statuses(n, a.expected_statuses, (*where, "expected_statuses")),
        }
    passive = None
    p, where = h.passive, (*at, "passive")
    if p.enabled:
        passive = {
            "failures": p.failures,
            "down_for": _positive(n, p.down_for, (*where, "down_for"), "down_for"),
            "statuses": statuses(n, p.statuses, (*where, "statuses")),
        }
    return {"active": active, "passive": passive}


def breaker(n: Checks, b: CircuitBreaker | None, at: DataPath) -> dict[str, Any] | None:
    if b is None:
        return None
    return {
        "failure_ratio": b.failure_ratio,
        "min_requests": b.min_requests,
        "window": _positive(n, b.window, (*at, "window"), "the window"),
        "open_for": n.duration(b.open_for, (*at, "open_for")),
        "half_open_requests": b.half_open_requests,
        "statuses": statuses(n, b.statuses, (*at, "statuses")),
    }


def retry_policy(n: Checks, r: RetryPolicy, at: DataPath) -> dict[str, Any]:
    methods = []
    for j, method in enumerate(r.methods):
        upper = method.upper()
        if upper not in _METHODS:
            hint = did_you_mean(upper, _METHODS)
            n.report((*at, "methods", j), f"unknown HTTP method '{method}'{hint}")
        methods.append(upper)
    backoff = n.duration(r.backoff, (*at, "backoff"))
    backoff_max = n.duration(r.backoff_max, (*at, "backoff_max"))
    if backoff_max < backoff:
        n.report((*at, "backoff_max"), f"backoff_max is below backoff ({backoff}s)")
    return {
        "count": r.count,
        "on": sorted(set(r.on)),
        "statuses": statuses(n, r.statuses, (*at, "statuses")),
        "methods": methods,
        "backoff": backoff,
        "backoff_max": backoff_max,
        "body_buffer": n.size(r.body_buffer, (*at, "body_buffer")),
    }


def retry_budget(n: Checks, b: RetryBudget | None, at: DataPath) -> dict[str, Any] | None:
    if b is None:
        return None
    return {
        "ratio": b.ratio,
        "window": _positive(n, b.window, (*at, "window"), "the window"),
        "min_per_second": b.min_per_second,
    }


def fallback(
    n: Checks, f: Fallback | None, at: DataPath, own: str, upstreams: Collection[str]
) -> dict[str, Any] | None:
    if f is None:
        return None
    if f.upstream is not None:
        if f.status is not None or f.headers or f.body:
            n.report(at, "give either 'upstream' or a static response (status, headers, body)")
        if f.upstream == own:
            n.report((*at, "upstream"), "an upstream cannot fall back to itself")
        elif f.upstream not in upstreams:
            hint = did_you_mean(f.upstream, upstreams)
            n.report((*at, "upstream"), f"unknown upstream '{f.upstream}'{hint}")
    for name, value in f.headers.items():
        if not _TOKEN.fullmatch(name):
            n.report((*at, "headers", name), f"invalid header name {name!r}")
        elif any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value):
            n.report((*at, "headers", name), "a header value cannot hold control characters")
    return {
        "upstream": f.upstream,
        "status": 503 if f.status is None else f.status,
        "headers": sorted(f.headers.items()),
        "body": f.body,
    }


def upstream_settings(
    n: Checks, upstream: _HasResilience, at: DataPath, upstreams: Collection[str]
) -> dict[str, Any]:
    """The health, breaker, retries and fallback of an upstream, normalized."""
    own = str(at[-1])
    return {
        "health": health(n, upstream.health, (*at, "health")),
        "breaker": breaker(n, upstream.breaker, (*at, "breaker")),
        "retries": retry_policy(n, upstream.retries, (*at, "retries")),
        "retry_budget": retry_budget(n, upstream.retries.budget, (*at, "retries", "budget")),
        "fallback": fallback(n, upstream.fallback, (*at, "fallback"), own, upstreams),
    }


class _Defaults(msgspec.Struct, frozen=True):
    health: HealthChecks = msgspec.field(default_factory=HealthChecks)
    breaker: CircuitBreaker | None = None
    retries: Retries = msgspec.field(default_factory=Retries)
    fallback: Fallback | None = None


def default_upstream_settings(n: Checks, at: DataPath) -> dict[str, Any]:
    """The settings of an upstream that sets none (one made from a route's URL)."""
    return upstream_settings(n, _Defaults(), at, ())


def route_settings(
    n: Checks, timeouts: RouteTimeouts | None, retries: RetryPolicy | None, at: DataPath
) -> dict[str, Any]:
    """A route's overrides of its upstream's timeouts and retry policy."""
    out_timeouts = None
    if timeouts is not None:
        out_timeouts = {}
        for key in ("connect", "read", "write", "total"):
            value = getattr(timeouts, key)
            seconds = None if value is None else n.duration(value, (*at, "timeouts", key))
            if key in ("connect", "read") and seconds == 0:
                n.report((*at, "timeouts", key), f"the {key} timeout must be longer than zero")
            out_timeouts[key] = seconds
    return {
        "timeouts": out_timeouts,
        "retries": None if retries is None else retry_policy(n, retries, (*at, "retries")),
    }
