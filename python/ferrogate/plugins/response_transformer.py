"""Rewrites responses on their way to the client: the status, the headers and the JSON body.

Headers go through remove, rename, replace, add, append (in that order) in ``on_response``,
which also runs for answers given by a plugin instead of the upstream. The body goes through
remove, rename, replace, add, then ``strip`` in ``on_response_body``: the body is buffered
only when the config has body rules. The operations mean what they mean for
request-transformer (see ``ferrogate.plugins.request_transformer``); values are used as
written (no templates).

Body rules apply to responses whose content type is JSON (``application/json`` or
``*/*+json``), as sent by the upstream, and that are not content-encoded. remove, rename,
replace and add need a top-level object; ``strip`` removes keys of the given names from every
object at any depth, inside lists too (for fields such as ``password`` that must never reach
clients) and runs last, so a field added under a stripped name is removed as well. A body
that is not valid JSON is sent unchanged; valid JSON nested too deeply to decode is an error
of the plugin (the client gets 500), so that no field to strip gets through.
"""

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ferrogate.hooks import Request, Response
from ferrogate.plugin import Plugin
from ferrogate.plugins.request_transformer import BodyEdits, FieldEdits, FieldValue, json_body

__all__ = [
    "ResponseAppendRules",
    "ResponseRemoveRules",
    "ResponseRenameRules",
    "ResponseTransformer",
    "ResponseValueRules",
]

_JSON_KEY = "response-transformer.json"


class _Struct(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class ResponseRemoveRules(_Struct, kw_only=True, frozen=True):
    """Fields to drop."""

    headers: Annotated[list[str], Meta(description="Header names.")] = []
    body: Annotated[list[str], Meta(description="JSON body field paths (a.b.c).")] = []


class ResponseRenameRules(_Struct, kw_only=True, frozen=True):
    """Fields to rename: old name -> new name."""

    headers: Annotated[dict[str, str], Meta(description="Old header name -> new name.")] = {}
    body: Annotated[
        dict[str, str],
        Meta(description="Field path -> the field's new key, in the same object."),
    ] = {}


class ResponseValueRules(_Struct, kw_only=True, frozen=True):
    """Fields to set: name -> value."""

    headers: Annotated[dict[str, FieldValue], Meta(description="Header name -> value.")] = {}
    body: Annotated[
        dict[str, Any], Meta(description="JSON body field path -> any JSON value.")
    ] = {}


class ResponseAppendRules(_Struct, kw_only=True, frozen=True):
    """Header values to add, whether or not the header is present."""

    headers: Annotated[
        dict[str, FieldValue | list[FieldValue]],
        Meta(description="Header name -> value or list of values."),
    ] = {}


def _strip(doc: Any, names: frozenset[str]) -> bool:
    """Remove keys named in ``names`` from every object in ``doc``; True if any was."""
    changed = False
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key in names & node.keys():
                del node[key]
                changed = True
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    return changed


class ResponseTransformer(Plugin):
    """Rewrites responses before the client: status, headers and JSON body (strip fields).

    Headers: remove, rename, replace, add, append. JSON body: remove, rename, replace, add
    with dotted field paths, then ``strip`` (key names removed at any depth). ``status``
    replaces the status code. The body is buffered only when the config has body rules.
    """

    name = "response-transformer"
    priority = 800

    class Config(_Struct, kw_only=True, frozen=True):
        """Settings of response-transformer."""

        remove: Annotated[
            ResponseRemoveRules,
            Meta(description="{headers, body}: header names and body field paths (a.b.c) to drop."),
        ] = msgspec.field(default_factory=ResponseRemoveRules)
        rename: Annotated[
            ResponseRenameRules,
            Meta(description="{headers, body}: old name -> new name, when the old one is present."),
        ] = msgspec.field(default_factory=ResponseRenameRules)
        replace: Annotated[
            ResponseValueRules,
            Meta(description="{headers, body}: name -> new value, when the field is present."),
        ] = msgspec.field(default_factory=ResponseValueRules)
        add: Annotated[
            ResponseValueRules,
            Meta(
                description="{headers, body}: name -> value, when the field is absent "
                "(missing objects on a body path are created)."
            ),
        ] = msgspec.field(default_factory=ResponseValueRules)
        append: Annotated[
            ResponseAppendRules,
            Meta(description="{headers}: name -> value or list, added even when present."),
        ] = msgspec.field(default_factory=ResponseAppendRules)
        strip: Annotated[
            list[str],
            Meta(description="JSON key names removed from every object at any depth."),
        ] = []
        status: Annotated[
            Annotated[int, Meta(ge=100, le=599)] | None,
            Meta(description="A new status code for the response."),
        ] = None

    config: "ResponseTransformer.Config"

    def __init__(self, config: "ResponseTransformer.Config") -> None:
        super().__init__(config)
        c = config
        self._headers = FieldEdits(
            "headers",
            c.remove.headers,
            c.rename.headers,
            c.replace.headers,
            c.add.headers,
            c.append.headers,
            header=True,
            templates=False,
        )
        self._body = BodyEdits(
            c.remove.body, c.rename.body, c.replace.body, c.add.body, [], templates=False
        )
        for i, key in enumerate(c.strip):
            if not key:
                raise ValueError(f"strip[{i}]: a key name cannot be empty")
        self._strip = frozenset(c.strip)
        self._body_rules = bool(self._body or self._strip)

    @classmethod
    def response_body_mode(cls, config: Any) -> Literal["none", "buffered", "streamed"]:
        """Buffered only when the config has body rules (``body`` in remove, rename, replace
        or add, or ``strip``); otherwise responses stream untouched."""
        c = config if isinstance(config, cls.Config) else msgspec.convert(config, cls.Config)
        body = c.remove.body or c.rename.body or c.replace.body or c.add.body or c.strip
        return "buffered" if body else "none"

    def on_response(self, req: Request, resp: Response) -> None:
        if self._body_rules:
            # The body's format is the one the upstream declared, whatever the header rules do.
            req.ctx[_JSON_KEY] = json_body(resp.headers)
        if self._headers:
            self._headers.apply(resp.headers, None)
        if self.config.status is not None:
            resp.status = self.config.status

    def on_response_body(self, req: Request, resp: Response, body: bytes) -> bytes | None:
        if not self._body_rules:
            return None
        is_json = req.ctx.get(_JSON_KEY)
        if is_json is None:
            is_json = json_body(resp.headers)
        if not is_json or not body.strip():
            return None
        try:
            doc = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return None
        except RecursionError:
            # Fail closed: the fields to strip could be in there.
            raise ValueError("JSON response body nested too deeply to edit") from None
        changed = False
        if self._body and isinstance(doc, dict):
            changed = self._body.apply(doc, None)
        if self._strip:
            changed |= _strip(doc, self._strip)
        return msgspec.json.encode(doc) if changed else None
