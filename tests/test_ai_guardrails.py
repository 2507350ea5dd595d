"""The AI gateway's guardrails: PII masking (with the Luhn and mod-97 checks), deny-lists, and
the stream masker split at every position."""

from __future__ import annotations

import random
import time
from typing import Any

import msgspec
import pytest

from ferrogate.ai.guardrails import (
    Guardrails,
    GuardrailsConfig,
    iban_valid,
    luhn_valid,
)


def guardrails(**cfg: Any) -> Guardrails:
    return Guardrails(msgspec.convert(cfg, GuardrailsConfig))


ALL = guardrails(pii={"responses": True})


def masked(text: str, g: Guardrails = ALL) -> str:
    return g.mask_text(text)[0]


# -- checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "number",
    ["4111111111111111", "5500005555555559", "378282246310005", "6011111111111117", "79927398713"],
)
def test_luhn_accepts_valid_numbers(number: str) -> None:
    assert luhn_valid(number)


@pytest.mark.parametrize("number", ["4111111111111112", "1234567812345678", "79927398710"])
def test_luhn_refuses_invalid_numbers(number: str) -> None:
    assert not luhn_valid(number)


@pytest.mark.parametrize(
    "iban",
    ["DE89370400440532013000", "GB82WEST12345698765432", "FR1420041010050500013M02606",
     "NL91ABNA0417164300", "NO9386011117947", "BE68539007547034"],
)  # fmt: skip
def test_iban_check_accepts_valid_ibans(iban: str) -> None:
    assert iban_valid(iban)


@pytest.mark.parametrize(
    "iban", ["DE89370400440532013001", "GB82WEST12345698765433", "DE89", "XX00123456789012"]
)
def test_iban_check_refuses_invalid_ibans(iban: str) -> None:
    assert not iban_valid(iban)


# -- masking ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to john.doe@example.com today", "write to [EMAIL] today"),
        ("JANE+news@mail.example.co.uk.", "[EMAIL]."),
        ("<a_b-c%d@sub-domain.example.org>", "<[EMAIL]>"),
        ("pay with 4111 1111 1111 1111 now", "pay with [CARD] now"),
        ("pay with 4111-1111-1111-1111", "pay with [CARD]"),
        ("pay with 4111111111111111.", "pay with [CARD]."),
        ("amex 3782 822463 10005 ok", "amex [CARD] ok"),
        ("card 4111 1111 1111 1111 2024", "card [CARD] 2024"),
        ("card 4111-1111-1111-1111-123", "card [CARD]-123"),
        ("tel 020 7946 0958-  1,000", "tel [PHONE]-  1,000"),
        ("iban DE89 3704 0044 0532 0130 00, thanks", "iban [IBAN], thanks"),
        ("GB82WEST12345698765432", "[IBAN]"),
        ("gb82 west 1234 5698 7654 32", "[IBAN]"),
        ("BE68 5390 0754 7034 2024 was the year", "[IBAN] 2024 was the year"),
        ("call +49 151 12345678 please", "call [PHONE] please"),
        ("call +1 (555) 123-4567", "call [PHONE]"),
        ("call +44 20 7946 0958.", "call [PHONE]."),
        ("call +33.1.23.45.67.89", "call [PHONE]"),
        ("(555) 123-4567 or 555-123-4567 or 555.123.4567", "[PHONE] or [PHONE] or [PHONE]"),
        ("1 555 123 4567", "[PHONE]"),
        ("020 7946 0958", "[PHONE]"),
        ("01 23 45 67 89", "[PHONE]"),
        ("07911123456", "[PHONE]"),
        ("030-1234567", "[PHONE]"),
        ("+49 151 12345678 (2)", "[PHONE] (2)"),
        ("a@b.io, 4111111111111111, +4915112345678", "[EMAIL], [CARD], [PHONE]"),
    ],
)
def test_masks_personal_data(text: str, expected: str) -> None:
    assert masked(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "card 4111111111111112 fails Luhn",
        "4111 1111 1111 1112",
        "DE89 3704 0044 0532 0130 02 fails mod 97",
        "in 2024 we sold 1,000,000 units at 3.14159 each",
        "dates 2024-01-15, 15/01/2024, 01-02-2024 12",
        "ip 192.168.100.200 and 10.0.0.1, version v1.2.3, build 20240115",
        "order 123456789012 and 5551234567",
        "timestamp 1700000000000",
        "a zip code 01234 and 0.123456789",
        "+123",
        "an@ sign, user@localhost, @handle, x@y.z",
        "room 12 floor 3 seats 1 2 3 4 5 6 7 8 9 0 1 2 3",
        "uuid 123e4567-e89b-12d3-a456-426614174000",
        "no personal data at all",
        "",
    ],
)
def test_leaves_ordinary_text_alone(text: str) -> None:
    assert ALL.mask_text(text) == (text, 0)


def test_only_the_configured_kinds() -> None:
    g = guardrails(pii={"mask": ["email"]})
    assert masked("a@b.io 4111111111111111 +4915112345678", g) == (
        "[EMAIL] 4111111111111111 +4915112345678"
    )


def test_custom_kinds_and_replacement_format() -> None:
    g = guardrails(
        pii={
            "mask": ["email"],
            "custom": [{"name": "employee_id", "regex": r"\bEMP-\d{6}\b"}],
            "replacement": "<{kind} removed>",
        }
    )
    assert g.mask_text("EMP-123456 wrote to x@y.io") == (
        "<EMPLOYEE_ID removed> wrote to <EMAIL removed>",
        2,
    )
    assert masked("EMP-12345 is too short", g) == "EMP-12345 is too short"


def test_mask_request_in_place() -> None:
    req: dict[str, Any] = {
        "model": "fast",
        "messages": [
            {"role": "system", "content": "You help a@b.io"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "my card is 4111 1111 1111 1111"},
                    {"type": "image_url", "image_url": {"url": "https://x.test/a@b.io.png"}},
                ],
            },
            {"role": "assistant", "content": None, "tool_calls": []},
        ],
    }
    assert ALL.mask_request(req) == 2
    assert req["messages"][0]["content"] == "You help [EMAIL]"
    assert req["messages"][1]["content"][0]["text"] == "my card is [CARD]"
    assert req["messages"][1]["content"][1]["image_url"]["url"] == "https://x.test/a@b.io.png"
    embeddings: dict[str, Any] = {"input": ["x@y.io", "plain", 42]}
    assert ALL.mask_request(embeddings) == 1
    assert embeddings["input"] == ["[EMAIL]", "plain", 42]


def test_responses_masked_only_when_asked() -> None:
    completion = {"choices": [{"message": {"role": "assistant", "content": "mail a@b.io"}}]}
    off = guardrails(pii={})
    assert off.mask_response(completion) == 0
    assert completion["choices"][0]["message"]["content"] == "mail a@b.io"
    assert ALL.mask_response(completion) == 1
    assert completion["choices"][0]["message"]["content"] == "mail [EMAIL]"


def test_no_pii_config_masks_nothing() -> None:
    g = guardrails(deny=[{"words": ["x"]}])
    req = {"messages": [{"role": "user", "content": "a@b.io"}]}
    assert g.mask_request(req) == 0
    assert not g.masks_requests and not g.masks_responses


# -- deny-lists ---------------------------------------------------------------------------------


DENY = guardrails(
    deny=[
        {"words": ["secret project", "Zeus"], "message": "internal code names"},
        {"regex": [r"\bdrop\s+table\b"], "responses": True, "message": "no SQL"},
        {"words": ["confidential"], "prompts": False, "responses": True, "message": "leak"},
    ]
)


def chat(*texts: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": t} for t in texts]}


@pytest.mark.parametrize(
    ("req", "reason"),
    [
        (chat("tell me about the SECRET   project"), "internal code names"),
        (chat("hi", "what is zeus?"), "internal code names"),
        (chat([{"type": "text", "text": "please DROP  TABLE users"}]), "no SQL"),
        ({"input": ["embed Zeus"]}, "internal code names"),
        (chat("zeusly", "secret projects", "confidential"), None),
        (chat("drop tables"), None),
    ],
)
def test_deny_prompts(req: dict[str, Any], reason: str | None) -> None:
    assert DENY.check_request(req) == reason


def test_deny_responses() -> None:
    def completion(text: str) -> dict[str, Any]:
        return {"choices": [{"message": {"role": "assistant", "content": text}}]}

    assert DENY.check_response(completion("this is Confidential.")) == "leak"
    assert DENY.check_response(completion("then DROP TABLE x")) == "no SQL"
    assert DENY.check_response(completion("Zeus")) is None  # a prompt-only rule
    assert DENY.check_response({"choices": "nonsense"}) is None


@pytest.mark.parametrize(
    ("cfg", "path", "fragment"),
    [
        ({"deny": [{"regex": ["("]}]}, ("deny", 0, "regex", 0), "not a valid regular"),
        ({"deny": [{"regex": ["a*"]}]}, ("deny", 0, "regex", 0), "empty string"),
        ({"deny": [{"message": "x"}]}, ("deny", 0), "give words or regex"),
        ({"deny": [{"words": [" "]}]}, ("deny", 0, "words", 0), "empty word"),
        (
            {"pii": {"custom": [{"name": "email", "regex": "x"}]}},
            ("pii", "custom", 0, "name"),
            "named twice",
        ),
        (
            {"pii": {"custom": [{"name": "a", "regex": "[x"}]}},
            ("pii", "custom", 0, "regex"),
            "not a valid",
        ),
    ],
)
def test_config_problems(cfg: dict[str, Any], path: tuple[Any, ...], fragment: str) -> None:
    parsed = msgspec.convert(cfg, GuardrailsConfig)
    problems = parsed.problems()
    assert problems and problems[0][0] == path and fragment in problems[0][1]
    with pytest.raises(ValueError, match=fragment):
        Guardrails(parsed)


def test_config_types_are_strict() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"pii": {"mask": ["ssn"]}}, GuardrailsConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"pii": {"typo": 1}}, GuardrailsConfig)


# -- streams ------------------------------------------------------------------------------------

STREAM_TEXTS = [
    "Reach me at john.doe@example.com or +49 151 12345678, card 4111 1111 1111 1111.",
    "IBAN GB82 WEST 1234 5698 7654 32 and (555) 123-4567; 2024 sales were 1,000,000.",
    "Nothing personal here, just words that go on for a while and 12 numbers 34.",
    "BE68 5390 0754 7034 2024 was the year. Call 020 7946 0958\nor mail x@y.io",
    "ends with a card 4111111111111111",
    "a@b.io.hello.4111 1111 1111 1111. card:4111-1111-1111-1111 tel:+49 151 12345678",
    "x 378282246310005-gb82 west 1234 5698 7654 32 , iban:DE89 3704 0044 0532 0130 00",
    "123 DE89 3704 0044 0532 0130 00-john.doe@example.comDE89 3704 0044 0532 0130 00 x",
    "WEST, 01 23 45 67 89-. 4567, tel:, 020 7946 0958-  1,000 @ ",
]


def stream(g: Guardrails, chunks: list[str]) -> str:
    masker = g.stream_masker()
    return "".join(masker.feed(c) for c in chunks) + masker.flush()


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_masker_split_at_every_position(text: str) -> None:
    whole = masked(text)
    assert stream(ALL, [text]) == whole
    for i in range(len(text) + 1):
        assert stream(ALL, [text[:i], text[i:]]) == whole, i
    for i in range(1, len(text)):
        for j in range(i, len(text), 7):
            assert stream(ALL, [text[:i], text[i:j], text[j:]]) == whole, (i, j)


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_masker_character_by_character(text: str) -> None:
    assert stream(ALL, list(text)) == masked(text)


def test_stream_masker_random_splits_with_custom_kind() -> None:
    g = guardrails(
        pii={
            "responses": True,
            "custom": [{"name": "ticket", "regex": r"TCK-\d+", "max_length": 16}],
        }
    )
    text = " ".join(STREAM_TEXTS) + " see TCK-12345678 and TCK-9"
    whole = masked(text, g)
    assert "[TICKET] and [TICKET]" in whole
    rng = random.Random(7)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 40)))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert stream(g, chunks) == whole


def test_stream_masker_never_leaks_a_prefix() -> None:
    # Whatever was sent before the end of a number is never part of it.
    masker = ALL.stream_masker()
    sent = ""
    for ch in "card 4111 1111 1111 111":
        sent += masker.feed(ch)
    assert "4" not in sent and "1" not in sent
    sent += masker.feed("1 ok")
    sent += masker.flush()
    assert sent == "card [CARD] ok"


def test_stream_masker_sends_plain_prose_promptly() -> None:
    masker = ALL.stream_masker()
    out = masker.feed("Hello there, how are you doing ")
    assert out == "Hello there, how are you doing "
    assert masker.feed("tod") == ""  # a word in progress may be the start of an email
    assert masker.feed("ay. ") == "today. "


def test_stream_masker_holds_back_a_bounded_tail() -> None:
    masker = ALL.stream_masker()
    out = masker.feed("x" * 1000)
    assert 700 <= len(out) < 1000
    assert out + masker.flush() == "x" * 1000


def test_stream_masker_passthrough_without_response_masking() -> None:
    masker = guardrails(pii={}).stream_masker()
    assert masker.feed("a@b.io") == "a@b.io"
    assert masker.flush() == ""


def test_stream_masker_on_random_texts() -> None:
    # Pieces of personal data, near misses and separators glued at random, split at random:
    # the stream must always come out as the whole text masked at once.
    pieces = [
        "john.doe@example.com", "a@b.io", "+49 151 12345678", "(555) 123-4567", "555-123-4567",
        "020 7946 0958", "01 23 45 67 89", "4111 1111 1111 1111", "4111111111111111",
        "378282246310005", "DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432",
        "gb82 west 1234 5698 7654 32", "2024", "12", "1,000", "card:", "tel:", "=", "/",
        "hello", "WEST", "x", "@", "+", "(", ")", "-", ".", "0", "00", "123", " ", "\n", ", ",
    ]  # fmt: skip
    rng = random.Random(14)
    masked_any = 0
    for _ in range(400):
        parts = [rng.choice(pieces) + rng.choice(["", " ", ", ", "-"]) for _ in range(12)]
        text = "".join(parts)
        whole = masked(text)
        masked_any += whole != text
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert stream(ALL, chunks) == whole, chunks
    assert masked_any > 300


@pytest.mark.parametrize(
    "text",
    ["DE89 " * 200_000, "4111 1111 1111 1112 " * 50_000, "a@" * 500_000, "+49 151 1 " * 100_000],
)
def test_near_misses_cost_bounded_time(text: str) -> None:
    # A megabyte of near misses: without the bound on rejected candidates this takes tens of
    # seconds; with it, well under a second on an idle core.
    started = time.monotonic()
    assert ALL.mask_text(text) == (text, 0)
    assert time.monotonic() - started < 5
