"""Plugins for tests/test_plugin_routing.py: choosing the upstream, fallbacks, the body mode
per request, and the node-shared counters; each is steered by request headers."""

import json
import os

import msgspec

from ferrogate import Attempt, LogInfo, Plugin, Request, Response, _core


class Route(Plugin):
    """``x-to``: the upstream; ``x-fallbacks``: JSON list of attempts; ``x-fallback-on``:
    statuses; ``x-mode``: the body mode. Reports what came back in ``x-attempt``/``x-skipped``
    and appends it to ``log`` from ``on_log``."""

    name = "t-route"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        log: str = ""

    def on_request(self, req: Request) -> None:
        to = req.headers.get("x-to")
        if to:
            req.upstream = to
        fallbacks = req.headers.get("x-fallbacks")
        if fallbacks:
            req.fallbacks = [
                Attempt(
                    a["upstream"],
                    path=a.get("path"),
                    headers=[tuple(h) for h in a.get("headers", [])],
                    body=a.get("body", "").encode(),
                    method=a.get("method"),
                )
                for a in json.loads(fallbacks)
            ]
        on = req.headers.get("x-fallback-on")
        if on:
            req.fallback_on = {int(s) for s in on.split(",")}
        mode = req.headers.get("x-mode")
        if mode:
            req.response_body_mode = mode

    def on_response(self, req: Request, resp: Response) -> None:
        resp.headers["x-attempt"] = str(resp.attempt)
        resp.headers["x-skipped"] = json.dumps([list(s) for s in resp.skipped])

    def on_response_body(self, req: Request, resp: Response, body: bytes) -> bytes:
        return body + b"|buffered"

    def on_response_chunk(self, req: Request, resp: Response, chunk: bytes, last: bool) -> bytes:
        return chunk + b"|streamed" if last else chunk

    def on_log(self, req: Request, resp: Response, info: LogInfo) -> None:
        if self.config.log:
            with open(self.config.log, "a") as f:
                line = {
                    "path": req.path,
                    "attempt": resp.attempt,
                    "skipped": [list(s) for s in resp.skipped],
                }
                f.write(json.dumps(line) + "\n")


class LogAttempts(Plugin):
    """Only ``on_log``: records ``resp.attempt`` and ``resp.skipped`` to ``log``."""

    name = "t-log-attempts"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        log: str

    def on_log(self, req: Request, resp: Response, info: LogInfo) -> None:
        with open(self.config.log, "a") as f:
            line = {"attempt": resp.attempt, "skipped": [list(s) for s in resp.skipped]}
            f.write(json.dumps(line) + "\n")


class Counter(Plugin):
    """Answers from the node-shared counters, by query: ``op`` (reserve, used, take),
    ``key``, ``amount``, ``limit``; with the worker's pid."""

    name = "t-counter"

    def on_request(self, req: Request) -> Response:
        q = req.query_params
        key = q["key"]
        op = q["op"]
        if op == "reserve":
            value: float = _core.budget_reserve(key, 7, int(q["amount"]), int(q["limit"]))
        elif op == "used":
            value = _core.budget_used(key, 7)
        else:
            value = _core.rate_take(key, 0.001, float(q["limit"]), float(q["amount"]))
        return Response(200, {"value": value, "pid": os.getpid()})
