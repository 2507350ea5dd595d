"""Where a running master keeps its pid and its normalized config, and safe writes to them.

The pid file is ``pid_file`` from the config (relative to the config file's directory) or,
by default, ``<tmp>/ferrogate-<uid>/<first 12 hex of sha1(absolute config path)>.pid``, so
``ferrogate reload -c FILE`` finds the master of FILE without being told more. The
normalized config the workers read sits next to it, ``<pid file minus .pid>.runtime.json``,
and so does ``<...>.status.json``: the master's config path and the outcome of its last reload,
which ``ferrogate reload`` reads to tell the user whether the reload worked.
"""

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path


def default_pid_file(config_path: str | os.PathLike[str]) -> Path:
    absolute = os.path.abspath(config_path)
    digest = hashlib.sha1(absolute.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"ferrogate-{os.getuid()}" / f"{digest}.pid"


def resolve_pid_file(
    config_path: str | os.PathLike[str], configured: str | None, override: str | None = None
) -> Path:
    """The pid file: ``override`` (from the command line), else ``configured``, else default."""
    if override:
        return Path(os.path.abspath(Path(override).expanduser()))
    if configured:
        base = Path(os.path.abspath(config_path)).parent
        return Path(os.path.abspath(base / Path(configured).expanduser()))
    return default_pid_file(config_path)


def _beside(pid_file: Path, suffix: str) -> Path:
    stem = pid_file.name[: -len(".pid")] if pid_file.name.endswith(".pid") else pid_file.name
    return pid_file.with_name(f"{stem}{suffix}")


def runtime_file(pid_file: Path) -> Path:
    """The normalized config the workers of this master read."""
    return _beside(pid_file, ".runtime.json")


def status_file(pid_file: Path) -> Path:
    """The master's config path and last reload outcome (JSON)."""
    return _beside(pid_file, ".status.json")


def plugin_stats_file(runtime: Path, worker_id: int) -> Path:
    """Where worker ``worker_id`` of the master using ``runtime`` keeps its plugin timings."""
    stem = runtime.name.removesuffix(".runtime.json")
    return runtime.with_name(f"{stem}.plugin-stats.{worker_id}.json")


def plugin_stats_files(pid_file: Path) -> list[Path]:
    """Every worker's plugin timings file of the master with ``pid_file``."""
    stem = runtime_file(pid_file).name.removesuffix(".runtime.json")
    return sorted(pid_file.parent.glob(f"{stem}.plugin-stats.*.json"))


def _worker_files(runtime: Path, kind: str) -> list[Path]:
    stem = runtime.name.removesuffix(".runtime.json")
    return sorted(runtime.parent.glob(f"{stem}.{kind}.*.json"))


def worker_plugin_stats_files(runtime: Path) -> list[Path]:
    """Every worker's plugin timings file, found from the runtime file the workers read."""
    return _worker_files(runtime, "plugin-stats")


def metrics_snapshot_files(runtime: Path) -> list[Path]:
    """Every worker's metrics snapshot (``rust/engine/src/metrics.rs`` writes them as
    ``<stem>.metrics.<worker id>.json`` beside the runtime file)."""
    return _worker_files(runtime, "metrics")


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` in one step: a reader sees the old content or the new, never half."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if that process is alive, else None (no file, stale, garbage)."""
    try:
        pid = int(pid_file.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        # Alive, but someone else's: still a running master as far as the file says.
        return pid
    # After a crash the pid may have been reused by an unrelated process, which a reload's
    # SIGHUP would likely kill. Where /proc exists, make sure it is a ferrogate.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid
    return pid if b"ferrogate" in cmdline else None


def remove_quietly(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
