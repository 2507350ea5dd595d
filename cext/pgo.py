"""The profile-guided build of the Rust extension, done by every ``pip install .``.

The request path spans more code than the CPU's instruction cache holds; compiled with the
counts of a real load, LLVM lays the code that load runs out together and inlines where
the counts say, and a proxied request costs 9-12% less CPU (docs/benchmarks.md). The
counts are made here, by the toolchain and from the source being built (CPython's
``--enable-optimizations`` does the same), so no profile is kept in the repository to go
stale or to be unreadable by another LLVM:

1. maturin builds the wheel with ``-Cprofile-generate``, in a target directory of its own;
2. a Python process loads that wheel's extension alone (no other dependency is needed) and
   runs ``train_load()`` (``rust/engine/src/train.rs``), and writes its counts as it exits;
   ``llvm-profdata`` merges them;
3. maturin builds the wheel again with ``-Cprofile-use`` (in a target directory of its own
   too, so that switching flags does not rebuild a developer's ``target/release``), and
   ``FERROGATE_BUILD=profile-guided``, which ``ferrogate --version`` shows.

The same crates with the same features must be built both times: a separate training
program resolves its dependencies' features otherwise, and its symbols (the profile's keys)
differ, so the training runs inside the extension itself.

``FERROGATE_PGO`` chooses: ``auto`` (the default) does it when the toolchain has
``llvm-profdata`` (``rustup component add llvm-tools``) and otherwise builds as before with a
warning; ``on`` makes a missing tool or a failed training an error (CI); ``off`` skips it.
"""

from __future__ import annotations

import glob
import os
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("auto", "on", "off")
TRAIN_TIMEOUT = 300
"""Seconds the training may take; it takes a few (it is bounded by a request count)."""


class PgoUnavailable(Exception):
    """The profile cannot be made here; the message says why and what to do."""


def log(message: str) -> None:
    print(f"pgo: {message}", file=sys.stderr, flush=True)


def mode() -> str:
    value = os.environ.get("FERROGATE_PGO", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise SystemExit(f"FERROGATE_PGO={value!r}: expected one of {', '.join(MODES)}")
    return value


def find_profdata() -> Path:
    """The toolchain's own llvm-profdata: its LLVM is the one that reads the profile."""
    try:
        sysroot = subprocess.run(
            ["rustc", "--print", "sysroot"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        raise PgoUnavailable(f"cannot ask rustc for its sysroot: {e}") from e
    found = sorted(glob.glob(os.path.join(sysroot, "lib", "rustlib", "*", "bin", "llvm-profdata")))
    if not found:
        raise PgoUnavailable(
            "llvm-profdata is not in the Rust toolchain (rustup component add llvm-tools)"
        )
    return Path(found[0])


def run_step(what: str, cmd: list[str], env: dict[str, str], timeout: float | None = None) -> None:
    started = time.monotonic()
    try:
        done = subprocess.run(
            cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PgoUnavailable(f"{what}: {e}") from e
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).splitlines()[-30:])
        raise PgoUnavailable(f"{what} failed ({shlex.join(cmd)}):\n{tail}")
    log(f"{what}: {time.monotonic() - started:.0f} s")


def target_dir(configured: str | None) -> Path:
    return Path(configured or ROOT / "target")


TRAIN = """
import importlib.machinery, importlib.util, sys
path = sys.argv[1]
loader = importlib.machinery.ExtensionFileLoader("ferrogate._core", path)
spec = importlib.util.spec_from_file_location("ferrogate._core", path, loader=loader)
core = importlib.util.module_from_spec(spec)
loader.exec_module(core)
print(core.train_load(), "requests")
"""
"""Loads the instrumented extension by its path and runs the training load; the counts are
written when this process exits normally."""


def make_profile(work: Path, build: Callable[[str], str]) -> Path:
    """Steps 1 and 2: the merged profile, in ``work``. ``build(directory)`` builds a wheel
    into ``directory`` with the environment in force and returns its file name."""
    profdata = find_profdata()
    saved = {k: os.environ.get(k) for k in ("RUSTFLAGS", "CARGO_TARGET_DIR")}
    flags = saved["RUSTFLAGS"] or ""
    started = time.monotonic()
    try:
        os.environ["RUSTFLAGS"] = f"{flags} -Cprofile-generate={work / 'build'}".strip()
        os.environ["CARGO_TARGET_DIR"] = str(target_dir(saved["CARGO_TARGET_DIR"]) / "pgo-generate")
        wheel = work / build(str(work))
    except (Exception, SystemExit) as e:
        raise PgoUnavailable(f"the instrumented build failed: {e}") from e
    finally:
        restore(saved)
    log(f"instrumented build: {time.monotonic() - started:.0f} s")
    with zipfile.ZipFile(wheel) as whl:
        names = [n for n in whl.namelist() if n.startswith("ferrogate/_core.")]
        if not names:
            raise PgoUnavailable(f"{wheel.name} holds no ferrogate/_core extension")
        extension = Path(whl.extract(names[0], work / "instrumented"))
    counts = work / "train"
    env = dict(os.environ, LLVM_PROFILE_FILE=str(counts / "%p-%m.profraw"))
    run_step("training load", [sys.executable, "-c", TRAIN, str(extension)], env, TRAIN_TIMEOUT)
    raw = sorted(str(p) for p in counts.glob("*.profraw"))
    if not raw:
        raise PgoUnavailable(f"the training load wrote no counts into {counts}")
    merged = work / "ferrogate.profdata"
    run_step(
        "merge of the counts", [str(profdata), "merge", "-o", str(merged), *raw], dict(os.environ)
    )
    return merged


def restore(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextmanager
def guided(build: Callable[[str], str]) -> Iterator[None]:
    """Within it, cargo builds with the profile of a fresh training run (or, when that is
    not possible and ``FERROGATE_PGO`` allows it, as it would without). ``build`` is as for
    ``make_profile``."""
    chosen = mode()
    if chosen == "off" or "profile-" in os.environ.get("RUSTFLAGS", ""):
        # off, or the caller is doing profile-guided builds of its own
        yield
        return
    with tempfile.TemporaryDirectory(prefix="ferrogate-pgo-") as tmp:
        try:
            profile = make_profile(Path(tmp), build)
        except PgoUnavailable as e:
            if chosen == "on":
                raise SystemExit(f"pgo: {e}") from e
            log(f"building without profile guidance (about 10% more CPU per request): {e}")
            yield
            return
        saved = {k: os.environ.get(k) for k in ("RUSTFLAGS", "CARGO_TARGET_DIR", "FERROGATE_BUILD")}
        flags = saved["RUSTFLAGS"] or ""
        os.environ["RUSTFLAGS"] = f"{flags} -Cprofile-use={profile}".strip()
        os.environ["CARGO_TARGET_DIR"] = str(target_dir(saved["CARGO_TARGET_DIR"]) / "pgo-use")
        os.environ["FERROGATE_BUILD"] = "profile-guided"
        try:
            yield
        finally:
            restore(saved)
