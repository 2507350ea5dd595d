"""Check plain data against msgspec Struct types, reporting every problem instead of the first.

``msgspec.convert`` stops at the first error. Walking the type here and converting each leaf
on its own finds every unknown key, missing field and bad value in one pass.
"""

import difflib
import functools
import re
import types
import typing
from collections.abc import Callable
from typing import Any

import msgspec

from ferrogate.problems import DataPath


def _type_info(tp: Any) -> Any:
    # msgspec rebuilds the whole tree of a type on every call (milliseconds for Config),
    # and a config check asks for the same few types many times: an admin change or a
    # cluster revision is validated on the path of its propagation.
    try:
        return _cached_type_info(tp)
    except TypeError:  # an unhashable annotation
        return msgspec.inspect.type_info(tp)


# Bounded: plugin code reloaded from plugins_dir brings new Config classes each time.
_cached_type_info = functools.lru_cache(maxsize=512)(msgspec.inspect.type_info)

# report(path, message, at_key): at_key points the problem at the key rather than the value.
Report = Callable[[DataPath, str, bool], None]

_ERROR = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_PATH_SEGMENT = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\[\.\.\.\]")


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """`` (did you mean `x`?)`` when a choice is close to ``word``, else an empty string."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def _strip_annotated(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _contains_struct(info: msgspec.inspect.Type) -> bool:
    if isinstance(info, msgspec.inspect.StructType):
        return True
    if isinstance(info, msgspec.inspect.Metadata):
        return _contains_struct(info.type)
    if isinstance(info, msgspec.inspect.ListType):
        return _contains_struct(info.item_type)
    if isinstance(info, msgspec.inspect.DictType):
        return _contains_struct(info.value_type)
    if isinstance(info, msgspec.inspect.UnionType):
        return any(_contains_struct(t) for t in info.types)
    return False


def _error_suffix(path_text: str) -> DataPath:
    segments: list[str | int] = []
    for match in _PATH_SEGMENT.finditer(path_text):
        if match.group(1) is not None:
            segments.append(match.group(1))
        elif match.group(2) is not None:
            segments.append(int(match.group(2)))
        else:
            break
    return tuple(segments)


def _friendly(message: str) -> str:
    # msgspec says "Expected `str`, got `int`"; in YAML the fix is almost always quoting.
    if re.match(r"Expected `str( \| null)?`, got `(int|float|bool)`", message):
        message += " (quote the value to make it a string)"
    return message[:1].lower() + message[1:]


def _choices(info: msgspec.inspect.Type) -> list[str]:
    """How the accepted values of an enum-like type read to a user."""
    if isinstance(info, msgspec.inspect.Metadata):
        return _choices(info.type)
    if isinstance(info, msgspec.inspect.LiteralType):
        return [f"'{v}'" for v in info.values]
    if isinstance(info, msgspec.inspect.IntType):
        return [f"an integer >= {info.ge}" if info.ge is not None else "an integer"]
    if isinstance(info, msgspec.inspect.UnionType):
        return [c for t in info.types for c in _choices(t)]
    return []


def convert_leaf(value: Any, tp: Any, path: DataPath, report: Report) -> bool:
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError as e:
        match = _ERROR.match(str(e))
        assert match is not None
        suffix = _error_suffix(match.group("path") or "")
        message = _friendly(match.group("message"))
        choices = _choices(_type_info(tp)) if not suffix else []
        if message.startswith("invalid enum value") and choices:
            message = f"invalid value {value!r}: expected {' or '.join(choices)}"
            message += did_you_mean(str(value), [c.strip("'") for c in choices])
        report((*path, *suffix), message, False)
        return False
    return True


def check_value(value: Any, tp: Any, path: DataPath, report: Report) -> bool:
    """Report every problem of ``value`` as a ``tp``; True if there was none."""
    base = _strip_annotated(tp)
    if _is_struct(base) and isinstance(value, dict):
        return check_struct(value, base, path, report)
    if _contains_struct(_type_info(base)):
        origin = typing.get_origin(base)
        if origin is list and isinstance(value, list):
            (item_type,) = typing.get_args(base)
            results = [check_value(v, item_type, (*path, i), report) for i, v in enumerate(value)]
            return all(results)
        if origin is dict and isinstance(value, dict):
            _, value_type = typing.get_args(base)
            results = [check_value(v, value_type, (*path, k), report) for k, v in value.items()]
            return all(results)
        if origin in (typing.Union, types.UnionType) and isinstance(value, dict):
            tagged = _tagged_member(value, base)
            if tagged is not None:
                member, problem = tagged
                if member is None:
                    where, message, at_key = problem
                    report((*path, *where), message, at_key)
                    return False
                return check_value(value, member, path, report)
            for member in typing.get_args(base):
                if _is_struct(_strip_annotated(member)):
                    return check_value(value, member, path, report)
    return convert_leaf(value, tp, path, report)


def _tagged_member(value: dict[str, Any], union: Any) -> tuple[Any, Any] | None:
    """For a union of tagged Structs: the member ``value``'s tag names, or (None, the
    problem to report). None when the union is not tagged."""
    members = [m for m in typing.get_args(union) if _is_struct(_strip_annotated(m))]
    tags: dict[Any, Any] = {}
    tag_field = None
    for m in members:
        info = _type_info(_strip_annotated(m))
        if isinstance(info, msgspec.inspect.StructType) and info.tag_field is not None:
            tag_field = info.tag_field
            tags[info.tag] = m
    if tag_field is None:
        return None
    tag = value.get(tag_field)
    if tag in tags:
        return tags[tag], None
    choices = ", ".join(str(t) for t in tags)
    # Reported at the item itself: its other fields mean nothing without a known tag.
    if tag is None:
        return None, ((), f"missing required field '{tag_field}' (one of: {choices})", False)
    hint = did_you_mean(str(tag), [str(t) for t in tags]) or f" (one of: {choices})"
    return None, ((), f"unknown {tag_field} {tag!r}{hint}", False)


def check_struct(
    value: dict[str, Any], cls: type[msgspec.Struct], path: DataPath, report: Report
) -> bool:
    info = _type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.encode_name: f for f in info.fields}
    ok = True
    for key in value:
        if key not in fields and key != info.tag_field:
            report((*path, key), f"unknown field '{key}'{did_you_mean(key, fields)}", True)
            ok = False
    for name, field in fields.items():
        if name in value:
            ok = check_value(value[name], hints[field.name], (*path, name), report) and ok
        elif field.required:
            report((*path, name), f"missing required field '{name}'", False)
            ok = False
    return ok


def placeholder(info: msgspec.inspect.Type) -> Any:
    """A value that passes as ``info``: stands in for a value already reported as broken."""
    if isinstance(info, msgspec.inspect.Metadata):
        return placeholder(info.type)
    if isinstance(info, msgspec.inspect.UnionType):
        if any(isinstance(t, msgspec.inspect.NoneType) for t in info.types):
            return None
        return placeholder(info.types[0])
    if isinstance(info, msgspec.inspect.StrType):
        return ""
    if isinstance(info, msgspec.inspect.IntType | msgspec.inspect.FloatType):
        low = info.ge if info.ge is not None else info.gt + 1 if info.gt is not None else 0
        return float(low) if isinstance(info, msgspec.inspect.FloatType) else int(low)
    if isinstance(info, msgspec.inspect.BoolType):
        return False
    if isinstance(info, msgspec.inspect.ListType):
        return []
    if isinstance(info, msgspec.inspect.DictType):
        return {}
    if isinstance(info, msgspec.inspect.LiteralType):
        return info.values[0]
    if isinstance(info, msgspec.inspect.StructType):
        out = {f.encode_name: placeholder(f.type) for f in info.fields if f.required}
        if info.tag_field is not None:
            out[info.tag_field] = info.tag
        return out
    return None


def salvage(value: Any, tp: Any, path: DataPath, touched: Callable[[DataPath], bool]) -> Any:
    """``value`` with every part that ``touched`` (has a problem at or below it) replaced.

    Broken optional fields are dropped (their default applies), broken required ones and
    list items get placeholders, so that the result converts and the cross-field checks
    can run on everything that is fine.
    """
    if not touched(path):
        return value
    base = _strip_annotated(tp)
    if _is_struct(base):
        return _salvage_struct(value if isinstance(value, dict) else {}, base, path, touched)
    if _contains_struct(_type_info(base)):
        origin = typing.get_origin(base)
        if origin is list and isinstance(value, list):
            (item_type,) = typing.get_args(base)
            return [salvage(v, item_type, (*path, i), touched) for i, v in enumerate(value)]
        if origin is dict and isinstance(value, dict):
            _, value_type = typing.get_args(base)
            return {k: salvage(v, value_type, (*path, k), touched) for k, v in value.items()}
        if origin in (typing.Union, types.UnionType) and isinstance(value, dict):
            tagged = _tagged_member(value, base)
            if tagged is not None and tagged[0] is not None:
                return salvage(value, tagged[0], path, touched)
            for member in typing.get_args(base):
                if _is_struct(_strip_annotated(member)):
                    return salvage(value, member, path, touched)
    return placeholder(_type_info(tp))


def _salvage_struct(
    value: dict[str, Any],
    cls: type[msgspec.Struct],
    path: DataPath,
    touched: Callable[[DataPath], bool],
) -> dict[str, Any]:
    info = _type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    hints = typing.get_type_hints(cls, include_extras=True)
    out: dict[str, Any] = {}
    for field in info.fields:
        name = field.encode_name
        at = (*path, name)
        if name in value and not touched(at):
            out[name] = value[name]
        elif name in value and _contains_struct(field.type):
            out[name] = salvage(value[name], hints[field.name], at, touched)
        elif field.required:
            out[name] = placeholder(field.type)
    if info.tag_field is not None:
        out[info.tag_field] = info.tag
    return out
