"""The request and response header view over the data plane's text: reads search the text,
edits are kept beside it, and whatever a plugin does it sees (and sends upstream) what the
same edits on a plain list of fields give. Compiled and plain ``ferrogate.hooks`` alike."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

import pytest

import ferrogate.hooks as compiled

SOURCE = Path(compiled.__file__ or "").with_name("hooks.py")

FIELDS = [
    ("host", "example.test:8080"),
    ("x-multi", "a"),
    ("accept", "*/*"),
    ("x-multi", "b"),
    ("apikey", "k:with:colons"),
    ("x-latin", "caf\xe9"),
]
TEXT = "\n" + "".join(f"{n}:{v}\n" for n, v in FIELDS)


def _plain() -> Any:
    spec = importlib.util.spec_from_file_location("ferrogate_hooks_plain_view", SOURCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["compiled", "plain"], scope="module")
def m(request: pytest.FixtureRequest) -> Any:
    return compiled if request.param == "compiled" else _plain()


def test_the_module_under_test_is_compiled() -> None:
    assert not (compiled.__file__ or "").endswith(".py")


@pytest.mark.parametrize(
    "blob",
    [TEXT, TEXT.encode("latin-1"), TEXT[1:], TEXT[1:].encode("latin-1")],
    ids=["str", "bytes", "str-without-newline", "bytes-without-newline"],
)
def test_reads_find_fields_in_every_form_of_the_text(m: Any, blob: str | bytes) -> None:
    h = m._wire_headers(blob)
    assert h.get("Host") == "example.test:8080"  # the first field of the text too
    assert h.get("apikey") == "k:with:colons"
    assert h["X-Latin"] == "caf\xe9"
    assert h.getall("x-multi") == ["a", "b"]
    assert h.get("absent") is None and h.get("absent", "d") == "d"
    assert "accept" in h and "absent" not in h and 3 not in h
    assert h.getall("absent") == []
    # nothing parsed, nothing changed
    assert h._items is None and not h.changed
    assert h.items() == FIELDS


@pytest.mark.parametrize("name", ["multi:a", "host:example.test", "a\nx-multi", ""])
def test_a_name_no_field_can_have_matches_nothing(m: Any, name: str) -> None:
    h = m._wire_headers(TEXT)
    # a colon or a newline in the name would otherwise match across a field or a line
    assert h.get(name) is None
    assert h.getall(name) == []
    assert not h.remove(name)
    assert not h.changed


def test_reads_after_edits_see_the_edits(m: Any) -> None:
    h = m._wire_headers(TEXT)
    assert h.remove("X-Multi")
    assert h.get("x-multi") is None and "x-multi" not in h
    h.add("x-multi", "c")
    assert h.getall("x-multi") == ["c"]
    h["apikey"] = "new"
    assert h.get("apikey") == "new" and h.getall("apikey") == ["new"]
    h["x-new"] = "1"
    h.add("x-new", "2")
    assert h.getall("x-new") == ["1", "2"]
    assert h.remove("x-new") and h.get("x-new") is None
    assert not h.remove("x-new")
    assert h.get("host") == "example.test:8080"
    assert h._items is None  # all of it without parsing the text
    # iterating after the edits: the fields as a plain list would have them
    assert h.items() == [
        ("host", "example.test:8080"),
        ("accept", "*/*"),
        ("x-latin", "caf\xe9"),
        ("x-multi", "c"),
        ("apikey", "new"),
    ]


def test_adding_to_a_name_the_text_holds_keeps_the_place_of_its_fields(m: Any) -> None:
    h = m._wire_headers(TEXT)
    h.add("accept", "text/html")
    assert h.getall("accept") == ["*/*", "text/html"]
    assert list(h)[:3] == ["host", "x-multi", "accept"]
    assert h.items()[-1] == ("accept", "text/html")
    assert h._wire() == (["accept"], [("accept", "*/*"), ("accept", "text/html")])


def test_removing_what_is_not_there_changes_nothing(m: Any) -> None:
    h = m._wire_headers(TEXT)
    assert not h.remove("x-consumer-username")
    assert not h.changed
    assert h._wire() == FIELDS


def test_what_an_authentication_plugin_does_crosses_as_a_short_diff(m: Any) -> None:
    h = m._wire_headers(TEXT)
    h.remove("x-anonymous-consumer")
    h["x-consumer-username"] = "alice"
    h["x-credential-identifier"] = "c1"
    assert h._wire() == (
        ["x-consumer-username", "x-credential-identifier"],
        [("x-consumer-username", "alice"), ("x-credential-identifier", "c1")],
    )
    # a spoofed one the client sent is replaced, not joined
    h = m._wire_headers(TEXT + "x-consumer-username:mallory\n")
    h.remove("x-anonymous-consumer")
    h["x-consumer-username"] = "alice"
    assert h.getall("x-consumer-username") == ["alice"]
    assert h._wire() == (["x-consumer-username"], [("x-consumer-username", "alice")])


def test_touching_every_field_sends_the_whole_list(m: Any) -> None:
    h = m._wire_headers("\na:1\nb:2\n")
    h["a"] = "3"
    h.remove("b")
    assert h._wire() == [("a", "3")]
    h = m._wire_headers("")
    h["a"] = "1"
    assert h._wire() == [("a", "1")]


def test_replacing_every_field_sends_the_new_list_whole(m: Any) -> None:
    h = m._wire_headers(TEXT)
    kept = h.get("accept")
    h.replace([("Authorization", "Bearer provider-key"), ("accept", kept), ("x-n", 7)])
    assert h.changed
    assert h.get("apikey") is None and "host" not in h
    assert h.get("authorization") == "Bearer provider-key"
    wire = [("authorization", "Bearer provider-key"), ("accept", "*/*"), ("x-n", "7")]
    assert h._wire() == wire
    assert _apply(FIELDS, h._wire()) == wire
    # later edits apply to the new list
    h["x-n"] = "8"
    h.add("x-more", "1")
    assert h._wire()[-2:] == [("x-n", "8"), ("x-more", "1")]
    h = m._wire_headers(TEXT)
    h.replace({})
    assert h._wire() == [] and len(h) == 0


def _apply(fields: list[tuple[str, str]], wire: Any) -> list[tuple[str, str]]:
    """What the data plane does with a wire form (see the hooks module doc)."""
    if isinstance(wire, list):
        return list(wire)
    removed, added = wire
    return [f for f in fields if f[0] not in removed] + list(added)


def _by_name(fields: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in fields:
        out.setdefault(name, []).append(value)
    return out


NAMES = ["host", "x-multi", "apikey", "x-new", "X-Other", "accept"]


def _op(rng: random.Random, h: Any) -> Any:
    name = rng.choice(NAMES)
    kind = rng.randrange(7)
    if kind == 0:
        return ("get", h.get(name))
    if kind == 1:
        return ("getall", h.getall(name))
    if kind == 2:
        return ("in", name in h)
    if kind == 3:
        return ("remove", h.remove(name))
    if kind == 4:
        h[name] = f"s{rng.randrange(100)}"
        return ("set",)
    if kind == 5:
        h.add(name, f"a{rng.randrange(100)}")
        return ("add",)
    if rng.randrange(4) == 0:
        return ("rename", h.rename(name, rng.choice(NAMES)))
    return ("len", len(h))


def test_the_view_behaves_as_a_list_of_fields(m: Any) -> None:
    """Random edits and reads on the view and on a plain list of the same fields: same
    answers, same fields, and the wire form turns the handed-in fields into them."""
    for seed in range(300):
        rng = random.Random(seed)
        view = m._wire_headers(TEXT)
        plain = m.Headers(FIELDS)
        for _ in range(rng.randrange(1, 8)):
            state = rng.getstate()
            got = _op(rng, view)
            rng.setstate(state)
            assert got == _op(rng, plain), seed
        if view.changed:
            applied = _apply(FIELDS, view._wire())
            assert _by_name(applied) == _by_name(plain.items()), seed
        assert view.items() == plain.items(), seed
