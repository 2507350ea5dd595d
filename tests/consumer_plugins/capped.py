"""Test plugins for plugins per consumer: a request cap per consumer (answers 429 past it, the
way a rate limit does), an async hook that tags the request, and one with a response hook
(which a consumer may not have)."""

import asyncio

import msgspec

from ferrogate import Plugin, Request, Response


class Cap(Plugin):
    name = "t-cap"
    priority = 900

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        limit: int

    def __init__(self, config: "Cap.Config") -> None:
        super().__init__(config)
        self.used: dict[str, int] = {}

    def on_request(self, req: Request) -> Response | None:
        who = req.consumer or "-"
        self.used[who] = self.used.get(who, 0) + 1
        if self.used[who] > self.config.limit:
            return Response(429, {"error": {"status": 429, "code": "capped", "message": who}})
        req.headers["x-cap-left"] = str(self.config.limit - self.used[who])
        return None


class AsyncTag(Plugin):
    name = "t-async-tag"
    priority = 700

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        value: str

    async def on_request(self, req: Request) -> None:
        await asyncio.sleep(0)
        req.headers["x-async-tag"] = self.config.value


class Stamp(Plugin):
    name = "t-stamp"
    priority = 10

    def on_request(self, req: Request) -> None:
        req.ctx["stamp"] = True

    def on_response(self, req: Request, resp: Response) -> None:
        resp.headers["x-stamp"] = "1"
