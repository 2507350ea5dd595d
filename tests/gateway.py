"""Starting and inspecting a real ``ferrogate run`` process for the integration tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml


def ferrogate_cli() -> str:
    """The ``ferrogate`` console script of the Python running the tests."""
    beside = Path(sys.executable).with_name("ferrogate")
    if beside.exists():
        return str(beside)
    found = shutil.which("ferrogate")
    if found:
        return found
    raise RuntimeError("the ferrogate command is not installed: pip install -e '.[test]'")


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``ferrogate ARGS`` to completion and capture its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [ferrogate_cli(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        stdin=subprocess.DEVNULL,
    )


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now and never handed out before in this process: two ports
    picked before either is bound (a gateway's and its status listener's) must differ."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


# ---- /proc helpers ---------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name is in parentheses and may contain spaces
    return data[data.rindex(")") + 2 :].split()


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def is_alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and parent_pid(int(entry.name)) == pid:
            kids.append(int(entry.name))
    return sorted(kids)


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def listen_inodes(port: int) -> set[str]:
    """Socket inodes of the TCP sockets listening on ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def holds_socket(pid: int, inodes: set[str]) -> bool:
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


# ---- the gateway -----------------------------------------------------------------------------


class Gateway:
    """``ferrogate run -c <yaml> --workers N --pid-file <file>`` on a free loopback port."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        *,
        workers: int = 2,
        env: dict[str, str] | None = None,
    ) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.workers = workers
        self.env = env or {}
        self.config_path = self.dir / "gateway.yaml"
        self.pid_file = self.dir / "gateway.pid"
        self.stdout_path = self.dir / "stdout.log"
        self.stderr_path = self.dir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._known: dict[int, int | None] = {}  # pid -> start time, for cleanup by PID
        self.write_config(config)

    # -- config ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def full_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"listen": [self.address], "grace_period": "3s", **config}

    def write_config(self, config: dict[str, Any]) -> None:
        self.write_config_text(yaml.safe_dump(self.full_config(config), sort_keys=False))

    def write_config_text(self, text: str) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> None:
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [
                    ferrogate_cli(),
                    "run",
                    "-c",
                    str(self.config_path),
                    "--workers",
                    str(self.workers),
                    "--pid-file",
                    str(self.pid_file),
                ],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        self._remember(self.proc.pid)
        self.wait_ready(timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _remember(self, pid: int) -> None:
        self._known.setdefault(pid, start_time(pid))

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the gateway answers HTTP and all its workers hold the listening socket."""
        deadline = time.monotonic() + timeout
        answered = False
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ferrogate run exited with {self.proc.returncode} during startup\n"
                    f"--- stderr ---\n{self.stderr_text()}\n--- stdout ---\n{self.stdout_text()}"
                )
            if not answered:
                answered = self._probe()
            if answered and (self.workers < 2 or len(self.worker_pids()) >= self.workers):
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"ferrogate did not become ready on {self.address} within {timeout}s "
            f"(answered={answered}, workers={self.worker_pids()})\n"
            f"--- stderr ---\n{self.stderr_text()}"
        )

    def _probe(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                s.sendall(
                    b"GET /__ferrogate_probe__ HTTP/1.1\r\nHost: probe.invalid\r\n"
                    b"Connection: close\r\n\r\n"
                )
                return s.recv(16).startswith(b"HTTP/1.")
        except OSError:
            return False

    def worker_pids(self) -> list[int]:
        """Children of the master that hold a socket listening on the gateway's port."""
        if self.proc is None:
            return []
        inodes = listen_inodes(self.port)
        pids = [p for p in children(self.proc.pid) if holds_socket(p, inodes)]
        for p in pids:
            self._remember(p)
        return pids

    def rss(self) -> int:
        """Summed resident memory of the worker processes, in bytes."""
        return sum(rss_bytes(p) for p in self.worker_pids())

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self) -> None:
        """Stop the master by PID, then any process of ours that outlived it."""
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.worker_pids()
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
        deadline = time.monotonic() + 3
        for pid, started in self._known.items():
            while is_alive(pid) and start_time(pid) == started and time.monotonic() < deadline:
                time.sleep(0.05)
            if is_alive(pid) and start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    # -- logs ------------------------------------------------------------------------------------
    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stdout_text(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- requests --------------------------------------------------------------------------------
    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 15.0)
        return httpx.Client(base_url=self.url, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        kwargs.setdefault("timeout", 15.0)
        return httpx.get(self.url + path, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        kwargs.setdefault("timeout", 15.0)
        return httpx.request(method, self.url + path, **kwargs)

    def wait_for_status(self, path: str, status: int, timeout: float = 5.0, **kwargs: Any) -> float:
        """Poll ``GET path`` until it answers ``status``; return the seconds it took."""
        t0 = time.monotonic()
        last: object = None
        while time.monotonic() - t0 < timeout:
            try:
                last = self.get(path, timeout=2.0, **kwargs).status_code
            except httpx.HTTPError as exc:
                last = exc
            if last == status:
                return time.monotonic() - t0
            time.sleep(0.05)
        raise AssertionError(f"GET {path} did not answer {status} within {timeout}s (last: {last})")


GatewayFactory = Callable[..., Gateway]
