"""A plugin for tests/test_hook_edits.py: edits headers the way the request's ``x-op`` asks,
with names in mixed case (header names compare case-insensitively)."""

import msgspec

from ferrogate import Plugin, Request, Response


class HeaderOps(Plugin):
    name = "t-header-ops"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        pass

    def on_request(self, req: Request) -> None:
        h = req.headers
        op = h.get("x-op")
        if op == "remove-one":
            # drop the first of the repeated fields, keep the others in order
            kept = h.getall("X-Multi")[1:]
            h.remove("X-Multi")
            for value in kept:
                h.add("x-multi", value)
        elif op == "replace":
            h["X-Multi"] = "z"
            h["X-Set"] = "s"
        elif op == "add":
            h.add("X-Multi", "c")
            h.add("x-new", "1")
            h.add("X-New", "2")
        elif op == "rename":
            h.rename("X-Multi", "x-renamed")
        elif op == "clear":
            for name in list(h):
                h.remove(name)
            h.add("x-only", "1")

    def on_response(self, req: Request, resp: Response) -> None:
        if req.headers.get("x-op") == "clear":
            return
        resp.headers.remove("X-Upstream")
        resp.headers.add("x-added", "1")
        resp.headers.add("X-Added", "2")


class Identify(Plugin):
    """Names the client as the consumer in ``x-who``, then refuses with 403 when the request
    has ``x-refuse``: the answer is logged against that consumer."""

    name = "t-identify"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        pass

    def on_request(self, req: Request) -> Response | None:
        who = req.headers.get("x-who")
        if who is not None:
            req.consumer = who
            req.credential = f"{who}-cred"
        if "x-refuse" in req.headers:
            return Response(403, {"error": {"code": "forbidden", "message": "no"}})
        return None


class Seen(Plugin):
    """Sends upstream who the chain saw the request from when it started."""

    name = "t-seen"
    priority = 5000  # before any authentication plugin

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        pass

    def on_request(self, req: Request) -> None:
        req.headers["x-seen-consumer"] = req.consumer or "-"
        req.headers["x-seen-credential"] = req.credential or "-"
