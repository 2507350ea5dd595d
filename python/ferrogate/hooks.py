"""The Python side of the hook boundary: the request and response views plugins see, and
the dispatcher that runs a route's plugin chain for one phase in one crossing.

The data plane calls ``Host`` methods with plain values (str, bytes, tuples) and reads back
plain values; nothing here knows about Rust. This module is compiled with Cython when the
wheel is built (``cext/``); it is also plain Python and runs as such when not compiled.

Wire formats at the boundary:
- headers in: one ``str``, a newline then ``name:value\\n`` per field (names lower-case,
  each character one byte of the field, as latin-1), searched by ``get`` and parsed only
  when a plugin needs the fields as a list (``bytes`` in that form is accepted too);
- headers out, only when a plugin changed them: a list of ``(name, value)`` str pairs, the
  whole new set; or, when that carries fewer fields (some were left untouched), a diff
  against the fields handed in:
  ``(removed, added)``, where ``removed`` lists the names (lower-case) whose every field goes
  and ``added`` the ``(name, value)`` pairs then appended, in order. A name a plugin touched
  in any way is removed and its fields as they now are are added, so the order of repeated
  fields is exact; names it did not touch keep their fields (only the order of fields of
  one name carries meaning in HTTP);
- request decision: ``None`` (nothing changed),
  ``(0, method, path, query, headers, body, consumer, credential, routing)`` (each ``None``
  when unchanged or unset; ``routing`` is ``(upstream, fallbacks, fallback_on, body_mode)``
  when a plugin set ``req.upstream``, ``req.fallbacks`` or ``req.response_body_mode``, each
  ``None`` when unset, ``fallbacks`` a list of
  ``(upstream, method, path, headers, body)`` and ``fallback_on`` a list of statuses),
  ``(1, status, headers, body, consumer, credential)`` to answer early
  (``headers`` always the whole list; ``consumer``/``credential`` set when a plugin named
  the client before answering, for the log and metrics), or ``(2, message)`` when a plugin
  failed;
- response decision: ``None`` or ``(status, headers)``.
- ``Host.response`` gets ``attempt`` and ``skipped`` only for a request that fell back
  (see ``Attempt``); the engine crosses the response head then even without
  ``on_response`` hooks, so that body hooks and ``on_log`` see them too.

The request's ``meta`` is
``(request_id, client_ip, route, host, scheme, http_version, span, consumer, credential)``
where ``span`` is ``(trace_id, server_span_id)`` (hex) when the request's trace is sampled, else
None, and ``consumer``/``credential`` name who the data plane already knows the request is
from (a client certificate mapped to a consumer), else None; they are ``req.consumer`` and
``req.credential`` when the chain starts. For a sampled request each plugin hook run becomes a
span, handed to ``ferrogate._core.record_span``; other requests pay one test per hook.
"""

import json
import sys
import time
import traceback
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

__all__ = [
    "Attempt",
    "Headers",
    "Host",
    "LogInfo",
    "Params",
    "PluginError",
    "Request",
    "Response",
    "Slot",
]

_perf_ns = time.perf_counter_ns
_time_ns = time.time_ns

Meta = tuple[str, str, str, str, str, str, "tuple[str, str] | None", str | None, str | None]
"""What the data plane tells about a request besides its head (see the module doc)."""


_LOWER: dict[str, str] = {}
"""Header names plugins used, lower-cased: they name the same few headers on every request,
and a lookup costs less than ``str.lower``. Bounded, since names may come from clients."""
_LOWER_MAX = 1024


def _text(value: object) -> str:
    """A header or parameter value: str, or a number written out; anything else is a bug."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise TypeError(
        f"header and query values must be str (or a number), not {type(value).__name__}"
    )


class _Fields:
    """An ordered multi-dict of text fields: ``f["x"]`` is the first value (KeyError when
    absent), ``get``/``getall`` read, ``f["x"] = v`` replaces every value, ``add`` appends
    one, ``del``/``remove`` drop all. Subclasses say how names compare (``_key``) and where
    the fields come from (``_fields``)."""

    __slots__ = ("_dirty", "_items", "changed")

    _items: list[list[str]] | None
    _dirty: dict[str, None] | None
    """Names whose fields changed (set, added, removed, renamed), in first-touched order."""
    changed: bool

    def _touch(self, key: str) -> None:
        dirty = self._dirty
        if dirty is None:
            self._dirty = {key: None}
        else:
            dirty[key] = None
        self.changed = True

    def _key(self, name: str) -> str:
        return name

    def _fields(self) -> list[list[str]]:
        assert self._items is not None
        return self._items

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name``, or ``default``."""
        key = self._key(name)
        for field in self._fields():
            if field[0] == key:
                return field[1]
        return default

    def getall(self, name: str) -> list[str]:
        """Every value of ``name``, in order."""
        key = self._key(name)
        return [f[1] for f in self._fields() if f[0] == key]

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __setitem__(self, name: str, value: str) -> None:
        key = self._key(name)
        text = value if type(value) is str else _text(value)
        self._drop(key)
        self._fields().append([key, text])
        self._touch(key)

    def add(self, name: str, value: str) -> None:
        """Append one more value for ``name``."""
        key = self._key(name)
        text = value if type(value) is str else _text(value)
        self._fields().append([key, text])
        self._touch(key)

    def _drop(self, key: str) -> bool:
        """Delete the fields named ``key`` in place; True if there was one."""
        fields = self._fields()
        found = False
        i = len(fields) - 1
        while i >= 0:
            field = fields[i]
            if field[0] == key:
                del fields[i]
                found = True
            i -= 1
        return found

    def remove(self, name: str) -> bool:
        """Drop every value of ``name``; True if there was one."""
        key = self._key(name)
        if not self._drop(key):
            return False
        self._touch(key)
        return True

    def __delitem__(self, name: str) -> None:
        if not self.remove(name):
            raise KeyError(name)

    def rename(self, old: str, new: str) -> bool:
        """Give every ``old`` field the name ``new``, in place; True if there was one."""
        src, dst = self._key(old), self._key(new)
        found = False
        for field in self._fields():
            if field[0] == src:
                field[0] = dst
                found = True
        if found:
            self._touch(src)
            self._touch(dst)
        return found

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def items(self) -> list[tuple[str, str]]:
        """Every field as a ``(name, value)`` pair, in order."""
        return [(f[0], f[1]) for f in self._fields()]

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for f in self._fields():
            seen[f[0]] = None
        return list(seen)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._fields())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.items()!r})"


class Headers(_Fields):
    """HTTP header fields: a case-insensitive multi-dict that keeps order (see ``_Fields``).
    Names are stored lower-case, as HTTP/2 sends them.

    Fields that arrive from the data plane stay in its blob (``_text``, decoded) until a
    plugin needs them as a list: ``get``, ``getall`` and ``in`` search the text, and
    ``remove``, setting, and ``add`` of a name the text does not hold are kept beside it
    (``_extra``). The fields are then the text's, less those of the names in ``_dirty``,
    followed by ``_extra``: a touched name has all its fields there. Iterating, ``rename``
    and ``add`` to a name the text holds (its new field goes after those, wherever they
    are) parse the text first.
    """

    __slots__ = ("_extra", "_gone", "_text")

    _gone: bool
    """Whether a field of the text is gone (its name was removed or set)."""

    def __init__(
        self, items: "Mapping[str, str] | Iterable[tuple[str, str]] | None" = None
    ) -> None:
        self._text = ""
        self._extra: list[list[str]] | None = None
        self._gone = False
        self._items = []
        self._dirty = None
        self.changed = False
        if items is not None:
            pairs = items.items() if isinstance(items, Mapping) else items
            for name, value in pairs:
                self._items.append([name.lower(), _text(value)])

    def _key(self, name: str) -> str:
        key = _LOWER.get(name)
        if key is None:
            key = name.lower()
            if len(_LOWER) < _LOWER_MAX:
                _LOWER[name] = key
        return key

    def _fields(self) -> list[list[str]]:
        items = self._items
        if items is None:
            items = []
            text = self._text
            dirty = self._dirty
            if text:
                # Every line is `name:value` (the value may hold more colons); the text
                # starts and ends with a newline, so the first and last pieces are empty.
                for line in text.split("\n"):
                    if line:
                        field = line.split(":", 1)
                        if dirty is None or field[0] not in dirty:
                            items.append(field)
            extra = self._extra
            if extra is not None:
                items.extend(extra)
            self._items = items
            self._text = ""
            self._extra = None
        return items

    def _holds(self, key: str) -> bool:
        needle = _needle(key)
        return needle is not None and needle in self._text

    def _take_extra(self, key: str) -> bool:
        """Drop the fields named ``key`` from ``_extra``; True if there was one."""
        extra = self._extra
        if not extra:
            return False
        kept = [f for f in extra if f[0] != key]
        self._extra = kept
        return len(kept) != len(extra)

    def get(self, name: str, default: str | None = None) -> str | None:
        key = self._key(name)
        if self._items is None:
            dirty = self._dirty
            if dirty is None or key not in dirty:
                needle = _needle(key)
                if needle is None:
                    return default
                text = self._text
                at = text.find(needle)
                if at < 0:
                    return default
                at += len(needle)
                end = text.find("\n", at)
                if end < 0:
                    end = len(text)
                return text[at:end]
            if self._extra is not None:
                for field in self._extra:
                    if field[0] == key:
                        return field[1]
            return default
        return _Fields.get(self, name, default)

    def getall(self, name: str) -> list[str]:
        key = self._key(name)
        if self._items is None:
            dirty = self._dirty
            if dirty is not None and key in dirty:
                return [f[1] for f in self._extra or () if f[0] == key]
            out = []
            needle = _needle(key)
            if needle is not None:
                text = self._text
                at = text.find(needle)
                while at >= 0:
                    at += len(needle)
                    end = text.find("\n", at)
                    if end < 0:
                        end = len(text)
                    out.append(text[at:end])
                    at = text.find(needle, end)
            return out
        return _Fields.getall(self, name)

    def __setitem__(self, name: str, value: str) -> None:
        if self._items is None:
            key = self._key(name)
            text = value if type(value) is str else _text(value)
            dirty = self._dirty
            if dirty is not None and key in dirty:
                self._take_extra(key)
            elif self._holds(key):
                self._gone = True
            if self._extra is None:
                self._extra = []
            self._extra.append([key, text])
            self._touch(key)
            return
        _Fields.__setitem__(self, name, value)

    def add(self, name: str, value: str) -> None:
        if self._items is None:
            key = self._key(name)
            dirty = self._dirty
            if (dirty is not None and key in dirty) or not self._holds(key):
                text = value if type(value) is str else _text(value)
                if self._extra is None:
                    self._extra = []
                self._extra.append([key, text])
                self._touch(key)
                return
        _Fields.add(self, name, value)

    def remove(self, name: str) -> bool:
        if self._items is None:
            key = self._key(name)
            dirty = self._dirty
            if dirty is not None and key in dirty:
                if not self._take_extra(key):
                    return False
            elif self._holds(key):
                self._gone = True
            else:
                return False
            self._touch(key)
            return True
        return _Fields.remove(self, name)

    def replace(self, items: "Mapping[str, str] | Iterable[tuple[str, str]]") -> None:
        """Make ``items`` the only fields, in order (every field there was is dropped).
        Cheaper than removing names one by one: the blob is never parsed, and the data
        plane gets the new list whole."""
        pairs = items.items() if isinstance(items, Mapping) else items
        fields = [[self._key(name), _text(value)] for name, value in pairs]
        self._items = fields
        self._text = ""
        self._extra = None
        self._gone = True
        # Every field is a touched one, now and after later edits: the wire form stays the
        # whole list (a diff would apply to the fields the data plane still holds).
        self._dirty = dict.fromkeys(f[0] for f in fields)
        self.changed = True

    def _wire(self) -> "list[tuple[str, str]] | tuple[list[str], list[tuple[str, str]]]":
        """The changed fields for the data plane: the whole list, or the diff when some
        fields were left untouched (see the module doc)."""
        dirty = self._dirty
        if self._items is None and dirty is not None:
            added = [(f[0], f[1]) for f in self._extra or ()]
            text = self._text
            if not self._gone:
                # every field of the text stays: a diff, unless there is none
                return (list(dirty), added) if len(text) > 1 else added
            # Fields the plugins touched, of those the text holds: all of them (one line
            # each, between the newlines), and the whole list is the shorter form.
            touched = 0
            for key in dirty:
                needle = _needle(key)
                if needle is not None:
                    touched += text.count(needle)
            if touched < text.count("\n") - 1:
                return (list(dirty), added)
            return added
        fields = self._fields()
        if dirty is None:
            return [(f[0], f[1]) for f in fields]
        added = [(f[0], f[1]) for f in fields if f[0] in dirty]
        if len(added) == len(fields):
            # every field is new or touched: the list is the whole set, and shorter
            return added
        return (list(dirty), added)


_NEEDLES: dict[str, str | None] = {}
"""``\\nname:`` per lower-case header name: what starts its fields in the text of a blob.
None for a name no field can have (with a colon or a newline, which would match across
lines). Bounded like ``_LOWER``."""


def _needle(key: str) -> str | None:
    needle = _NEEDLES.get(key, "")
    if needle is not None and not needle:
        needle = None if not key or ":" in key or "\n" in key else "\n" + key + ":"
        if len(_NEEDLES) < _LOWER_MAX:
            _NEEDLES[key] = needle
    return needle


class Params(_Fields):
    """Query parameters: an ordered multi-dict (case-sensitive, see ``_Fields``) over the
    raw query string."""

    __slots__ = ()

    def __init__(self, query: str = "") -> None:
        self._items = [list(p) for p in parse_qsl(query, keep_blank_values=True)]
        self._dirty = None
        self.changed = False

    def encode(self) -> str:
        return urlencode(self.items(), quote_via=quote)


class Request:
    """The client's request as plugins see it; changes made in ``on_request`` go upstream.

    ``path`` and ``query`` are what the client sent; setting ``path`` replaces the path sent
    upstream (the route's rewrite is then not applied). ``body`` is the whole body when the
    plugin declared ``request_body = "buffered"``, else None. ``ctx`` is a dict shared by
    every plugin and phase of this one request. ``consumer`` is who the request is from, once
    an authentication plugin has said so (and ``credential`` which of its credentials was
    used); rate limits keyed by consumer or credential count on these. A consumer the data
    plane identified before the chain ran (a client certificate mapped to one) is there from
    the start; setting either to None does not unset what the data plane knows.
    """

    __slots__ = (
        "_body",
        "_body_set",
        "_headers",
        "_orig_consumer",
        "_orig_credential",
        "_orig_method",
        "_orig_path",
        "_orig_query",
        "_params",
        "_span",
        "client_ip",
        "consumer",
        "credential",
        "ctx",
        "fallback_on",
        "fallbacks",
        "host",
        "http_version",
        "method",
        "path",
        "query",
        "request_id",
        "response",
        "response_body_mode",
        "route",
        "scheme",
        "upstream",
    )

    def __init__(
        self,
        method: str = "GET",
        path: str = "/",
        query: str = "",
        headers: "Headers | Mapping[str, str] | Iterable[tuple[str, str]] | None" = None,
        body: bytes | None = None,
        *,
        request_id: str = "",
        client_ip: str = "127.0.0.1",
        route: str = "",
        host: str = "",
        scheme: str = "http",
        http_version: str = "HTTP/1.1",
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self._headers = headers if isinstance(headers, Headers) else Headers(headers)
        self._params: Params | None = None
        self._body = body
        self._body_set = False
        self._orig_method = method
        self._orig_path = path
        self._orig_query = query
        self.request_id = request_id
        self.client_ip = client_ip
        self.route = route
        self.host = host
        self.scheme = scheme
        self.http_version = http_version
        self._span: tuple[str, str] | None = None
        self.consumer: str | None = None
        self.credential: str | None = None
        self._orig_consumer: str | None = None
        self._orig_credential: str | None = None
        self.ctx: dict[str, Any] = {}
        self.response: Response | None = None
        self.upstream: str | None = None
        self.fallbacks: list[Attempt] | None = None
        self.fallback_on: Collection[int] | None = None
        self.response_body_mode: str | None = None

    @property
    def headers(self) -> Headers:
        return self._headers

    @property
    def query_params(self) -> Params:
        """The query string parsed; changes to it replace ``query`` when sent upstream."""
        if self._params is None:
            self._params = Params(self.query)
        return self._params

    @property
    def body(self) -> bytes | None:
        return self._body

    @body.setter
    def body(self, value: bytes) -> None:
        if isinstance(value, str):
            value = value.encode()
        self._body = bytes(value)
        self._body_set = True

    def json(self) -> Any:
        """The body decoded as JSON (``request_body = "buffered"`` only)."""
        if self._body is None:
            raise ValueError("the request body is not buffered for this plugin")
        return json.loads(self._body)

    def _decision(self) -> tuple[Any, ...] | None:
        """What changed, for the data plane (see the module doc)."""
        params = self._params
        query_changed = self.query is not self._orig_query and self.query != self._orig_query
        if params is not None and params.changed:
            self.query = params.encode()
            query_changed = True
        method_changed = self.method is not self._orig_method and self.method != self._orig_method
        path_changed = self.path is not self._orig_path and self.path != self._orig_path
        headers = self._headers
        consumer = self.consumer
        if consumer is self._orig_consumer:
            consumer = None
        credential = self.credential
        if credential is self._orig_credential:
            credential = None
        routing = None
        if not (
            self.upstream is None and self.fallbacks is None and self.response_body_mode is None
        ):
            routing = self._routing()
        if not (
            method_changed
            or path_changed
            or query_changed
            or headers.changed
            or self._body_set
            or consumer is not None
            or credential is not None
            or routing is not None
        ):
            return None
        return (
            0,
            self.method if method_changed else None,
            self.path if path_changed else None,
            self.query if query_changed else None,
            headers._wire() if headers.changed else None,
            self._body if self._body_set else None,
            consumer,
            credential,
            routing,
        )

    def _routing(self) -> tuple[Any, ...]:
        """``req.upstream``, ``req.fallbacks`` and ``req.response_body_mode`` for the data
        plane (see the module doc); a wrong type is the plugin's error."""
        upstream = self.upstream
        if upstream is not None and not isinstance(upstream, str):
            raise PluginError(
                "(chain)", "on_request", f"req.upstream is a {type(upstream).__name__}, not a str"
            )
        mode = self.response_body_mode
        if mode is not None and mode not in ("buffered", "streamed"):
            raise PluginError(
                "(chain)",
                "on_request",
                f"req.response_body_mode must be 'buffered' or 'streamed', not {mode!r}",
            )
        fallbacks = None
        statuses = None
        if self.fallbacks:
            fallbacks = []
            for a in self.fallbacks:
                if not isinstance(a, Attempt):
                    raise PluginError(
                        "(chain)", "on_request", f"req.fallbacks holds a {type(a).__name__}"
                    )
                fallbacks.append(a._wire())
            if self.fallback_on is not None:
                statuses = [int(s) for s in self.fallback_on]
        return (upstream, fallbacks, statuses, mode)

    def __repr__(self) -> str:
        q = f"?{self.query}" if self.query else ""
        return f"<Request {self.method} {self.path}{q} id={self.request_id}>"


class Response:
    """A response: the upstream's on its way back, or one a plugin answers with.

    Return ``Response(403, {"error": "no"})`` (a dict or list body is sent as JSON) or
    ``Response(200, b"bytes", headers={"content-type": "text/plain"})`` from ``on_request`` to
    answer without contacting the upstream.
    """

    __slots__ = ("_headers", "_orig_status", "attempt", "body", "skipped", "status", "trailers")

    def __init__(
        self,
        status: int = 200,
        body: "bytes | str | dict[str, Any] | list[Any] | None" = None,
        headers: "Headers | Mapping[str, str] | Iterable[tuple[str, str]] | None" = None,
    ) -> None:
        self.status = status
        self._orig_status = status
        self._headers = headers if isinstance(headers, Headers) else Headers(headers)
        if isinstance(body, (dict, list)):
            body = json.dumps(body, separators=(",", ":")).encode()
            if "content-type" not in self._headers:
                self._headers["content-type"] = "application/json"
        elif isinstance(body, str):
            body = body.encode()
            if "content-type" not in self._headers:
                self._headers["content-type"] = "text/plain; charset=utf-8"
        self.body: bytes | None = body
        # The upstream's trailers (a gRPC status), in buffered body hooks; None otherwise.
        self.trailers: Headers | None = None
        self.attempt = 0
        """Which attempt answered: 0 the request itself, i ``req.fallbacks[i - 1]``."""
        self.skipped: Sequence[tuple[str, int]] = ()
        """``(upstream, status)`` of the attempts given up on (status 0: no answer)."""

    @property
    def headers(self) -> Headers:
        return self._headers

    def json(self) -> Any:
        """The body decoded as JSON (buffered body hooks only)."""
        if self.body is None:
            raise ValueError("the response body is not buffered here")
        return json.loads(self.body)

    def _decision(self) -> tuple[Any, ...] | None:
        status_changed = self.status != self._orig_status
        if not (status_changed or self._headers.changed):
            return None
        return (
            self.status if status_changed else None,
            self._headers._wire() if self._headers.changed else None,
        )

    def __repr__(self) -> str:
        return f"<Response {self.status}>"


class Attempt:
    """One fallback of a request (``req.fallbacks``): sent when the request before it got a
    status in ``req.fallback_on`` (default 429 and 500-599) or no answer at all.

    ``headers`` are the whole header list of this attempt (the client's are not carried
    over; the gateway still adds X-Request-Id, Via, X-Forwarded-*, traceparent and Host).
    ``path`` None is the main request's upstream path (it may carry ``?query``), ``method``
    None the main request's, ``body`` None an empty body.
    """

    __slots__ = ("body", "headers", "method", "path", "upstream")

    def __init__(
        self,
        upstream: str,
        path: str | None = None,
        headers: "Mapping[str, str] | Iterable[tuple[str, str]]" = (),
        body: bytes | None = None,
        method: str | None = None,
    ) -> None:
        self.upstream = upstream
        self.path = path
        self.headers = headers
        self.body = body
        self.method = method

    def _wire(self) -> tuple[Any, ...]:
        headers = self.headers
        pairs = headers.items() if isinstance(headers, (Mapping, _Fields)) else headers
        body = self.body
        if isinstance(body, str):
            body = body.encode()
        return (
            self.upstream,
            self.method,
            self.path,
            [(n, _text(v)) for n, v in pairs],
            b"" if body is None else bytes(body),
        )

    def __repr__(self) -> str:
        return f"<Attempt {self.method or ''} {self.upstream}{self.path or ''}>"


class LogInfo:
    """What the log phase knows about a finished request."""

    __slots__ = ("bytes_sent", "duration", "error", "status", "upstream")

    def __init__(
        self,
        status: int,
        bytes_sent: int,
        duration: float,
        upstream: str | None = None,
        error: str | None = None,
    ) -> None:
        self.status = status
        self.bytes_sent = bytes_sent
        """Response body bytes sent to the client."""
        self.duration = duration
        """Seconds from the request's arrival to the end of the response."""
        self.upstream = upstream
        """The target that served it (host:port), or None if none was contacted."""
        self.error = error
        """Why the response ended early (client gone, upstream failed mid-body), or None."""

    def __repr__(self) -> str:
        return f"<LogInfo {self.status} {self.bytes_sent}B {self.duration * 1000:.1f}ms>"


class PluginError(Exception):
    """A plugin raised, timed out or went over its budget; the client gets a 500."""

    def __init__(self, plugin: str, phase: str, reason: str) -> None:
        self.plugin = plugin
        self.phase = phase
        self.reason = reason
        super().__init__(f"plugin '{plugin}' failed in {phase}: {reason}")


def log_event(level: str, event: str, **fields: Any) -> None:
    """One JSON line on stderr, like the data plane's own events."""
    record = {"ts": round(time.time(), 6), "level": level, "event": event, **fields}
    try:
        sys.stderr.write(json.dumps(record, default=str, separators=(",", ":")) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class PhaseStats:
    """Time spent in one plugin's hook for one phase; always measured."""

    __slots__ = ("calls", "errors", "max_ns", "over_budget", "total_ns")

    def __init__(self) -> None:
        self.calls = 0
        self.total_ns = 0
        self.max_ns = 0
        self.errors = 0
        self.over_budget = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "total_ns": self.total_ns,
            "max_ns": self.max_ns,
            "errors": self.errors,
            "over_budget": self.over_budget,
        }


class Slot:
    """One configured plugin in a route's chain: the instance, its hooks, its limits."""

    __slots__ = (
        "budget_ns",
        "bypass_for_ns",
        "bypassed_until",
        "name",
        "on_log",
        "on_over_budget",
        "on_request",
        "on_response",
        "on_response_body",
        "on_response_chunk",
        "plugin",
        "stats",
        "timeout",
    )

    def __init__(
        self,
        name: str,
        plugin: Any,
        hooks: Mapping[str, Any],
        *,
        timeout: float | None = None,
        budget: float | None = None,
        on_over_budget: str = "log",
        bypass_for: float = 30.0,
    ) -> None:
        self.name = name
        self.plugin = plugin
        self.on_request: Any = hooks.get("on_request")
        self.on_response: Any = hooks.get("on_response")
        self.on_response_body: Any = hooks.get("on_response_body")
        self.on_response_chunk: Any = hooks.get("on_response_chunk")
        self.on_log: Any = hooks.get("on_log")
        self.timeout = timeout
        self.budget_ns = int(budget * 1e9) if budget else 0
        self.on_over_budget = on_over_budget
        self.bypass_for_ns = int(bypass_for * 1e9)
        self.bypassed_until = 0
        self.stats = {
            phase: PhaseStats()
            for phase in ("on_request", "on_response", "on_response_body", "on_log")
        }

    def skipped(self, now: int) -> bool:
        return self.bypassed_until > now

    def account(self, phase: str, request_id: str, start: int, end: int) -> None:
        """Record a call's time; act on the latency budget."""
        spent = end - start
        stats = self.stats[phase]
        stats.calls += 1
        stats.total_ns += spent
        if spent > stats.max_ns:
            stats.max_ns = spent
        budget = self.budget_ns
        if budget and spent > budget:
            stats.over_budget += 1
            policy = self.on_over_budget
            log_event(
                "warn",
                "plugin_over_budget",
                plugin=self.name,
                phase=phase,
                request_id=request_id,
                spent_ms=round(spent / 1e6, 3),
                budget_ms=round(budget / 1e6, 3),
                action=policy,
            )
            if policy == "bypass":
                self.bypassed_until = end + self.bypass_for_ns
            elif policy == "fail" and phase != "on_log":
                raise PluginError(self.name, phase, "over its latency budget")

    def failed(self, phase: str, request_id: str, exc: BaseException) -> PluginError:
        """Log a plugin's exception with its traceback; the error the client's 500 names."""
        self.stats[phase].errors += 1
        if isinstance(exc, PluginError):
            return exc
        log_event(
            "error",
            "plugin_failed",
            plugin=self.name,
            phase=phase,
            request_id=request_id,
            error=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(exc)),
        )
        return PluginError(self.name, phase, type(exc).__name__)


class Chain:
    """A route's plugins, split by phase, in run order."""

    __slots__ = ("body", "buffered", "chunk", "log", "request", "response", "route", "streamable")

    def __init__(self, route: str, slots: list[Slot]) -> None:
        self.route = route
        self.request = tuple(s for s in slots if s.on_request is not None)
        self.response = tuple(s for s in slots if s.on_response is not None)
        self.body = tuple(
            s for s in slots if s.on_response_body is not None or s.on_response_chunk is not None
        )
        self.buffered = any(s.on_response_body is not None for s in slots)
        self.chunk = tuple(s for s in slots if s.on_response_chunk is not None)
        self.log = tuple(s for s in slots if s.on_log is not None)
        # Whether a request may pick either body mode: every body plugin has a chunk hook.
        self.streamable = bool(self.body) and len(self.chunk) == len(self.body)


def _check_body_mode(chain: Chain, req: Request) -> None:
    """``req.response_body_mode`` set by a hook: "streamed" needs every body plugin of the
    route to have ``on_response_chunk``; either needs a body plugin at all."""
    mode = req.response_body_mode
    if mode is None or (mode == "buffered" and chain.body):
        return
    if mode == "streamed" and chain.streamable:
        return
    raise PluginError(
        "(chain)",
        "on_request",
        f"req.response_body_mode = {mode!r}, but not every body plugin of route "
        f"'{chain.route}' has on_response_chunk"
        if chain.body
        else f"req.response_body_mode is set, but route '{chain.route}' has no body plugin",
    )


def run_request(chain: Chain, req: Request) -> tuple[Any, ...] | None:
    """Run the ``on_request`` hooks of ``chain`` (sync ones only)."""
    rid = req.request_id
    traced = req._span is not None
    wall = 0
    for slot in chain.request:
        start = _perf_ns()
        if slot.bypassed_until > start:
            continue
        if traced:
            wall = _time_ns()
        try:
            answer = slot.on_request(req)
        except BaseException as e:
            if traced:
                _hook_span(req, slot, "on_request", wall, e)
            raise slot.failed("on_request", rid, e) from None
        if traced:
            _hook_span(req, slot, "on_request", wall, None)
        slot.account("on_request", rid, start, _perf_ns())
        if answer is not None:
            return _early(slot, req, answer)
    if req.response_body_mode is not None:
        _check_body_mode(chain, req)
    return req._decision()


async def run_request_async(chain: Chain, req: Request) -> tuple[Any, ...] | None:
    """Like ``run_request`` where some hooks are coroutines; each runs within its timeout."""
    import asyncio

    rid = req.request_id
    traced = req._span is not None
    wall = 0
    for slot in chain.request:
        start = _perf_ns()
        if slot.bypassed_until > start:
            continue
        if traced:
            wall = _time_ns()
        try:
            answer = slot.on_request(req)
            if asyncio.iscoroutine(answer):
                answer = await asyncio.wait_for(answer, slot.timeout)
        except TimeoutError:
            if traced:
                _hook_span(req, slot, "on_request", wall, f"timed out after {slot.timeout}s")
            slot.stats["on_request"].errors += 1
            log_event(
                "error", "plugin_timeout", plugin=slot.name, phase="on_request", request_id=rid
            )
            raise PluginError(slot.name, "on_request", f"timed out after {slot.timeout}s") from None
        except BaseException as e:
            if traced:
                _hook_span(req, slot, "on_request", wall, e)
            raise slot.failed("on_request", rid, e) from None
        if traced:
            _hook_span(req, slot, "on_request", wall, None)
        slot.account("on_request", rid, start, _perf_ns())
        if answer is not None:
            return _early(slot, req, answer)
    if req.response_body_mode is not None:
        _check_body_mode(chain, req)
    return req._decision()


def _hook_span(
    req: Request, slot: Slot, phase: str, start_ns: int, error: BaseException | str | None
) -> None:
    """One hook run of a sampled request, as a span under the request's server span.

    Streamed body chunks and ``on_log`` get none: a span per chunk would flood the
    collector, and the log phase runs after the request's span has ended.
    """
    from ferrogate._core import record_span

    span = req._span
    if span is None:
        return
    if error is not None and not isinstance(error, str):
        error = f"{type(error).__name__}: {error}"
    attributes: dict[str, str | int | float | bool] = {
        "ferrogate.plugin": slot.name,
        "ferrogate.phase": phase,
        "ferrogate.route": req.route,
    }
    try:
        record_span(
            span[0], span[1], f"plugin {slot.name} {phase}", start_ns, _time_ns(), attributes, error
        )
    except Exception as e:  # tracing must never fail a request
        log_event("error", "plugin_span_failed", plugin=slot.name, error=repr(e))


def _early(slot: Slot, req: Request, answer: Any) -> tuple[Any, ...]:
    if not isinstance(answer, Response):
        raise PluginError(
            slot.name,
            "on_request",
            f"on_request must return a Response or None, not {type(answer).__name__}",
        )
    consumer = req.consumer
    credential = req.credential
    return (
        1,
        answer.status,
        answer.headers.items(),
        answer.body or b"",
        None if consumer is req._orig_consumer else consumer,
        None if credential is req._orig_credential else credential,
    )


def run_response(chain: Chain, req: Request, resp: Response) -> tuple[Any, ...] | None:
    rid = req.request_id
    traced = req._span is not None
    wall = 0
    for slot in chain.response:
        start = _perf_ns()
        if slot.bypassed_until > start:
            continue
        if traced:
            wall = _time_ns()
        try:
            slot.on_response(req, resp)
        except BaseException as e:
            if traced:
                _hook_span(req, slot, "on_response", wall, e)
            raise slot.failed("on_response", rid, e) from None
        if traced:
            _hook_span(req, slot, "on_response", wall, None)
        slot.account("on_response", rid, start, _perf_ns())
    return resp._decision()


async def run_response_async(chain: Chain, req: Request, resp: Response) -> tuple[Any, ...] | None:
    import asyncio

    rid = req.request_id
    traced = req._span is not None
    wall = 0
    for slot in chain.response:
        start = _perf_ns()
        if slot.bypassed_until > start:
            continue
        if traced:
            wall = _time_ns()
        try:
            result = slot.on_response(req, resp)
            if asyncio.iscoroutine(result):
                await asyncio.wait_for(result, slot.timeout)
        except TimeoutError:
            if traced:
                _hook_span(req, slot, "on_response", wall, f"timed out after {slot.timeout}s")
            slot.stats["on_response"].errors += 1
            log_event(
                "error", "plugin_timeout", plugin=slot.name, phase="on_response", request_id=rid
            )
            raise PluginError(
                slot.name, "on_response", f"timed out after {slot.timeout}s"
            ) from None
        except BaseException as e:
            if traced:
                _hook_span(req, slot, "on_response", wall, e)
            raise slot.failed("on_response", rid, e) from None
        if traced:
            _hook_span(req, slot, "on_response", wall, None)
        slot.account("on_response", rid, start, _perf_ns())
    return resp._decision()


def run_body(chain: Chain, req: Request, resp: Response, body: bytes) -> bytes:
    """Buffered mode: every body hook sees the whole body; chunk hooks get it as one chunk."""
    rid = req.request_id
    resp.body = body
    traced = req._span is not None
    wall = 0
    for slot in chain.body:
        start = _perf_ns()
        if slot.bypassed_until > start:
            continue
        if traced:
            wall = _time_ns()
        try:
            if slot.on_response_body is not None:
                out = slot.on_response_body(req, resp, resp.body)
            else:
                out = slot.on_response_chunk(req, resp, resp.body, True)
        except BaseException as e:
            if traced:
                _hook_span(req, slot, "on_response_body", wall, e)
            raise slot.failed("on_response_body", rid, e) from None
        if traced:
            _hook_span(req, slot, "on_response_body", wall, None)
        slot.account("on_response_body", rid, start, _perf_ns())
        if out is not None:
            resp.body = out.encode() if isinstance(out, str) else bytes(out)
    return resp.body if resp.body is not None else b""


def run_chunk(chain: Chain, req: Request, resp: Response, chunk: bytes, last: bool) -> bytes:
    """Streamed mode: one chunk through every chunk hook, in order."""
    rid = req.request_id
    for slot in chain.chunk:
        start = _perf_ns()
        if slot.bypassed_until > start:
            continue
        try:
            out = slot.on_response_chunk(req, resp, chunk, last)
        except BaseException as e:
            raise slot.failed("on_response_body", rid, e) from None
        slot.account("on_response_body", rid, start, _perf_ns())
        if out is not None:
            chunk = out.encode() if isinstance(out, str) else bytes(out)
    return chunk


def run_log(chain: Chain, req: Request, info: LogInfo, loop: Any = None) -> None:
    """The log phase: errors are logged, never raised (the response is already sent).

    An ``async def on_log`` is started on ``loop`` (the worker's hook loop) and not waited
    for; with a loop that is not running (tests), it is run to completion here.
    """
    resp = req.response
    if resp is None:
        resp = _wire_response(info.status, "")
    rid = req.request_id
    for slot in chain.log:
        start = _perf_ns()
        try:
            result = slot.on_log(req, resp, info)
            if result is not None and hasattr(result, "__await__"):
                _start_log(slot, rid, result, loop)
        except BaseException as e:
            slot.failed("on_log", rid, e)
            continue
        slot.account("on_log", rid, start, _perf_ns())


def _start_log(slot: Slot, rid: str, coro: Any, loop: Any) -> None:
    import asyncio

    if loop is None:
        coro.close()
        raise RuntimeError("an async on_log needs the worker's hook loop")
    if not loop.is_running():
        loop.run_until_complete(coro)
        return

    def finished(fut: Any) -> None:
        exc = fut.exception()
        if exc is not None:
            slot.failed("on_log", rid, exc)

    asyncio.run_coroutine_threadsafe(coro, loop).add_done_callback(finished)


class Host:
    """Every route chain of one config generation; the data plane's entry points.

    A reload builds a new ``Host``; requests in flight keep the one they started with.
    """

    __slots__ = ("chains", "loop")

    def __init__(self, chains: list[Chain], loop: Any = None) -> None:
        self.chains = chains
        self.loop = loop
        """The event loop async hooks run on (another thread), or None when none is async."""

    # -- entry points called by the data plane --------------------------------------------

    def request(
        self,
        chain: int,
        method: str,
        path: str,
        query: str,
        headers: "str | bytes",
        body: bytes | None,
        meta: Meta,
    ) -> tuple[Request, tuple[Any, ...] | None]:
        req = _new_request(self.chains[chain], method, path, query, headers, body, meta)
        try:
            return req, run_request(self.chains[chain], req)
        except PluginError as e:
            # The request object still goes back: later phases and the log see the request.
            return req, (2, str(e))

    def request_async(
        self,
        chain: int,
        method: str,
        path: str,
        query: str,
        headers: "str | bytes",
        body: bytes | None,
        meta: Meta,
        done: Any,
    ) -> Request:
        """Start the chain on the hook loop; ``done(decision, error)`` is called once."""
        req = _new_request(self.chains[chain], method, path, query, headers, body, meta)
        self._submit(run_request_async(self.chains[chain], req), done)
        return req

    def response(
        self,
        chain: int,
        req: Request,
        status: int,
        headers: "str | bytes",
        attempt: int = 0,
        skipped: "list[tuple[str, int]] | None" = None,
    ) -> Any:
        resp = _wire_response(status, headers)
        if skipped is not None:
            resp.attempt = attempt
            resp.skipped = skipped
        req.response = resp
        return run_response(self.chains[chain], req, resp)

    def response_async(
        self,
        chain: int,
        req: Request,
        status: int,
        headers: "str | bytes",
        done: Any,
        attempt: int = 0,
        skipped: "list[tuple[str, int]] | None" = None,
    ) -> None:
        resp = _wire_response(status, headers)
        if skipped is not None:
            resp.attempt = attempt
            resp.skipped = skipped
        req.response = resp
        self._submit(run_response_async(self.chains[chain], req, resp), done)

    def response_body(
        self, chain: int, req: Request, body: bytes, trailers: "str | None" = None
    ) -> tuple[Any, bytes]:
        resp = req.response
        if resp is None:
            resp = req.response = _wire_response(200, "")
        resp.trailers = None if trailers is None else _wire_headers(trailers)
        out = run_body(self.chains[chain], req, resp, body)
        return resp._decision(), out

    def response_whole(
        self,
        chain: int,
        req: Request,
        status: int,
        headers: "str | bytes",
        body: bytes,
        trailers: "str | None" = None,
        attempt: int = 0,
        skipped: "list[tuple[str, int]] | None" = None,
    ) -> tuple[Any, bytes]:
        """``response`` then ``response_body`` in one call (a buffered body and sync
        ``on_response`` hooks): the data plane crosses once for both. The head's decision
        is in the body's (``_decision`` reports every change since the wire)."""
        self.response(chain, req, status, headers, attempt, skipped)
        return self.response_body(chain, req, body, trailers)

    def response_chunk(self, chain: int, req: Request, chunk: bytes, last: bool) -> bytes:
        resp = req.response
        if resp is None:
            resp = req.response = _wire_response(200, "")
        return run_chunk(self.chains[chain], req, resp, chunk, last)

    def log(
        self, batch: list[tuple[int, Request, int, int, float, str | None, str | None]]
    ) -> None:
        for chain, req, status, sent, duration, upstream, error in batch:
            run_log(
                self.chains[chain], req, LogInfo(status, sent, duration, upstream, error), self.loop
            )

    # -- helpers ----------------------------------------------------------------------------

    def _submit(self, coro: Any, done: Any) -> None:
        import asyncio

        def finished(fut: Any) -> None:
            try:
                result = fut.result()
            except PluginError as e:
                done(None, str(e))
            except BaseException as e:  # a bug in the dispatcher itself
                log_event(
                    "error", "plugin_host_failed", error=repr(e), traceback=traceback.format_exc()
                )
                done(None, f"plugin host failed: {type(e).__name__}")
            else:
                done(result, None)

        asyncio.run_coroutine_threadsafe(coro, self.loop).add_done_callback(finished)

    def stats(self) -> dict[str, dict[str, dict[str, dict[str, int]]]]:
        """Per route, per plugin, per phase: calls, total/max ns, errors, over-budget count."""
        out: dict[str, dict[str, dict[str, dict[str, int]]]] = {}
        for chain in self.chains:
            seen = {*chain.request, *chain.response, *chain.body, *chain.log}
            if not seen:
                continue
            out[chain.route] = {
                s.name: {p: st.as_dict() for p, st in s.stats.items() if st.calls or st.errors}
                for s in seen
            }
        return out


def _wire_headers(blob: "str | bytes") -> Headers:
    """Headers from the data plane's text, searched and parsed when first read."""
    h = Headers.__new__(Headers)
    text = blob if type(blob) is str else blob.decode("latin-1")  # type: ignore[union-attr]
    # Every field is found after a newline, the first one too.
    if text[:1] != "\n":
        text = "\n" + text
    if text[-1:] != "\n":
        text += "\n"
    h._text = text
    h._extra = None
    h._gone = False
    h._items = None
    h._dirty = None
    h.changed = False
    return h


def _wire_response(status: int, blob: "str | bytes") -> Response:
    r = Response.__new__(Response)
    r.status = status
    r._orig_status = status
    r._headers = _wire_headers(blob)
    r.body = None
    r.trailers = None
    r.attempt = 0
    r.skipped = ()
    return r


def _new_request(
    chain: Chain,
    method: str,
    path: str,
    query: str,
    headers: "str | bytes",
    body: bytes | None,
    meta: Meta,
) -> Request:
    req = Request.__new__(Request)
    req.method = req._orig_method = method
    req.path = req._orig_path = path
    req.query = req._orig_query = query
    req._headers = _wire_headers(headers)
    req._params = None
    req._body = body
    req._body_set = False
    (
        req.request_id,
        req.client_ip,
        req.route,
        req.host,
        req.scheme,
        req.http_version,
        req._span,
        req.consumer,
        req.credential,
    ) = meta
    req._orig_consumer = req.consumer
    req._orig_credential = req.credential
    req.ctx = {}
    req.response = None
    req.upstream = None
    req.fallbacks = None
    req.fallback_on = None
    req.response_body_mode = None
    return req
