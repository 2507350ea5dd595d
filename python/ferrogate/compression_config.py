"""``compression:``, globally and per route: gzip, brotli and zstd responses.

The data plane (rust/engine/src/compress.rs) gets each route's effective settings, the
top-level ones with the route's changes merged in, or nothing when the route does not
compress. See docs/config.md ("Response compression").
"""

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ferrogate.problems import DataPath
from ferrogate.units import Size, parse_size

__all__ = ["Compression", "RouteCompression", "check_compression", "normalize_route_compression"]

Coding = Literal["zstd", "br", "gzip"]
MediaType = Annotated[
    str,
    Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/(\*|[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*)$"),
]

DEFAULT_TYPES = (
    "application/json",
    "text/*",
    "application/javascript",
    "application/xml",
    "image/svg+xml",
)


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class Levels(_Section, kw_only=True, frozen=True):
    """Compression level per coding: higher is smaller and costs more CPU."""

    # 1, as nginx's gzip_comp_level: API bodies are small, and at level 1 the data plane
    # compresses a body of known length whole, in a fraction of a level-4 stream's CPU.
    gzip: Annotated[int, Meta(ge=1, le=9, description="gzip level, 1-9.")] = 1
    br: Annotated[int, Meta(ge=0, le=11, description="brotli quality, 0-11.")] = 4
    zstd: Annotated[int, Meta(ge=1, le=19, description="zstd level, 1-19.")] = 3


class RouteLevels(_Section, kw_only=True, frozen=True):
    """Changes to the levels on one route."""

    gzip: Annotated[int, Meta(ge=1, le=9)] | None = None
    br: Annotated[int, Meta(ge=0, le=11)] | None = None
    zstd: Annotated[int, Meta(ge=1, le=19)] | None = None


class Compression(_Section, kw_only=True, frozen=True):
    """Response compression on every route (a route may change it or turn it off)."""

    encodings: Annotated[
        list[Coding],
        Meta(
            min_length=1,
            description="Codings offered; among those the client accepts with equal q, "
            "the first listed wins.",
        ),
    ] = msgspec.field(default_factory=lambda: ["zstd", "br", "gzip"])
    min_size: Annotated[
        Size,
        Meta(
            description="Responses whose Content-Length is below this are sent as they "
            "are (a body of unknown length is compressed)."
        ),
    ] = 1024
    types: Annotated[
        list[MediaType],
        Meta(description="Media types compressed (`type/subtype` or `type/*`)."),
    ] = msgspec.field(default_factory=lambda: list(DEFAULT_TYPES))
    level: Annotated[Levels, Meta(description="Level per coding.")] = msgspec.field(
        default_factory=Levels
    )


class RouteCompression(_Section, kw_only=True, frozen=True):
    """Compression on one route: the top-level settings (or the defaults) with these changes."""

    encodings: Annotated[list[Coding], Meta(min_length=1)] | None = None
    min_size: Size | None = None
    types: list[MediaType] | None = None
    level: RouteLevels | None = None


RouteCompressionSetting = Annotated[
    RouteCompression | bool | Literal["on", "off"] | None,
    Meta(
        description="off (or false): responses of this route are never compressed; on (or "
        "true): the top-level settings, or the defaults when there are none; or changes to them."
    ),
]


def check_compression(
    top: Compression | None, report: Callable[[DataPath, str], None]
) -> Compression | None:
    """Report the problems of the top-level section once (routes inherit it silently)."""
    if top is not None:
        _problems(top.encodings, top.min_size, ("compression",), report)
    return top


def _problems(
    encodings: Sequence[str] | None,
    min_size: int | str | None,
    at: DataPath,
    report: Callable[[DataPath, str], None],
) -> None:
    if encodings is not None and len(set(encodings)) != len(encodings):
        report((*at, "encodings"), "a coding is listed twice")
    if min_size is not None:
        try:
            parse_size(min_size)
        except ValueError as e:
            report((*at, "min_size"), str(e))


def _size(value: int | str) -> int:
    try:
        return parse_size(value)
    except ValueError:
        return 0  # reported where it is written


def normalize_route_compression(
    setting: RouteCompression | bool | str | None,
    top: Compression | None,
    at: DataPath,
    report: Callable[[DataPath, str], None],
) -> dict[str, Any] | None:
    """A route's effective settings, or None when it does not compress."""
    if setting is False or setting == "off" or (setting is None and top is None):
        return None
    base = top if top is not None else Compression()
    encodings = list(base.encodings)
    types = list(base.types)
    min_size = _size(base.min_size)
    levels = {"gzip": base.level.gzip, "br": base.level.br, "zstd": base.level.zstd}
    if isinstance(setting, RouteCompression):
        _problems(setting.encodings, setting.min_size, at, report)
        if setting.encodings is not None:
            encodings = list(setting.encodings)
        if setting.types is not None:
            types = list(setting.types)
        if setting.min_size is not None:
            min_size = _size(setting.min_size)
        if setting.level is not None:
            for name in ("gzip", "br", "zstd"):
                value = getattr(setting.level, name)
                if value is not None:
                    levels[name] = value
    return {
        "encodings": encodings,
        "min_size": min_size,
        "types": sorted({t.lower() for t in types}),
        "level": levels,
    }
