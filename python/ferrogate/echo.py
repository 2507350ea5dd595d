"""``python -m ferrogate.echo``: the built-in echo upstream, started by the master."""

import argparse
import signal
import sys
import traceback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ferrogate.echo",
        description="The echo upstream (started by `ferrogate run` when `echo` is configured).",
    )
    parser.add_argument("--fd", type=int, required=True, help="listening socket fd")
    args = parser.parse_args(argv)
    # Ctrl-C reaches the whole process group; the master stops us after the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGHUP stays blocked as the master spawned us: the echo has nothing to reload.
    from ferrogate import _core

    try:
        _core.serve_echo(args.fd)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
