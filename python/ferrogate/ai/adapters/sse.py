"""Server-sent events read incrementally: providers' streams arrive split at any byte."""

from __future__ import annotations

import re

__all__ = ["SseEvent", "SseParser"]

# An event ends at an empty line; the spec allows CRLF, LF or CR line ends.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class SseEvent:
    __slots__ = ("data", "event")

    def __init__(self, event: str, data: str) -> None:
        self.event = event
        """The ``event:`` field ("" when the event had none)."""
        self.data = data
        """The ``data:`` lines joined with "\\n"."""


class SseParser:
    """Feeds bytes, yields complete events; comments (``: ping``) and id/retry are dropped."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[SseEvent]:
        buf = self._buf + data if self._buf else data
        events: list[SseEvent] = []
        start = 0
        # A lone "\r" at the end may be the first half of "\r\n": keep it for the next feed.
        while True:
            m = _EVENT_END.search(buf, start)
            if m is None or (m.group() == b"\r\r" and m.end() == len(buf)):
                break
            ev = _parse(buf[start : m.start()])
            if ev is not None:
                events.append(ev)
            start = m.end()
        self._buf = buf[start:]
        return events

    def close(self) -> list[SseEvent]:
        """An unterminated last event (a server that closed without the empty line)."""
        rest, self._buf = self._buf, b""
        ev = _parse(rest.rstrip(b"\r\n"))
        return [ev] if ev is not None else []


def _parse(block: bytes) -> SseEvent | None:
    if not block:
        return None
    event = ""
    data: list[str] = []
    for raw in block.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"):
        line = raw.decode("utf-8", "replace")
        if not line or line[0] == ":":
            continue
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    if not data and not event:
        return None
    return SseEvent(event, "\n".join(data))
