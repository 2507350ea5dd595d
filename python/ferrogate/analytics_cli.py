"""``ferrogate stats``: the analytics of a running gateway, asked of its status listener."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from ferrogate.analytics_service import parse_time
from ferrogate.cli import _format_table, _print_problems

TOKEN_ENV = "FERROGATE_ADMIN_TOKEN"


class StatsError(Exception):
    pass


def _status_of_config(path: str) -> dict[str, Any]:
    from ferrogate.config import ConfigError, load_config

    try:
        status = load_config(path).normalized.get("status")
    except ConfigError as e:
        _print_problems(e, sys.stderr)
        raise StatsError(f"cannot read {path}") from None
    if status is None:
        raise StatsError(f"{path} has no status listener ('status: listen:'); analytics need one")
    return dict(status)


def _local_url(listen: str) -> str:
    """The URL to reach a listener bound to ``listen`` from this machine."""
    from ferrogate.addresses import join_host_port, split_host_port

    host, port = split_host_port(listen)
    host = host.strip("[]")
    if host == "0.0.0.0":
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://{join_host_port(host, port)}"


def _get(client: Any, url: str, path: str, params: dict[str, str]) -> Any:
    import httpx

    try:
        resp = client.get(path, params=params)
    except httpx.TransportError as e:
        raise StatsError(
            f"nothing answers at {url} ({e.__class__.__name__}): is the gateway running?"
        ) from None
    try:
        body = resp.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if resp.status_code == 401:
        raise StatsError(
            f"the admin token was refused by {url} (give --token, {TOKEN_ENV}, "
            "or run with the config that has it)"
        )
    if resp.status_code == 403:
        raise StatsError(f"{url} has no admin token configured: set status.admin_token")
    if resp.status_code != 200 or not isinstance(body, dict):
        message = error.get("message") if isinstance(error, dict) else resp.text[:200]
        raise StatsError(f"{url}{path} answered {resp.status_code}: {message}")
    return body


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.001:
        return f"{value * 1e6:.0f}us"
    if value < 1:
        return f"{value * 1000:.1f}ms"
    return f"{value:.2f}s"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _percent(rate: float) -> str:
    return f"{rate * 100:.2f}%"


def _print_report(url: str, since: str, by: str, data: dict[str, Any]) -> None:
    s = data["summary"]
    print(f"ferrogate stats: the last {since}, from {url}")
    print(f"  requests  {s['requests']}  ({s['rps']:.2f}/s)")
    print(f"  errors    {s['errors']}  ({_percent(s['error_rate'])})")
    print(
        f"  latency   p50 {_seconds(s['p50'])}  p95 {_seconds(s['p95'])}  "
        f"p99 {_seconds(s['p99'])}  mean {_seconds(s['mean'])}"
    )
    print(f"  bytes     in {_bytes(s['bytes_in'])}  out {_bytes(s['bytes_out'])}")
    print()
    rows = data["top"]["rows"]
    if rows:
        header = [by.upper(), "REQUESTS", "ERRORS", "ERROR%", "P50", "P95", "P99", "BYTES_OUT"]
        table = [
            [
                r["key"] or "(none)",
                str(r["requests"]),
                str(r["errors"]),
                _percent(r["error_rate"]),
                _seconds(r["p50"]),
                _seconds(r["p95"]),
                _seconds(r["p99"]),
                _bytes(r["bytes_out"]),
            ]
            for r in rows
        ]
        print(_format_table(header, table))
        print()
    statuses = data["statuses"]
    table = []
    for cls, count in statuses["classes"].items():
        if count:
            table.append([cls, str(count)])
            table += [
                [f"  {r['status']}", str(r["requests"])]
                for r in statuses["rows"]
                if f"{r['status'] // 100}xx" == cls
            ]
    if table:
        print(_format_table(["STATUS", "REQUESTS"], table))
    elif not s["requests"]:
        print("no requests in this time")


def run_stats(args: argparse.Namespace) -> int:
    import httpx

    try:
        parse_time(f"-{args.since}", time.time())
    except ValueError:
        print(f"ferrogate: --since: expected a duration like 15m, 1h, 7d; got {args.since!r}")
        return 2
    try:
        status: dict[str, Any] = {}
        if args.config is not None and (args.url is None or args.token is None):
            status = _status_of_config(args.config)
        elif args.url is None:
            raise StatsError("give -c FILE (the gateway's config) or --url of its status listener")
        url = (args.url or _local_url(status["listen"])).rstrip("/")
        token = args.token or os.environ.get(TOKEN_ENV) or status.get("admin_token")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        params = {"from": f"-{args.since}"}
        with httpx.Client(base_url=url, headers=headers, timeout=args.timeout) as client:
            data = {
                "summary": _get(client, url, "/api/analytics/summary", params),
                "top": _get(
                    client,
                    url,
                    "/api/analytics/top",
                    {**params, "by": args.by, "limit": str(args.limit)},
                ),
                "statuses": _get(client, url, "/api/analytics/statuses", params),
            }
    except StatsError as e:
        print(f"ferrogate: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print_report(url, args.since, args.by, data)
    return 0
