"""Observability settings: the status listener, access log, metrics, tracing, analytics and
anomaly alerts. The user-facing schema (msgspec Structs, used by ``ferrogate.config``) and
their normalization into the ``observe`` section that ``rust/engine/src/config.rs`` reads
(the master reads ``status``, ``analytics`` and ``alerts`` itself).

Everything is off unless configured; a config with none of these sections pays nothing on
the request path.
"""

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from ferrogate.problems import DataPath
from ferrogate.resilience import Checks
from ferrogate.structcheck import did_you_mean
from ferrogate.units import Duration, Size

__all__ = [
    "ACCESS_LOG_FIELDS",
    "DEFAULT_ACCESS_LOG_FIELDS",
    "DEFAULT_REDACT",
    "AccessLog",
    "Alerts",
    "Analytics",
    "Capture",
    "Metrics",
    "Status",
    "Tracing",
    "log_file_problem",
    "observe_settings",
]

# Every field an access log line can carry, in the order they are written.
ACCESS_LOG_FIELDS = (
    "time",
    "request_id",
    "trace_id",
    "client_ip",
    "consumer",
    "route",
    "method",
    "host",
    "path",
    "query",
    "protocol",
    "status",
    "bytes_in",
    "bytes_out",
    "duration",
    "upstream_duration",
    "upstream",
    "retries",
    "rate_limit",
    "cache",
    "error",
    "user_agent",
    "worker",
)
# Every field but those that repeat what the request id already finds elsewhere.
DEFAULT_ACCESS_LOG_FIELDS = tuple(
    f for f in ACCESS_LOG_FIELDS if f not in ("host", "query", "protocol", "user_agent", "worker")
)
# Header names whose values never reach a log line as they are.
DEFAULT_REDACT = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "apikey",
    "x-auth-token",
)
# JSON body keys whose values are redacted in captured bodies (matched case-insensitively,
# as substrings: "client_secret" matches "secret").
DEFAULT_REDACT_BODY_KEYS = ("password", "secret", "token", "api_key", "apikey", "authorization")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class Status(_Section, kw_only=True, frozen=True):
    """The status listener: /metrics, the analytics API and the dashboard. Never the proxy
    port."""

    listen: Annotated[str, Meta(description="host:port of the status listener.")]
    admin_token: Annotated[
        str | None,
        Meta(
            description="Bearer token for the analytics API and the dashboard; use ${VAR} "
            "to keep it out of the file. Without one, only /metrics and /healthz are served."
        ),
    ] = None
    metrics_need_token: Annotated[
        bool, Meta(description="Ask for the admin token on /metrics too.")
    ] = False


class Capture(_Section, kw_only=True, frozen=True):
    """Opt-in capture of headers and bodies into access log lines, with secrets redacted."""

    request_headers: Annotated[
        list[str] | bool,
        Meta(description="Header names to capture, or true for all of them."),
    ] = False
    response_headers: Annotated[
        list[str] | bool,
        Meta(description="Header names to capture, or true for all of them."),
    ] = False
    request_body: Annotated[
        Size, Meta(description="Capture up to this many bytes of the request body (0: none).")
    ] = 0
    response_body: Annotated[
        Size, Meta(description="Capture up to this many bytes of the response body (0: none).")
    ] = 0
    redact: Annotated[
        list[str],
        Meta(description="More header names whose values are replaced by [REDACTED]."),
    ] = []
    redact_body_keys: Annotated[
        list[str],
        Meta(description="More JSON keys whose values are redacted in captured bodies."),
    ] = []


class AccessLog(_Section, kw_only=True, frozen=True):
    """One JSON object per request, written by a thread of its own (never on the request
    path; lines are dropped and counted if it cannot keep up)."""

    path: Annotated[
        str,
        Meta(
            description='"stdout", or a file (relative to the config file); reopened on '
            "SIGUSR1, for logrotate."
        ),
    ] = "stdout"
    fields: Annotated[
        list[str],
        Meta(description=f"Fields of each line, from: {', '.join(ACCESS_LOG_FIELDS)}."),
    ] = msgspec.field(default_factory=lambda: list(DEFAULT_ACCESS_LOG_FIELDS))
    sample: Annotated[
        float, Meta(ge=0, le=1, description="Fraction of requests logged; errors (5xx) always are.")
    ] = 1.0
    capture: Annotated[Capture, Meta(description="Header and body capture (off).")] = msgspec.field(
        default_factory=Capture
    )


class Metrics(_Section, kw_only=True, frozen=True):
    """Prometheus metrics, summed over every worker, at /metrics on the status listener."""

    enabled: Annotated[bool, Meta(description="false: no metrics are collected.")] = True
    consumer_labels: Annotated[
        bool, Meta(description="Also count requests per consumer (a `consumer` label).")
    ] = False
    max_consumers: Annotated[
        int,
        Meta(ge=1, description='At most this many consumer label values; the rest: "other".'),
    ] = 100
    latency_buckets: Annotated[
        list[Annotated[float, Meta(gt=0)]],
        Meta(description="Histogram bucket bounds in seconds."),
    ] = msgspec.field(
        default_factory=lambda: [
            0.001,
            0.0025,
            0.005,
            0.01,
            0.025,
            0.05,
            0.1,
            0.25,
            0.5,
            1.0,
            2.5,
            5.0,
            10.0,
        ]
    )
    publish_interval: Annotated[
        Duration, Meta(description="How often each worker hands its counters to the master.")
    ] = 1.0


class Tracing(_Section, kw_only=True, frozen=True):
    """W3C trace context, and spans exported over OTLP/HTTP (protobuf)."""

    endpoint: Annotated[
        str,
        Meta(
            description="The collector's OTLP/HTTP traces URL, e.g. http://127.0.0.1:4318/v1/traces."
        ),
    ]
    sample: Annotated[
        float,
        Meta(
            ge=0,
            le=1,
            description="Fraction of new traces recorded; a client's sampled flag is followed.",
        ),
    ] = 0.1
    service_name: Annotated[str, Meta(description="The resource's service.name.")] = "ferrogate"
    batch_size: Annotated[int, Meta(ge=1, description="Spans per export request at most.")] = 512
    flush_interval: Annotated[Duration, Meta(description="Longest wait before an export.")] = 1.0
    queue_size: Annotated[
        int, Meta(ge=1, description="Spans waiting for export at most; more are dropped, counted.")
    ] = 8192
    headers: Annotated[
        dict[str, str], Meta(description="Extra headers on export requests (e.g. an API key).")
    ] = {}


class Analytics(_Section, kw_only=True, frozen=True):
    """Every request counted in an embedded store (SQLite), by route, consumer, upstream and
    status, at `resolution`; queried through the status listener and `ferrogate stats`."""

    enabled: Annotated[bool, Meta(description="false: nothing is recorded.")] = True
    path: Annotated[str, Meta(description="The SQLite file, relative to the config file.")] = (
        "ferrogate-analytics.db"
    )
    resolution: Annotated[
        Duration, Meta(description="Time bucket of the stored rows (and of worker flushes).")
    ] = 10.0
    # A week of fine buckets covers the dashboard's longest range; the hourly rollup keeps
    # the long-term trends for far longer.
    retention: Annotated[
        Duration, Meta(description="Buckets older than this are deleted (the hourly rollup stays).")
    ] = "168h"
    max_consumers: Annotated[
        int,
        Meta(
            ge=1,
            description="Distinct consumers per worker and bucket at most; the rest are "
            'counted as "other".',
        ),
    ] = 1000


class Alerts(_Section, kw_only=True, frozen=True):
    """Anomaly alerts against a learned baseline (EWMA mean and variance per series)."""

    enabled: Annotated[bool, Meta(description="false: no anomaly detection.")] = True
    z_threshold: Annotated[
        float, Meta(gt=0, description="How many standard deviations from the baseline alert.")
    ] = 4.0
    warmup: Annotated[
        int, Meta(ge=1, description="Buckets of history a series needs before it can alert.")
    ] = 30
    alpha: Annotated[float, Meta(gt=0, lt=1, description="EWMA weight of the newest bucket.")] = 0.1
    min_requests: Annotated[
        int,
        Meta(ge=0, description="Error-rate and latency alerts need this many requests per bucket."),
    ] = 20
    webhook: Annotated[
        str | None, Meta(description="An http(s) URL that gets each alert as a JSON POST.")
    ] = None


def log_file_problem(path: Path) -> str | None:
    """Why the workers could not open ``path`` to append to it (None: they can), found
    without creating it: a worker that cannot open its log does not start."""
    if path.is_dir():
        return f"{path} is a directory"
    if path.exists():
        return None if os.access(path, os.W_OK) else f"cannot write to {path}"
    if not path.parent.is_dir():
        return f"the directory {path.parent} does not exist"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"cannot create files in {path.parent}"
    return None


def _header_names(n: Checks, names: list[str] | bool, at: DataPath) -> list[str] | bool:
    if isinstance(names, bool):
        return names
    for j, name in enumerate(names):
        if not _TOKEN.fullmatch(name):
            n.report((*at, j), f"invalid header name {name!r}")
    return [name.lower() for name in names]


def _access_log(n: Checks, log: AccessLog | None, at: DataPath) -> dict[str, Any] | None:
    if log is None:
        return None
    for j, field in enumerate(log.fields):
        if field not in ACCESS_LOG_FIELDS:
            hint = did_you_mean(field, ACCESS_LOG_FIELDS) or (
                f" (known: {', '.join(ACCESS_LOG_FIELDS)})"
            )
            n.report((*at, "fields", j), f"unknown access log field {field!r}{hint}")
    if not log.path.strip():
        n.report((*at, "path"), 'give a file or "stdout"')
    cap = log.capture
    return {
        "path": log.path,
        "fields": [f for f in ACCESS_LOG_FIELDS if f in log.fields],
        "sample": log.sample,
        "capture": {
            "request_headers": _header_names(
                n, cap.request_headers, (*at, "capture", "request_headers")
            ),
            "response_headers": _header_names(
                n, cap.response_headers, (*at, "capture", "response_headers")
            ),
            "request_body": n.size(cap.request_body, (*at, "capture", "request_body")),
            "response_body": n.size(cap.response_body, (*at, "capture", "response_body")),
            "redact": sorted({*DEFAULT_REDACT, *(h.lower() for h in cap.redact)}),
            "redact_body_keys": sorted(
                {*DEFAULT_REDACT_BODY_KEYS, *(k.lower() for k in cap.redact_body_keys)}
            ),
        },
    }


def _metrics(n: Checks, m: Metrics, at: DataPath) -> dict[str, Any] | None:
    if not m.enabled:
        return None
    buckets = sorted(set(m.latency_buckets))
    if not buckets:
        n.report((*at, "latency_buckets"), "give at least one bucket bound")
    return {
        "consumer_labels": m.consumer_labels,
        "max_consumers": m.max_consumers,
        "latency_buckets": buckets,
        "publish_interval": n.duration(m.publish_interval, (*at, "publish_interval")),
    }


def _tracing(n: Checks, t: Tracing | None, at: DataPath) -> dict[str, Any] | None:
    if t is None:
        return None
    if t.endpoint.startswith("https://"):
        n.report(
            (*at, "endpoint"),
            "https is not supported: export to a collector on this host or network over http://",
        )
    elif not re.fullmatch(r"http://[^/\s]+(/\S*)?", t.endpoint):
        n.report((*at, "endpoint"), f"expected an http:// URL, got {t.endpoint!r}")
    return {
        "endpoint": t.endpoint,
        "sample": t.sample,
        "service_name": t.service_name,
        "batch_size": t.batch_size,
        "flush_interval": n.duration(t.flush_interval, (*at, "flush_interval")),
        "queue_size": t.queue_size,
        "headers": {k.lower(): v for k, v in t.headers.items()},
    }


def _analytics(n: Checks, a: Analytics | None, at: DataPath) -> dict[str, Any] | None:
    if a is None or not a.enabled:
        return None
    resolution = n.duration(a.resolution, (*at, "resolution"))
    if resolution < 0.1:
        n.report((*at, "resolution"), "the resolution must be at least 100ms")
    return {
        "path": a.path,
        "resolution": resolution,
        "retention": n.duration(a.retention, (*at, "retention")),
        "max_consumers": a.max_consumers,
    }


def _alerts(a: Alerts | None) -> dict[str, Any] | None:
    if a is None or not a.enabled:
        return None
    return {
        "z_threshold": a.z_threshold,
        "warmup": a.warmup,
        "alpha": a.alpha,
        "min_requests": a.min_requests,
        "webhook": a.webhook,
    }


def observe_settings(
    n: Checks,
    *,
    status: Status | None,
    access_log: AccessLog | None,
    metrics: Metrics,
    tracing: Tracing | None,
    analytics: Analytics | None,
    alerts: Alerts | None,
    listen: list[str],
    address: Callable[[str, DataPath], str],
) -> dict[str, Any]:
    """The normalized ``status`` and ``observe`` sections.

    Metrics are collected only when there is a status listener to serve them; analytics
    and alerts need one too (they are read there).
    """
    out_status = None
    if status is not None:
        where = address(status.listen, ("status", "listen"))
        if where in listen:
            n.report(("status", "listen"), "the status listener needs its own address")
        out_status = {
            "listen": where,
            "admin_token": status.admin_token,
            "metrics_need_token": status.metrics_need_token,
        }
    elif analytics is not None and analytics.enabled:
        n.report(("analytics",), "analytics are read on the status listener: configure 'status'")
    if alerts is not None and (analytics is None or not analytics.enabled):
        n.report(("alerts",), "alerts learn from the analytics store: configure 'analytics'")
    observe = {
        "access_log": _access_log(n, access_log, ("access_log",)),
        "metrics": _metrics(n, metrics, ("metrics",)) if status is not None else None,
        "tracing": _tracing(n, tracing, ("tracing",)),
        "analytics": _analytics(n, analytics, ("analytics",)),
        "alerts": _alerts(alerts),
    }
    return {"status": out_status, "observe": observe}
