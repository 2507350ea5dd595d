"""Durations and sizes as written in a config: a plain number or a string with a unit."""

import math
import re
from typing import Annotated

from msgspec import Meta

# Also published in the JSON Schema, hence ECMA-262-compatible syntax (no inline flags).
DURATION_PATTERN = r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$"
SIZE_PATTERN = r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgG][iI]?[bB]|[bB])?\s*$"

# The config schema's types for them (checked by msgspec, parsed by the functions below).
Duration = Annotated[
    Annotated[float, Meta(ge=0)]
    | Annotated[str, Meta(extra_json_schema={"pattern": DURATION_PATTERN})],
    Meta(description="Seconds as a number, or a string with a unit: 250ms, 5s, 2m, 1h."),
]
Size = Annotated[
    Annotated[int, Meta(ge=0)] | Annotated[str, Meta(extra_json_schema={"pattern": SIZE_PATTERN})],
    Meta(description="Bytes as a number, or a string with a unit: 512KB, 16KiB, 10MiB, 1GiB."),
]

_DURATION = re.compile(DURATION_PATTERN)
_SIZE = re.compile(SIZE_PATTERN)
_SECONDS_PER_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_BYTES_PER_UNIT = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def parse_duration(value: float | str) -> float:
    """Seconds as a float. Raises ValueError with a message fit for the user."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(
                f"invalid duration {value!r}: use seconds as a number (2.5) "
                "or a number with a unit: 250ms, 5s, 2m, 1h"
            )
        seconds = float(match.group(1)) * _SECONDS_PER_UNIT[match.group(2) or "s"]
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must be a finite number >= 0")
    return seconds


def parse_size(value: int | str) -> int:
    """Bytes as an int (KB = 1000, KiB = 1024). Raises ValueError with a user-fit message."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match is None:
            raise ValueError(
                f"invalid size {value!r}: use bytes as a number "
                "or a number with a unit: 512KB, 16KiB, 10MiB, 1GiB"
            )
        unit = (match.group(2) or "b").lower()
        size = int(float(match.group(1)) * _BYTES_PER_UNIT[unit])
    else:
        size = value
    if size < 0:
        raise ValueError(f"invalid size {value!r}: must be >= 0")
    return size
