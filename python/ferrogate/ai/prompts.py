"""Prompts published as REST endpoints: a template, a model and JSON Schemas turn
``POST /ai/sentiment {"text": "..."}`` into a chat completion and its answer back into
``{"sentiment": "positive", "confidence": 0.93}``.

Template values are data, never code: ``{{name}}`` (or ``{{customer.name}}`` for a nested
field) is replaced in one pass by the field's value, a string as it is and anything else as
compact JSON; a value is never searched for placeholders itself and nothing is evaluated. No
escaping is applied, whatever the template looks like: the result is the text of a chat
message, and escaping would not stop a prompt injection anyway (the input schema, with
``maxLength`` and ``enum``, is the tool for limiting what a caller can put in a prompt).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ferrogate.request_schemas import problems_of, schema_validator

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

__all__ = ["PromptConfig", "PromptEndpoint", "PromptInputError", "PromptMessage"]


class PromptMessage(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Meta(description="Text with {{field}} placeholders.")]


class PromptConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A prompt published as a REST endpoint."""

    path: Annotated[str, Meta(description="The endpoint's path, e.g. /ai/sentiment.")]
    model: Annotated[str, Meta(description="The model alias that answers.")]
    messages: Annotated[
        list[PromptMessage] | None,
        Meta(description="The conversation sent, with {{field}} placeholders."),
    ] = None
    template: Annotated[
        str | None, Meta(description="Or one user message with {{field}} placeholders.")
    ] = None
    input: Annotated[
        dict[str, Any] | None,
        Meta(description="JSON Schema of the request body (a JSON object)."),
    ] = None
    output: Annotated[
        dict[str, Any] | None,
        Meta(
            description="JSON Schema of the answer: the model is asked for JSON, and its "
            "answer is parsed and checked against it."
        ),
    ] = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    methods: Annotated[
        list[Literal["POST", "PUT", "PATCH"]], Meta(description="Methods served.")
    ] = msgspec.field(default_factory=lambda: ["POST"])

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """What is wrong beyond the types, as (path inside this prompt, message)."""
        out: list[tuple[tuple[str | int, ...], str]] = []
        if (self.messages is None) == (self.template is None):
            out.append(((), "give either messages or template"))
        elif self.messages is not None and not self.messages:
            out.append((("messages",), "at least one message"))
        if not self.path.startswith("/"):
            out.append((("path",), "a path starting with '/'"))
        for field in ("input", "output"):
            schema = getattr(self, field)
            if schema is not None:
                try:
                    schema_validator(schema)
                except ValueError as e:
                    out.append(((field,), str(e)))
        return out


class PromptInputError(Exception):
    """A request body the prompt does not accept: a 400 naming the field."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        """JSON pointer of the field in the body ("" for the whole body)."""


_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][\w\-]*(?:\.[\w\-]+)*)\s*\}\}")
_FENCED = re.compile(r"\A\s*```[A-Za-z]*[ \t]*\n(.*?)\n?```\s*\Z", re.DOTALL)
_NOT_NAME = re.compile(r"[^A-Za-z0-9_\-]")

# literal text and field paths, alternating: ["Hi ", ("user", "name"), "!"]
_Compiled = list[str | tuple[str, ...]]


def _compile(text: str) -> _Compiled:
    parts: _Compiled = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        parts.append(text[pos : m.start()])
        parts.append(tuple(m.group(1).split(".")))
        pos = m.end()
    parts.append(text[pos:])
    return parts


_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder()


def _render(parts: _Compiled, data: dict[str, Any]) -> str:
    if len(parts) == 1:
        return parts[0]  # type: ignore[return-value]
    out: list[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        value: Any = data
        for key in part:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str):
            out.append(value)
        elif value is not None:
            out.append(_json.encode(value).decode())
    return "".join(out)


class PromptEndpoint:
    """One compiled prompt: builds the chat request of a call and shapes the answer."""

    def __init__(self, name: str, cfg: PromptConfig) -> None:
        problems = cfg.problems()
        if problems:
            path, message = problems[0]
            raise ValueError(f"{'.'.join(map(str, path)) or name}: {message}")
        self.name = name
        self.cfg = cfg
        self._input: Validator | None = schema_validator(cfg.input) if cfg.input else None
        self._output: Validator | None = schema_validator(cfg.output) if cfg.output else None
        messages = cfg.messages or [PromptMessage(role="user", content=cfg.template or "")]
        self._messages = [(m.role, _compile(m.content)) for m in messages]
        self._extra: dict[str, Any] = {}
        if cfg.temperature is not None:
            self._extra["temperature"] = cfg.temperature
        if cfg.max_tokens is not None:
            self._extra["max_tokens"] = cfg.max_tokens
        self._instruction: dict[str, str] | None = None
        if cfg.output is not None:
            schema = _json.encode(cfg.output).decode()
            # Both: providers that honour response_format constrain the answer, and the
            # instruction carries the schema to those that only know JSON mode or nothing.
            self._extra["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": _NOT_NAME.sub("_", name)[:64], "schema": cfg.output},
            }
            self._instruction = {
                "role": "system",
                "content": "Answer with one JSON value and nothing else (no prose, no code "
                f"fences). It must be valid against this JSON Schema: {schema}",
            }

    def build(self, body: bytes) -> dict[str, Any]:
        """The canonical chat request for a call with this body; PromptInputError when the
        body is not a JSON object the input schema accepts."""
        if body.strip():
            try:
                data = _decode.decode(body)
            except msgspec.DecodeError as e:
                raise PromptInputError(f"the request body is not valid JSON: {e}") from None
        else:
            data = {}
        if not isinstance(data, dict):
            raise PromptInputError("the request body must be a JSON object")
        if self._input is not None:
            problems = problems_of(self._input, data, "body", 1)
            if problems:
                raise PromptInputError(problems[0].text(), problems[0].pointer)
        messages = [
            {"role": role, "content": _render(parts, data)} for role, parts in self._messages
        ]
        if self._instruction is not None:
            messages.insert(0, dict(self._instruction))
        return {"model": self.cfg.model, "messages": messages, **self._extra}

    def answer(self, completion: dict[str, Any]) -> tuple[int, Any]:
        """The endpoint's answer to a successful completion: (200, the parsed output) with an
        output schema, else (200, {"text": ...}); (502, error) when the model's text is
        missing, or is not JSON valid against the output schema."""
        choices = completion.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        message = choice.get("message") if isinstance(choice, dict) else None
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            return _bad_output("the model gave no text answer")
        if self._output is None:
            return 200, {"text": text}
        fenced = _FENCED.match(text)
        raw = fenced.group(1) if fenced else text
        try:
            value = _decode.decode(raw.encode())
        except msgspec.DecodeError as e:
            why = f"the model's answer is not valid JSON ({e})"
            if isinstance(choice, dict) and choice.get("finish_reason") == "length":
                why += "; it was cut off at max_tokens"
            return _bad_output(why)
        problems = problems_of(self._output, value, "output", 1)
        if problems:
            return _bad_output(
                f"the model's answer does not match the output schema: {problems[0].text()}"
            )
        return 200, value


def _bad_output(reason: str) -> tuple[int, dict[str, Any]]:
    return 502, {"error": {"status": 502, "code": "invalid_model_output", "message": reason}}
