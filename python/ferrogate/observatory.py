"""The master's side of observability: the status listener and what it serves.

Workers observe requests (``rust/engine/src/observe.rs``) and hand the master their
counters as files beside the runtime file: metric snapshots (``<stem>.metrics.<id>.json``,
rewritten every ``metrics.publish_interval``) and analytics buckets (spooled under
``<stem>.analytics/``). The master turns them into the Prometheus exposition, the
analytics store, alerts and the dashboard. Nothing here is on the request path.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ferrogate.events import emit
from ferrogate.status_server import Reply, Request, Route, StatusServer, json_reply

if TYPE_CHECKING:
    from ferrogate.metrics_export import MetricsExport

__all__ = ["Component", "Observatory"]


class Component(Protocol):
    """A part of the status listener's world (metrics, analytics, alerts, dashboard)."""

    def routes(self) -> list[Route]: ...

    def reconfigure(self, normalized: dict[str, Any]) -> None:
        """A reload was applied; ``normalized`` is the new config."""

    def worker_exited(self, worker_id: int) -> None:
        """Worker ``worker_id`` died or retired (its replacement starts from zero)."""

    def stop(self) -> None: ...


class Observatory:
    def __init__(self, runtime: Path, normalized: dict[str, Any]) -> None:
        self.runtime = runtime
        self.status = normalized.get("status")
        self.server: StatusServer | None = None
        self.components: list[Component] = []
        self._normalized = normalized
        # The Prometheus export, for the master's own counters (restarts, reloads).
        self.metrics: MetricsExport | None = None

    def start(self) -> None:
        if self.status is None:
            return
        from ferrogate.ai.usage_export import AiUsageExport
        from ferrogate.alerts import AlertService
        from ferrogate.analytics_service import AnalyticsService
        from ferrogate.cache_purge import CachePurge
        from ferrogate.dashboard import Dashboard
        from ferrogate.metrics_export import MetricsExport

        normalized = self._normalized
        metrics = self.metrics = MetricsExport(self.runtime, normalized)
        analytics = AnalyticsService(self.runtime, normalized, metrics)
        alerts = AlertService(analytics, normalized, metrics)
        self.components = [
            metrics,
            analytics,
            alerts,
            Dashboard(normalized),
            CachePurge(self.runtime),
            AiUsageExport(self.runtime, normalized, metrics, analytics),
        ]
        routes = [Route("/healthz", self._healthz, auth=False)]
        for c in self.components:
            routes += c.routes()
        self.server = StatusServer(self.status["listen"], self.status.get("admin_token"), routes)
        self.server.set_token(
            self.status.get("admin_token"), bool(self.status.get("metrics_need_token"))
        )
        self.server.start()
        emit("info", "status_listening", listen=self.status["listen"])

    def _healthz(self, req: Request) -> Reply:
        return json_reply({"status": "ok"})

    def reconfigure(self, normalized: dict[str, Any]) -> None:
        status = normalized.get("status")
        if self.server is None:
            if status is not None:
                emit("warning", "status_change_needs_restart", configured=status["listen"])
            return
        if status is None or status["listen"] != self.status["listen"]:  # type: ignore[index]
            emit(
                "warning",
                "status_change_needs_restart",
                configured=status["listen"] if status else None,
                serving=self.server.listen,
            )
        else:
            self.server.set_token(status.get("admin_token"), bool(status.get("metrics_need_token")))
        for c in self.components:
            c.reconfigure(normalized)

    def worker_exited(self, worker_id: int) -> None:
        for c in self.components:
            c.worker_exited(worker_id)

    def note_worker_restart(self) -> None:
        """A worker died and is being replaced (a resize retiring one is no restart)."""
        if self.metrics is not None:
            self.metrics.note_worker_restart()

    def note_reload(self, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.note_reload(ok)

    def stop(self) -> None:
        for c in reversed(self.components):
            c.stop()
        if self.server is not None:
            self.server.stop()
