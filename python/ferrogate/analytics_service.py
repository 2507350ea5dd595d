"""The analytics store's service in the master: ingest worker buckets, answer queries."""

from pathlib import Path
from typing import Any

from ferrogate.status_server import Route


class AnalyticsService:
    def __init__(self, runtime: Path, normalized: dict[str, Any], metrics: Any) -> None:
        self.runtime = runtime

    def routes(self) -> list[Route]:
        return []

    def reconfigure(self, normalized: dict[str, Any]) -> None:
        pass

    def worker_exited(self, worker_id: int) -> None:
        pass

    def stop(self) -> None:
        pass
