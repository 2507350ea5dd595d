"""``ferrogate run`` without arguments serves the quickstart: a gateway in front of an echo."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from gateway import children, ferrogate_cli, is_alive, port_is_free, start_time

GATEWAY_PORT, ECHO_PORT = 8080, 8081


def test_run_without_arguments_proxies_to_the_echo_upstream(tmp_path: Path) -> None:
    busy = [p for p in (GATEWAY_PORT, ECHO_PORT) if not port_is_free(p)]
    if busy:
        pytest.fail(
            f"the quickstart needs 127.0.0.1 ports {GATEWAY_PORT} and {ECHO_PORT}, but {busy} "
            "are in use: stop what listens there and run the test again"
        )
    stderr = (tmp_path / "stderr.log").open("wb")
    proc = subprocess.Popen(
        [ferrogate_cli(), "run"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)},
    )
    started: dict[int, int | None] = {}
    try:
        resp = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                resp = httpx.post(
                    f"http://127.0.0.1:{GATEWAY_PORT}/hello/world?lang=en",
                    content=b"ping",
                    headers={"X-Demo": "1"},
                    timeout=2,
                )
                if resp.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        started.update((p, start_time(p)) for p in children(proc.pid))
        log = (tmp_path / "stderr.log").read_text(errors="replace")
        assert proc.poll() is None, f"ferrogate run exited with {proc.returncode}:\n{log}"
        assert resp is not None, f"nothing answered on port {GATEWAY_PORT}:\n{log}"
        assert resp.status_code == 200, resp.text
        echo = resp.json()
        assert echo["method"] == "POST"
        assert echo["path"] == "/hello/world"
        assert echo["headers"]["x-demo"] == ["1"]
        assert echo["headers"]["x-forwarded-for"] == ["127.0.0.1"]
        assert "ping" in resp.text
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        stderr.close()
        for pid, since in started.items():  # workers and the echo upstream, by PID
            if is_alive(pid) and start_time(pid) == since:
                os.kill(pid, signal.SIGKILL)
