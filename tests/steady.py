"""Steady, paced client traffic through a real gateway, and polling with a deadline: for the
tests of what the master learns from traffic over time (analytics, alerts, the dashboard)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from gateway import Gateway


class SteadyTraffic:
    """GET ``path`` at ``per_second`` from a thread of its own, until stopped; counts the
    statuses it got."""

    def __init__(
        self,
        gw: Gateway,
        path: str = "/",
        *,
        per_second: float = 160,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.gw, self.path, self.headers = gw, path, headers or {}
        self.interval = 1 / per_second
        self.statuses: Counter[int] = Counter()
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"traffic {path}", daemon=True)
        self._thread.start()

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    def _run(self) -> None:
        with self.gw.client(headers=self.headers) as client:
            due = time.monotonic()
            while not self._stop.is_set():
                self.statuses[client.get(self.path).status_code] += 1
                due += self.interval
                # behind schedule (a busy machine): carry on from now, no catch-up burst
                due = max(due, time.monotonic() - 0.05)
                self._stop.wait(max(0.0, due - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def poll(what: Callable[[], Any], timeout: float, message: str | Callable[[], str]) -> Any:
    """Call ``what`` until it returns something true (which is returned), or fail."""
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(0.05)
