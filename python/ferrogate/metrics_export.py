"""Prometheus exposition of the whole gateway: every worker's snapshot summed."""

from pathlib import Path
from typing import Any

from ferrogate.status_server import Route


class MetricsExport:
    def __init__(self, runtime: Path, normalized: dict[str, Any]) -> None:
        self.runtime = runtime

    def routes(self) -> list[Route]:
        return []

    def reconfigure(self, normalized: dict[str, Any]) -> None:
        pass

    def worker_exited(self, worker_id: int) -> None:
        pass

    def note_worker_restart(self) -> None:
        pass

    def note_reload(self, ok: bool) -> None:
        pass

    def stop(self) -> None:
        pass
