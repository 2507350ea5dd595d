"""Stands in for an authentication plugin in the policy tests: who the client is comes from
test headers (x-t-consumer, x-t-claims as JSON, x-t-scopes)."""

import json

from ferrogate import Plugin, Request


class Identity(Plugin):
    name = "t-identity"
    priority = 1000

    def on_request(self, req: Request) -> None:
        consumer = req.headers.get("x-t-consumer")
        if consumer is not None:
            req.consumer = consumer
        claims = req.headers.get("x-t-claims")
        if claims is not None:
            req.ctx["claims"] = json.loads(claims)
        scopes = req.headers.get("x-t-scopes")
        if scopes is not None:
            req.ctx["scopes"] = scopes.split(",") if "," in scopes else scopes
