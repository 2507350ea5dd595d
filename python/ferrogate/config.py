"""The gateway config: the user-facing schema, loading with located problems, normalization.

``load_config`` reports every problem of a file at once, each with its line and column:
syntax, unknown keys, missing fields and wrong types (``structcheck``), cross-field rules
(this module), and finally whatever the data plane's own compiler (``_core.check_config``)
rejects. What it returns carries the *normalized* JSON the Rust workers read.
"""

import datetime
import ipaddress
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ferrogate.addresses import (
    join_host_port,
    looks_like_url,
    parse_upstream_url,
    speaks_http2,
    split_host_port,
)
from ferrogate.admin_config import Admin, normalize_admin
from ferrogate.ai.config import AiSettings, compile_ai
from ferrogate.api_versions import compile_apis
from ferrogate.api_versions import uses_plugins as apis_use_plugins
from ferrogate.cache_config import CacheStore, RouteCache, normalize_cache, normalize_route_cache
from ferrogate.certificates import Certificate, normalize_certificates
from ferrogate.compression_config import (
    Compression,
    RouteCompressionSetting,
    check_compression,
    normalize_route_compression,
)
from ferrogate.consumers import ConsumerSpec as Consumer
from ferrogate.consumers import checking as consumers_checking
from ferrogate.consumers import duplicate_credentials, normalize_consumer
from ferrogate.ip_restriction import IpRestriction, normalize_ip_restriction
from ferrogate.observability import (
    AccessLog,
    Alerts,
    Analytics,
    Metrics,
    Status,
    Tracing,
    log_file_problem,
    observe_settings,
)
from ferrogate.plugin_config import Entry, chain_of, check_use, consumer_chains
from ferrogate.plugin_registry import Registry, discover
from ferrogate.problems import ConfigError, DataPath, Problem, format_path
from ferrogate.resilience import (
    CircuitBreaker,
    Fallback,
    HealthChecks,
    Retries,
    RetryPolicy,
    RouteTimeouts,
    default_upstream_settings,
    route_settings,
    upstream_settings,
)
from ferrogate.runtime_files import resolve_pid_file
from ferrogate.structcheck import check_struct, did_you_mean, salvage
from ferrogate.tls_config import Tls, normalize_tls
from ferrogate.units import (
    Duration,
    Size,
    parse_duration,
    parse_size,
)
from ferrogate.upstream_tls_config import (
    UpstreamTls,
    default_upstream_tls,
    normalize_upstream_tls,
)
from ferrogate.waf_config import RouteWafSetting, Waf, normalize_route_waf, normalize_waf
from ferrogate.yaml_source import parse_source

__all__ = [
    "Config",
    "ConfigError",
    "Consumer",
    "Echo",
    "Limits",
    "LoadedConfig",
    "MirrorTo",
    "Plan",
    "PluginUse",
    "Predicate",
    "Problem",
    "Quota",
    "RateLimit",
    "RateLimiting",
    "RedisStore",
    "Route",
    "Split",
    "SplitTarget",
    "Target",
    "Timeouts",
    "Upstream",
    "UpstreamTimeouts",
    "VersionRule",
    "config_schema",
    "load_config",
    "load_config_text",
    "normalize",
    "normalized_json",
]

Address = Annotated[str, Meta(description="host:port; IPv6 hosts in brackets: [::1]:8080.")]

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
HASH_ON_PATTERN = r"^(ip|header:.+|cookie:.+)$"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
GENERATED_UPSTREAM_PREFIX = "route:"


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class Limits(_Section, kw_only=True, frozen=True):
    """Request size and connection limits."""

    max_header_bytes: Annotated[
        Size, Meta(description="Request line plus headers above this get 431 headers_too_large.")
    ] = 16 * 1024
    max_body_bytes: Annotated[
        Size, Meta(description="Request bodies above this get 413 body_too_large; 0 = unlimited.")
    ] = 0
    max_headers: Annotated[
        int,
        Meta(ge=1, le=10000, description="Requests with more header fields get 431."),
    ] = 100
    max_url_bytes: Annotated[
        Size,
        Meta(description="A longer request target (path and query) gets 414; 0 = unlimited."),
    ] = 8 * 1024
    max_connections_per_ip: Annotated[
        int,
        Meta(
            ge=0,
            description="Open connections one client address may hold, per worker (trusted "
            "proxies are exempt); more are closed at once; 0 = unlimited.",
        ),
    ] = 0


class Timeouts(_Section, kw_only=True, frozen=True):
    """Timeouts; `connect` and `read` are the defaults of upstreams that do not set them."""

    connect: Annotated[
        Duration, Meta(description="TCP connect to a target; failure gives 502.")
    ] = 5.0
    read: Annotated[
        Duration,
        Meta(
            description="Waiting for an upstream's response headers (expiry gives 504), then "
            "for each read of its body."
        ),
    ] = 60.0
    write: Annotated[
        Duration,
        Meta(description="Each wait for an upstream to take more of the request; 0 = no limit."),
    ] = 60.0
    total: Annotated[
        Duration,
        Meta(
            description="The whole exchange up to the response headers, retries and backoff "
            "included; expiry gives 504; 0 = no limit."
        ),
    ] = 0.0
    client_idle: Annotated[
        Duration,
        Meta(
            description="Idle keep-alive client connections (on HTTP/2: with no stream open) "
            "are closed after this."
        ),
    ] = 60.0
    client_header: Annotated[
        Duration,
        Meta(
            description="A request head must arrive whole within this of its first byte (of "
            "the connection's opening, for the first request); else the connection is "
            "closed; 0 = no limit."
        ),
    ] = 10.0
    client_body: Annotated[
        Duration,
        Meta(
            description="The longest wait for more of a request body; the connection is "
            "closed after it; 0 = no limit."
        ),
    ] = 60.0


class UpstreamTimeouts(_Section, kw_only=True, frozen=True):
    """Per-upstream timeouts; an absent one falls back to the global `timeouts`."""

    connect: Annotated[Duration | None, Meta(description="TCP connect to a target.")] = None
    read: Annotated[Duration | None, Meta(description="Waiting for the response headers.")] = None
    write: Annotated[
        Duration | None, Meta(description="Each wait for the upstream to take more of the request.")
    ] = None
    total: Annotated[
        Duration | None, Meta(description="The whole exchange up to the response headers.")
    ] = None


class Echo(_Section, kw_only=True, frozen=True):
    """The built-in echo upstream the master starts (handy for trying routes)."""

    listen: Annotated[Address, Meta(description="Where the echo upstream listens.")]


class Target(_Section, kw_only=True, frozen=True):
    """One upstream target with a weight."""

    address: Annotated[Address, Meta(description="host:port of the target.")]
    weight: Annotated[
        int, Meta(ge=1, description="Relative share of requests (weighted round robin).")
    ] = 1


class AdaptiveConcurrency(_Section, kw_only=True, frozen=True):
    """How many requests each worker may have in flight to an upstream, found from its
    latency: the limit grows while latency stays near its recent best and shrinks by a
    tenth when it rises past `tolerance` times that."""

    min: Annotated[int, Meta(ge=1, description="The limit never goes below this.")] = 4
    max: Annotated[int, Meta(ge=1, description="The limit never goes above this.")] = 1000
    initial: Annotated[int, Meta(ge=1, description="The limit to start from.")] = 100
    tolerance: Annotated[
        float, Meta(ge=1, description="Latency above tolerance x the recent best is a slowdown.")
    ] = 2.0


class Upstream(_Section, kw_only=True, frozen=True):
    """A named group of targets that routes forward to."""

    targets: Annotated[
        list[Address | Target],
        Meta(description='Targets: "host:port" or {address, weight}.'),
    ]
    balance: Annotated[
        Literal["round_robin", "least_conn", "hash"],
        Meta(description="round_robin (weighted, smooth) | least_conn | hash."),
    ] = "round_robin"
    hash_on: Annotated[
        Annotated[str, Meta(extra_json_schema={"pattern": HASH_ON_PATTERN})] | None,
        Meta(description='Only with balance: hash: "ip" | "header:NAME" | "cookie:NAME".'),
    ] = None
    keepalive: Annotated[
        int, Meta(ge=0, description="Idle pooled connections kept per target.")
    ] = 1024
    keepalive_timeout: Annotated[
        Duration, Meta(description="Idle pooled connections are closed after this.")
    ] = 60.0
    timeouts: Annotated[
        UpstreamTimeouts | None, Meta(description="Overrides the global timeouts.")
    ] = None
    health: Annotated[
        HealthChecks, Meta(description="Health checks of the targets (passive ones are on).")
    ] = msgspec.field(default_factory=HealthChecks)
    breaker: Annotated[
        CircuitBreaker | None, Meta(description="A circuit breaker per target; off by default.")
    ] = None
    retries: Annotated[
        Retries, Meta(description="Retries of failed attempts, and their budget.")
    ] = msgspec.field(default_factory=Retries)
    fallback: Annotated[
        Fallback | None,
        Meta(description="When no target can take a request: another upstream or a response."),
    ] = None
    adaptive_concurrency: Annotated[
        AdaptiveConcurrency | None,
        Meta(
            description="Limit requests in flight by the upstream's latency (AIMD); the "
            "excess is shed at once with 503 overloaded."
        ),
    ] = None
    tls: Annotated[
        UpstreamTls | None,
        Meta(description="TLS towards the targets (verified by default); plain HTTP if absent."),
    ] = None
    http2: Annotated[
        bool,
        Meta(
            description="The targets speak HTTP/2 (gRPC servers): h2c with prior knowledge, or "
            "h2 by ALPN with tls. A route's grpc:// or grpcs:// URL sets it."
        ),
    ] = False


class Predicate(_Section, kw_only=True, frozen=True):
    """A header or query parameter that must match: give exactly one of `value` or `regex`."""

    name: Annotated[str, Meta(description="Header name (case-insensitive) or query parameter.")]
    value: Annotated[str | None, Meta(description="Exact value.")] = None
    regex: Annotated[
        str | None, Meta(description="Regular expression (Rust regex syntax, unanchored).")
    ] = None


class PluginUse(_Section, kw_only=True, frozen=True):
    """A plugin on a route (or on every route, at the top level) with its settings."""

    name: Annotated[str, Meta(description="The plugin's name; `ferrogate plugins` lists them.")]
    config: Annotated[
        dict[str, Any], Meta(description="The plugin's settings (its own schema).")
    ] = {}
    enabled: Annotated[
        bool, Meta(description="false on a route turns off a top-level plugin of that name.")
    ] = True
    priority: Annotated[
        int | None, Meta(description="Overrides the plugin's priority; higher runs first.")
    ] = None
    timeout: Annotated[
        Duration, Meta(description="How long an async hook may take; expiry gives 500.")
    ] = 10.0
    budget: Annotated[
        Duration | None,
        Meta(
            description="Latency budget per hook call; exceeding it is logged (see on_over_budget)."
        ),
    ] = None
    on_over_budget: Annotated[
        Literal["log", "bypass", "fail"],
        Meta(
            description="log: only log | bypass: skip the plugin for bypass_for | "
            "fail: the request gets 500."
        ),
    ] = "log"
    bypass_for: Annotated[
        Duration, Meta(description="With on_over_budget: bypass, how long to skip the plugin.")
    ] = 30.0


class ConsumerWithPlugins(Consumer, kw_only=True, frozen=True):
    """Someone an authentication plugin recognizes, and the plugins run for them."""

    plugins: Annotated[
        list[PluginUse],
        Meta(
            description="Plugins run (on_request) for this consumer's requests, right after "
            "the route's authentication plugins; one named like a route plugin replaces it."
        ),
    ] = msgspec.field(default_factory=list)


LIMIT_KEY_PATTERN = r"^(ip|consumer|credential|route|header:.+)$"
LIMIT_KEY_SOURCES = ("ip", "consumer", "credential", "route", "header")
LimitKeyText = Annotated[str, Meta(extra_json_schema={"pattern": LIMIT_KEY_PATTERN})]


class RateLimit(_Section, kw_only=True, frozen=True):
    """`limit` requests per `per` for each key; the node's workers share the counters."""

    limit: Annotated[int, Meta(ge=1, description="Requests allowed per `per`.")]
    per: Annotated[Duration, Meta(description="The period: 1s, 1m, 1h, 1d.")]
    burst: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        Meta(description="Requests allowed at once; default: `limit`."),
    ] = None
    key: Annotated[
        LimitKeyText | list[LimitKeyText] | None,
        Meta(
            description='Who a bucket belongs to: "ip" (behind trusted_proxies: the client), '
            '"consumer", "credential", "route", "header:NAME", or a list of these combined. '
            "An absent consumer, credential or header counts against the client's address. "
            'Default: "ip" ("consumer" in a plan).'
        ),
    ] = None
    name: Annotated[str | None, Meta(description="Names the limit in errors and logs.")] = None
    scope: Annotated[
        Literal["node", "cluster"],
        Meta(
            description="node: the workers of this node share the count (exact, sliding); "
            "cluster: every node sharing rate_limiting.redis does (fixed windows of `per`, "
            "whole seconds)."
        ),
    ] = "node"


class Quota(_Section, kw_only=True, frozen=True):
    """At most `limit` requests per calendar day or month (UTC) for each consumer."""

    limit: Annotated[int, Meta(ge=1, description="Requests per period.")]
    per: Annotated[Literal["day", "month"], Meta(description="day | month, UTC.")]
    scope: Annotated[
        Literal["node", "cluster"],
        Meta(description="cluster: counted across nodes in rate_limiting.redis."),
    ] = "node"
    name: Annotated[str | None, Meta(description="Names the quota in errors and logs.")] = None


class Plan(_Section, kw_only=True, frozen=True):
    """What a consumer on this plan may do: rate limits (keyed by consumer) and quotas."""

    rate_limits: Annotated[list[RateLimit], Meta(description="Counted per consumer.")] = []
    quotas: Annotated[list[Quota], Meta(description="Per consumer, per day or month.")] = []


class RedisStore(_Section, kw_only=True, frozen=True):
    """The Redis server cluster-wide limits count in."""

    url: Annotated[str, Meta(description="redis://[:password@]host:port/db")]
    on_failure: Annotated[
        Literal["open", "closed"],
        Meta(description="Redis unreachable: open lets requests pass, closed answers 503."),
    ] = "open"
    timeout: Annotated[
        Duration, Meta(description="A Redis call taking longer counts as a failure.")
    ] = 0.25
    lease: Annotated[
        float,
        Meta(
            gt=0,
            le=1,
            description="Share of a limit a worker takes from Redis at a time: smaller is "
            "more exact, larger asks Redis less often.",
        ),
    ] = 0.01


class RateLimiting(_Section, kw_only=True, frozen=True):
    """The node-wide table the rate limits count in, and the store of cluster-wide ones."""

    slots: Annotated[
        int,
        Meta(
            ge=1024,
            description="Buckets the table holds (16 bytes each, shared by all workers); "
            "rounded up to a power of two; a change needs a restart.",
        ),
    ] = 1 << 18
    redis: Annotated[
        RedisStore | None, Meta(description="Needed by limits with scope: cluster.")
    ] = None


class VersionRule(_Section, kw_only=True, frozen=True):
    """Requests whose header (or cookie) has `value` go to `upstream`."""

    header: Annotated[str | None, Meta(description="A header name.")] = None
    cookie: Annotated[str | None, Meta(description="A cookie name.")] = None
    value: Annotated[str, Meta(description="The exact value that selects the upstream.")]
    upstream: Annotated[str, Meta(description="A named upstream.")]


class SplitTarget(_Section, kw_only=True, frozen=True):
    """One side of a weighted split."""

    upstream: Annotated[
        str | None, Meta(description="A named upstream; absent: the route's own `upstream`.")
    ] = None
    weight: Annotated[int, Meta(ge=0, description="Relative share of the requests.")]


class Split(_Section, kw_only=True, frozen=True):
    """A weighted split of a route's requests between upstreams (canary releases)."""

    targets: Annotated[list[SplitTarget], Meta(description="The upstreams and their weights.")]
    hash_on: Annotated[
        Annotated[str, Meta(extra_json_schema={"pattern": HASH_ON_PATTERN})] | None,
        Meta(
            description='Sticky: "ip", "header:NAME" or "cookie:NAME" keeps a client on one '
            "side; absent: random per request."
        ),
    ] = None


class MirrorTo(_Section, kw_only=True, frozen=True):
    """Shadow traffic: copies of a route's requests go to another upstream; its answers are
    dropped and never slow the client."""

    upstream: Annotated[str, Meta(description="A named upstream.")]
    percent: Annotated[float, Meta(ge=0, le=100, description="Share of the requests copied.")] = (
        100.0
    )
    max_body: Annotated[
        Size,
        Meta(description="Requests with larger or chunked bodies are not mirrored."),
    ] = 64 * 1024


class Route(_Section, kw_only=True, frozen=True):
    """Requests matching every given condition are forwarded to `upstream`."""

    name: Annotated[str | None, Meta(description='Unique name; defaults to "route-<index>".')] = (
        None
    )
    paths: Annotated[
        list[str],
        Meta(
            description="Radix-tree patterns: /a/{param} (one segment), /a/{*rest} "
            "(the rest, at least one character), /a/* (/a, /a/ and everything below)."
        ),
    ]
    hosts: Annotated[
        list[str],
        Meta(
            description='Exact ("api.example.com") or leading-wildcard ("*.example.com"); '
            "empty = any host."
        ),
    ] = []
    methods: Annotated[list[str], Meta(description="HTTP methods; empty = any method.")] = []
    headers: Annotated[list[Predicate], Meta(description="Headers that must all match.")] = []
    query: Annotated[
        list[Predicate], Meta(description="Decoded query parameters that must all match.")
    ] = []
    upstream: Annotated[
        str,
        Meta(
            description="An upstream name, or a URL: http://127.0.0.1:9000[/base/path] "
            "(https:// for TLS, verified against the system's roots)."
        ),
    ]
    strip_prefix: Annotated[
        bool, Meta(description='With a "/x/*" path: remove "/x" before forwarding.')
    ] = False
    rewrite: Annotated[
        str | None,
        Meta(
            description='Path template sent upstream, e.g. "/v2/users/{id}"; '
            "{name} are path parameters."
        ),
    ] = None
    preserve_host: Annotated[
        bool,
        Meta(description="Pass the client's Host; false: Host is the target's host:port."),
    ] = True
    priority: Annotated[
        int, Meta(description="Higher wins among routes on the same path pattern.")
    ] = 0
    plugins: Annotated[
        list[PluginUse],
        Meta(description="Plugins on this route, added to (or replacing) the top-level ones."),
    ] = []
    rate_limits: Annotated[
        list[RateLimit], Meta(description="Limits counted for this route alone.")
    ] = []
    versions: Annotated[
        list[VersionRule],
        Meta(description="Header/cookie values that pick another upstream (checked first)."),
    ] = []
    split: Annotated[
        Split | None, Meta(description="A weighted split between upstreams (canary).")
    ] = None
    mirror: Annotated[
        MirrorTo | None, Meta(description="Copy requests to another upstream (shadow).")
    ] = None
    timeouts: Annotated[
        RouteTimeouts | None, Meta(description="Overrides the upstream's timeouts.")
    ] = None
    retries: Annotated[
        RetryPolicy | None,
        Meta(description="Replaces the upstream's retry policy (its budget stays the upstream's)."),
    ] = None
    ip_restriction: Annotated[
        IpRestriction | None,
        Meta(description="Client addresses let in or kept out here (the global list applies too)."),
    ] = None
    client_cert: Annotated[
        Literal["required"] | None,
        Meta(
            description="required: only clients with a verified certificate (see "
            "`tls.client_auth`) get through; others get 403."
        ),
    ] = None
    waf: RouteWafSetting = None
    compression: RouteCompressionSetting = None
    websocket: Annotated[
        bool,
        Meta(
            description="Pass WebSocket handshakes (HTTP/1.1 Upgrade, HTTP/2 extended CONNECT) "
            "to the upstream and splice the connections; off: Upgrade is removed."
        ),
    ] = False
    websocket_idle: Annotated[
        Duration,
        Meta(description="A WebSocket session silent both ways this long is closed; 0 = no limit."),
    ] = 60.0
    sse_heartbeat: Annotated[
        Duration,
        Meta(
            description="On an event stream (text/event-stream) idle this long at an event "
            "boundary, send a ': ping' comment; 0 = never."
        ),
    ] = 0.0
    cache: Annotated[
        RouteCache | None, Meta(description="Cache this route's responses (RFC 9111); off.")
    ] = None


class ApiVersioning(_Section, kw_only=True, frozen=True):
    """Where a request names the version of an API it wants."""

    by: Annotated[
        Literal["path", "header", "query"],
        Meta(
            description="path: /<base_path>/<version>/... | header: a request header | "
            "query: a query parameter."
        ),
    ] = "path"
    name: Annotated[
        str | None,
        Meta(description='The header (default "Api-Version") or query parameter ("api-version").'),
    ] = None


class ApiVersion(_Section, kw_only=True, frozen=True):
    """One version of an API: its upstream and where it is in its lifecycle."""

    upstream: Annotated[
        str, Meta(description="An upstream name, or a URL: http://127.0.0.1:9000[/base/path].")
    ]
    state: Annotated[
        Literal["draft", "published", "deprecated", "retired"],
        Meta(
            description="draft: not routed | published | deprecated: served with Deprecation, "
            "Sunset and Link headers | retired: 410 version_retired, never forwarded."
        ),
    ] = "published"
    deprecation: Annotated[
        datetime.date | None,
        Meta(description="deprecated: the day (UTC) it was deprecated (the Deprecation header)."),
    ] = None
    sunset: Annotated[
        datetime.date | None,
        Meta(description="deprecated: the day (UTC) it stops being served (the Sunset header)."),
    ] = None
    successor: Annotated[
        str | None,
        Meta(description="The version that replaces this one (Link rel=successor-version)."),
    ] = None
    deprecation_link: Annotated[
        str | None,
        Meta(description="deprecated: a page about the deprecation (Link rel=deprecation)."),
    ] = None
    prefix: Annotated[
        str | None,
        Meta(description="Path versioning: its prefix instead of <base_path>/<name>."),
    ] = None


class ApiRoute(_Section, kw_only=True, frozen=True):
    """A route template: compiled once for every routed version of the API."""

    name: Annotated[
        str | None, Meta(description="Part of the compiled routes' names; default: its index.")
    ] = None
    paths: Annotated[
        list[str],
        Meta(description="Patterns below the version's prefix, as a route's paths: /items/{id}."),
    ]
    methods: Annotated[list[str], Meta(description="HTTP methods; empty = any method.")] = []
    headers: Annotated[list[Predicate], Meta(description="Headers that must all match.")] = []
    query: Annotated[
        list[Predicate], Meta(description="Decoded query parameters that must all match.")
    ] = []
    plugins: Annotated[
        list[PluginUse], Meta(description="Plugins on these routes (after the API's own).")
    ] = []
    priority: Annotated[
        int, Meta(description="Higher wins among routes on the same path pattern.")
    ] = 0


class Api(_Section, kw_only=True, frozen=True):
    """An API with versions, each routed to its own upstream (compiled into routes)."""

    versioning: Annotated[ApiVersioning, Meta(description="How a request names a version.")] = (
        msgspec.field(default_factory=ApiVersioning)
    )
    base_path: Annotated[
        str | None, Meta(description='Where the API\'s paths start; default "/<api name>".')
    ] = None
    default_version: Annotated[
        str | None,
        Meta(description="Header or query versioning: the version of requests that name none."),
    ] = None
    versions: Annotated[dict[str, ApiVersion], Meta(description="The versions by name.")]
    routes: Annotated[
        list[ApiRoute],
        Meta(description="Route templates for every version; default: one catch-all route."),
    ] = []
    hosts: Annotated[
        list[str], Meta(description="Hosts of every compiled route; empty = any host.")
    ] = []
    strip_prefix: Annotated[
        bool,
        Meta(
            description="The upstream gets the path below the version's prefix (path "
            "versioning) or below base_path; false: the path as the client sent it."
        ),
    ] = True
    preserve_host: Annotated[
        bool, Meta(description="Pass the client's Host; false: the target's host:port.")
    ] = True
    plugins: Annotated[list[PluginUse], Meta(description="Plugins on every route of the API.")] = []


class Config(_Section, kw_only=True, frozen=True):
    """A ferrogate gateway configuration."""

    listen: Annotated[
        list[Address],
        Meta(description="Addresses the proxy listens on (HTTP/1.1 and h2c on each)."),
    ]
    workers: Annotated[
        Annotated[int, Meta(ge=1)] | Literal["auto"],
        Meta(description="Worker processes; auto = number of CPUs. `run --workers N` overrides."),
    ] = "auto"
    grace_period: Annotated[
        Duration, Meta(description="On SIGTERM, in-flight requests get this long to finish.")
    ] = 30.0
    pid_file: Annotated[
        str | None,
        Meta(
            description="Default: <tmp>/ferrogate-<uid>/<hash of the config path>.pid; "
            "a relative path is relative to the config file."
        ),
    ] = None
    limits: Annotated[Limits, Meta(description="Request size limits.")] = msgspec.field(
        default_factory=Limits
    )
    timeouts: Annotated[Timeouts, Meta(description="Defaults for every upstream.")] = msgspec.field(
        default_factory=Timeouts
    )
    echo: Annotated[
        Echo | None, Meta(description="Optional built-in echo upstream started by the master.")
    ] = None
    tls: Annotated[
        Tls | None, Meta(description="HTTPS listeners and their certificates; none.")
    ] = None
    certificates: Annotated[
        dict[str, Certificate],
        Meta(description="Certificates by name, served by SNI on the HTTPS listeners."),
    ] = {}
    upstreams: Annotated[
        dict[str, Upstream], Meta(description="Named upstreams, referenced by routes.")
    ] = {}
    routes: Annotated[list[Route], Meta(description="The routing table.")] = []
    apis: Annotated[
        dict[str, Api],
        Meta(description="Versioned APIs by name, compiled into routes after `routes`."),
    ] = {}
    plugins: Annotated[
        list[PluginUse], Meta(description="Plugins on every route (a route may override one).")
    ] = []
    rate_limits: Annotated[
        list[RateLimit],
        Meta(description="Limits on every route, one bucket per key across all of them."),
    ] = []
    rate_limiting: Annotated[
        RateLimiting, Meta(description="The shared table of rate limit counters.")
    ] = msgspec.field(default_factory=RateLimiting)
    plans: Annotated[dict[str, Plan], Meta(description="Plans by name (tiered access).")] = {}
    consumers: Annotated[
        dict[str, ConsumerWithPlugins],
        Meta(description="Consumers by name, as authentication plugins set them."),
    ] = {}
    ip_restriction: Annotated[
        IpRestriction | None,
        Meta(description="Client addresses let in or kept out on every route; none."),
    ] = None
    waf: Annotated[
        Waf | None,
        Meta(description="Web application firewall (libmodsecurity + OWASP CRS); off."),
    ] = None
    compression: Annotated[
        Compression | None,
        Meta(description="Response compression (gzip, brotli, zstd) on every route; off."),
    ] = None
    trusted_proxies: Annotated[
        list[str],
        Meta(
            description="Addresses or CIDRs of proxies in front of the gateway: their "
            "X-Forwarded-For tells the client's address (for `ip` rate limit keys)."
        ),
    ] = []
    plugins_dir: Annotated[
        str | None,
        Meta(
            description="A directory of plugin files (*.py), relative to the config file; "
            "they are read again on reload."
        ),
    ] = None
    status: Annotated[
        Status | None,
        Meta(description="The status listener (metrics, analytics API, dashboard); off."),
    ] = None
    access_log: Annotated[
        AccessLog | None, Meta(description="JSON lines, one per request; off.")
    ] = None
    metrics: Annotated[
        Metrics, Meta(description="Prometheus metrics (collected when `status` is set).")
    ] = msgspec.field(default_factory=Metrics)
    tracing: Annotated[
        Tracing | None, Meta(description="W3C trace context and OTLP span export; off.")
    ] = None
    analytics: Annotated[
        Analytics | None, Meta(description="The embedded analytics store; off.")
    ] = None
    alerts: Annotated[
        Alerts | None, Meta(description="Anomaly alerts over the analytics; off.")
    ] = None
    cache: Annotated[
        CacheStore, Meta(description="The response cache's store (routes choose to cache).")
    ] = msgspec.field(default_factory=CacheStore)
    admin: Annotated[
        Admin | None, Meta(description="The admin REST API and its entity store; off.")
    ] = None
    ai: Annotated[
        AiSettings | None,
        Meta(description="The AI gateway (OpenAI-compatible endpoints over providers); off."),
    ] = None


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated config file together with its normalized form."""

    path: str
    """The file as the caller named it (problems are reported against this name)."""
    config: Config
    normalized: dict[str, Any]
    """What the Rust data plane reads: see ``normalize``."""
    json: str
    """``normalized`` serialized."""
    pid_file: Path
    """Where the master of this config keeps its pid (see ``runtime_files``)."""


# --- normalization ------------------------------------------------------------------------


class _Normalizer:
    """Turns checked Structs into the normalized dict, reporting cross-field problems."""

    def __init__(
        self, report: Callable[[DataPath, str], None], base_dir: Path | None = None
    ) -> None:
        self.report = report
        self.base_dir = base_dir if base_dir is not None else Path.cwd()
        # generated upstream name -> where the URL that created it is
        self.generated: dict[str, DataPath] = {}
        # index of a route compiled from `apis` -> where it and its path are in the file
        self.route_origins: dict[int, tuple[DataPath, DataPath]] = {}
        self.registry: Registry | None = None
        self.top_plugins: list[Entry | None] = []
        # names of the upstreams the config defines (fallbacks refer to them)
        self.upstream_names: tuple[str, ...] = ()
        self.redis: RedisStore | None = None
        self.waf: Waf | None = None
        self.compression: Compression | None = None

    def duration(self, value: float | str, path: DataPath) -> float:
        try:
            return parse_duration(value)
        except ValueError as e:
            self.report(path, str(e))
            return 0.0

    def size(self, value: int | str, path: DataPath) -> int:
        try:
            return parse_size(value)
        except ValueError as e:
            self.report(path, str(e))
            return 0

    def address(self, value: str, path: DataPath, *, listen: bool = False) -> str:
        try:
            host, port = split_host_port(value, allow_port_zero=listen)
        except ValueError as e:
            self.report(path, str(e))
            return value
        return join_host_port(host, port)

    def config(self, cfg: Config) -> dict[str, Any]:
        listen = [self.address(a, ("listen", i), listen=True) for i, a in enumerate(cfg.listen)]
        self.duplicates(listen, "listen", "listen address")
        if not cfg.listen:
            self.report(("listen",), "at least one listen address is needed")
        timeouts = {
            name: self.duration(getattr(cfg.timeouts, name), ("timeouts", name))
            for name in (
                "connect",
                "read",
                "write",
                "total",
                "client_idle",
                "client_header",
                "client_body",
            )
        }
        echo = None
        if cfg.echo is not None:
            echo = {"listen": self.address(cfg.echo.listen, ("echo", "listen"), listen=True)}
            if echo["listen"] in listen:
                self.report(("echo", "listen"), "the echo upstream needs its own address")
        out_upstreams: dict[str, Any] = {}
        self.upstream_names = tuple(cfg.upstreams)
        for name, upstream in cfg.upstreams.items():
            if name.startswith(GENERATED_UPSTREAM_PREFIX):
                self.report(
                    ("upstreams", name),
                    f"names starting with '{GENERATED_UPSTREAM_PREFIX}' are reserved for "
                    "upstreams made from route URLs",
                )
            out_upstreams[name] = self.upstream(name, upstream, timeouts)
        # Consumers first: plugins check the consumers they name (anonymous) against them.
        out_consumers = self.consumers(cfg)
        self.redis = cfg.rate_limiting.redis
        self.waf = cfg.waf
        self.compression = check_compression(cfg.compression, self.report)
        out_routes: list[dict[str, Any]] = []
        names: dict[str, int] = {}
        with consumers_checking(out_consumers):
            plugins_dir = self.plugins(cfg)
            for i, route in enumerate(cfg.routes):
                out_routes.append(
                    self.route(i, route, names, cfg.upstreams, out_upstreams, timeouts)
                )
            compile_apis(self, cfg.apis, cfg.upstreams, names, out_routes, out_upstreams, timeouts)
            if cfg.ai is not None:
                compile_ai(self, cfg.ai, cfg.upstreams, names, out_routes, out_upstreams, timeouts)
            for name, chain in consumer_chains(
                self.consumer_plugins, out_routes, self.report
            ).items():
                out_consumers[name]["plugins"] = chain
        if not cfg.routes and not cfg.apis and cfg.ai is None:
            self.report(("routes",), "at least one route (or API) is needed")
        observed = observe_settings(
            self,
            status=cfg.status,
            access_log=cfg.access_log,
            metrics=cfg.metrics,
            tracing=cfg.tracing,
            analytics=cfg.analytics,
            alerts=cfg.alerts,
            listen=listen,
            address=lambda value, at: self.address(value, at, listen=True),
        )
        observe = observed["observe"]
        # Files named in the config are relative to it; the workers get absolute paths.
        if observe["access_log"] is not None and observe["access_log"]["path"] != "stdout":
            observe["access_log"]["path"] = str(self.base_dir / observe["access_log"]["path"])
            problem = log_file_problem(Path(observe["access_log"]["path"]))
            if problem is not None:
                self.report(("access_log", "path"), problem)
        if observe["analytics"] is not None:
            observe["analytics"]["path"] = str(self.base_dir / observe["analytics"]["path"])
        tls = None
        if cfg.tls is not None:
            taken = [*listen, *([echo["listen"]] if echo is not None else [])]
            tls = normalize_tls(
                cfg.tls,
                self.base_dir,
                lambda value, at: self.address(value, at, listen=True),
                taken,
                self.report,
            )
        sni = normalize_certificates(cfg.certificates, self.base_dir, self.report)
        if tls is not None:
            tls["sni"] = sni
        return {
            "listen": listen,
            "tls": tls,
            "workers": cfg.workers if isinstance(cfg.workers, int) else os.cpu_count() or 1,
            "grace_period": self.duration(cfg.grace_period, ("grace_period",)),
            "pid_file": cfg.pid_file,
            "limits": {
                "max_header_bytes": self.size(
                    cfg.limits.max_header_bytes, ("limits", "max_header_bytes")
                ),
                "max_body_bytes": self.size(
                    cfg.limits.max_body_bytes, ("limits", "max_body_bytes")
                ),
                "max_headers": cfg.limits.max_headers,
                "max_url_bytes": self.size(cfg.limits.max_url_bytes, ("limits", "max_url_bytes")),
                "max_connections_per_ip": cfg.limits.max_connections_per_ip,
            },
            "ip_restriction": normalize_ip_restriction(
                cfg.ip_restriction, ("ip_restriction",), self.report
            ),
            "waf": normalize_waf(cfg.waf, self.base_dir, self.report),
            "cache": normalize_cache(cfg.cache, self.report),
            "timeouts": timeouts,
            "echo": echo,
            "upstreams": out_upstreams,
            "routes": out_routes,
            "plugins_dir": plugins_dir,
            "rate_limits": [
                self.rate_limit(limit, ("rate_limits", j), "*")
                for j, limit in enumerate(cfg.rate_limits)
            ],
            "rate_limiting": {
                "slots": 1 << (cfg.rate_limiting.slots - 1).bit_length(),
                "redis": self.redis_store(cfg.rate_limiting.redis),
            },
            "trusted_proxies": [
                self.network(text, ("trusted_proxies", j))
                for j, text in enumerate(cfg.trusted_proxies)
            ],
            "plans": {name: self.plan(name, plan) for name, plan in cfg.plans.items()},
            "consumers": out_consumers,
            "status": observed["status"],
            "observe": observe,
            "admin": normalize_admin(
                cfg.admin,
                self.base_dir,
                [
                    *listen,
                    *(tls["listen"] if tls is not None else []),
                    *([echo["listen"]] if echo is not None else []),
                    *([observed["status"]["listen"]] if observed["status"] is not None else []),
                ],
                lambda value, at: self.address(value, at, listen=True),
                self.report,
            ),
        }

    def named_upstream(self, name: str, at: DataPath, upstreams: Mapping[str, Upstream]) -> None:
        if name not in upstreams:
            hint = did_you_mean(name, upstreams) or " (define it under 'upstreams:')"
            self.report(at, f"unknown upstream '{name}'{hint}")

    def version_rule(
        self, rule: VersionRule, at: DataPath, upstreams: Mapping[str, Upstream]
    ) -> dict[str, Any]:
        if (rule.header is None) == (rule.cookie is None):
            self.report(at, "give exactly one of 'header' or 'cookie'")
        elif rule.header is not None and not _TOKEN.fullmatch(rule.header):
            self.report((*at, "header"), f"invalid header name {rule.header!r}")
        self.named_upstream(rule.upstream, (*at, "upstream"), upstreams)
        return {
            "header": rule.header.lower() if rule.header else None,
            "cookie": rule.cookie,
            "value": rule.value,
            "upstream": rule.upstream,
        }

    def mirror(
        self, mirror: MirrorTo | None, at: DataPath, upstreams: Mapping[str, Upstream]
    ) -> dict[str, Any] | None:
        if mirror is None:
            return None
        self.named_upstream(mirror.upstream, (*at, "upstream"), upstreams)
        return {
            "upstream": mirror.upstream,
            "percent": mirror.percent,
            "max_body": self.size(mirror.max_body, (*at, "max_body")),
        }

    def split(
        self, split: Split | None, at: DataPath, upstreams: Mapping[str, Upstream]
    ) -> dict[str, Any] | None:
        if split is None:
            return None
        if not any(t.weight for t in split.targets):
            self.report((*at, "targets"), "a split needs at least one target with a weight")
        for j, t in enumerate(split.targets):
            if t.upstream is not None:
                self.named_upstream(t.upstream, (*at, "targets", j, "upstream"), upstreams)
        hash_on = None
        if split.hash_on is not None:
            source, sep, name = split.hash_on.partition(":")
            if source == "ip" and not sep:
                hash_on = {"source": "ip", "name": None}
            elif source in ("header", "cookie") and sep and _TOKEN.fullmatch(name):
                hash_on = {"source": source, "name": name}
            else:
                self.report(
                    (*at, "hash_on"),
                    f'invalid hash_on {split.hash_on!r}: expected "ip", "header:NAME" or '
                    '"cookie:NAME"',
                )
        return {
            "targets": [{"upstream": t.upstream, "weight": t.weight} for t in split.targets],
            "hash_on": hash_on,
        }

    def plan(self, name: str, plan: Plan) -> dict[str, Any]:
        at: DataPath = ("plans", name)
        return {
            "rate_limits": [
                self.rate_limit(
                    limit, (*at, "rate_limits", j), f"plan:{name}", default_key="consumer"
                )
                for j, limit in enumerate(plan.rate_limits)
            ],
            "quotas": [
                {
                    "id": json.dumps([f"plan:{name}", q.name or j, q.limit, q.per]),
                    "limit": q.limit,
                    "period": q.per,
                    "cluster": self.cluster_scope(q.scope, (*at, "quotas", j, "scope")),
                }
                for j, q in enumerate(plan.quotas)
            ],
        }

    def consumers(self, cfg: Config) -> dict[str, Any]:
        out = {}
        for name, c in cfg.consumers.items():
            out[name] = normalize_consumer(c, ("consumers", name), self.base_dir, self.report)
            out[name]["plan"] = self.consumer_plan(name, c, cfg.plans)
        for at, message in duplicate_credentials(out):
            self.report(at, message)
        return out

    def consumer_plan(self, name: str, consumer: Consumer, plans: Mapping[str, Plan]) -> str | None:
        if consumer.plan is not None and consumer.plan not in plans:
            hint = did_you_mean(consumer.plan, plans) or " (define it under 'plans:')"
            self.report(("consumers", name, "plan"), f"unknown plan '{consumer.plan}'{hint}")
            return None
        return consumer.plan

    def cluster_scope(self, scope: str, at: DataPath) -> bool:
        if scope == "cluster" and self.redis is None:
            self.report(at, "scope: cluster needs rate_limiting.redis (where nodes count)")
        return scope == "cluster"

    def network(self, text: str, at: DataPath) -> str:
        try:
            return str(ipaddress.ip_network(text, strict=False))
        except ValueError:
            self.report(at, f"'{text}' is not an IP address or CIDR (10.0.0.0/8, ::1)")
            return "0.0.0.0/32"

    def redis_store(self, store: RedisStore | None) -> dict[str, Any] | None:
        if store is None:
            return None
        at: DataPath = ("rate_limiting", "redis")
        if not re.match(r"^rediss?://", store.url):
            self.report((*at, "url"), "expected redis://[:password@]host:port/db")
        return {
            "url": store.url,
            "on_failure": store.on_failure,
            "timeout": self.duration(store.timeout, (*at, "timeout")),
            "lease": store.lease,
        }

    def rate_limit(
        self, limit: RateLimit, at: DataPath, scope: str, default_key: str = "ip"
    ) -> dict[str, Any]:
        per = self.duration(limit.per, (*at, "per"))
        if per <= 0:
            self.report((*at, "per"), "the period must be longer than zero")
        cluster = self.cluster_scope(limit.scope, (*at, "scope"))
        if cluster and (per < 1 or per != int(per)):
            self.report((*at, "per"), "a cluster-wide limit counts in whole seconds (1s or more)")
        key = default_key if limit.key is None else limit.key
        keys = [key] if isinstance(key, str) else key
        if not keys:
            self.report((*at, "key"), "a limit needs at least one key")
        out_keys = []
        for k, text in enumerate(keys):
            where = (*at, "key", k) if isinstance(limit.key, list) else (*at, "key")
            source, _, name = text.partition(":")
            if source not in LIMIT_KEY_SOURCES or (source == "header") != bool(name):
                hint = did_you_mean(source, LIMIT_KEY_SOURCES)
                self.report(
                    where,
                    f"unknown key {text!r}{hint}: use ip, consumer, credential, route "
                    "or header:NAME",
                )
                source, name = "ip", ""
            elif source == "header" and not _TOKEN.fullmatch(name):
                self.report(where, f"invalid header name {name!r}")
            out_keys.append({"source": source, "name": name or None})
        burst = limit.burst if limit.burst is not None else limit.limit
        # The buckets keep counting across a reload as long as the limit means the same.
        ident = json.dumps([scope, limit.name or at[-1], limit.limit, per, burst, keys])
        return {
            "id": ident,
            "limit": limit.limit,
            "per": per,
            "burst": burst,
            "key": out_keys,
            "cluster": cluster,
        }

    def plugins(self, cfg: Config) -> str | None:
        """Discover plugins (when the config uses any) and check the top-level ones."""
        plugins_dir = None
        self.consumer_plugins: dict[str, list[Entry | None]] = {}
        if cfg.plugins_dir is not None:
            plugins_dir = str((self.base_dir / cfg.plugins_dir).resolve())
        if not (
            cfg.plugins
            or any(r.plugins for r in cfg.routes)
            or any(c.plugins for c in cfg.consumers.values())
            or apis_use_plugins(cfg.apis)
            or cfg.ai is not None
        ):
            return plugins_dir
        self.registry = discover(plugins_dir)
        for problem in self.registry.problems:
            self.report(("plugins_dir",) if plugins_dir is not None else (), problem)
        self.top_plugins = [
            self.plugin_use(use, ("plugins", j), "every route") for j, use in enumerate(cfg.plugins)
        ]
        self.consumer_plugins = {
            name: [
                self.plugin_use(use, ("consumers", name, "plugins", j), f"consumer '{name}'")
                for j, use in enumerate(c.plugins)
            ]
            for name, c in cfg.consumers.items()
            if c.plugins
        }
        return plugins_dir

    def plugin_use(self, use: PluginUse, at: DataPath, owner: str) -> Entry | None:
        assert self.registry is not None
        settings = {
            "timeout": self.duration(use.timeout, (*at, "timeout")),
            "budget": None if use.budget is None else self.duration(use.budget, (*at, "budget")),
            "on_over_budget": use.on_over_budget,
            "bypass_for": self.duration(use.bypass_for, (*at, "bypass_for")),
        }
        return check_use(use, at, self.registry, self.report, owner, settings)

    def duplicates(self, values: list[str], field: str, what: str) -> None:
        first: dict[str, int] = {}
        for i, value in enumerate(values):
            if value in first:
                self.report((field, i), f"duplicate {what} (also {field}[{first[value]}])")
            else:
                first[value] = i

    def upstream(
        self, name: str, upstream: Upstream, defaults: Mapping[str, float]
    ) -> dict[str, Any]:
        at: DataPath = ("upstreams", name)
        targets = []
        for j, target in enumerate(upstream.targets):
            if isinstance(target, str):
                address = self.address(target, (*at, "targets", j))
                weight = 1
            else:
                address = self.address(target.address, (*at, "targets", j, "address"))
                weight = target.weight
            targets.append({"address": address, "weight": weight})
        if not upstream.targets:
            self.report((*at, "targets"), "an upstream needs at least one target")
        timeouts = dict(defaults)
        if upstream.timeouts is not None:
            for key in ("connect", "read", "write", "total"):
                value = getattr(upstream.timeouts, key)
                if value is not None:
                    timeouts[key] = self.duration(value, (*at, "timeouts", key))
        return {
            "targets": targets,
            "balance": upstream.balance,
            "hash_on": self.hash_on(upstream, at),
            "keepalive": upstream.keepalive,
            "keepalive_timeout": self.duration(
                upstream.keepalive_timeout, (*at, "keepalive_timeout")
            ),
            "timeouts": {k: timeouts[k] for k in ("connect", "read", "write", "total")},
            "path_prefix": "",
            **upstream_settings(self, upstream, at, self.upstream_names),
            "adaptive_concurrency": self.adaptive(upstream.adaptive_concurrency, at),
            "tls": normalize_upstream_tls(upstream.tls, self.base_dir, (*at, "tls"), self.report),
            "http2": upstream.http2,
        }

    def adaptive(self, cfg: AdaptiveConcurrency | None, at: DataPath) -> dict[str, Any] | None:
        if cfg is None:
            return None
        if cfg.min > cfg.max:
            self.report((*at, "adaptive_concurrency", "min"), "min is above max")
        return {"min": cfg.min, "max": cfg.max, "initial": cfg.initial, "tolerance": cfg.tolerance}

    def hash_on(self, upstream: Upstream, at: DataPath) -> dict[str, str | None] | None:
        text = upstream.hash_on
        if upstream.balance != "hash":
            if text is not None:
                self.report(
                    (*at, "hash_on"),
                    f"hash_on is only used with 'balance: hash' (balance is {upstream.balance})",
                )
            return None
        if text is None:
            self.report(
                (*at, "hash_on"),
                'balance: hash needs hash_on: "ip", "header:NAME" or "cookie:NAME"',
            )
            return None
        source, sep, name = text.partition(":")
        if source == "ip" and not sep:
            return {"source": "ip", "name": None}
        if source in ("header", "cookie") and sep and _TOKEN.fullmatch(name):
            return {"source": source, "name": name}
        self.report(
            (*at, "hash_on"),
            f'invalid hash_on {text!r}: expected "ip", "header:NAME" or "cookie:NAME"',
        )
        return None

    def predicate(self, predicate: Predicate, at: DataPath, *, header: bool) -> dict[str, Any]:
        if header and not _TOKEN.fullmatch(predicate.name):
            self.report((*at, "name"), f"invalid header name {predicate.name!r}")
        elif not predicate.name:
            self.report((*at, "name"), "the name cannot be empty")
        if (predicate.value is None) == (predicate.regex is None):
            self.report(at, "give exactly one of 'value' or 'regex'")
        return {"name": predicate.name, "value": predicate.value, "regex": predicate.regex}

    def route(
        self,
        i: int,
        route: Route,
        names: dict[str, int],
        upstreams: Mapping[str, Upstream],
        out_upstreams: dict[str, Any],
        timeouts: Mapping[str, float],
        at: DataPath | None = None,
        inherited: list[Entry | None] | None = None,
    ) -> dict[str, Any]:
        """``at`` and ``inherited`` (plugins above the route's own) are for routes compiled
        from ``apis``."""
        at = ("routes", i) if at is None else at
        name = f"route-{i}" if route.name is None else route.name
        if not name:
            self.report((*at, "name"), "a route name cannot be empty")
        elif name in names:
            self.report(
                (*at, "name") if route.name is not None else at,
                f"duplicate route name '{name}' (also routes[{names[name]}])",
            )
        else:
            names[name] = i
        upstream = route.upstream
        if looks_like_url(upstream):
            upstream = self.url_upstream(i, name, route.upstream, out_upstreams, timeouts)
        elif upstream not in upstreams:
            hint = did_you_mean(upstream, upstreams)
            if not upstreams:
                hint = " (define it under 'upstreams:' or use a URL like http://127.0.0.1:9000)"
            self.report((*at, "upstream"), f"unknown upstream '{upstream}'{hint}")
        methods = []
        for j, method in enumerate(route.methods):
            upper = method.upper()
            if upper not in HTTP_METHODS:
                hint = did_you_mean(upper, HTTP_METHODS)
                self.report((*at, "methods", j), f"unknown HTTP method '{method}'{hint}")
            methods.append(upper)
        if not route.paths:
            self.report((*at, "paths"), "a route needs at least one path")
        own = [
            self.plugin_use(use, (*at, "plugins", j), f"route '{name}'")
            for j, use in enumerate(route.plugins)
        ]
        return {
            "name": name,
            "paths": list(route.paths),
            "hosts": [h.lower() for h in route.hosts],
            "methods": methods,
            "headers": [
                self.predicate(p, (*at, "headers", j), header=True)
                for j, p in enumerate(route.headers)
            ],
            "query": [
                self.predicate(p, (*at, "query", j), header=False)
                for j, p in enumerate(route.query)
            ],
            "upstream": upstream,
            "strip_prefix": route.strip_prefix,
            "rewrite": route.rewrite,
            "preserve_host": route.preserve_host,
            "priority": route.priority,
            "plugins": chain_of(i, [*self.top_plugins, *(inherited or [])], own),
            "rate_limits": [
                self.rate_limit(limit, (*at, "rate_limits", j), name)
                for j, limit in enumerate(route.rate_limits)
            ],
            "versions": [
                self.version_rule(v, (*at, "versions", j), upstreams)
                for j, v in enumerate(route.versions)
            ],
            "split": self.split(route.split, (*at, "split"), upstreams),
            "mirror": self.mirror(route.mirror, (*at, "mirror"), upstreams),
            "ip_restriction": normalize_ip_restriction(
                route.ip_restriction, (*at, "ip_restriction"), self.report
            ),
            "client_cert": route.client_cert,
            "waf": normalize_route_waf(route.waf, self.waf, (*at, "waf"), self.report),
            "compression": normalize_route_compression(
                route.compression, self.compression, (*at, "compression"), self.report
            ),
            "websocket": route.websocket,
            "websocket_idle": self.duration(route.websocket_idle, (*at, "websocket_idle")),
            "sse_heartbeat": self.duration(route.sse_heartbeat, (*at, "sse_heartbeat")),
            "cache": normalize_route_cache(route.cache, (*at, "cache"), self.report),
            **route_settings(self, route.timeouts, route.retries, at),
        }

    def url_upstream(
        self,
        i: int,
        name: str,
        url: str,
        out_upstreams: dict[str, Any],
        timeouts: Mapping[str, float],
        at: DataPath | None = None,
    ) -> str:
        generated = f"{GENERATED_UPSTREAM_PREFIX}{name}"
        at = ("routes", i, "upstream") if at is None else at
        try:
            address, path_prefix, tls = parse_upstream_url(url)
        except ValueError as e:
            self.report(at, str(e))
            return generated
        self.generated[generated] = at
        out_upstreams[generated] = {
            "targets": [{"address": address, "weight": 1}],
            "balance": "round_robin",
            "hash_on": None,
            "keepalive": 1024,
            "keepalive_timeout": 60.0,
            "timeouts": {k: timeouts[k] for k in ("connect", "read", "write", "total")},
            "path_prefix": path_prefix,
            **default_upstream_settings(self, ("upstreams", generated)),
            "tls": default_upstream_tls() if tls else None,
            "http2": speaks_http2(url),
        }
        return generated


def _raise_on_problem(path: DataPath, message: str) -> None:
    raise ValueError(f"{format_path(path)}: {message}")


def normalize(cfg: Config) -> dict[str, Any]:
    """The normalized config the Rust side reads.

    Same field names as the user-facing config, but: durations are float seconds, sizes
    int bytes, ``workers`` an int, targets ``{"address", "weight"}``, ``hash_on`` null or
    ``{"source", "name"}``, every upstream has resolved ``timeouts`` and a ``path_prefix``,
    a route whose upstream is a URL points at a generated upstream ``route:<route name>``,
    route names are filled in, methods upper-cased, predicates ``{"name", "value", "regex"}``.
    Raises ValueError if ``cfg`` breaks a rule that ``load_config`` would report.
    """
    return _Normalizer(_raise_on_problem).config(cfg)


def normalized_json(cfg: Config) -> str:
    return json.dumps(normalize(cfg), separators=(",", ":"))


# --- loading ------------------------------------------------------------------------------


def _under(path: DataPath, bad: list[DataPath]) -> bool:
    """True if ``path`` is at, below or above a place that already has a problem."""
    return any(p[: len(path)] == path or path[: len(p)] == p for p in bad)


def _ends_segment(text: str, pos: int) -> bool:
    return pos == len(text) or text[pos] in ".["


def _parse_core_path(text: str, data: Any) -> DataPath:
    """Split a data plane path such as ``upstreams.route:a.b.targets[0]`` into segments.

    Key names may contain dots, so a dotted name is matched against the keys that exist.
    """
    segments: list[str | int] = []
    pos = 0
    if text.startswith("$"):
        pos = 1
    node = data
    while pos < len(text):
        segment: str | int
        if text[pos] == "[":
            end = text.find("]", pos)
            inner = text[pos + 1 : end if end != -1 else len(text)]
            if inner.startswith('"'):
                segment, consumed = json.JSONDecoder().raw_decode(text, pos + 1)
                pos = consumed + 1
            else:
                segment = int(inner) if inner.isdigit() else inner
                pos = end + 1 if end != -1 else len(text)
        else:
            if text[pos] == ".":
                pos += 1
            keys = node.keys() if isinstance(node, dict) else ()
            fits = [
                k for k in keys if text.startswith(k, pos) and _ends_segment(text, pos + len(k))
            ]
            if fits:
                name = max(fits, key=len)
            else:
                match = re.compile(r"[^.\[]*").match(text, pos)
                assert match is not None
                name = match.group(0)
            pos += len(name)
            segment = name
        segments.append(segment)
        if isinstance(node, dict) and isinstance(segment, str):
            node = node.get(segment)
        elif isinstance(node, list) and isinstance(segment, int) and segment < len(node):
            node = node[segment]
        else:
            node = None
    return tuple(segments)


def _core_problems(
    normalized: dict[str, Any],
    text: str,
    generated: Mapping[str, DataPath],
    route_origins: Mapping[int, tuple[DataPath, DataPath]],
) -> list[tuple[DataPath, str]]:
    """What the data plane's compiler says about ``text``, as paths into the user's file."""
    # Imported here so that loading and schema generation work in tools without the
    # compiled module; only this check needs the data plane.
    from ferrogate import _core

    problems = []
    for path_text, message in _core.check_config(text):
        path = _parse_core_path(path_text, normalized)
        if len(path) >= 2 and path[0] == "upstreams" and path[1] in generated:
            # The user never wrote this upstream: point at the URL it came from.
            path = generated[str(path[1])]
        elif len(path) >= 2 and path[0] == "routes" and path[1] in route_origins:
            # A route compiled from `apis`: its template, or the API's version.
            at, paths_at = route_origins[int(path[1])]
            path = paths_at if path[2:3] == ("paths",) else (*at, *path[2:3])
        problems.append((path, message))
    return problems


def load_config_text(
    text: str,
    file: str = "<config>",
    *,
    base_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Like ``load_config`` for text already read; ``file`` names it in problems.

    ``base_dir`` (default: the working directory) is where ``file`` lives, which places
    the default pid file and a relative ``pid_file``.
    """
    doc = parse_source(text, file, env=env)
    problems = list(doc.problems)
    # Every place with a problem: later stages keep quiet at, above and below these.
    reported: list[DataPath] = list(doc.problem_paths)

    def report(path: DataPath, message: str, at_key: bool = False) -> None:
        if not doc.is_tainted(path):
            reported.append(path)
            problems.append(doc.problem(path, message, key=at_key))

    data = doc.data
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        report((), f"a config must be a mapping of settings (listen, routes, ...), got {got}")
        raise ConfigError(problems)
    # Structure and types first. Then the cross-field checks, and the data plane's own, run
    # on a copy where every broken part is replaced by a harmless stand-in, and stay quiet
    # about those parts: one typo must not hide the problems elsewhere.
    bad: list[DataPath] = []

    def structural(path: DataPath, message: str, at_key: bool) -> None:
        bad.append(path)
        report(path, message, at_key)

    check_struct(data, Config, (), structural)

    def semantic(path: DataPath, message: str) -> None:
        if not _under(path, bad):
            report(path, message)

    def touched(path: DataPath) -> bool:
        return any(p[: len(path)] == path for p in bad)

    try:
        partial = msgspec.convert(salvage(data, Config, (), touched), Config)
    except msgspec.ValidationError:
        raise ConfigError(problems) from None
    where = Path(base_dir) if base_dir is not None else Path.cwd()
    normalizer = _Normalizer(semantic, (where / file).parent)
    normalized = normalizer.config(partial)
    text_json = json.dumps(normalized, separators=(",", ":"))
    for path, message in _core_problems(
        normalized, text_json, normalizer.generated, normalizer.route_origins
    ):
        if not problems:
            problems.append(doc.problem(path, message))
        elif path and not _under(path, reported) and not doc.is_tainted(path):
            # Alongside other problems, a root-level complaint is likely about a stand-in.
            problems.append(doc.problem(path, message))
    if problems:
        raise ConfigError(problems)
    cfg = msgspec.convert(data, Config)
    pid_file = resolve_pid_file(where / file, cfg.pid_file)
    return LoadedConfig(file, cfg, normalized, text_json, pid_file)


def load_config(
    path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None
) -> LoadedConfig:
    """Read, check and normalize a config file; raises ConfigError with every problem."""
    file = os.fspath(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError([Problem(file, 1, 1, "$", f"cannot read the file: {reason}")]) from None
    return load_config_text(text, file, env=env)


def config_schema() -> dict[str, Any]:
    """JSON Schema of the config file, for editors and `ferrogate schema`."""
    schema = msgspec.json.schema(Config)
    defs = schema["$defs"]
    # The root object is inlined (rather than a bare $ref) so tools that only look at the
    # top-level "properties" see the settings.
    root = {k: v for k, v in defs.pop(Config.__name__).items() if k != "title"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "ferrogate configuration",
        **root,
        "$defs": defs,
    }
