"""Plugins that do nothing, for bench/plugins/run.sh: what a Python hook costs per request.

- ``noop``: an ``on_request`` hook that returns None (the request goes upstream unchanged).
- ``noop-stream``: an ``on_response_chunk`` hook that returns None for every chunk (the
  response body streams to the client unchanged, one hook call per chunk).
"""

from ferrogate import Plugin, Request, Response


class Noop(Plugin):
    """Takes part in the request phase and changes nothing."""

    name = "noop"

    def on_request(self, req: Request) -> Response | None:
        return None


class NoopStream(Plugin):
    """Sees the response body chunk by chunk and passes every chunk on unchanged."""

    name = "noop-stream"

    def on_response_chunk(
        self, req: Request, resp: Response, chunk: bytes, last: bool
    ) -> bytes | None:
        return None
