"""``DELETE /cache`` on the status listener: purge cached responses on every worker.

Workers are separate processes with their own cache stores. The master appends one JSON
line per purge to ``<runtime file>.cache-purge``; each worker reads the lines added since it
last looked, every 100 ms (rust/engine/src/cache.rs, ``watch_purges``), so a purge reaches
every worker, and a replacement worker (which starts empty) skips what came before it.
"""

import contextlib
import json
import threading
from pathlib import Path
from typing import Any

from ferrogate.events import emit
from ferrogate.status_server import Reply, Request, Route, error_reply, json_reply

__all__ = ["CachePurge", "purge_file"]


def purge_file(runtime: Path) -> Path:
    """Where purges for the workers of ``runtime`` are written (the data plane reads it)."""
    return runtime.with_name(runtime.name + ".cache-purge")


class CachePurge:
    """The purge endpoint; needs the admin token."""

    def __init__(self, runtime: Path) -> None:
        self.path = purge_file(runtime)
        self._lock = threading.Lock()
        # A fresh master: earlier purges are of stores that are gone.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def routes(self) -> list[Route]:
        return [Route("/cache", self._purge, methods=("DELETE",))]

    def _purge(self, req: Request) -> Reply:
        key, prefix = req.query.get("key"), req.query.get("prefix")
        if (key is None) == (prefix is None):
            return error_reply(400, "bad_request", "give exactly one of ?key= or ?prefix=")
        purge = {"key": key} if key is not None else {"prefix": prefix}
        if not (key or prefix or "").startswith("/"):
            return error_reply(400, "bad_request", "a key or prefix is a path: it starts with /")
        line = json.dumps(purge, separators=(",", ":")) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(line)
        emit("info", "cache_purge", **purge)
        return json_reply({"purge": purge, "applied_within": 0.1}, status=202)

    def reconfigure(self, normalized: dict[str, Any]) -> None:
        pass

    def worker_exited(self, worker_id: int) -> None:
        pass

    def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
