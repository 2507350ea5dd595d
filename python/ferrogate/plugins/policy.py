"""Allows or denies requests by rules over the request, its consumer and its token's claims."""

import re
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ferrogate import auth
from ferrogate.consumers import current
from ferrogate.hooks import Request, Response
from ferrogate.plugin import Plugin

__all__ = ["Policy", "compile_glob"]

ClaimValue = str | int | bool
Names = Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)]


class When(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Conditions of a rule: all given ones must hold (none given: every request)."""

    method: Annotated[Names | None, Meta(description="Any of these methods.")] = None
    path: Annotated[
        str | list[str] | None,
        Meta(
            description='Globs on the normalized path, any of them: "*" is one segment\'s '
            'worth, "**" anything; a trailing "/*" is the path and everything below it.'
        ),
    ] = None
    header: Annotated[
        dict[str, str] | None,
        Meta(description="Header name -> regex (unanchored) its value must match; all of them."),
    ] = None
    consumer: Annotated[Names | None, Meta(description="Any of these consumers.")] = None
    group: Annotated[Names | None, Meta(description="A consumer in any of these groups.")] = None
    claim: Annotated[
        dict[str, ClaimValue | list[ClaimValue]] | None,
        Meta(
            description="Claim (dotted for nested: realm.roles) -> the value, or any of a "
            "list; a list-valued claim matches when it contains one. All of them."
        ),
    ] = None
    scope: Annotated[Names | None, Meta(description="Scopes the request must all hold.")] = None


class Rule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One rule: `allow` or `deny` with its conditions."""

    allow: Annotated[When | None, Meta(description="Let the request through when these hold.")] = (
        None
    )
    deny: Annotated[When | None, Meta(description="Refuse the request when these hold.")] = None


def compile_glob(pattern: str) -> re.Pattern[str]:
    """A path glob as an anchored regex (see ``When.path``)."""
    if not pattern.startswith("/"):
        raise ValueError(f"path {pattern!r}: a path glob starts with '/'")
    below = pattern.endswith("/*")
    body = pattern[:-2] if below else pattern
    parts = []
    for piece in re.split(r"(\*\*|\*)", body):
        if piece == "**":
            parts.append(".*")
        elif piece == "*":
            parts.append("[^/]*")
        else:
            parts.append(re.escape(piece))
    tail = "(?:/.*)?" if below else ""
    return re.compile("".join(parts) + tail)


def _claim(claims: Any, dotted: str) -> Any:
    value = claims
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _scopes(value: Any) -> frozenset[str]:
    # RFC 8693 / 7662 carry scopes as one space-separated string; others as a list.
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, Iterable):
        return frozenset(str(v) for v in value)
    return frozenset()


def _same(a: Any, b: ClaimValue) -> bool:
    # bool is an int in Python: True must not equal a claim of 1.
    return type(a) is type(b) and a == b


Check = Callable[[Request], bool]


def _compile(when: When, at: str) -> list[Check]:
    checks: list[Check] = []
    if when.method is not None:
        methods = frozenset(m.upper() for m in when.method)
        checks.append(lambda req: req.method.upper() in methods)
    if when.path is not None:
        globs = [when.path] if isinstance(when.path, str) else when.path
        try:
            regexes = [compile_glob(g) for g in globs]
        except ValueError as e:
            raise ValueError(f"{at}.path: {e}") from None
        checks.append(lambda req: any(r.fullmatch(req.path) for r in regexes))
    for name, pattern in (when.header or {}).items():
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{at}.header.{name}: invalid regex: {e}") from None

        def header(req: Request, name: str = name.lower(), regex: re.Pattern[str] = regex) -> bool:
            return any(regex.search(v) for v in req.headers.getall(name))

        checks.append(header)
    if when.consumer is not None:
        consumers = frozenset(when.consumer)
        checks.append(lambda req: req.consumer in consumers)
    if when.group is not None:
        groups = frozenset(when.group)

        def group(req: Request) -> bool:
            consumer = current().get(req.consumer)
            return consumer is not None and not groups.isdisjoint(consumer.groups)

        checks.append(group)
    for name, wanted in (when.claim or {}).items():
        accepted = wanted if isinstance(wanted, list) else [wanted]

        def claim(req: Request, name: str = name, accepted: list[ClaimValue] = accepted) -> bool:
            value = _claim(req.ctx.get("claims"), name)
            values = value if isinstance(value, list) else [value]
            return any(_same(v, a) for v in values for a in accepted)

        checks.append(claim)
    if when.scope is not None:
        needed = frozenset(when.scope)
        checks.append(lambda req: needed <= _scopes(req.ctx.get("scopes")))
    return checks


class Policy(Plugin):
    """Allows or denies requests by rules over the request, its consumer, claims and scopes.

    Conditions: method, path (globs), headers, consumer, groups, token claims and scopes.
    Rules are tried in order and the first whose conditions all hold decides; when none
    does, ``default`` decides (deny unless set). A denied request gets 403 ``forbidden``,
    which does not say which rule refused it. The path is the normalized one the route
    matched (see docs/security.md), so ``/orders/../admin`` is judged as ``/admin``. Claims
    and scopes are read from ``req.ctx["claims"]`` (a dict) and ``req.ctx["scopes"]`` (a
    list, or one space-separated string), which the JWT and introspection plugins set; the
    consumer and its groups from the authentication plugins. So ``policy`` runs after them
    (priority 900, after ``acl``).
    """

    name = "policy"
    priority = 900

    class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
        """Settings of policy."""

        rules: Annotated[
            list[Rule], Meta(description="Tried in order; the first that matches decides.")
        ]
        default: Annotated[
            Literal["allow", "deny"], Meta(description="The decision when no rule matches.")
        ] = "deny"

    config: "Policy.Config"

    def __init__(self, config: "Policy.Config") -> None:
        super().__init__(config)
        self._rules: list[tuple[bool, list[Check]]] = []
        for i, rule in enumerate(config.rules):
            if (rule.allow is None) == (rule.deny is None):
                raise ValueError(f"rules[{i}]: give exactly one of 'allow' or 'deny'")
            when = rule.allow if rule.allow is not None else rule.deny
            assert when is not None
            kind = "allow" if rule.allow is not None else "deny"
            self._rules.append((rule.allow is not None, _compile(when, f"rules[{i}].{kind}")))
        self._default = config.default == "allow"

    def decide(self, req: Request) -> bool:
        for allow, checks in self._rules:
            if all(check(req) for check in checks):
                return allow
        return self._default

    def on_request(self, req: Request) -> Response | None:
        if self.decide(req):
            return None
        return auth.forbidden(req, "the route's policy does not allow this request")
