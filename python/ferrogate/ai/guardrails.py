"""Guardrails of the AI gateway: personal data masked in prompts (and optionally in answers)
before they leave, and deny-lists that refuse prompts (or answers) containing listed words,
phrases or patterns.

Every request of a route with guardrails pays for them, so the work is a few precompiled
regular expressions run only where a match can be: the numeric kinds (phones, cards, IBANs)
are not looked for in a text with fewer than 8 digits, nor emails in one without an ``@``. A
regex only proposes a candidate; cards must pass the Luhn check and IBANs the ISO 13616
mod-97 check, which keeps order numbers, timestamps and other ordinary numbers intact.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "CustomPii",
    "DenyRule",
    "Guardrails",
    "GuardrailsConfig",
    "PiiConfig",
    "StreamMasker",
    "iban_valid",
    "luhn_valid",
]

PiiKind = Literal["email", "phone", "card", "iban"]


class CustomPii(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A kind of personal data of your own, found by a regular expression."""

    name: Annotated[
        str,
        Meta(
            pattern=r"^[A-Za-z][A-Za-z0-9_]*$",
            description="Its name; the replacement shows it in upper case ([EMPLOYEE_ID]).",
        ),
    ]
    regex: Annotated[str, Meta(description="A Python regular expression; every match is masked.")]
    max_length: Annotated[
        int,
        Meta(
            ge=1,
            le=1024,
            description="Longest match, in characters: streamed answers hold back this much "
            "text so that a match split across chunks is still found.",
        ),
    ] = 64


class PiiConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Which personal data is masked, and where."""

    mask: Annotated[
        list[PiiKind], Meta(description="Built-in kinds masked: email, phone, card, iban.")
    ] = msgspec.field(default_factory=lambda: ["email", "phone", "card", "iban"])
    custom: Annotated[
        list[CustomPii], Meta(description="Further kinds, found by regular expressions.")
    ] = msgspec.field(default_factory=list)
    responses: Annotated[
        bool, Meta(description="Mask the models' answers too (streamed ones included).")
    ] = False
    replacement: Annotated[
        str,
        Meta(
            min_length=1,
            description="What replaces a match; {kind} is the kind in upper case (EMAIL).",
        ),
    ] = "[{kind}]"


class DenyRule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Words, phrases or patterns that refuse a prompt (or an answer) containing them."""

    words: Annotated[
        list[str],
        Meta(
            description="Words or phrases, matched case-insensitively as whole words "
            "(any run of whitespace matches the spaces of a phrase)."
        ),
    ] = msgspec.field(default_factory=list)
    regex: Annotated[
        list[str],
        Meta(description="Python regular expressions, matched case-insensitively."),
    ] = msgspec.field(default_factory=list)
    prompts: Annotated[bool, Meta(description="Check the prompts (every message).")] = True
    responses: Annotated[
        bool, Meta(description="Check the models' answers too (not streamed ones).")
    ] = False
    message: Annotated[
        str, Meta(description="The reason given to the client when the rule matches.")
    ] = "the content was refused by a content rule"


class GuardrailsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """PII masking and deny-lists."""

    pii: Annotated[PiiConfig | None, Meta(description="Mask personal data.")] = None
    deny: Annotated[
        list[DenyRule], Meta(description="Refuse prompts or answers with listed content.")
    ] = msgspec.field(default_factory=list)

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """What is wrong beyond the types (bad regular expressions, empty rules), as
        (path inside this section, message), for the config loader to report with file:line."""
        out: list[tuple[tuple[str | int, ...], str]] = []
        if self.pii is not None:
            names: set[str] = set()
            for i, c in enumerate(self.pii.custom):
                where: tuple[str | int, ...] = ("pii", "custom", i)
                if c.name.lower() in names or c.name.lower() in _BUILTIN:
                    out.append(((*where, "name"), f"the kind {c.name!r} is named twice"))
                names.add(c.name.lower())
                problem = _regex_problem(c.regex, 0)
                if problem:
                    out.append(((*where, "regex"), problem))
        for i, rule in enumerate(self.deny):
            if not rule.words and not rule.regex:
                out.append((("deny", i), "give words or regex"))
            if not rule.prompts and not rule.responses:
                out.append((("deny", i), "the rule checks neither prompts nor responses"))
            for j, w in enumerate(rule.words):
                if not w.strip():
                    out.append((("deny", i, "words", j), "an empty word"))
            for j, r in enumerate(rule.regex):
                problem = _regex_problem(r, re.IGNORECASE)
                if problem:
                    out.append((("deny", i, "regex", j), problem))
        return out


def _regex_problem(pattern: str, flags: int) -> str | None:
    try:
        compiled = re.compile(pattern, flags)
    except re.error as e:
        return f"not a valid regular expression: {e}"
    if compiled.search("") is not None:
        return "the regular expression matches the empty string"
    return None


# -- checks of the candidates -------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    """The Luhn check of a card number (digits only)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# letters as the numbers ISO 13616 gives them (A=10 ... Z=35)
_IBAN_LETTERS = str.maketrans({chr(c): str(c - 55) for c in range(65, 91)})


def iban_valid(iban: str) -> bool:
    """The ISO 13616 check of an IBAN (no spaces, upper case): its mod-97 remainder is 1."""
    if not 15 <= len(iban) <= 34 or not iban.isalnum() or not iban.isascii():
        return False
    number = (iban[4:] + iban[:4]).translate(_IBAN_LETTERS)
    return number.isdigit() and int(number) % 97 == 1


_NON_DIGITS = re.compile(r"\D+")
_DIGIT = re.compile(r"\d")
_SEPARATORS = re.compile(r"[ \-]")


def _shorter(text: str) -> list[str]:
    """``text`` and its prefixes without one, two, ... trailing groups: a candidate may have
    swallowed a number that follows it (a year, a count)."""
    out = [text]
    while True:
        cut = max(text.rfind(" "), text.rfind("-"), text.rfind("."))
        if cut <= 0:
            return out
        text = text[:cut].rstrip(" -.(")
        if not text:
            return out
        out.append(text)


def _card(text: str) -> int:
    for cand in _shorter(text):
        digits = _NON_DIGITS.sub("", cand)
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            return len(cand)
    return 0


def _iban(text: str) -> int:
    # the pattern separates groups by single spaces only
    groups = text.upper().split(" ")
    compact = "".join(groups)
    n = len(compact)
    for k in range(len(groups), 0, -1):
        if n < 15:
            break
        if iban_valid(compact[:n]):
            return n + k - 1
        n -= len(groups[k - 1])
    return 0


_PHONE_SEPS = re.compile(r"[ .\-]{2}|\(\D|\D\)(?! )|\)\d")


def _phone(text: str) -> int:
    if text[0] == "+":
        for cand in _shorter(text):
            cand = cand.rstrip("(.-")
            n = len(_NON_DIGITS.sub("", cand))
            if (
                8 <= n <= 15
                and cand[-1].isdigit()
                and cand.count("(") == cand.count(")") <= 1
                and cand.find("(") <= cand.find(")")
                and not _PHONE_SEPS.search(cand)
            ):
                return len(cand)
        return 0
    if text[0] == "0":
        # A national number with its trunk 0: 9 to 12 digits in groups of 2 or more, one
        # kind of separator (which keeps "01-02-2024 12" a date and a number).
        for cand in _shorter(text):
            groups = _SEPARATORS.split(cand)
            seps = set(_NON_DIGITS.findall(cand))
            if (
                9 <= sum(len(g) for g in groups) <= 12
                and all(len(g) >= 2 for g in groups)
                and len(seps) <= 1
            ):
                return len(cand)
        return 0
    return len(text)  # North American: the pattern is exact


def _whole(text: str) -> int:
    return len(text)


_EMAIL = re.compile(
    r"(?<![\w.%+\-])[A-Za-z0-9._%+\-]{1,64}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}"
    r"(?![\w\-]|\.[A-Za-z0-9])"
)
_IBAN = re.compile(
    r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?:[ ]?[A-Za-z0-9]{4}){2,7}(?:[ ]?[A-Za-z0-9]{1,3})?"
    r"(?![A-Za-z0-9])"
)
_CARD = re.compile(
    r"(?<![\w+\-])(?:\d{13,19}"
    r"|\d{4}([ \-])\d{4}\1\d{4}\1\d{1,4}(?:\1\d{1,3})?"  # 4-4-4-4 (and 13 to 19 digits)
    r"|\d{4}[ \-]\d{6}[ \-]\d{4,5})"  # 4-6-5 (Amex), 4-6-4 (Diners)
    r"(?!\w|-\d)"
)
_PHONE = re.compile(
    # international: +, a country code, then digits in groups (checked by _phone)
    r"(?<![\w+])\+[1-9][\d ().\-]{5,20}\d(?!\d)"
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567, 1 555 123 4567
    r"|(?<![\w.\-+])(?<!\d[ .\-])(?:1[ .\-])?(?:\(\d{3}\)[ ]?|\d{3}[ .\-])\d{3}[ .\-]\d{4}"
    r"(?!\w|[.\-]\d)"
    # national with the trunk 0: 020 7946 0958, 01 23 45 67 89, 07911123456
    # (neither this nor the North American form starts inside a longer run of digit groups)
    r"|(?<![\w.,\-+/])(?<!\d[ .\-])0[1-9][\d \-]{6,14}\d(?!\w|[.,\-/]\d)"
)


# Candidates are looked for only around cheap anchors, since a regex scan of a long prompt
# costs about 10-30 ns a character per pattern: an email around each "@" (found like a
# substring), an IBAN at two letters and two digits, cards and phones inside runs of digits
# and separators (at least 8 characters), and nothing numeric in a text of fewer than 8 digits.
_LOCAL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")
_IBAN_AT = re.compile(r"\d\d(?<=[A-Za-z]{2}\d\d)")
_RUN = re.compile(r"[\d+(][\d ().\-]{6,}\d")
_DIGITS = "0123456789"

Candidates = Callable[[str, int, "_Scan"], Iterator["re.Match[str] | None"]]


class _Scan:
    """What the kinds of one text share: whether it can hold numbers, and its digit runs."""

    __slots__ = ("_runs", "numeric", "pos", "text")

    def __init__(self, text: str, pos: int) -> None:
        self.text = text
        self.pos = pos
        count = 0
        for d in _DIGITS:
            count += text.count(d, pos)
            if count >= 8:
                break
        self.numeric = count >= 8
        self._runs: list[tuple[int, int]] | None = None

    def runs(self) -> list[tuple[int, int]]:
        if self._runs is None:
            self._runs = [m.span() for m in _RUN.finditer(self.text, self.pos)]
        return self._runs


def _emails(text: str, pos: int, scan: _Scan) -> Iterator[re.Match[str] | None]:
    at = text.find("@", pos)
    while at >= 0:
        start = at
        floor = max(pos, at - 64)
        while start > floor and text[start - 1] in _LOCAL_CHARS:
            start -= 1
        if start < at:
            yield _EMAIL.match(text, start)
        at = text.find("@", at + 1)


def _ibans(text: str, pos: int, scan: _Scan) -> Iterator[re.Match[str] | None]:
    if scan.numeric:
        for m in _IBAN_AT.finditer(text, pos + 2):
            yield _IBAN.match(text, m.start() - 2)


def _in_runs(regex: re.Pattern[str]) -> Candidates:
    def candidates(text: str, pos: int, scan: _Scan) -> Iterator[re.Match[str] | None]:
        if not scan.numeric:
            return
        for start, end in scan.runs():
            # every match of these kinds lies inside a run; the two characters after it are
            # enough for the look-aheads
            m = regex.search(text, start, end + 2)
            while m is not None:
                yield m
                m = regex.search(text, m.start() + 1, end + 2)

    return candidates


def _searched(regex: re.Pattern[str]) -> Candidates:
    def candidates(text: str, pos: int, scan: _Scan) -> Iterator[re.Match[str] | None]:
        m = regex.search(text, pos)
        while m is not None:
            yield m
            m = regex.search(text, m.end())

    return candidates


class _Kind:
    __slots__ = ("accept", "candidates", "replacement")

    def __init__(
        self, candidates: Candidates, accept: Callable[[str], int], replacement: str
    ) -> None:
        self.candidates = candidates
        self.accept = accept
        self.replacement = replacement


_BUILTIN: dict[str, tuple[Candidates, Callable[[str], int]]] = {
    # the order matters: an email's digits are not a phone, an IBAN's digits not a card
    "email": (_emails, _whole),
    "iban": (_ibans, _iban),
    "card": (_in_runs(_CARD), _card),
    "phone": (_in_runs(_PHONE), _phone),
}

Span = tuple[int, int, str]

# Near misses (numbers failing their check) looked at per kind and text: a text made of
# nothing else (tens of thousands of "DE89 ...") would otherwise cost seconds of CPU.
_MAX_REJECTED = 1000


class Guardrails:
    """The compiled guardrails of one config; shared by every request (no per-request state,
    except the stream maskers it hands out)."""

    def __init__(self, cfg: GuardrailsConfig) -> None:
        problems = cfg.problems()
        if problems:
            path, message = problems[0]
            raise ValueError(f"{'.'.join(map(str, path))}: {message}")
        self.cfg = cfg
        self._kinds: list[_Kind] = []
        self._custom_hold = 0
        pii = cfg.pii
        if pii is not None:
            for name, (candidates, accept) in _BUILTIN.items():
                if name in pii.mask:
                    self._kinds.append(_Kind(candidates, accept, _replacement(pii, name)))
            for c in pii.custom:
                found = _searched(re.compile(c.regex))
                self._kinds.append(_Kind(found, _whole, _replacement(pii, c.name)))
                self._custom_hold = max(self._custom_hold, c.max_length)
        self.masks_requests = bool(self._kinds)
        self.masks_responses = bool(self._kinds) and pii is not None and pii.responses
        self._deny_prompts = [_Deny(r) for r in cfg.deny if r.prompts]
        self._deny_responses = [_Deny(r) for r in cfg.deny if r.responses]
        self.checks_requests = bool(self._deny_prompts)
        self.checks_responses = bool(self._deny_responses)

    # -- masking --------------------------------------------------------------------------------

    def spans(self, text: str, pos: int = 0) -> list[Span]:
        """The matches in ``text`` from ``pos`` on: (start, end, replacement), in order and
        not overlapping (a match overlapping one of an earlier kind is dropped)."""
        out: list[Span] = []
        scan = _Scan(text, pos)
        if not scan.numeric and not self._custom_hold and "@" not in text:
            return out
        starts: list[int] = []  # of the earlier kinds' matches, sorted, for overlap checks
        for kind in self._kinds:
            # a candidate inside an accepted match is skipped; after a rejected one the next
            # position is tried (what it covered may hold a shorter match)
            done = pos
            found: list[Span] = []
            rejected = 0
            for m in kind.candidates(text, pos, scan):
                start = m.start() if m is not None else -1
                if m is not None and start < done:
                    continue
                length = kind.accept(m.group()) if m is not None else 0
                if not length:
                    rejected += 1
                    if rejected > _MAX_REJECTED:
                        break
                    continue
                end = start + length
                if out:
                    i = bisect.bisect_left(starts, end)  # out[:i] start before this ends
                    if i and out[i - 1][1] > start:
                        continue
                found.append((start, end, kind.replacement))
                done = end
            if found:
                out.extend(found)
                out.sort()
                starts = [s for s, _, _ in out]
        return out

    def mask_text(self, text: str) -> tuple[str, int]:
        """``text`` with its personal data masked, and how many matches were replaced."""
        spans = self.spans(text)
        if not spans:
            return text, 0
        return _apply(text, 0, len(text), spans), len(spans)

    def mask_request(self, req: dict[str, Any]) -> int:
        """Masks the messages (string contents and text parts) and an embeddings ``input``,
        in place; how many matches were replaced."""
        if not self._kinds:
            return 0
        count = 0
        messages = req.get("messages")
        if isinstance(messages, list):
            for msg in messages:
                if isinstance(msg, dict):
                    count += self._mask_content(msg)
        inp = req.get("input")
        if isinstance(inp, str):
            req["input"], n = self.mask_text(inp)
            count += n
        elif isinstance(inp, list):
            for i, item in enumerate(inp):
                if isinstance(item, str):
                    inp[i], n = self.mask_text(item)
                    count += n
        return count

    def mask_response(self, completion: dict[str, Any]) -> int:
        """Masks the choices' message contents of a completion in place (when the config asks
        for responses to be masked); how many matches were replaced."""
        if not self.masks_responses:
            return 0
        count = 0
        for choice in _choices(completion):
            msg = choice.get("message")
            if isinstance(msg, dict):
                count += self._mask_content(msg)
        return count

    def _mask_content(self, msg: dict[str, Any]) -> int:
        content = msg.get("content")
        if isinstance(content, str):
            msg["content"], n = self.mask_text(content)
            return n
        count = 0
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text":
                    text = part.get("text")
                    if isinstance(text, str):
                        part["text"], n = self.mask_text(text)
                        count += n
        return count

    def stream_masker(self) -> StreamMasker:
        """A masker for one streamed answer's text deltas."""
        return StreamMasker(self)

    # -- deny-lists -----------------------------------------------------------------------------

    def check_request(self, req: dict[str, Any]) -> str | None:
        """The message of a deny rule a prompt matches, else None."""
        if not self._deny_prompts:
            return None
        return _denied(self._deny_prompts, _request_texts(req))

    def check_response(self, completion: dict[str, Any]) -> str | None:
        """The message of a response deny rule the answer matches, else None."""
        if not self._deny_responses:
            return None
        texts: list[str] = []
        for choice in _choices(completion):
            msg = choice.get("message")
            if isinstance(msg, dict):
                texts.extend(_content_texts(msg.get("content")))
        return _denied(self._deny_responses, texts)


def _replacement(pii: PiiConfig, name: str) -> str:
    return pii.replacement.replace("{kind}", name.upper())


class _Deny:
    """One deny rule, compiled. Words are looked for in the lower-cased text by a pattern
    without flags and their word boundaries checked after a hit: a case-insensitive pattern
    starting with a look-behind scans several times slower."""

    __slots__ = ("message", "regex", "words")

    def __init__(self, rule: DenyRule) -> None:
        self.message = rule.message
        words = [r"\s+".join(re.escape(w) for w in word.lower().split()) for word in rule.words]
        self.words = re.compile("|".join(words)) if words else None
        regex = "|".join(f"(?:{r})" for r in rule.regex)
        self.regex = re.compile(regex, re.IGNORECASE) if regex else None

    def matches(self, text: str, lowered: str) -> bool:
        if self.regex is not None and self.regex.search(text):
            return True
        if self.words is None:
            return False
        m = self.words.search(lowered)
        while m is not None:
            start, end = m.span()
            if not (start and _is_word(lowered[start - 1])) and not (
                end < len(lowered) and _is_word(lowered[end])
            ):
                return True
            m = self.words.search(lowered, start + 1)
        return False


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _denied(rules: list[_Deny], texts: list[str]) -> str | None:
    for text in texts:
        lowered = text.lower()
        for rule in rules:
            if rule.matches(text, lowered):
                return rule.message
    return None


def _choices(completion: dict[str, Any]) -> list[dict[str, Any]]:
    choices = completion.get("choices")
    if not isinstance(choices, list):
        return []
    return [c for c in choices if isinstance(c, dict)]


def _content_texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    out: list[str] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    out.append(text)
    return out


def _request_texts(req: dict[str, Any]) -> list[str]:
    out: list[str] = []
    messages = req.get("messages")
    if isinstance(messages, list):
        for msg in messages:
            if isinstance(msg, dict):
                out.extend(_content_texts(msg.get("content")))
    inp = req.get("input")
    if isinstance(inp, str):
        out.append(inp)
    elif isinstance(inp, list):
        out.extend(x for x in inp if isinstance(x, str))
    return out


def _apply(text: str, start: int, stop: int, spans: list[Span]) -> str:
    parts: list[str] = []
    pos = start
    for s, e, replacement in spans:
        parts.append(text[pos:s])
        parts.append(replacement)
        pos = e
    parts.append(text[pos:stop])
    return "".join(parts)


# -- streams ------------------------------------------------------------------------------------

# A match without whitespace (an email) is held back up to this long; longer runs are let go.
_WORD_HOLD = 256
# Space-separated numbers (phones, cards, IBANs) are at most 42 characters.
_GROUPS_HOLD = 48
_CONTEXT = 2  # characters kept before the held text: the patterns' look-behinds see them
_GROUP = re.compile(r"[A-Za-z0-9().+\-]{1,34}")
_GROUP_END = re.compile(r"[+(]?[A-Za-z0-9().\-]{1,34}\Z")


def _last_space(buf: str, lo: int, hi: int) -> int:
    return max(buf.rfind(" ", lo, hi), buf.rfind("\n", lo, hi), buf.rfind("\t", lo, hi))


def _held_from(buf: str, start: int) -> int:
    """Where the text that may still become (part of) a match begins: the last run without
    whitespace (it may be the start of an email), and before it the space-separated groups
    that could be the start of a phone, card or IBAN number."""
    n = len(buf)
    held = n
    if n > start and buf[n - 1] not in " \n\t":
        lo = max(start, n - _WORD_HOLD)
        held = max(_last_space(buf, lo, n) + 1, lo)
    floor = max(start, held - _GROUPS_HOLD)
    k = held
    while k - 1 > floor and buf[k - 1] == " ":
        p = max(_last_space(buf, floor, k - 1) + 1, floor)
        group = buf[p : k - 1]
        if not group:
            break
        if not _GROUP.fullmatch(group):
            # a number may start inside it ("card:4111 ..."), after some punctuation
            m = _GROUP_END.search(group)
            if m and _DIGIT.search(m.group()):
                held = p + m.start()
            break
        if _DIGIT.search(group):
            held = p
        elif len(group) != 4 or not group.isalpha():
            break  # letters only: an IBAN's bank code (GB82 WEST ...), or an ordinary word
        k = p
    return held


class StreamMasker:
    """Masks a streamed answer's text as it arrives, split anywhere: ``feed`` returns the text
    that can be sent (masked), holding back a bounded tail that may still grow into a match;
    ``flush`` at the end returns the rest."""

    __slots__ = ("_buf", "_g", "_start")

    def __init__(self, guardrails: Guardrails) -> None:
        self._g = guardrails
        self._buf = ""
        self._start = 0  # _buf[:_start] was sent already: context for the look-behinds

    def feed(self, text: str) -> str:
        g = self._g
        if not g.masks_responses:
            return text
        buf = self._buf + text
        start = self._start
        cut = _held_from(buf, start)
        if g._custom_hold:
            cut = min(cut, len(buf) - g._custom_hold)
        if cut <= start:
            self._buf = buf
            return ""
        spans = g.spans(buf, start)
        done: list[Span] = []
        for s, e, replacement in spans:
            if s >= cut:
                break
            if e > cut:
                cut = s
                break
            done.append((s, e, replacement))
        out = _apply(buf, start, cut, done)
        keep = max(cut - _CONTEXT, 0)
        self._buf = buf[keep:]
        self._start = cut - keep
        return out

    def flush(self) -> str:
        buf, start = self._buf, self._start
        self._buf, self._start = "", 0
        if not self._g.masks_responses:
            return buf[start:]
        return _apply(buf, start, len(buf), self._g.spans(buf, start))
