"""``cache:`` on a route (what is cached and under which key) and at the top level (the
store). The data plane follows RFC 9111 (rust/engine/src/cache.rs); see docs/config.md.
"""

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ferrogate.problems import DataPath
from ferrogate.units import Duration, Size, parse_duration, parse_size

__all__ = [
    "CacheKey",
    "CacheRedis",
    "CacheStore",
    "RouteCache",
    "normalize_cache",
    "normalize_route_cache",
]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class CacheKey(_Section, kw_only=True, frozen=True):
    """What tells cached responses apart, besides the route, method and path."""

    query: Annotated[
        Literal["all", "none"] | list[str],
        Meta(description='"all" (the whole query), "none", or these parameters only.'),
    ] = "all"
    headers: Annotated[
        list[str], Meta(description="Request headers whose values are part of the key.")
    ] = []
    consumer: Annotated[
        bool,
        Meta(
            description="The consumer an authentication plugin identified is part of the key "
            "(default): one consumer's answers never reach another. false shares them."
        ),
    ] = True


class RouteCache(_Section, kw_only=True, frozen=True):
    """Responses of this route are cached as HTTP caching (RFC 9111) allows."""

    methods: Annotated[
        list[Literal["GET", "HEAD"]], Meta(description="Methods whose responses are cached.")
    ] = msgspec.field(default_factory=lambda: ["GET", "HEAD"])
    key: Annotated[CacheKey, Meta(description="The cache key.")] = msgspec.field(
        default_factory=CacheKey
    )
    max_body: Annotated[
        Size,
        Meta(description="Larger responses (and ones without Content-Length) are not stored."),
    ] = "1MiB"
    default_ttl: Annotated[
        Duration | None,
        Meta(
            description="Freshness of responses that give none (no max-age, s-maxage or "
            "Expires); unset: those are stored only with a validator, and always revalidated."
        ),
    ] = None
    store_set_cookie: Annotated[
        bool, Meta(description="Also store responses that set cookies.")
    ] = False
    coalesce_timeout: Annotated[
        Duration,
        Meta(
            description="How long a request for a key being fetched waits for that answer "
            "before going upstream itself."
        ),
    ] = 5.0


class CacheRedis(_Section, kw_only=True, frozen=True):
    """A Redis server holding the cached responses of every worker and node using it."""

    url: Annotated[str, Meta(description="redis://[:password@]host:port/db")]
    timeout: Annotated[
        Duration,
        Meta(description="A slower Redis call counts as failed: a miss, or nothing stored."),
    ] = "100ms"


class CacheStore(_Section, kw_only=True, frozen=True):
    """Where cached responses are kept."""

    memory: Annotated[
        Size,
        Meta(
            description="Bytes of cached responses each worker keeps (least recently used "
            "go first); workers do not share their stores."
        ),
    ] = "64MiB"
    redis: Annotated[
        CacheRedis | None,
        Meta(description="Keep responses in Redis instead, shared across workers and nodes."),
    ] = None


def normalize_route_cache(
    cache: RouteCache | None, at: DataPath, report: Callable[[DataPath, str], None]
) -> dict[str, Any] | None:
    if cache is None:
        return None
    for j, name in enumerate(cache.key.headers):
        if not _TOKEN.fullmatch(name):
            report((*at, "key", "headers", j), f"invalid header name {name!r}")
    query: bool | list[str] = (
        cache.key.query == "all" if isinstance(cache.key.query, str) else list(cache.key.query)
    )
    try:
        max_body = parse_size(cache.max_body)
    except ValueError as e:
        report((*at, "max_body"), str(e))
        max_body = 0
    durations: dict[str, float | None] = {}
    for name in ("default_ttl", "coalesce_timeout"):
        value = getattr(cache, name)
        try:
            durations[name] = None if value is None else parse_duration(value)
        except ValueError as e:
            report((*at, name), str(e))
            durations[name] = 0.0
    return {
        "methods": list(dict.fromkeys(cache.methods)),
        "key": {
            "query": query,
            "headers": [h.lower() for h in cache.key.headers],
            "consumer": cache.key.consumer,
        },
        "max_body": max_body,
        "store_set_cookie": cache.store_set_cookie,
        **durations,
    }


def normalize_cache(store: CacheStore, report: Callable[[DataPath, str], None]) -> dict[str, Any]:
    try:
        memory = parse_size(store.memory)
    except ValueError as e:
        report(("cache", "memory"), str(e))
        memory = 0
    redis = None
    if store.redis is not None:
        at: DataPath = ("cache", "redis")
        if not re.match(r"^rediss?://", store.redis.url):
            report((*at, "url"), "expected redis://[:password@]host:port/db")
        try:
            timeout = parse_duration(store.redis.timeout)
        except ValueError as e:
            report((*at, "timeout"), str(e))
            timeout = 0.1
        redis = {"url": store.redis.url, "timeout": timeout}
    return {"memory": memory, "redis": redis}
