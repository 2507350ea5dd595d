"""The master: owns the listening sockets and supervises the worker processes.

Workers are ``python -m ferrogate.worker`` processes in the master's own process group (so
Ctrl-C and CPU accounting cover the whole gateway). They inherit the listening sockets and
read the normalized config from the runtime file; the master rewrites that file and sends
them SIGHUP to reload. A worker that dies is replaced; one that keeps dying is restarted with
a growing delay. SIGTERM or SIGINT stop the workers gracefully, then the master.
"""

import contextlib
import json
import os
import queue
import re
import select
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from ferrogate.admin_api import AdminApi
from ferrogate.admin_store import StoreUnavailable
from ferrogate.config import ConfigError, LoadedConfig, load_config
from ferrogate.events import emit
from ferrogate.listeners import local_url, open_listener
from ferrogate.observatory import Observatory
from ferrogate.runtime_files import (
    metrics_snapshot_files,
    plugin_stats_files,
    read_pid,
    remove_quietly,
    resolve_pid_file,
    runtime_file,
    status_file,
    write_atomic,
)
from ferrogate.upstream_tls_config import warn_unverified

# Quota counters a node holds (consumer x quota pairs in the current windows), 16 bytes each.
QUOTA_SLOTS = 1 << 16
# Plugins' node-shared counters after the quota table (counters.rs): two tables of 2^15 slots.
COUNTER_BYTES = 2 * (1 << 15) * 16
# Targets whose active health check results the node's workers share (probe.rs), 32 bytes each.
HEALTH_SLOTS = 1 << 12

# Supervision wakes up at least this often even without signals (checks are cheap).
_TICK = 0.2
# A child that ran at least this long before dying is not crash-looping.
_STABLE_AFTER = 10.0
_MAX_BACKOFF = 30.0
# After stopping the workers, the echo upstream gets this long before SIGKILL.
_ECHO_STOP_TIMEOUT = 3.0


@dataclass
class _Slot:
    """One supervised child: a worker id or the echo upstream."""

    name: str
    argv: list[str]
    fds: tuple[int, ...]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    start_at: float = 0.0  # when to (re)start it if proc is None
    extra: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] | None = None  # None: the master's own environment


# glibc keeps at most 7 freed chunks per size in its per-thread cache by default. A worker
# finishing a burst of requests frees more than that of the same sizes, so the rest took
# the allocator's slow path and the next burst's allocations too (callgrind at 256
# connections: about 430 instructions per request, 2%). Other C libraries ignore this.
_WORKER_TUNABLES = "glibc.malloc.tcache_count=256"


def worker_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The environment a worker starts with: the master's, plus the allocator tuning
    unless the operator set that tunable."""
    env = dict(base)
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.tcache_count=" not in tunables:
        env["GLIBC_TUNABLES"] = f"{_WORKER_TUNABLES}:{tunables}" if tunables else _WORKER_TUNABLES
    return env


def _exit_description(returncode: int) -> dict[str, object]:
    if returncode < 0:
        try:
            return {"signal": signal.Signals(-returncode).name}
        except ValueError:
            return {"signal": -returncode}
    return {"exit_code": returncode}


class Master:
    def __init__(
        self, config_path: str, workers_override: int | None, pid_file_override: str | None
    ) -> None:
        self.config_path = config_path
        self.workers_override = workers_override
        self.pid_file_override = pid_file_override
        self.signals: list[int] = []
        self.listeners: list[socket.socket] = []
        # The node's rate limit and quota tables: one memfd every worker maps (ratelimit.rs).
        self.limits_fd: int | None = None
        self.limits_size = 0
        self.quotas_size = QUOTA_SLOTS * 16
        # Active health check results, shared so that a target is probed once per node.
        self.health_fd: int | None = None
        self.health_size = HEALTH_SLOTS * 32
        self.listen_addresses: list[str] = []
        # HTTPS listeners (the config's `tls.listen`), passed to the workers as --tls-fds.
        self.tls_listeners: list[socket.socket] = []
        self.tls_addresses: list[str] = []
        self.echo_socket: socket.socket | None = None
        self.echo_address: str | None = None
        self.workers: dict[int, _Slot] = {}
        self.echo: _Slot | None = None
        self.retiring: list[subprocess.Popen[bytes]] = []
        self.grace_period = 30.0
        self.reloads = 0
        self.pid_file = Path()
        self.runtime = Path()
        self.status = Path()
        self.owns_files = False
        self.observatory: Observatory | None = None
        # pid -> worker id of retired workers (resized away) still draining
        self._retired_ids: dict[int, int] = {}
        self.admin: AdminApi | None = None
        # Changes the admin API validated, applied by the main loop like a reload.
        self._admin_changes: queue.Queue[tuple[LoadedConfig, int, threading.Event]] = queue.Queue()
        self._admin_revision = 0

    # --- signals -----------------------------------------------------------------------

    def _install_signals(self) -> socket.socket:
        """Handlers only record the signal; the wakeup socket makes the main loop see it now."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake_w = wake_w  # keep it open for as long as the handlers may write to it
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        return wake_r

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum != signal.SIGCHLD:
            self.signals.append(signum)

    def _sleep(self, wake: socket.socket, timeout: float) -> None:
        with contextlib.suppress(InterruptedError):
            select.select([wake], [], [], max(0.0, timeout))
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while wake.recv(512):
                pass

    # --- start-up ----------------------------------------------------------------------

    def run(self) -> int:
        wake = self._install_signals()
        try:
            loaded = load_config(self.config_path)
        except ConfigError as e:
            for problem in e.problems:
                print(problem, file=sys.stderr)
            return 2
        admin = loaded.normalized.get("admin")
        if admin is not None:
            try:
                self.admin = AdminApi(self.config_path, admin, self._apply_admin_change)
                loaded = self.admin.effective(loaded)
            except ConfigError as e:
                for problem in e.problems:
                    print(f"ferrogate: the admin store's config: {problem}", file=sys.stderr)
                return 2
            except (OSError, sqlite3.Error) as e:
                print(
                    f"ferrogate: cannot open the admin store {admin['store']['path']}: {e}",
                    file=sys.stderr,
                )
                return 1
            except StoreUnavailable as e:
                print(
                    f"ferrogate: cannot start: the admin store ({admin['store']['type']}) "
                    f"cannot be reached: {e}",
                    file=sys.stderr,
                )
                return 1
        warn_unverified(loaded.normalized["upstreams"])
        self.pid_file = resolve_pid_file(
            self.config_path, loaded.config.pid_file, self.pid_file_override
        )
        self.runtime = runtime_file(self.pid_file)
        self.status = status_file(self.pid_file)
        running = read_pid(self.pid_file)
        if running is not None and running != os.getpid():
            print(
                f"ferrogate: a master (pid {running}) is already running with pid file "
                f"{self.pid_file}; stop it first or use another --pid-file",
                file=sys.stderr,
            )
            return 1
        if any(s in (signal.SIGTERM, signal.SIGINT) for s in self.signals):
            return 0
        try:
            if not self._open_sockets(loaded):
                return 1
            try:
                self.owns_files = True
                # Timings and counts left by the workers of an earlier run are not ours.
                remove_quietly(
                    *plugin_stats_files(self.pid_file),
                    *metrics_snapshot_files(runtime_file(self.pid_file)),
                )
                self._write_runtime(loaded.normalized)
                write_atomic(self.pid_file, f"{os.getpid()}\n")
            except OSError as e:
                print(
                    f"ferrogate: cannot write {e.filename or self.pid_file}: {e.strerror}",
                    file=sys.stderr,
                )
                return 1
            self._write_status(ok=True, problems=[])
            self.observatory = Observatory(self.runtime, loaded.normalized)
            try:
                self.observatory.start()
            except OSError as e:
                status = loaded.normalized["status"] or {}
                print(
                    f"ferrogate: cannot serve the status listener on {status.get('listen')}: "
                    f"{e.strerror or e}",
                    file=sys.stderr,
                )
                return 1
            if self.admin is not None:
                try:
                    self.admin.start()
                except OSError as e:
                    print(
                        f"ferrogate: cannot serve the admin API on {admin and admin['listen']}: "
                        f"{e.strerror or e}",
                        file=sys.stderr,
                    )
                    return 1
            self._start_children(loaded)
            self._banner(loaded)
            emit(
                "info",
                "master_started",
                pid=os.getpid(),
                config=os.path.abspath(self.config_path),
                workers=len(self.workers),
                listen=self.listen_addresses,
                pid_file=str(self.pid_file),
            )
            self._supervise(wake)
            self._shutdown(wake)
            return 0
        finally:
            self._kill_leftovers()
            if self.observatory is not None:
                self.observatory.stop()
            if self.admin is not None:
                self.admin.stop()
            for sock in [*self.listeners, *self.tls_listeners, self.echo_socket]:
                if sock is not None:
                    sock.close()
            if self.owns_files and read_pid(self.pid_file) in (os.getpid(), None):
                remove_quietly(
                    self.pid_file,
                    self.runtime,
                    self.status,
                    *plugin_stats_files(self.pid_file),
                    *metrics_snapshot_files(self.runtime),
                )

    def _open_sockets(self, loaded: LoadedConfig) -> bool:
        wanted: list[str] = list(loaded.normalized["listen"])
        tls = loaded.normalized["tls"]
        tls_addresses: list[str] = list(tls["listen"]) if tls is not None else []
        wanted += tls_addresses
        echo = loaded.normalized["echo"]
        if echo is not None:
            wanted.append(echo["listen"])
        opened: list[socket.socket] = []
        for address in wanted:
            try:
                opened.append(open_listener(address))
            except OSError as e:
                print(f"ferrogate: cannot listen on {address}: {e.strerror or e}", file=sys.stderr)
                for sock in opened:
                    sock.close()
                return False
        if echo is not None:
            self.echo_socket = opened.pop()
            self.echo_address = echo["listen"]
        if tls_addresses:
            self.tls_listeners = opened[-len(tls_addresses) :]
            del opened[-len(tls_addresses) :]
            self.tls_addresses = tls_addresses
        self.listeners = opened
        self.listen_addresses = list(loaded.normalized["listen"])
        return True

    def _worker_count(self, normalized: dict[str, Any]) -> int:
        return self.workers_override or int(normalized["workers"])

    def _write_runtime(self, normalized: dict[str, Any]) -> None:
        # The reload count makes every reload a change for the workers, so plugin code is
        # read again even when the config text stayed the same.
        runtime = {
            **normalized,
            "workers": self._worker_count(normalized),
            "generation": self.reloads,
            # The workers never need the admin token; keep it out of the file.
            "status": None,
            "admin": None,
        }
        self.grace_period = float(runtime["grace_period"])
        # Credentials that verification needs as they are (HMAC, JWT) are in it: ours only.
        write_atomic(self.runtime, json.dumps(runtime, separators=(",", ":")), mode=0o600)

    def _write_status(self, *, ok: bool, problems: list[str]) -> None:
        status = {
            "pid": os.getpid(),
            "config": os.path.abspath(self.config_path),
            "reloads": self.reloads,
            "ok": ok,
            "problems": problems,
        }
        try:
            write_atomic(self.status, json.dumps(status))
        except OSError as e:
            emit("warning", "status_write_failed", path=str(self.status), error=str(e))

    def _open_limits_table(self, normalized: dict[str, Any]) -> None:
        """Make the shared rate limit table once; its pages are only backed once used."""
        self.limits_size = int(normalized["rate_limiting"]["slots"]) * 16
        self.limits_fd = os.memfd_create("ferrogate-rate-limits", 0)
        os.ftruncate(self.limits_fd, self.limits_size + self.quotas_size + COUNTER_BYTES)

    def _worker_slot(self, worker_id: int) -> _Slot:
        fds = tuple(sock.fileno() for sock in [*self.listeners, *self.tls_listeners])
        limits: list[str] = []
        if self.limits_fd is not None:
            fds = (*fds, self.limits_fd)
            limits = ["--limits", f"{self.limits_fd}:{self.limits_size}:{self.quotas_size}"]
        if self.health_fd is not None:
            fds = (*fds, self.health_fd)
            limits += ["--health", f"{self.health_fd}:{self.health_size}"]
        if self.tls_listeners:
            limits += ["--tls-fds", ",".join(str(sock.fileno()) for sock in self.tls_listeners)]
        argv = [
            sys.executable,
            "-m",
            "ferrogate.worker",
            "--config",
            str(self.runtime),
            "--worker-id",
            str(worker_id),
            "--fds",
            ",".join(str(sock.fileno()) for sock in self.listeners),
            *limits,
        ]
        return _Slot(
            f"worker-{worker_id}",
            argv,
            fds,
            extra={"worker_id": worker_id},
            env=worker_environment(os.environ),
        )

    def _start_children(self, loaded: LoadedConfig) -> None:
        if self.echo_socket is not None:
            fd = self.echo_socket.fileno()
            argv = [sys.executable, "-m", "ferrogate.echo", "--fd", str(fd)]
            self.echo = _Slot("echo", argv, (fd,))
            self._spawn(self.echo)
        if self.health_fd is None:
            self.health_fd = os.memfd_create("ferrogate-health", 0)
            os.ftruncate(self.health_fd, self.health_size)
        if self.limits_fd is None:
            self._open_limits_table(loaded.normalized)
        for worker_id in range(self._worker_count(loaded.normalized)):
            slot = self._worker_slot(worker_id)
            self.workers[worker_id] = slot
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        # The child inherits a blocked SIGHUP through exec, so a reload that races with its
        # start cannot kill it before it has set up its own handling (see worker.py). Here
        # the block only defers a SIGHUP for the master by the duration of the spawn.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGUSR1})
        try:
            # Same process group on purpose: Ctrl-C and resource accounting cover everyone.
            slot.proc = subprocess.Popen(
                slot.argv, pass_fds=slot.fds, stdin=subprocess.DEVNULL, env=slot.env
            )
        except OSError as e:
            slot.proc = None
            slot.failures += 1
            slot.start_at = time.monotonic() + self._backoff(slot.failures)
            emit("error", "spawn_failed", child=slot.name, error=str(e))
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        slot.started = time.monotonic()
        emit("info", "child_spawned", child=slot.name, pid=slot.proc.pid, **slot.extra)

    def _banner(self, loaded: LoadedConfig) -> None:
        from ferrogate import __version__

        urls = [local_url(sock) for sock in self.listeners]
        https = [local_url(sock).replace("http://", "https://", 1) for sock in self.tls_listeners]
        lines = [
            f"ferrogate {__version__}: master pid {os.getpid()}, {len(self.workers)} "
            f"worker{'s' if len(self.workers) != 1 else ''}, config {self.config_path}",
        ]
        lines += [f"  listening on {url}" for url in [*urls, *https]]
        if self.admin is not None and self.admin.server is not None:
            host, port = self.admin.server.address
            where = f"[{host}]" if ":" in host else host
            lines.append(f"  admin API on http://{where}:{port}")
        if self.echo_socket is not None:
            lines.append(f"  echo upstream on {local_url(self.echo_socket)}")
            examples = _example_requests(loaded.normalized["routes"], _curlable(urls[0]))
            if examples:
                lines.append("Try:")
                lines += [f"  {cmd}" for cmd in examples]
        reload_cmd = "ferrogate reload"
        if self.pid_file_override:
            reload_cmd += f" --pid-file {shlex.quote(self.pid_file_override)}"
        elif not _is_bundled(self.config_path):
            reload_cmd += f" -c {shlex.quote(self.config_path)}"
        lines.append(f"Reload the config with `{reload_cmd}`; stop with Ctrl-C.")
        # Nobody reading stdout is no reason to stop serving.
        with contextlib.suppress(OSError):
            print("\n".join(lines), flush=True)

    # --- supervision -------------------------------------------------------------------

    def _backoff(self, failures: int) -> float:
        # First death: replace at once. A crash loop: 0.25 s, 0.5 s, 1 s, ... up to 30 s.
        return 0.0 if failures <= 1 else min(0.25 * 2 ** (failures - 2), _MAX_BACKOFF)

    def _slots(self) -> list[_Slot]:
        return [*([self.echo] if self.echo else []), *self.workers.values()]

    def _supervise(self, wake: socket.socket) -> None:
        while True:
            while self.signals:
                sig = self.signals.pop(0)
                if sig in (signal.SIGTERM, signal.SIGINT):
                    emit("info", "master_stopping", signal=signal.Signals(sig).name)
                    return
                if sig == signal.SIGHUP:
                    self._reload()
                if sig == signal.SIGUSR1:
                    # logrotate moved the access log: every worker reopens it.
                    emit("info", "logs_reopening")
                    for slot in self.workers.values():
                        if slot.proc is not None:
                            self._signal(slot.proc, signal.SIGUSR1)
            self._apply_admin_changes()
            now = time.monotonic()
            self._reap(now)
            next_due = now + _TICK
            for slot in self._slots():
                if slot.proc is None:
                    if slot.start_at <= now:
                        self._spawn(slot)
                    else:
                        next_due = min(next_due, slot.start_at)
            self._sleep(wake, next_due - time.monotonic())

    def _reap(self, now: float) -> None:
        for slot in self._slots():
            if slot.proc is None or slot.proc.poll() is None:
                continue
            uptime = now - slot.started
            slot.failures = slot.failures + 1 if uptime < _STABLE_AFTER else 1
            delay = self._backoff(slot.failures)
            slot.start_at = now + delay
            emit(
                "error" if slot.failures > 1 else "warning",
                "worker_exited" if slot is not self.echo else "echo_exited",
                child=slot.name,
                pid=slot.proc.pid,
                **_exit_description(slot.proc.returncode),
                uptime=round(uptime, 3),
                restart_in=round(delay, 3),
                **slot.extra,
            )
            slot.proc = None
            if self.observatory is not None and slot is not self.echo:
                self.observatory.worker_exited(int(slot.extra["worker_id"]))
                self.observatory.note_worker_restart()
        for proc in list(self.retiring):
            if proc.poll() is not None:
                self.retiring.remove(proc)
                if self.observatory is not None:
                    self.observatory.worker_exited(self._retired_ids.pop(proc.pid, -1))
                emit("info", "worker_retired", pid=proc.pid, **_exit_description(proc.returncode))

    def _signal(self, proc: subprocess.Popen[bytes], sig: int) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    # --- reload ------------------------------------------------------------------------

    def _apply_admin_change(self, loaded: LoadedConfig, revision: int) -> None:
        """Called on an admin API thread: the main loop applies ``loaded`` as a reload."""
        done = threading.Event()
        self._admin_changes.put((loaded, revision, done))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if not done.wait(30.0):
            emit("warning", "admin_change_not_applied_yet", revision=revision)

    def _apply_admin_changes(self) -> None:
        """The newest queued revision only: an older one must not undo a newer one."""
        batch = []
        while not self._admin_changes.empty():
            batch.append(self._admin_changes.get_nowait())
        if not batch:
            return
        loaded, revision, _ = max(batch, key=lambda change: change[1])
        if revision > self._admin_revision:
            self._admin_revision = revision
            self._reload(loaded)
        for _, _, done in batch:
            done.set()

    def _load(self) -> LoadedConfig:
        loaded = load_config(self.config_path)
        if self.admin is not None:
            if loaded.normalized.get("admin") is not None:
                self.admin.update_settings(loaded.normalized["admin"])
            loaded = self.admin.effective(loaded)
        return loaded

    def _reload(self, change: LoadedConfig | None = None) -> None:
        self.reloads += 1
        try:
            loaded = change if change is not None else self._load()
        except ConfigError as e:
            problems = [str(p) for p in e.problems]
            emit("error", "config_reload_failed", config=self.config_path, problems=problems)
            self._write_status(ok=False, problems=problems)
            if self.observatory is not None:
                self.observatory.note_reload(False)
            return
        normalized = dict(loaded.normalized)
        warn_unverified(normalized["upstreams"])
        # The sockets are bound once, by the master: moving them needs a restart.
        if normalized["listen"] != self.listen_addresses:
            emit(
                "warning",
                "listen_change_needs_restart",
                configured=normalized["listen"],
                serving=self.listen_addresses,
            )
            normalized["listen"] = self.listen_addresses
        tls = normalized["tls"]
        if (tls["listen"] if tls is not None else []) != self.tls_addresses:
            emit(
                "warning",
                "tls_listen_change_needs_restart",
                configured=tls["listen"] if tls is not None else [],
                serving=self.tls_addresses,
            )
            if tls is not None:
                normalized["tls"] = {**tls, "listen": self.tls_addresses}
        echo = {"listen": self.echo_address} if self.echo_address is not None else None
        if normalized["echo"] != echo:
            emit(
                "warning", "echo_change_needs_restart", configured=normalized["echo"], serving=echo
            )
            normalized["echo"] = echo
        if self.pid_file_override is None:
            wanted = resolve_pid_file(self.config_path, loaded.config.pid_file)
            if wanted != self.pid_file:
                emit(
                    "warning",
                    "pid_file_change_needs_restart",
                    configured=str(wanted),
                    serving=str(self.pid_file),
                )
        try:
            self._write_runtime(normalized)
        except OSError as e:
            emit(
                "error",
                "config_reload_failed",
                config=self.config_path,
                problems=[f"cannot write {self.runtime}: {e}"],
            )
            self._write_status(ok=False, problems=[f"cannot write {self.runtime}: {e}"])
            if self.observatory is not None:
                self.observatory.note_reload(False)
            return
        # A worker still starting re-reads the runtime file once its SIGHUP handler is in.
        for slot in self.workers.values():
            if slot.proc is not None:
                self._signal(slot.proc, signal.SIGHUP)
        self._resize(self._worker_count(normalized))
        if self.observatory is not None:
            self.observatory.reconfigure(normalized)
            self.observatory.note_reload(True)
        emit(
            "info",
            "config_reloaded",
            config=self.config_path,
            routes=len(normalized["routes"]),
            upstreams=len(normalized["upstreams"]),
            workers=len(self.workers),
        )
        self._write_status(ok=True, problems=[])

    def _resize(self, count: int) -> None:
        """Worker ids stay 0..count-1: start the missing ones, retire those above."""
        for worker_id in range(count):
            if worker_id not in self.workers:
                slot = self._worker_slot(worker_id)
                self.workers[worker_id] = slot
                self._spawn(slot)
        for worker_id in [w for w in self.workers if w >= count]:
            slot = self.workers.pop(worker_id)
            if slot.proc is not None:
                self._signal(slot.proc, signal.SIGTERM)
                self.retiring.append(slot.proc)
                self._retired_ids[slot.proc.pid] = worker_id

    # --- shutdown ----------------------------------------------------------------------

    def _shutdown(self, wake: socket.socket) -> None:
        # Closing our copies first means that once the workers stop accepting, new
        # connections are refused instead of waiting in a backlog nobody serves.
        for sock in [*self.listeners, *self.tls_listeners]:
            sock.close()
        self.signals.clear()
        workers = [s.proc for s in self.workers.values() if s.proc is not None] + self.retiring
        for proc in workers:
            self._signal(proc, signal.SIGTERM)
        self._wait_for(workers, self.grace_period + 5.0, wake)
        if self.echo is not None and self.echo.proc is not None:
            self._signal(self.echo.proc, signal.SIGTERM)
            self._wait_for([self.echo.proc], _ECHO_STOP_TIMEOUT, wake)
        emit("info", "master_stopped", pid=os.getpid())

    def _wait_for(
        self, procs: list[subprocess.Popen[bytes]], timeout: float, wake: socket.socket
    ) -> None:
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if now >= deadline:
                break
            # Another Ctrl-C or SIGTERM while stopping means: do not wait any longer.
            if any(s in (signal.SIGTERM, signal.SIGINT) for s in self.signals):
                emit("warning", "stop_forced")
                break
            self._sleep(wake, min(0.1, deadline - now))
        for proc in procs:
            if proc.poll() is None:
                emit("warning", "child_killed", pid=proc.pid, reason="did not stop in time")
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()

    def _kill_leftovers(self) -> None:
        """Last resort (an unexpected error in the master): no child may outlive it."""
        procs = [s.proc for s in self._slots() if s.proc is not None] + self.retiring
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()


def _is_bundled(config_path: str) -> bool:
    return Path(config_path).resolve().parent == Path(__file__).resolve().parent


def _curlable(url: str) -> str:
    # A wildcard address is not something to connect to; loopback reaches it.
    return url.replace("//0.0.0.0:", "//127.0.0.1:").replace("//[::]:", "//[::1]:")


def _example_path(pattern: str) -> str:
    if pattern.endswith("/*"):
        pattern = pattern[:-1] + "hello"
    pattern = re.sub(r"\{\*[^}]*\}", "some/file", pattern)
    return re.sub(r"\{[^}]*\}", "42", pattern)


def _example_requests(routes: list[dict[str, Any]], base_url: str, limit: int = 5) -> list[str]:
    """A curl command per route (as far as one can be made up), for the start-up banner."""
    commands: list[str] = []
    for route in routes:
        if len(commands) >= limit or not route["paths"]:
            break
        predicates = route["headers"] + route["query"]
        if any(p["value"] is None for p in predicates):
            continue  # a regex predicate: no example value to make up
        args = ["curl", "-i"]
        if route["methods"] and "GET" not in route["methods"]:
            args += ["-X", route["methods"][0]]
        if route["hosts"]:
            host = route["hosts"][0]
            args += ["-H", f"Host: {'www' + host[1:] if host.startswith('*') else host}"]
        args += [arg for p in route["headers"] for arg in ("-H", f"{p['name']}: {p['value']}")]
        url = base_url + _example_path(route["paths"][0])
        if route["query"]:
            url += "?" + urlencode([(p["name"], p["value"]) for p in route["query"]])
        commands.append(" ".join(shlex.quote(a) for a in [*args, url]))
    return commands


def run(
    config_path: str, workers_override: int | None = None, pid_file_override: str | None = None
) -> int:
    """Run a gateway until SIGTERM/SIGINT; returns the exit status (2: the config is bad)."""
    return Master(config_path, workers_override, pid_file_override).run()
