"""A plugin the gRPC tests load through ``plugins_dir``: it reports what on_response_body saw
of the response's trailers."""

import json

import msgspec

from ferrogate import Plugin, Request, Response


class TrailerProbe(Plugin):
    """Copies the trailers it saw into response headers; with `replace`, answers with them as
    a JSON body instead (a plain HTTP response, as a transcoder's)."""

    name = "t-trailer-probe"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        replace: bool = False

    def on_response_body(self, req: Request, resp: Response, body: bytes) -> bytes | None:
        trailers = resp.trailers
        if self.config.replace:
            resp.headers["content-type"] = "application/json"
            seen = None if trailers is None else dict(trailers.items())
            return json.dumps({"trailers": seen, "body_len": len(body)}).encode()
        resp.headers["x-saw-trailers"] = "no" if trailers is None else "yes"
        if trailers is not None:
            resp.headers["x-saw-grpc-status"] = trailers.get("grpc-status", "")
            resp.headers["x-saw-trail"] = trailers.get("x-trail", "")
        return None
