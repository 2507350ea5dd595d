"""The compiled data plane (Rust, PyO3). Python orchestrates; this module moves bytes.

The config passed in is the *normalized* JSON that ``ferrogate.config`` produces: named
upstreams only (route URLs already turned into upstreams), durations as float seconds,
sizes as integer bytes, hash_on as an object.
"""

from collections.abc import Callable

__all__ = [
    "__build__",
    "__version__",
    "ai_usage_take",
    "budget_adjust",
    "budget_reserve",
    "budget_used",
    "check_config",
    "rate_adjust",
    "rate_take",
    "record_span",
    "route_table",
    "serve",
    "serve_echo",
    "sha256_hex",
    "train_load",
]
__version__: str
__build__: str
"""``profile-guided`` when compiled with the counts of the training load, else ``plain``."""

def check_config(config_json: str) -> list[tuple[str, str]]:
    """Compile the config as a worker would and return its problems.

    Each problem is ``(path, message)`` where path is like ``routes[3].paths[1]``.
    An empty list means the config compiles.
    """

def route_table(config_json: str) -> list[dict[str, object]]:
    """The compiled route table in precedence order.

    Each row has keys: ``host`` (str, ``*`` for any), ``path`` (the radix pattern),
    ``route`` (name), ``methods`` (list[str]), ``predicates`` (list[str]),
    ``priority`` (int), ``upstream`` (str), ``rewrite`` (str | None).
    Raises ValueError if the config does not compile.
    """

def serve(
    listen_fds: list[int],
    config_path: str,
    worker_id: int,
    plugin_loader: Callable[[str], object] | None = None,
    limits: tuple[int, int, int] | None = None,
    health: tuple[int, int] | None = None,
    tls_fds: list[int] | None = None,
) -> None:
    """Run one worker's proxy on already-listening sockets until SIGTERM; releases the GIL.

    ``plugin_loader(config_json)`` returns the plugin host of a config generation (a
    ``ferrogate.hooks.Host``, or None when no route has plugins). ``limits`` is the node's
    shared rate limit and quota tables as ``(memfd, limit bytes, quota bytes)``; without it
    the worker counts alone. ``health`` is the node's board of active health check results
    as ``(memfd, bytes)``; without it the worker runs its health checks alone.
    ``tls_fds`` are listening sockets that serve HTTPS with the config's ``tls`` section.

    ``config_path`` is a normalized JSON config file. SIGHUP re-reads it and swaps the
    routing state atomically (in-flight requests finish on the old one). SIGTERM stops
    accepting and drains in-flight requests for at most ``grace_period`` seconds.
    The worker also exits when its parent dies. Raises ValueError on a bad config.
    """

def train_load() -> int:
    """Run the profile-guided build's training load and return its request count.

    A gateway with the echo upstream behind it on loopback, driven with small GETs at 64
    and 256 connections, POSTs, unmatched paths and h2c streams, every answer checked
    (RuntimeError on a wrong one). Its threads serve until the process exits: run it in a
    process of its own.
    """

def serve_echo(listen_fd: int) -> None:
    """Run the built-in echo upstream on a listening socket until SIGTERM.

    Every request gets a 200 JSON answer describing it: method, path, query, headers
    (lower-case names, list of values), body length and body (as text, truncated to 64 KiB).
    """

def record_span(
    trace_id: str,
    parent_span_id: str,
    name: str,
    start_ns: int,
    end_ns: int,
    attributes: dict[str, str | int | float | bool],
    error: str | None = None,
) -> bool:
    """Queue a finished span of a sampled trace with this worker's tracer.

    ``trace_id`` (32) and ``parent_span_id`` (16) are lower-case hex; times are Unix
    nanoseconds; ``error`` marks the span failed. The plugin dispatcher calls it for each hook
    run of a sampled request. Returns False when tracing is off in this process or its export
    queue is full (the span is dropped and counted).
    """

def sha256_hex(text: str) -> str:
    """SHA-256 of ``text``'s UTF-8 bytes in lower-case hex (``hashlib.sha256(text.encode())
    .hexdigest()`` in one call)."""

# Node-shared counters for plugins: every worker of a node counts in the same tables (shared
# memory from the master); outside a worker the process counts alone.

def rate_take(key: str, per_second: float, burst: float, cost: float) -> float:
    """GCRA: take ``cost`` units from ``key``'s bucket (``per_second`` refill, ``burst``
    capacity). 0.0 when allowed (and charged), else the seconds until it would be allowed
    (nothing charged)."""

def rate_adjust(key: str, per_second: float, burst: float, delta: float) -> None:
    """Charge (``delta`` > 0) or refund (``delta`` < 0) ``key``'s bucket without a check."""

def budget_reserve(key: str, window: int, amount: int, limit: int) -> int:
    """Add ``amount`` to ``key``'s total in ``window`` if it stays within ``limit``: the new
    total, else -1 (nothing added). A new window starts from 0."""

def budget_adjust(key: str, window: int, delta: int) -> int:
    """Add ``delta`` (may be negative) to ``key``'s total in ``window``, never below 0; the
    new total."""

def budget_used(key: str, window: int) -> int:
    """``key``'s total in ``window``."""

def ai_usage_take() -> tuple[
    list[
        tuple[
            tuple[float, str, str, str, str, str, str, str],
            tuple[int, int, int, float, int],
            tuple[
                bytes,
                bytes,
                list[tuple[str, float, float, float]],
                list[tuple[str, int]],
                int,
                float,
                float,
            ]
            | None,
        ]
    ],
    int,
]:
    """The AI pass-through's usage rows queued since the last call, and how many were dropped:
    ((time, request_id, route, consumer, model, deployment, provider, provider_model),
    (prompt_tokens, completion_tokens, cost in micro-USD, latency_ms, status), estimate).
    ``estimate`` is None, or for an answer without usage: (request body, answer, tpm counters
    charged (key, rate, burst, tokens), budget counters (key, window), micro-USD reserved,
    price in, price out)."""
