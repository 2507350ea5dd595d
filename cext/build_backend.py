"""PEP 517 build backend: compile the Cython modules, then build with maturin.

``pyproject.toml`` names this module (``backend-path = ["cext"]``). For a wheel (regular or
editable) it first compiles each module in ``MODULES``: ``python/ferrogate/<name>.py`` with the
static declarations of ``cext/<name>.pxd`` (Cython's pure Python mode), into
``python/ferrogate/<name><EXT_SUFFIX>``, where maturin picks it up (``[tool.maturin] include``).
A regular wheel's Rust code is then compiled with the counts of a training load (``pgo.py``);
an editable one, a developer's, is not. Every hook, those two included, is then maturin's.

``python cext/build_backend.py`` compiles the modules in place and nothing else: run it after
changing a compiled module in an editable install, where the compiled module is what imports.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pgo import guided

ROOT = Path(__file__).resolve().parent.parent
CEXT = ROOT / "cext"
PACKAGE = ROOT / "python" / "ferrogate"

MODULES = ("hooks",)
"""Modules of the ferrogate package compiled with Cython, each with ``cext/<name>.pxd``."""

DIRECTIVES = {
    "language_level": 3,
    # Types come from the .pxd only: a plugin may pass a str subclass (a StrEnum member)
    # where the .py annotates ``str``, and the plain module accepts it.
    "annotation_typing": False,
}
COMPILE_ARGS = ["-O2", "-g0"]


def source_digest(name: str) -> str:
    """SHA-256 of the module's .py: the compiled module carries it as ``__source_sha256__``."""
    return hashlib.sha256((PACKAGE / f"{name}.py").read_bytes()).hexdigest()


def compile_modules(dest: Path = PACKAGE) -> list[Path]:
    """Compile every module of ``MODULES`` into ``dest``; the paths written."""
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    written = []
    with tempfile.TemporaryDirectory(prefix="ferrogate-cext-") as tmp:
        src = Path(tmp) / "src"
        pkg = src / "ferrogate"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        for name in MODULES:
            text = (PACKAGE / f"{name}.py").read_text(encoding="utf-8")
            text += f'\n__source_sha256__ = "{source_digest(name)}"\n'
            (pkg / f"{name}.py").write_text(text, encoding="utf-8")
            shutil.copyfile(CEXT / f"{name}.pxd", pkg / f"{name}.pxd")

        cwd = os.getcwd()
        os.chdir(src)  # source names in tracebacks read ferrogate/<name>.py
        try:
            extensions = cythonize(
                [
                    Extension(
                        f"ferrogate.{name}",
                        [f"ferrogate/{name}.py"],
                        extra_compile_args=COMPILE_ARGS,
                    )
                    for name in MODULES
                ],
                compiler_directives=DIRECTIVES,
                force=True,
                quiet=True,
            )
            dist = Distribution({"name": "ferrogate-cext", "ext_modules": extensions})
            cmd = build_ext(dist)
            cmd.build_lib = str(Path(tmp) / "lib")
            cmd.build_temp = str(Path(tmp) / "temp")
            cmd.ensure_finalized()
            cmd.run()
        finally:
            os.chdir(cwd)

        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        for name in MODULES:
            built = Path(tmp) / "lib" / "ferrogate" / f"{name}{suffix}"
            for old in dest.glob(f"{name}.*.so"):
                old.unlink()
            target = dest / built.name
            shutil.copyfile(built, target)
            written.append(target)
    for path in written:
        print(f"cext: compiled {path}", file=sys.stderr)
    return written


# -- PEP 517 hooks: compile first where a wheel is built, then maturin -------------------------


def _maturin() -> Any:
    import maturin

    return maturin


def build_wheel(
    wheel_directory: str,
    config_settings: Mapping[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    compile_modules()

    def build(directory: str) -> str:
        return str(_maturin().build_wheel(directory, config_settings, metadata_directory))

    with guided(build):
        return build(wheel_directory)


def build_editable(
    wheel_directory: str,
    config_settings: Mapping[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    compile_modules()
    return str(_maturin().build_editable(wheel_directory, config_settings, metadata_directory))


def build_sdist(sdist_directory: str, config_settings: Mapping[str, Any] | None = None) -> str:
    return str(_maturin().build_sdist(sdist_directory, config_settings))


def get_requires_for_build_wheel(config_settings: Mapping[str, Any] | None = None) -> list[str]:
    return list(_maturin().get_requires_for_build_wheel(config_settings))


def get_requires_for_build_editable(
    config_settings: Mapping[str, Any] | None = None,
) -> list[str]:
    return list(_maturin().get_requires_for_build_editable(config_settings))


def get_requires_for_build_sdist(config_settings: Mapping[str, Any] | None = None) -> list[str]:
    return list(_maturin().get_requires_for_build_sdist(config_settings))


def prepare_metadata_for_build_wheel(
    metadata_directory: str, config_settings: Mapping[str, Any] | None = None
) -> str:
    return str(_maturin().prepare_metadata_for_build_wheel(metadata_directory, config_settings))


def prepare_metadata_for_build_editable(
    metadata_directory: str, config_settings: Mapping[str, Any] | None = None
) -> str:
    return str(_maturin().prepare_metadata_for_build_editable(metadata_directory, config_settings))


if __name__ == "__main__":
    compile_modules()
