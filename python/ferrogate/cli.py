"""The ``ferrogate`` command: run, check, routes, plugins, schema, reload, stats,
hash-password."""

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

# How long `ferrogate reload` waits for the master to report the outcome.
_RELOAD_TIMEOUT = 15.0


@contextlib.contextmanager
def _config_file(path: str | None) -> Iterator[str]:
    """The given config, or the bundled quickstart (as a real file for as long as needed)."""
    if path is not None:
        yield path
        return
    with as_file(files("ferrogate") / "quickstart.yaml") as bundled:
        yield str(bundled)


def _print_problems(error: Exception, stream: Any = None) -> None:
    from ferrogate.config import ConfigError

    assert isinstance(error, ConfigError)
    for problem in error.problems:
        print(problem, file=stream or sys.stdout)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


# --- commands -------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from ferrogate.master import run

    with _config_file(args.config) as path:
        return run(path, args.workers, args.pid_file)


def _cmd_check(args: argparse.Namespace) -> int:
    from ferrogate.config import ConfigError, load_config

    status = 0
    for path in args.files:
        try:
            load_config(path)
        except ConfigError as e:
            _print_problems(e)
            count = len(e.problems)
            print(f"{path}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
            status = 2
        else:
            print(f"{path}: ok")
    return status


def _format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)


def _cmd_routes(args: argparse.Namespace) -> int:
    from ferrogate import _core
    from ferrogate.config import ConfigError, load_config

    with _config_file(args.config) as path:
        try:
            loaded = load_config(path)
        except ConfigError as e:
            _print_problems(e, sys.stderr)
            return 2
    chains = {
        r["name"]: [
            f"{e['name']}({e['priority']})" for e in (r.get("plugins") or {}).get("entries", [])
        ]
        for r in loaded.normalized["routes"]
    }
    rows = []
    for row in _core.route_table(loaded.json):
        methods = row["methods"]
        predicates = row["predicates"]
        assert isinstance(methods, list) and isinstance(predicates, list)
        rows.append(
            [
                str(row["host"]),
                str(row["path"]),
                ",".join(map(str, methods)) or "*",
                " & ".join(map(str, predicates)) or "-",
                str(row["priority"]),
                str(row["route"]),
                str(row["upstream"]),
                "-" if row["rewrite"] is None else str(row["rewrite"]),
                " > ".join(chains.get(str(row["route"]), [])) or "-",
            ]
        )
    header = [
        "HOST",
        "PATH",
        "METHODS",
        "PREDICATES",
        "PRIORITY",
        "ROUTE",
        "UPSTREAM",
        "REWRITE",
        "PLUGINS (run order, priority)",
    ]
    print(_format_table(header, rows))
    return 0


def _field_lines(schema: dict[str, Any], defs: dict[str, Any], indent: str) -> list[str]:
    """One line per config field: name, type, default, description."""
    if "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    props = schema.get("properties", {})
    required = set(schema.get("required", []))
    lines = []
    for name, prop in props.items():
        target = defs.get(prop.get("$ref", "").rsplit("/", 1)[-1], prop)
        kind = target.get("type") or ("object" if "properties" in target else "any")
        if "anyOf" in prop:
            kind = " | ".join(str(a.get("type", "object")) for a in prop["anyOf"])
        default = " (required)" if name in required else ""
        if "default" in prop:
            default = f" = {json.dumps(prop['default'])}"
        text = prop.get("description") or target.get("description") or ""
        lines.append(f"{indent}{name}: {kind}{default}" + (f"  {text}" if text else ""))
    return lines


def _plugin_stats(args: argparse.Namespace) -> int:
    """Sum the per-plugin timings the running workers publish."""
    from ferrogate.runtime_files import plugin_stats_files

    if args.pid_file is not None:
        pid_file = Path(args.pid_file)
    elif args.config is not None:
        pid_file = _pid_file_of_config(args.config)
    else:
        print("--stats needs -c FILE or --pid-file P of a running gateway", file=sys.stderr)
        return 2
    totals: dict[tuple[str, str, str], dict[str, int]] = {}
    workers = 0
    for path in plugin_stats_files(pid_file):
        try:
            record = json.loads(path.read_text())
            os.kill(int(record["pid"]), 0)
        except (OSError, ValueError, KeyError):
            continue  # a worker that is gone, or a file being replaced
        workers += 1
        for route, plugins in record["routes"].items():
            for plugin, phases in plugins.items():
                for phase, counts in phases.items():
                    total = totals.setdefault((route, plugin, phase), dict.fromkeys(counts, 0))
                    for key, value in counts.items():
                        total[key] = (
                            max(total[key], value) if key == "max_ns" else total[key] + value
                        )
    if args.json:
        out = [
            {"route": r, "plugin": p, "phase": ph, "workers": workers, **c}
            for (r, p, ph), c in sorted(totals.items())
        ]
        print(json.dumps(out, indent=2))
        return 0
    if not workers:
        print(f"no plugin timings published for {pid_file} (is it running, with plugins?)")
        return 1
    rows = [
        [
            r,
            p,
            ph,
            str(c["calls"]),
            f"{c['total_ns'] / max(c['calls'], 1) / 1000:.1f}",
            f"{c['max_ns'] / 1000:.1f}",
            str(c["errors"]),
            str(c["over_budget"]),
        ]
        for (r, p, ph), c in sorted(totals.items())
    ]
    header = ["ROUTE", "PLUGIN", "PHASE", "CALLS", "MEAN_US", "MAX_US", "ERRORS", "OVER_BUDGET"]
    print(_format_table(header, rows))
    print(f"({workers} worker{'s' if workers != 1 else ''}; counters since start)")
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    import msgspec

    from ferrogate.plugin_registry import discover

    if args.stats:
        return _plugin_stats(args)
    plugins_dir = args.plugins_dir
    if plugins_dir is None and args.config is not None:
        from ferrogate.config import ConfigError, load_config

        try:
            plugins_dir = load_config(args.config).normalized.get("plugins_dir")
        except ConfigError as e:
            _print_problems(e, sys.stderr)
            return 2
    registry = discover(plugins_dir)
    specs = sorted(registry.plugins.values(), key=lambda s: s.name)
    if args.names:
        unknown = [n for n in args.names if n not in registry.plugins]
        if unknown:
            print(f"unknown plugin: {', '.join(unknown)}", file=sys.stderr)
            return 2
        specs = [registry.plugins[n] for n in args.names]
    described = []
    for spec in specs:
        (schema,), defs = msgspec.json.schema_components([spec.config_type])
        if "$ref" in schema:
            # Inline the config's own object; nested types stay in $defs.
            schema = defs.pop(schema["$ref"].rsplit("/", 1)[-1])
        described.append((spec, schema, defs))
    if args.json:
        out = [
            {
                "name": spec.name,
                "source": spec.source,
                "priority": spec.priority,
                "hooks": {h: ("async" if a else "sync") for h, a in spec.hooks.items()},
                "description": spec.doc,
                "config_schema": {**schema, "$defs": defs} if defs else schema,
            }
            for spec, schema, defs in described
        ]
        print(json.dumps(out, indent=2))
    else:
        for spec, schema, defs in described:
            hooks = ", ".join(f"{h}{' (async)' if a else ''}" for h, a in spec.hooks.items())
            print(f"{spec.name}  (priority {spec.priority}, {spec.source})")
            if spec.doc:
                print(f"  {spec.doc}")
            print(f"  hooks: {hooks}")
            fields = _field_lines(schema, defs, "    ")
            print("  config:" if fields else "  config: none")
            for line in fields:
                print(line)
            print()
    for problem in [*registry.problems, *registry.warnings]:
        print(f"warning: {problem}", file=sys.stderr)
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from ferrogate.config import config_schema

    print(json.dumps(config_schema(), indent=2))
    return 0


def _pid_file_of_config(path: str) -> Path:
    """The pid file a master of ``path`` uses, even if the file is now broken.

    Only ``pid_file`` is read here: the master validates the file itself when it reloads,
    with its own environment, and ``reload`` reports what it found.
    """
    from ferrogate.problems import ConfigError
    from ferrogate.runtime_files import resolve_pid_file
    from ferrogate.yaml_source import parse_source

    configured = None
    with contextlib.suppress(OSError, UnicodeDecodeError, ConfigError):
        data = parse_source(Path(path).read_text(encoding="utf-8"), path).data
        if isinstance(data, dict) and isinstance(data.get("pid_file"), str):
            configured = data["pid_file"] or None
    return resolve_pid_file(path, configured)


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def _cmd_reload(args: argparse.Namespace) -> int:
    from ferrogate.runtime_files import read_pid, status_file

    if args.pid_file is not None:
        pid_file = Path(os.path.abspath(args.pid_file))
    else:
        with _config_file(args.config) as path:
            pid_file = _pid_file_of_config(path)
    pid = read_pid(pid_file)
    if pid is None:
        why = "is stale" if pid_file.exists() else "does not exist"
        print(f"ferrogate: no master is running (pid file {pid_file} {why})", file=sys.stderr)
        return 1
    status_path = status_file(pid_file)
    before = _read_status(status_path)
    os.kill(pid, signal.SIGHUP)
    if before is None or before.get("pid") != pid:
        print(f"sent SIGHUP to the master (pid {pid}); see its log for the outcome")
        return 0
    deadline = time.monotonic() + _RELOAD_TIMEOUT
    while time.monotonic() < deadline:
        after = _read_status(status_path)
        if after is not None and after.get("reloads", 0) > before.get("reloads", 0):
            if after.get("ok"):
                print(f"reloaded: the master (pid {pid}) applied {after.get('config')}")
                return 0
            for problem in after.get("problems", []):
                print(problem)
            print(
                "reload refused: the master keeps serving the previous config",
                file=sys.stderr,
            )
            return 2
        time.sleep(0.05)
    print(
        f"ferrogate: sent SIGHUP to the master (pid {pid}) but it did not report back within "
        f"{_RELOAD_TIMEOUT:.0f}s",
        file=sys.stderr,
    )
    return 1


def _cmd_hash_password(args: argparse.Namespace) -> int:
    from ferrogate.consumers import hash_password

    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("ferrogate: the passwords differ", file=sys.stderr)
            return 2
    else:
        # One line, as `echo "$PW" | ferrogate hash-password` sends it.
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("ferrogate: the password is empty", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from ferrogate.analytics_cli import run_stats

    return run_stats(args)


# --- argument parsing -----------------------------------------------------------------------


def _cmd_import_openapi(args: argparse.Namespace) -> int:
    from ferrogate.openapi_import import OpenApiImportError, Options, import_openapi

    options = Options(
        api=args.api,
        upstream=args.upstream,
        version=args.api_version,
        base_path=args.base_path,
        validate=args.validate,
        listen=args.listen,
    )
    try:
        text = import_openapi(args.spec, options)
    except OpenApiImportError as e:
        print(f"ferrogate: {e}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"{args.output}: written", file=sys.stderr)
    return 0


def _version_text() -> str:
    from ferrogate import __version__, _core

    return f"ferrogate {__version__} ({_core.__build__} build)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferrogate",
        description="An API gateway: a Rust data plane run and configured from Python.",
    )
    parser.add_argument("--version", action="version", version=_version_text())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the gateway (the quickstart without -c)")
    run.add_argument("-c", "--config", metavar="FILE", help="config file (YAML or JSON)")
    run.add_argument(
        "--workers", type=_positive_int, metavar="N", help="worker processes (overrides config)"
    )
    run.add_argument("--pid-file", metavar="P", help="pid file (overrides config and default)")
    run.set_defaults(handler=_cmd_run)

    check = commands.add_parser("check", help="validate config files, printing every problem")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(handler=_cmd_check)

    routes = commands.add_parser("routes", help="print the compiled route table")
    routes.add_argument("-c", "--config", metavar="FILE", help="config file (default: quickstart)")
    routes.set_defaults(handler=_cmd_routes)

    plugins = commands.add_parser(
        "plugins", help="list the available plugins with their hooks and config schema"
    )
    plugins.add_argument("names", nargs="*", metavar="NAME", help="only these plugins")
    plugins.add_argument("-c", "--config", metavar="FILE", help="include its plugins_dir")
    plugins.add_argument("--plugins-dir", metavar="DIR", help="a directory of plugin files")
    plugins.add_argument("--json", action="store_true", help="JSON, with full config schemas")
    plugins.add_argument(
        "--stats",
        action="store_true",
        help="time spent per plugin and phase in the running gateway (-c or --pid-file)",
    )
    plugins.add_argument("--pid-file", metavar="P", help="with --stats: the master's pid file")
    plugins.set_defaults(handler=_cmd_plugins)

    imports = commands.add_parser("import", help="make a config from another description")
    kinds = imports.add_subparsers(dest="kind", required=True, metavar="KIND")
    openapi = kinds.add_parser(
        "openapi", help="an API with one route per operation of an OpenAPI 3 document"
    )
    openapi.add_argument("spec", metavar="SPEC", help="the OpenAPI 3.0/3.1 document (YAML or JSON)")
    openapi.add_argument("--api", metavar="NAME", help="the API's name (default: from the title)")
    openapi.add_argument(
        "--upstream", metavar="URL", help="where the API is served (default: its first server)"
    )
    openapi.add_argument(
        "--api-version", metavar="V", help="the version's name (default: v<major of info.version>)"
    )
    openapi.add_argument("--base-path", metavar="P", help="the API's path (default: /<name>)")
    openapi.add_argument(
        "--validate", action="store_true", help="check requests against the document"
    )
    openapi.add_argument(
        "--listen", default="127.0.0.1:8080", metavar="ADDR", help="the config's listen address"
    )
    openapi.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    openapi.set_defaults(handler=_cmd_import_openapi)

    schema = commands.add_parser("schema", help="print the JSON Schema of the config file")
    schema.set_defaults(handler=_cmd_schema)

    reload = commands.add_parser("reload", help="make a running master reload its config")
    which = reload.add_mutually_exclusive_group()
    which.add_argument("-c", "--config", metavar="FILE", help="the config the master runs")
    which.add_argument("--pid-file", metavar="P", help="the master's pid file")
    reload.set_defaults(handler=_cmd_reload)

    hash_pw = commands.add_parser(
        "hash-password",
        help="print the scrypt hash of a password (from stdin, or asked for) for password_hash",
    )
    hash_pw.set_defaults(handler=_cmd_hash_password)

    stats = commands.add_parser(
        "stats", help="traffic, errors and latency of a running gateway (its analytics)"
    )
    stats.add_argument("-c", "--config", metavar="FILE", help="the config the gateway runs")
    stats.add_argument(
        "--since", default="1h", metavar="D", help="how far back: 15m, 1h, 7d (default 1h)"
    )
    stats.add_argument(
        "--by",
        choices=("route", "consumer", "upstream"),
        default="route",
        help="what the top table groups by (default route)",
    )
    stats.add_argument(
        "--limit", type=_positive_int, default=10, metavar="N", help="rows of the top table"
    )
    stats.add_argument("--json", action="store_true", help="the API's answers as JSON")
    stats.add_argument("--url", help="the status listener, e.g. http://127.0.0.1:9901")
    stats.add_argument(
        "--token", help="the admin token (else $FERROGATE_ADMIN_TOKEN, else the config's)"
    )
    stats.add_argument("--timeout", type=float, default=10.0, metavar="S", help=argparse.SUPPRESS)
    stats.set_defaults(handler=_cmd_stats)

    from ferrogate.admin_cli import add_parser as add_admin_parser

    add_admin_parser(commands)

    from ferrogate.config_sync import add_parser as add_sync_parser

    add_sync_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    status: int = args.handler(args)
    return status
