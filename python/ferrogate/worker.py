"""``python -m ferrogate.worker``: one data plane worker process, started by the master."""

import argparse
import gc
import signal
import sys
import traceback
from pathlib import Path


def _fd_list(text: str) -> list[int]:
    try:
        fds = [int(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fds, got {text!r}") from None
    if not fds:
        raise argparse.ArgumentTypeError("at least one fd is needed")
    return fds


def _fd_and_sizes(text: str) -> tuple[int, int, int]:
    try:
        fd, limits, quotas = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FD:BYTES:BYTES, got {text!r}") from None
    return fd, limits, quotas


def _fd_and_size(text: str) -> tuple[int, int]:
    fd, _, size = text.partition(":")
    try:
        return int(fd), int(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FD:BYTES, got {text!r}") from None


class _PluginLoader:
    """Called by the data plane for each config with plugins (imported late: workers
    without plugins never load the plugin machinery)."""

    def __init__(self, runtime: str, worker_id: int) -> None:
        self.runtime = runtime
        self.worker_id = worker_id
        self.publishing = False

    def __call__(self, config_json: str) -> object:
        from ferrogate import plugin_host
        from ferrogate.runtime_files import plugin_stats_file

        plugin_host.set_worker_identity(Path(self.runtime), self.worker_id)
        host = plugin_host.load(config_json)
        # What is loaded now (modules, vocabularies, configs) lives as long as the config:
        # out of the collector's sight, the collections that requests' garbage triggers stay
        # short. Unfrozen first, so that a previous config's cycles can still be freed.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        if not self.publishing:
            self.publishing = True
            path = plugin_stats_file(Path(self.runtime), self.worker_id)
            plugin_host.publish_stats(path, self.worker_id)
        return host


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ferrogate.worker",
        description="A gateway worker (started by `ferrogate run`, not by hand).",
    )
    parser.add_argument("--config", required=True, help="normalized JSON config file")
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--fds", type=_fd_list, required=True, help="listening socket fds: 3,4")
    parser.add_argument(
        "--tls-fds", type=_fd_list, help="listening socket fds that serve HTTPS: 5,6"
    )
    parser.add_argument(
        "--limits",
        type=_fd_and_sizes,
        help="the shared rate limit and quota tables: FD:LIMIT_BYTES:QUOTA_BYTES",
    )
    parser.add_argument(
        "--health", type=_fd_and_size, help="the shared health check board: FD:BYTES"
    )
    args = parser.parse_args(argv)
    # Ctrl-C reaches the whole process group; the master turns it into an orderly SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The master starts us with SIGHUP blocked, since by default a reload SIGHUP would kill
    # a worker that is still starting. Ignored from here until the data plane installs its
    # handler, which then re-reads the config file once, so a reload in that gap still lands.
    # SIGUSR1 (reopen the access log) is treated the same way.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP, signal.SIGUSR1})
    from ferrogate import _core

    try:
        _core.serve(
            args.fds,
            args.config,
            args.worker_id,
            _PluginLoader(args.config, args.worker_id),
            args.limits,
            args.health,
            args.tls_fds,
        )
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
