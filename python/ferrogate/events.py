"""Structured log events: one JSON object per line on stderr, for people and log shippers."""

import json
import sys
import time


def emit(level: str, event: str, **fields: object) -> None:
    """Write ``{"ts", "level", "event", **fields}`` as one line; never raises."""
    record = {
        # Unix seconds, like the events the Rust workers write to the same stream.
        "ts": round(time.time(), 6),
        "level": level,
        "event": event,
        **fields,
    }
    try:
        sys.stderr.write(json.dumps(record, default=str, separators=(",", ":")) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        # A closed or broken stderr must not take the master down with it.
        pass
