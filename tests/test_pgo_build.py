"""The profile-guided build (cext/pgo.py): its training load runs against the installed
extension, and the build backend's choice follows ``FERROGATE_PGO``.

A whole wheel build takes minutes; CI does one (``.ci/run`` sets ``FERROGATE_PGO=on``, so a
broken training load fails the build), and ``test_cli.py`` checks that the installed wheel
is the profile-guided one then.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "cext"))

import pgo  # noqa: E402


def test_the_training_load_runs_against_the_real_engine() -> None:
    # In a process of its own: the gateway it starts serves until the process exits.
    out = subprocess.run(
        [sys.executable, "-c", "import ferrogate._core as c; print(c.train_load())"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    # every answer was checked (a wrong status raises); all of them were sent
    assert out.stdout.strip() == "68000"


def builds(mode: str, monkeypatch: pytest.MonkeyPatch, path: str) -> AbstractContextManager[None]:
    monkeypatch.setenv("FERROGATE_PGO", mode)
    monkeypatch.setenv("PATH", path)
    monkeypatch.delenv("RUSTFLAGS", raising=False)

    def build(directory: str) -> str:
        raise AssertionError("no instrumented build without llvm-profdata")

    return pgo.guided(build)


def test_without_the_toolchain_auto_builds_plain(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # no rustc on PATH: no llvm-profdata to be found
    with builds("auto", monkeypatch, str(tmp_path)):
        assert "RUSTFLAGS" not in os.environ
        assert "FERROGATE_BUILD" not in os.environ
    assert "building without profile guidance" in capsys.readouterr().err


def test_without_the_toolchain_on_refuses_to_build(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with (
        pytest.raises(SystemExit, match="cannot ask rustc"),
        builds("on", monkeypatch, str(tmp_path)),
    ):
        pass


def test_off_and_unknown_modes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with builds("off", monkeypatch, str(tmp_path)):
        assert "RUSTFLAGS" not in os.environ
    assert capsys.readouterr().err == ""  # not even looked for: no message
    with (
        pytest.raises(SystemExit, match="expected one of auto, on, off"),
        builds("sometimes", monkeypatch, str(tmp_path)),
    ):
        pass
