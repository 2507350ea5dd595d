"""Plugins the integration tests load through ``plugins_dir``; each probes one thing."""

import asyncio
import json
import time

import msgspec

from ferrogate import LogInfo, Plugin, Request, Response


class Rewrite(Plugin):
    """Rewrites method, path, query and headers on the way upstream."""

    name = "t-rewrite"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        header: str = "x-added"
        path: str | None = None
        method: str | None = None

    def on_request(self, req: Request) -> None:
        req.headers[self.config.header] = "yes"
        req.headers.remove("x-secret")
        req.query_params["added"] = "a b"
        req.query_params.remove("drop")
        if self.config.path is not None:
            req.path = self.config.path
        if self.config.method is not None:
            req.method = self.config.method


class Deny(Plugin):
    """Answers 403 itself when the request carries x-deny."""

    name = "t-deny"

    def on_request(self, req: Request) -> Response | None:
        if "x-deny" in req.headers:
            return Response(403, {"denied": req.headers["x-deny"]}, {"x-denied-by": self.name})
        return None


class Stamp(Plugin):
    """Marks the request in ctx and copies the mark to the response headers."""

    name = "t-stamp"

    def on_request(self, req: Request) -> None:
        req.ctx["mark"] = f"{req.method} {req.path}"

    def on_response(self, req: Request, resp: Response) -> None:
        resp.headers["x-stamp"] = req.ctx.get("mark", "none")
        resp.headers["x-upstream-status"] = str(resp.status)
        if resp.headers.get("x-upstream") is not None:
            resp.headers.rename("x-upstream", "x-served-by")
        if "x-make-201" in req.headers:
            resp.status = 201


class Boom(Plugin):
    """Raises in the phase named by the x-boom request header."""

    name = "t-boom"

    def on_request(self, req: Request) -> None:
        if req.headers.get("x-boom") == "request":
            raise RuntimeError("boom in on_request")
        if req.headers.get("x-boom") == "header":
            req.headers["x-injected"] = "a\r\nx-evil: 1"

    def on_response(self, req: Request, resp: Response) -> None:
        if req.headers.get("x-boom") == "response":
            raise KeyError("boom in on_response")


class JsonBody(Plugin):
    """Adds a field to JSON request bodies."""

    name = "t-json-body"
    request_body = "buffered"
    max_body_size = 64 * 1024

    def on_request(self, req: Request) -> None:
        if req.body:
            data = req.json()
            data["added_by_gateway"] = True
            req.body = json.dumps(data).encode()


class ResponseBody(Plugin):
    """Rewrites the whole JSON response body and a header with it."""

    name = "t-resp-body"
    max_body_size = 256 * 1024

    def on_response_body(self, req: Request, resp: Response, body: bytes) -> bytes:
        data = json.loads(body)
        data["rewritten"] = True
        data.pop("headers", None)
        resp.headers["x-body-rewritten"] = "1"
        return json.dumps(data).encode()


class HeadThenBody(Plugin):
    """Changes the head in ``on_response`` and reports, from the body hook, what it saw."""

    name = "t-head-body"
    max_body_size = 256 * 1024

    def on_response(self, req: Request, resp: Response) -> None:
        req.ctx["mark"] = f"head {resp.status}"
        resp.status = 203
        resp.headers["x-head"] = "seen"

    def on_response_body(self, req: Request, resp: Response, body: bytes) -> bytes:
        return json.dumps(
            {
                "status": resp.status,
                "x-head": resp.headers.get("x-head"),
                "length": len(body),
                "mark": req.ctx.get("mark"),
            }
        ).encode()


class UpperStream(Plugin):
    """Upper-cases the response body chunk by chunk, then appends the chunk count."""

    name = "t-upper-stream"

    def on_response_chunk(
        self, req: Request, resp: Response, chunk: bytes, last: bool
    ) -> bytes | None:
        req.ctx["chunks"] = req.ctx.get("chunks", 0) + 1
        out = chunk.upper()
        if last:
            out += f"\n#chunks={req.ctx['chunks']}".encode()
        return out


class Sleepy(Plugin):
    """An async hook that waits, then says when it ran."""

    name = "t-async"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        delay: float = 0.2

    async def on_request(self, req: Request) -> None:
        start = time.time()
        await asyncio.sleep(self.config.delay)
        req.headers["x-async-window"] = f"{start:.6f},{time.time():.6f}"

    async def on_response(self, req: Request, resp: Response) -> None:
        await asyncio.sleep(0)
        resp.headers["x-async-response"] = "1"


class SlowSync(Plugin):
    """A sync hook that takes a while (for latency budgets)."""

    name = "t-slow-sync"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        delay: float = 0.05

    def on_request(self, req: Request) -> None:
        if "x-fast" not in req.headers:
            time.sleep(self.config.delay)
        req.headers["x-slow-sync"] = "ran"


class LogToFile(Plugin):
    """Appends one JSON line per finished request to a file."""

    name = "t-log"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        path: str

    def on_log(self, req: Request, resp: Response, info: LogInfo) -> None:
        record = {
            "path": req.path,
            "status": info.status,
            "bytes_sent": info.bytes_sent,
            "upstream": info.upstream,
            "error": info.error,
            "duration": info.duration,
            "mark": req.ctx.get("mark"),
            "request_id": req.request_id,
        }
        with open(self.config.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class _Mark(Plugin):
    def on_request(self, req: Request) -> None:
        req.headers.add("x-order", self.name)


class MarkA(_Mark):
    name = "t-mark-a"
    priority = 10


class MarkB(_Mark):
    name = "t-mark-b"
    priority = 20


class MarkC(_Mark):
    name = "t-mark-c"
    priority = 10


class AsyncLog(Plugin):
    """An async log hook (e.g. shipping records over the network)."""

    name = "t-async-log"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        path: str

    async def on_log(self, req: Request, resp: Response, info: LogInfo) -> None:
        await asyncio.sleep(0.01)
        with open(self.config.path, "a") as f:
            f.write(json.dumps({"path": req.path, "status": info.status}) + "\n")


class Instance(Plugin):
    """Says which plugin object served the request."""

    name = "t-instance"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        label: str = ""

    def on_response(self, req: Request, resp: Response) -> None:
        resp.headers["x-instance"] = f"{id(self)}:{self.config.label}"


class Consumer(Plugin):
    """Takes the consumer (and credential) from request headers, as an auth plugin would."""

    name = "t-consumer"

    def on_request(self, req: Request) -> None:
        user = req.headers.get("x-user")
        if user is not None:
            req.consumer = user
            req.credential = req.headers.get("x-key", f"{user}-key")
