"""The plugin SDK: subclass ``Plugin`` and write the hooks you need.

    import msgspec
    from ferrogate import Plugin, Request, Response

    class Greeter(Plugin):
        name = "greeter"

        class Config(msgspec.Struct):
            greeting: str = "hello"

        def on_request(self, req: Request) -> Response | None:
            req.headers["x-greeting"] = self.config.greeting
            return None

A hook you write is a phase you take part in; the rest never cross into Python. Any hook
may be ``async def`` (it then runs on the worker's event loop, within ``timeout``).

Phases, in request order:
- ``on_request(req)``: after routing, before the upstream. Change ``req`` (method, path,
  query, headers, body), or return a ``Response`` to answer without the upstream.
- ``on_response(req, resp)``: the response head (upstream's or an early answer); change
  ``resp.status`` and ``resp.headers``.
- ``on_response_body(req, resp, body) -> bytes | None``: the whole body (buffered, up to
  ``max_body_size``); may also change status and headers. Return None to keep it.
  ``resp.trailers`` holds the upstream's trailers (a gRPC status), or None.
- ``on_response_chunk(req, resp, chunk, last) -> bytes | None``: the body chunk by chunk as
  it streams (headers already sent). Return None to pass the chunk unchanged.
- ``on_log(req, resp, info)``: after the response was sent; never delays the client.
"""

import inspect
from collections.abc import Awaitable
from typing import Any, ClassVar, Literal

import msgspec

from ferrogate.hooks import LogInfo, Request, Response

__all__ = ["HOOKS", "NoConfig", "Plugin", "declared_hooks"]

HOOKS = ("on_request", "on_response", "on_response_body", "on_response_chunk", "on_log")


class NoConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The config of a plugin that has no settings."""


class Plugin:
    """Base class of every plugin. Class attributes describe it; hooks do the work."""

    name: ClassVar[str]
    """How configs refer to the plugin (``plugins: [{name: ...}]``); lower-case, dashes."""
    priority: ClassVar[int] = 0
    """Higher runs first within each phase; equal priorities keep config order."""
    Config: ClassVar[type[Any]] = NoConfig
    """A ``msgspec.Struct`` for the plugin's settings, validated when the config loads."""
    request_body: ClassVar[Literal["none", "buffered"]] = "none"
    """``"buffered"``: ``req.body`` holds the whole request body in ``on_request``."""
    max_body_size: ClassVar[int] = 1 << 20
    """Cap for buffered bodies, in bytes: a larger request gets 413, a larger response 502."""

    config: Any

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    def request_body_mode(cls, config: Any) -> Literal["none", "buffered"]:
        """Whether ``on_request`` needs ``req.body`` with this config (default: the class's
        ``request_body``). Say "none" when the config does not touch the body, so requests
        stream to the upstream unbuffered."""
        return cls.request_body

    @classmethod
    def max_body_size_for(cls, config: Any) -> int:
        """The cap of buffered bodies with this config (default: the class's
        ``max_body_size``), for plugins whose settings choose it."""
        return cls.max_body_size

    @classmethod
    def response_body_mode(cls, config: Any) -> Literal["none", "buffered", "streamed"]:
        """Whether the body hook runs with this config (default: "buffered" if the class
        defines ``on_response_body``, "streamed" for ``on_response_chunk``, else "none").
        Say "none" when the config has no body rules, so responses stream untouched."""
        if cls.on_response_body is not Plugin.on_response_body:
            return "buffered"
        if cls.on_response_chunk is not Plugin.on_response_chunk:
            return "streamed"
        return "none"

    def on_request(self, req: Request) -> "Response | Awaitable[Response | None] | None":
        return None

    def on_response(self, req: Request, resp: Response) -> "Awaitable[None] | None":
        return None

    def on_response_body(self, req: Request, resp: Response, body: bytes) -> bytes | None:
        return None

    def on_response_chunk(
        self, req: Request, resp: Response, chunk: bytes, last: bool
    ) -> bytes | None:
        return None

    def on_log(self, req: Request, resp: Response, info: LogInfo) -> None:
        return None


def declared_hooks(cls: type[Plugin]) -> dict[str, bool]:
    """The hooks ``cls`` overrides, each mapped to whether it is ``async``."""
    out = {}
    for hook in HOOKS:
        impl = getattr(cls, hook, None)
        if impl is not None and impl is not getattr(Plugin, hook):
            out[hook] = inspect.iscoroutinefunction(impl)
    return out
