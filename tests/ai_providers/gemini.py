"""A test server speaking Google's Gemini API as documented:
``POST /v1beta/models/{model}:generateContent``, ``:streamGenerateContent?alt=sse`` (one
``GenerateContentResponse`` per ``data:`` event, the last with ``finishReason`` and
``usageMetadata``), ``:batchEmbedContents`` and ``:embedContent``; the key from
``x-goog-api-key`` (or ``?key=``); requests validated as the API does (roles ``user`` and
``model``, one kind of data per part, ``functionResponse`` only after a ``functionCall`` of
that name, ``responseSchema`` without JSON Schema keywords outside its subset); error bodies
``{"error": {"code", "message", "status"}}``; a fault mid-stream sends an error event.

The answers are deterministic: ``echo: <last user text>``; JSON following ``responseSchema``
when ``responseMimeType`` is ``application/json``; a ``functionCall`` when the tool config
forces one or the last user text starts with ``use tool``; one token per word.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from typing import Any

from ai_providers.loopback import Fault, ProviderServer, Recorded, Reply, sample, words

_STATUS = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_PART_KINDS = ("text", "inlineData", "fileData", "functionCall", "functionResponse")
_GENERATION_KEYS = {
    "temperature",
    "topP",
    "topK",
    "maxOutputTokens",
    "stopSequences",
    "candidateCount",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "responseMimeType",
    "responseSchema",
}
_SCHEMA_KEYS = {
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "maxItems",
    "minItems",
    "properties",
    "required",
    "items",
    "minimum",
    "maximum",
    "anyOf",
    "propertyOrdering",
    "minLength",
    "maxLength",
    "pattern",
    "default",
}


_TASK_TYPES = (
    "RETRIEVAL_QUERY",
    "RETRIEVAL_DOCUMENT",
    "SEMANTIC_SIMILARITY",
    "CLASSIFICATION",
    "CLUSTERING",
    "QUESTION_ANSWERING",
    "FACT_VERIFICATION",
    "CODE_RETRIEVAL_QUERY",
)


def error_body(code: int, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": _STATUS.get(code, "UNKNOWN")}}


def error_reply(code: int, message: str, retry_after: str | None = None) -> Reply:
    headers = [("retry-after", retry_after)] if retry_after is not None else []
    return Reply(code, json.dumps(error_body(code, message)).encode(), headers=headers)


class Invalid(Exception):
    pass


def _check_schema(schema: Any, where: str) -> None:
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key not in _SCHEMA_KEYS:
                raise Invalid(
                    f"Invalid JSON payload received. Unknown name \"{key}\" at '{where}': "
                    "Cannot find field."
                )
            if key == "properties":
                for name, sub in value.items():
                    _check_schema(sub, f"{where}.properties[{name}].value")
            elif key == "items":
                _check_schema(value, f"{where}.items")


def _validate(req: Any) -> None:
    if not isinstance(req, dict):
        raise Invalid("Invalid JSON payload received.")
    contents = req.get("contents")
    if not isinstance(contents, list) or not contents:
        raise Invalid("* GenerateContentRequest.contents: contents is not specified")
    called: set[str] = set()
    for i, content in enumerate(contents):
        if content.get("role") not in ("user", "model"):
            raise Invalid(f"Please use a valid role: user, model. (contents[{i}])")
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            raise Invalid(
                f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty."
            )
        for j, part in enumerate(parts):
            kinds = [k for k in _PART_KINDS if k in part]
            if len(kinds) != 1:
                raise Invalid(f"contents[{i}].parts[{j}]: exactly one data field is required")
            if "functionCall" in part:
                if content["role"] != "model":
                    raise Invalid("functionCall parts belong to the model role")
                called.add(part["functionCall"]["name"])
            if "functionResponse" in part:
                fr = part["functionResponse"]
                if fr.get("name") not in called:
                    raise Invalid(
                        "Please ensure that function response turn comes immediately after a "
                        "function call turn."
                    )
                if not isinstance(fr.get("response"), dict):
                    raise Invalid("functionResponse.response must be an object")
            if "inlineData" in part:
                data = part["inlineData"]
                if not data.get("mimeType") or not data.get("data"):
                    raise Invalid("inlineData needs mimeType and data")
    system = req.get("systemInstruction")
    if system is not None and not isinstance(system.get("parts"), list):
        raise Invalid("systemInstruction.parts is required")
    gen = req.get("generationConfig") or {}
    for key in gen:
        if key not in _GENERATION_KEYS:
            raise Invalid(
                f"Invalid JSON payload received. Unknown name \"{key}\" at 'generation_config'"
            )
    if "responseSchema" in gen:
        _check_schema(gen["responseSchema"], "generation_config.response_schema")
    for tool in req.get("tools") or ():
        for decl in tool.get("functionDeclarations") or ():
            if not decl.get("name"):
                raise Invalid("function_declarations.name is required")
            if "parameters" in decl:
                _check_schema(decl["parameters"], "tools.function_declarations.parameters")


def _text(parts: list[dict[str, Any]]) -> str:
    return " ".join(p["text"] for p in parts if "text" in p)


def _answer(req: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    last = req["contents"][-1]["parts"]
    user_text = _text(last)
    gen = req.get("generationConfig") or {}
    decls = [d for t in req.get("tools") or () for d in t.get("functionDeclarations") or ()]
    mode = ((req.get("toolConfig") or {}).get("functionCallingConfig") or {}).get("mode", "AUTO")
    allowed = ((req.get("toolConfig") or {}).get("functionCallingConfig") or {}).get(
        "allowedFunctionNames"
    )
    if decls and mode != "NONE" and (mode == "ANY" or user_text.startswith("use tool")):
        decl = next((d for d in decls if not allowed or d["name"] in allowed), decls[0])
        call = {"name": decl["name"], "args": sample(decl.get("parameters") or {})}
        return [{"functionCall": call}], "STOP"
    responses = [p["functionResponse"] for p in last if "functionResponse" in p]
    if responses:
        text = "tool said: " + " ".join(json.dumps(r["response"]) for r in responses)
    elif gen.get("responseMimeType") == "application/json":
        text = json.dumps(
            sample(gen["responseSchema"]) if "responseSchema" in gen else {"echo": user_text}
        )
    else:
        text = "echo: " + user_text
        images = sum("inlineData" in p or "fileData" in p for p in last)
        if images:
            text += f" [{images} image]"
    reason = "STOP"
    for seq in gen.get("stopSequences") or ():
        if seq in text:
            text = text[: text.index(seq)]
    tokens = text.split(" ")
    if gen.get("maxOutputTokens") and len(tokens) > gen["maxOutputTokens"]:
        text = " ".join(tokens[: gen["maxOutputTokens"]])
        reason = "MAX_TOKENS"
    return [{"text": text}], reason


def _prompt_tokens(req: dict[str, Any]) -> int:
    n = words(_text((req.get("systemInstruction") or {}).get("parts") or []))
    for content in req["contents"]:
        n += words(_text(content["parts"])) + 1
    return n


def embedding(text: str, dims: int = 8) -> list[float]:
    """The test server's embedding of a text: deterministic, from its SHA-256."""
    digest = hashlib.sha256(text.encode()).digest() * (dims // 8 + 1)
    return [round(b / 255, 4) for b in digest[:dims]]


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\r\n\r\n"


class GeminiServer(ProviderServer):
    def answer(self, rec: Recorded, fault: Fault) -> Reply:
        prefix = "/v1beta/models/"
        if rec.method != "POST" or not rec.path.startswith(prefix) or ":" not in rec.path:
            return error_reply(404, f"Method not found: {rec.path}")
        model, _, method = rec.path[len(prefix) :].partition(":")
        key = rec.headers.get("x-goog-api-key") or (rec.query.get("key") or [None])[0]
        if key != self.api_key:
            return error_reply(400, "API key not valid. Please pass a valid API key.")
        if fault.status:
            return error_reply(fault.status, f"injected fault {fault.status}", fault.retry_after)
        try:
            req = rec.json()
        except ValueError:
            return error_reply(400, "Invalid JSON payload received.")
        if method in ("batchEmbedContents", "embedContent"):
            return self._embed(model, method, req)
        if method not in ("generateContent", "streamGenerateContent"):
            return error_reply(404, f"Method not found: {method}")
        try:
            _validate(req)
        except Invalid as e:
            return error_reply(400, str(e))
        parts, reason = _answer(req)
        prompt = _prompt_tokens(req)
        out_tokens = sum(words(p["text"]) if "text" in p else 3 for p in parts)
        usage = {
            "promptTokenCount": prompt,
            "candidatesTokenCount": out_tokens,
            "totalTokenCount": prompt + out_tokens,
        }
        if method == "generateContent":
            body = {
                "candidates": [
                    {
                        "content": {"role": "model", "parts": parts},
                        "finishReason": reason,
                        "index": 0,
                    }
                ],
                "usageMetadata": usage,
                "modelVersion": model,
                "responseId": "resp-" + hashlib.sha1(rec.body).hexdigest()[:12],
            }
            return Reply(200, json.dumps(body).encode())
        if (rec.query.get("alt") or [""])[0] != "sse":
            return error_reply(400, "this test server streams with alt=sse only")
        return Reply(200, self._stream(model, parts, reason, usage, fault), "text/event-stream")

    def _stream(
        self,
        model: str,
        parts: list[dict[str, Any]],
        reason: str,
        usage: dict[str, int],
        fault: Fault,
    ) -> Iterator[bytes]:
        pieces: list[dict[str, Any]] = []
        for part in parts:
            if "text" in part:
                ws = part["text"].split(" ")
                pieces += [
                    {"text": " ".join(ws[i : i + 2]) + (" " if i + 2 < len(ws) else "")}
                    for i in range(0, len(ws), 2)
                ]
            else:
                pieces.append(part)
        for n, piece in enumerate(pieces):
            if fault.stream_error and n == 1:
                yield _sse(error_body(503, "The model is overloaded. Please try again later."))
                return
            last = n == len(pieces) - 1
            cand: dict[str, Any] = {"content": {"role": "model", "parts": [piece]}, "index": 0}
            chunk: dict[str, Any] = {
                "candidates": [cand],
                "modelVersion": model,
                "responseId": "resp-s",
            }
            if last:
                cand["finishReason"] = reason
                chunk["usageMetadata"] = usage
            else:
                chunk["usageMetadata"] = {
                    "promptTokenCount": usage["promptTokenCount"],
                    "totalTokenCount": usage["promptTokenCount"],
                }
            yield _sse(chunk)

    def _embed(self, model: str, method: str, req: dict[str, Any]) -> Reply:
        items = req.get("requests") if method == "batchEmbedContents" else [req]
        if not isinstance(items, list) or not items:
            return error_reply(400, "* BatchEmbedContentsRequest.requests: requests is empty")
        out = []
        for i, item in enumerate(items):
            if method == "batchEmbedContents" and item.get("model") != f"models/{model}":
                return error_reply(
                    400,
                    f"* BatchEmbedContentsRequest.requests[{i}].model: the model must be "
                    f"models/{model}",
                )
            if item.get("taskType") not in (None, *_TASK_TYPES):
                return error_reply(400, f"Invalid value at 'requests[{i}].task_type'")
            text = _text((item.get("content") or {}).get("parts") or [])
            out.append({"values": embedding(text, item.get("outputDimensionality") or 8)})
        body = {"embeddings": out} if method == "batchEmbedContents" else {"embedding": out[0]}
        return Reply(200, json.dumps(body).encode())


def floats_of_base64(data: bytes) -> list[float]:
    return list(struct.unpack(f"<{len(data) // 4}f", data))
