"""A real gateway with its admin API listener, and a client of that API, for the admin tests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from gateway import Gateway, free_port

ADMIN_TOKEN = "admin-token-0123456789"
OPERATOR_TOKEN = "operator-token-0123456789"
READER_TOKEN = "reader-token-0123456789"


def admin_section(port: int, store: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{port}",
        "tokens": {
            "root": {"token": "${ADMIN_TOKEN}", "role": "admin"},
            "ops": {"token": OPERATOR_TOKEN, "role": "operator"},
            "reader": {"token": {"file": "reader.token"}, "role": "read-only"},
        },
        **({"store": store} if store is not None else {}),
    }


class AdminGateway:
    """``ferrogate run`` with ``admin:`` set; ``api(token)`` is an httpx client of the API."""

    def __init__(
        self, workdir: Path, config: dict[str, Any], *, store: dict[str, Any] | None = None
    ) -> None:
        self.admin_port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "reader.token").write_text(READER_TOKEN + "\n")
        self.config = {**config, "admin": admin_section(self.admin_port, store)}
        self.gw = Gateway(workdir, self.config, env={"ADMIN_TOKEN": ADMIN_TOKEN})

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> None:
        self.gw.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(self.admin_url + "/openapi.json", timeout=2)
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        self.gw.stop()

    def api(self, token: str | None = ADMIN_TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.admin_url, headers=headers, timeout=30)


def served_within(
    gw: Gateway, path: str, status: int, timeout: float, headers: dict[str, str] | None = None
) -> float:
    """Seconds until every one of many fresh connections gets ``status`` for ``path``."""
    t0 = time.monotonic()
    limits = httpx.Limits(max_keepalive_connections=0)
    with gw.client(limits=limits, timeout=5) as client:
        while True:
            codes = {client.get(path, headers=headers).status_code for _ in range(8)}
            elapsed = time.monotonic() - t0
            if codes == {status}:
                return elapsed
            if elapsed > timeout:
                raise AssertionError(f"GET {path}: {codes} after {elapsed:.2f}s, want {status}")
            time.sleep(0.02)
