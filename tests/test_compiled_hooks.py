"""The installed package carries ``ferrogate.hooks`` compiled with Cython (cext/), and the
compiled module is the one that imports; it behaves as the plain hooks.py does."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import sysconfig
import types
from pathlib import Path
from typing import Any

import pytest

import ferrogate.hooks as hooks

SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")
SOURCE = Path(hooks.__file__ or "").with_name("hooks.py")
COMPILED_CLASSES = (
    hooks.Headers,
    hooks.Params,
    hooks.Request,
    hooks.Response,
    hooks.LogInfo,
    hooks.Slot,
    hooks.Chain,
    hooks.Host,
)


def _editable() -> bool:
    text = importlib.metadata.distribution("ferrogate").read_text("direct_url.json")
    return bool(text and json.loads(text).get("dir_info", {}).get("editable"))


def test_the_compiled_module_is_the_one_imported() -> None:
    assert (hooks.__file__ or "").endswith(SUFFIX), (
        f"ferrogate.hooks is not compiled ({hooks.__file__}): pip install . (or -e .), "
        "or in an editable install python cext/build_backend.py"
    )


def test_the_package_ships_the_compiled_module() -> None:
    name = f"ferrogate/hooks{SUFFIX}"
    if _editable():
        # an editable install imports from the source tree, where the build compiled it
        assert (SOURCE.parent / f"hooks{SUFFIX}").is_file()
    else:
        files = importlib.metadata.files("ferrogate") or []
        assert name in {f.as_posix() for f in files}


@pytest.mark.parametrize("cls", COMPILED_CLASSES, ids=lambda c: c.__name__)
def test_classes_are_extension_types(cls: type) -> None:
    python_functions = [k for k, v in vars(cls).items() if isinstance(v, types.FunctionType)]
    assert python_functions == [], f"{cls.__name__} has Python methods: {python_functions}"


def test_dispatch_functions_are_compiled() -> None:
    for fn in (hooks.run_request, hooks.run_response, hooks.run_chunk, hooks.run_log):
        assert not isinstance(fn, types.FunctionType), fn


def test_compiled_from_the_hooks_py_beside_it() -> None:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    assert getattr(hooks, "__source_sha256__", None) == digest, (
        "the compiled ferrogate.hooks is older than hooks.py: reinstall, or in an editable "
        "install run `python cext/build_backend.py`"
    )


# -- the compiled module and the plain one give the same answers -----------------------------


def _plain() -> Any:
    spec = importlib.util.spec_from_file_location("ferrogate_hooks_plain", SOURCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Editor:
    def on_request(self, req: Any) -> None:
        req.headers["X-Tenant"] = "acme"
        req.headers.add("x-tag", "a")
        req.headers.remove("user-agent")
        req.query_params["page"] = "2"
        req.ctx["seen"] = True

    def on_response(self, req: Any, resp: Any) -> None:
        resp.status = 201
        resp.headers["x-seen"] = str(req.ctx["seen"])

    def on_response_chunk(self, req: Any, resp: Any, chunk: bytes, last: bool) -> bytes:
        return chunk.upper() + (b"!" if last else b"")


def _run(m: Any) -> list[Any]:
    def answer(req: Any) -> Any:
        return m.Response(403, {"error": "no"})

    editor = _Editor()
    hooks_of = {name: getattr(editor, name) for name in vars(_Editor) if name.startswith("on_")}
    host = m.Host(
        [
            m.Chain("edit", [m.Slot("editor", editor, hooks_of)]),
            m.Chain("answer", [m.Slot("answer", None, {"on_request": answer})]),
        ]
    )
    meta = ("id-1", "127.0.0.1", "edit", "x", "http", "HTTP/1.1", None, None, None)
    blob = b"host:x\nuser-agent:curl\naccept:*/*\n"
    req, decision = host.request(0, "GET", "/a", "page=1&q=x", blob, None, meta)
    out: list[Any] = [decision]
    out.append(host.response(0, req, 200, b"content-type:text/plain\n"))
    out.append([host.response_chunk(0, req, c, i == 1) for i, c in enumerate((b"ab", b"cd"))])
    out.append(host.request(1, "GET", "/b", "", blob, None, meta)[1])
    out.append({route: {p: sorted(st) for p, st in s.items()} for route, s in host.stats().items()})
    headers = m.Headers({"A": "1", "b": "2"})
    headers.add("a", "3")
    out.append((headers.items(), headers.getall("A"), "B" in headers, len(headers)))
    out.append(headers.rename("a", "c"))
    out.append(repr(headers))
    return out


def test_compiled_and_plain_give_the_same_answers() -> None:
    assert _run(hooks) == _run(_plain())
