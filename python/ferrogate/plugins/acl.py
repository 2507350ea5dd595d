"""Access control by consumer group: a route allows some groups, or denies some."""

from typing import Annotated

import msgspec
from msgspec import Meta

from ferrogate import auth
from ferrogate.consumers import current
from ferrogate.hooks import Headers, Request, Response
from ferrogate.plugin import Plugin

__all__ = ["Acl"]

GroupList = Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)]


class Acl(Plugin):
    """Lets a route's requests through by the groups of their consumer.

    With ``allow``, only consumers in at least one of those groups pass; with ``deny``,
    consumers in any of them are refused (give exactly one of the two). The consumer is the
    one an authentication plugin identified, so ``acl`` runs after them (priority 950).

    A request without a consumer gets 401, and so does the ``anonymous`` consumer of an
    authentication plugin when it is not let through: authenticating may help. The 401
    carries the ``WWW-Authenticate`` challenges of the authentication plugins that ran on
    the request. A known consumer that is not let through gets 403; neither answer names
    the groups involved.
    """

    name = "acl"
    priority = auth.ACL_PRIORITY

    class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
        """Settings of acl."""

        allow: Annotated[
            GroupList | None, Meta(description="Groups let through (all others refused).")
        ] = None
        deny: Annotated[
            GroupList | None, Meta(description="Groups refused (all others let through).")
        ] = None
        realm: Annotated[
            str,
            Meta(
                description="Realm of the 401's challenge when no authentication plugin "
                "ran on the request."
            ),
        ] = "ferrogate"

    config: "Acl.Config"

    def __init__(self, config: "Acl.Config") -> None:
        super().__init__(config)
        if (config.allow is None) == (config.deny is None):
            raise ValueError("give exactly one of 'allow' or 'deny'")
        if any(ch in config.realm for ch in '"\\\r\n\0'):
            raise ValueError("realm: cannot contain a quote, a backslash, CR, LF or NUL")
        self._allow = frozenset(config.allow) if config.allow is not None else None
        self._deny = frozenset(config.deny or ())

    def permits(self, groups: frozenset[str]) -> bool:
        if self._allow is not None:
            return not self._allow.isdisjoint(groups)
        return self._deny.isdisjoint(groups)

    def on_request(self, req: Request) -> Response | None:
        consumer = current().get(req.consumer)
        groups = consumer.groups if consumer is not None else frozenset()
        if req.consumer is not None and self.permits(groups):
            return None
        if req.consumer is None or auth.is_anonymous(req):
            challenges = auth.challenges(req) or [f'Key realm="{self.config.realm}"']
            headers = Headers([("www-authenticate", c) for c in challenges])
            return auth.error(req, 401, "unauthorized", "authentication required", headers)
        return auth.forbidden(req, "this consumer may not use this route")
