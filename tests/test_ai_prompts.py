"""Prompts published as REST endpoints: templates, input validation, output parsing."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from ferrogate.ai.prompts import PromptConfig, PromptEndpoint, PromptInputError

SENTIMENT = {
    "path": "/ai/sentiment",
    "model": "fast",
    "template": "Classify the sentiment of this text: {{ text }}",
    "input": {
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 1, "maxLength": 2000}},
        "required": ["text"],
        "additionalProperties": False,
    },
    "output": {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["sentiment", "confidence"],
    },
    "temperature": 0,
    "max_tokens": 50,
}


def endpoint(name: str = "sentiment", **cfg: Any) -> PromptEndpoint:
    return PromptEndpoint(name, msgspec.convert(cfg, PromptConfig))


def completion(text: Any, finish: str = "stop") -> dict[str, Any]:
    return {
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        ],
    }


def test_build_with_output_schema() -> None:
    req = endpoint(**SENTIMENT).build(b'{"text": "I love it"}')
    assert req["model"] == "fast"
    assert req["temperature"] == 0 and req["max_tokens"] == 50
    assert req["response_format"]["type"] == "json_schema"
    assert req["response_format"]["json_schema"]["name"] == "sentiment"
    assert req["response_format"]["json_schema"]["schema"] == SENTIMENT["output"]
    system, user = req["messages"]
    assert system["role"] == "system" and '"confidence"' in system["content"]
    assert user == {"role": "user", "content": "Classify the sentiment of this text: I love it"}


def test_values_are_data_not_templates() -> None:
    ep = endpoint(
        path="/p",
        model="m",
        messages=[
            {"role": "system", "content": "You rate {{product.name}}."},
            {"role": "user", "content": "{{text}} / {{n}} / {{tags}} / {{missing}} / {{nested}}"},
        ],
    )
    body = {
        "product": {"name": "the {{text}} gadget"},
        "text": '{{product.name}} "quoted" \\ {% raw %}',
        "n": 3.5,
        "tags": ["a", "b"],
        "nested": {"k": None},
    }
    req = ep.build(json.dumps(body).encode())
    assert req["messages"] == [
        {"role": "system", "content": "You rate the {{text}} gadget."},
        {
            "role": "user",
            "content": '{{product.name}} "quoted" \\ {% raw %} / 3.5 / ["a","b"] /  / {"k":null}',
        },
    ]
    assert "response_format" not in req and "temperature" not in req


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        (b'{"text": ""}', "/text", "should be non-empty"),
        (b"{}", "/text", "required"),
        (b'{"text": "x", "extra": 1}', "/extra", "Additional properties"),
        (b'{"text": 5}', "/text", "not of type 'string'"),
        (b"[1, 2]", "", "must be a JSON object"),
        (b'{"text": ', "", "not valid JSON"),
        (b"", "/text", "required"),
    ],
)
def test_input_validation(body: bytes, field: str, fragment: str) -> None:
    with pytest.raises(PromptInputError) as info:
        endpoint(**SENTIMENT).build(body)
    assert info.value.field == field
    assert fragment in info.value.message


def test_without_input_schema_any_object() -> None:
    ep = endpoint(path="/p", model="m", template="Say {{word}}")
    assert ep.build(b"")["messages"] == [{"role": "user", "content": "Say "}]
    assert ep.build(b'{"word": "hi", "x": 1}')["messages"][0]["content"] == "Say hi"
    with pytest.raises(PromptInputError):
        ep.build(b'"just a string"')


def test_answer_parses_and_validates_output() -> None:
    ep = endpoint(**SENTIMENT)
    good = '{"sentiment": "positive", "confidence": 0.93}'
    assert ep.answer(completion(good)) == (200, {"sentiment": "positive", "confidence": 0.93})
    fenced = '```json\n{"sentiment": "neutral", "confidence": 0.5}\n```'
    assert ep.answer(completion(fenced)) == (200, {"sentiment": "neutral", "confidence": 0.5})


@pytest.mark.parametrize(
    ("text", "finish", "fragment"),
    [
        ("I think it is positive", "stop", "not valid JSON"),
        ('{"sentiment": "positive", "confid', "length", "cut off at max_tokens"),
        ('{"sentiment": "great", "confidence": 0.9}', "stop", "output.sentiment"),
        ('{"sentiment": "positive", "confidence": 7}', "stop", "output.confidence"),
        ('{"sentiment": "positive"}', "stop", "'confidence' is a required property"),
        (None, "stop", "no text answer"),
    ],
)
def test_answer_refuses_bad_output(text: Any, finish: str, fragment: str) -> None:
    status, body = endpoint(**SENTIMENT).answer(completion(text, finish))
    assert status == 502
    assert body["error"]["code"] == "invalid_model_output"
    assert body["error"]["status"] == 502
    assert fragment in body["error"]["message"]


def test_answer_without_output_schema_is_text() -> None:
    ep = endpoint(path="/p", model="m", template="hi")
    assert ep.answer(completion("Hello!")) == (200, {"text": "Hello!"})
    assert ep.answer({"choices": []})[0] == 502


@pytest.mark.parametrize(
    ("cfg", "fragment"),
    [
        ({"path": "/p", "model": "m"}, "either messages or template"),
        ({"path": "/p", "model": "m", "template": "x", "messages": []}, "either messages"),
        ({"path": "/p", "model": "m", "messages": []}, "at least one message"),
        ({"path": "p", "model": "m", "template": "x"}, "starting with '/'"),
        ({"path": "/p", "model": "m", "template": "x", "input": {"type": "nope"}}, "input"),
        ({"path": "/p", "model": "m", "template": "x", "output": {"minimum": "a"}}, "output"),
    ],
)
def test_config_problems(cfg: dict[str, Any], fragment: str) -> None:
    parsed = msgspec.convert(cfg, PromptConfig)
    problems = parsed.problems()
    assert problems and any(fragment in f"{'.'.join(map(str, p))} {m}" for p, m in problems)
    with pytest.raises(ValueError):
        PromptEndpoint("p", parsed)


def test_config_types_are_strict() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"path": "/p", "model": "m", "template": "x", "typo": 1}, PromptConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(
            {"path": "/p", "model": "m", "messages": [{"role": "robot", "content": "x"}]},
            PromptConfig,
        )
