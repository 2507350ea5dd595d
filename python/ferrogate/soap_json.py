"""JSON values to and from the values zeep renders and parses, following the XSD types of a
WSDL's messages: the checks that make a request the SOAP service would refuse a 400 at the
gateway, naming the field, instead of an envelope sent upstream."""

import base64
import binascii
import datetime
import decimal
from collections.abc import Callable, Iterator
from typing import Any

from zeep.helpers import serialize_object
from zeep.xsd import ComplexType, Element
from zeep.xsd.types import builtins as xsd

__all__ = [
    "InputError",
    "arguments",
    "check_arguments",
    "from_json",
    "from_text",
    "to_json",
    "xml_to_json",
]


class InputError(ValueError):
    """A value that does not fit the operation's input; ``field`` is its dotted path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.reason = message


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _children(kind: ComplexType) -> Iterator[tuple[str, Any, bool]]:
    """(name, element or attribute, is_attribute) of a complex type, in schema order."""
    for name, elm in kind.elements:
        yield name, elm, False
    for name, attr in kind.attributes:
        yield name, attr, True


def _repeats(elm: Any) -> bool:
    return bool(getattr(elm, "accepts_multiple", False))


def _required(elm: Any, is_attribute: bool) -> bool:
    if is_attribute:
        return bool(getattr(elm, "required", False))
    return not getattr(elm, "is_optional", True) and not getattr(elm, "nillable", False)


def arguments(body: Element | None) -> dict[str, tuple[Any, bool]]:
    """The operation's top-level arguments: name -> (element or attribute, is_attribute)."""
    if body is None or not isinstance(body.type, ComplexType):
        return {}
    return {name: (elm, attr) for name, elm, attr in _children(body.type)}


def from_json(value: Any, elm: Any, where: str) -> Any:
    """``value`` (decoded JSON) as the python value zeep renders for ``elm``."""
    if _repeats(elm):
        if not isinstance(value, list):
            value = [value]
        low = int(elm.min_occurs or 0)
        high = elm.max_occurs
        if len(value) < low:
            raise InputError(where, f"needs at least {low} item(s)")
        if isinstance(high, int) and len(value) > high:
            raise InputError(where, f"takes at most {high} item(s)")
        return [_one(v, elm.type, f"{where}[{i}]") for i, v in enumerate(value)]
    return _one(value, elm.type, where)


def _one(value: Any, kind: Any, where: str) -> Any:
    if value is None:
        return None
    if isinstance(kind, ComplexType):
        return _complex(value, kind, where)
    return _simple(value, kind, where)


def _complex(value: Any, kind: ComplexType, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(where, "must be an object")
    known = {name: (elm, attr) for name, elm, attr in _children(kind)}
    return _fields(value, known, where, {})


def check_arguments(
    known: dict[str, tuple[Any, bool]], body: dict[str, Any], given: dict[str, Any]
) -> dict[str, Any]:
    """The operation's arguments: ``body`` (decoded JSON) checked and converted, beside
    ``given`` (the path and query parameters, converted by ``from_text``)."""
    return _fields(body, known, "", given)


def _fields(
    value: dict[str, Any], known: dict[str, tuple[Any, bool]], where: str, given: dict[str, Any]
) -> dict[str, Any]:
    for key in value:
        if key not in known:
            raise InputError(_join(where, key), f"is not a field (known: {', '.join(known)})")
    out = dict(given)
    for name, (elm, attr) in known.items():
        if name in given:
            continue
        path = _join(where, name)
        got = value.get(name)
        if got is None:
            if _required(elm, attr):
                raise InputError(path, "is required")
            continue
        out[name] = _one(got, elm.type, path) if attr else from_json(got, elm, path)
    return out


def _simple(value: Any, kind: Any, where: str) -> Any:
    """Checked by the JSON type each XSD type is written as: numbers for numbers, true/false
    for booleans, strings for the rest (decimals also as strings, to keep every digit)."""
    if isinstance(value, (dict, list)):
        raise InputError(where, f"must be a single value ({_type_name(kind)})")
    if isinstance(kind, xsd.Boolean):
        if not isinstance(value, bool):
            raise InputError(where, "must be true or false")
        return value
    if isinstance(value, bool):
        raise InputError(where, f"must be {_type_name(kind)}, not a boolean")
    if isinstance(kind, xsd.Integer):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise InputError(where, "must be an integer")
        return value
    if isinstance(kind, xsd.Decimal):
        if isinstance(value, (int, float)):
            return decimal.Decimal(str(value))
        return _parsed(value, where, "a decimal number", decimal.Decimal)
    if isinstance(kind, (xsd.Float, xsd.Double)):
        if not isinstance(value, (int, float)):
            raise InputError(where, "must be a number")
        return float(value)
    if not isinstance(value, str):
        raise InputError(where, f"must be a string ({_type_name(kind)})")
    if isinstance(kind, (xsd.Date, xsd.DateTime, xsd.Time, xsd.Duration)):
        return _parsed(value, where, _type_name(kind), kind.pythonvalue)
    if isinstance(kind, xsd.Base64Binary):
        return _parsed(value, where, "base64", lambda v: base64.b64decode(v, validate=True))
    if isinstance(kind, xsd.HexBinary):
        return _parsed(value, where, "hexadecimal", bytes.fromhex)
    return value


def _parsed(value: Any, where: str, what: str, parse: Callable[[str], Any]) -> Any:
    if not isinstance(value, str):
        raise InputError(where, f"must be {what}")
    try:
        return parse(value.strip())
    except (ValueError, ArithmeticError, binascii.Error, TypeError):
        raise InputError(where, f"must be {what}, not {value!r}") from None


def from_text(text: str, elm: Any, is_attribute: bool, where: str) -> Any:
    """A path or query parameter (text) as the value of a simple-typed argument."""
    kind = elm.type
    if isinstance(kind, ComplexType):
        raise InputError(where, "is structured: send it in the JSON body")
    value: Any = text
    if isinstance(kind, xsd.Boolean):
        if text not in ("true", "false", "1", "0"):
            raise InputError(where, f"must be true or false, not {text!r}")
        value = text in ("true", "1")
    elif isinstance(kind, xsd.Integer):
        try:
            value = int(text)
        except ValueError:
            raise InputError(where, f"must be an integer, not {text!r}") from None
    elif isinstance(kind, (xsd.Float, xsd.Double)):
        try:
            value = float(text)
        except ValueError:
            raise InputError(where, f"must be a number, not {text!r}") from None
    if is_attribute:
        return _one(value, kind, where)
    return from_json(value, elm, where)


def _type_name(kind: Any) -> str:
    qname = getattr(kind, "qname", None)
    return f"xsd:{qname.localname}" if qname is not None else type(kind).__name__


def _plain(value: Any) -> Any:
    """Values JSON has no type for, as strings: decimals keep their digits, dates ISO 8601."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if hasattr(value, "tag") and hasattr(value, "iterchildren"):
        return xml_to_json(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def to_json(result: Any) -> Any:
    """A reply zeep parsed, as plain JSON values."""
    return _plain(serialize_object(result, dict))


def xml_to_json(node: Any) -> Any:
    """An XML element without a schema (a fault's detail): text for a leaf, else an object
    of its children by local name (a name that repeats becomes a list)."""
    children = [c for c in node.iterchildren() if isinstance(c.tag, str)]
    if not children:
        return (node.text or "").strip()
    grouped: dict[str, list[Any]] = {}
    for child in children:
        grouped.setdefault(child.tag.rpartition("}")[2], []).append(xml_to_json(child))
    return {name: values[0] if len(values) == 1 else values for name, values in grouped.items()}
