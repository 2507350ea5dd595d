"""api-key: lets a request through only when it carries a known API key."""

import hmac
from typing import Annotated

import msgspec
from msgspec import Meta

from ferrogate import Plugin, Request, Response


class ApiKey(Plugin):
    """Checks the request's API key; answers 401 when it is missing or unknown.

    The upstream never sees the key: it gets the consumer's name in ``x-consumer`` instead.
    """

    name = "api-key"
    priority = 1000  # after cors (2000), before the transformers (800, 801)

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        keys: Annotated[dict[str, str], Meta(min_length=1, description="API key -> consumer name.")]
        header: Annotated[str, Meta(description="The request header with the key.")] = "x-api-key"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.keys = [(key.encode(), consumer) for key, consumer in config.keys.items()]

    def consumer_of(self, key: str) -> str | None:
        """The consumer whose key this is; every key is compared, in constant time."""
        given = key.encode()
        found = None
        for known, consumer in self.keys:
            if hmac.compare_digest(known, given):
                found = consumer
        return found

    def on_request(self, req: Request) -> Response | None:
        key = req.headers.get(self.config.header)
        consumer = self.consumer_of(key) if key else None
        if consumer is None:
            return Response(
                401,
                {"error": f"a valid {self.config.header} header is required"},
                {"www-authenticate": "ApiKey"},
            )
        req.consumer = consumer
        req.headers.remove(self.config.header)
        req.headers["x-consumer"] = consumer
        return None

    def on_response(self, req: Request, resp: Response) -> None:
        if req.consumer is not None:
            resp.headers["x-consumer"] = req.consumer
