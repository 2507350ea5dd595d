"""The dashboard page on the status listener."""

from typing import Any

from ferrogate.status_server import Route


class Dashboard:
    def __init__(self, analytics: Any) -> None:
        self.analytics = analytics

    def routes(self) -> list[Route]:
        return []

    def reconfigure(self, normalized: dict[str, Any]) -> None:
        pass

    def worker_exited(self, worker_id: int) -> None:
        pass

    def stop(self) -> None:
        pass
