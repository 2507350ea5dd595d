"""A test server speaking AWS Bedrock Runtime's Converse API on loopback.

``POST /model/{modelId}/converse`` and ``/model/{modelId}/converse-stream``. Every request's
SigV4 signature is recomputed with botocore's signer from the headers it names and the keys
the server knows; a mismatch is AWS's 403. Streams are binary AWS event streams
(``application/vnd.amazon.eventstream``): ``messageStart``, ``contentBlockStart`` (tool use),
``contentBlockDelta``, ``contentBlockStop``, ``messageStop`` and ``metadata`` (usage), or an
exception message (``throttlingException``, ...). ``/model/{modelId}/invoke`` serves the
Titan and Cohere embedding models. Errors carry ``x-amzn-ErrorType`` and
``{"message": ...}``. Converse's rules are checked: turns alternate starting with the user,
a ``toolUse`` needs a ``toolConfig``.
"""

from __future__ import annotations

import binascii
import itertools
import json
import struct
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from ai_providers.loopback import Fault, ProviderServer, Recorded, Reply, sample, words

ANSWER = "Hello from Bedrock."
MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
TITAN_EMBED = "amazon.titan-embed-text-v2:0"
COHERE_EMBED = "cohere.embed-english-v3"
REGION = "us-east-1"
ACCESS_KEY = "AKIDEXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
_EXCEPTIONS = {
    400: "ValidationException",
    403: "AccessDeniedException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}


def event_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event stream message: prelude, string headers, payload, CRC32s."""
    raw_headers = b""
    for name, value in headers.items():
        n, v = name.encode(), value.encode()
        raw_headers += struct.pack("!B", len(n)) + n + b"\x07" + struct.pack("!H", len(v)) + v
    total = 12 + len(raw_headers) + len(payload) + 4
    prelude = struct.pack("!II", total, len(raw_headers))
    prelude += struct.pack("!I", binascii.crc32(prelude))
    message = prelude + raw_headers + payload
    return message + struct.pack("!I", binascii.crc32(message))


def event(kind: str, doc: dict[str, Any]) -> bytes:
    headers = {":event-type": kind, ":content-type": "application/json", ":message-type": "event"}
    return event_message(headers, json.dumps({**doc, "p": "abcdefgh"}).encode())


def exception(kind: str, message: str) -> bytes:
    headers = {
        ":exception-type": kind,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return event_message(headers, json.dumps({"message": message}).encode())


def _error(status: int, message: str, kind: str | None = None) -> Reply:
    kind = kind or _EXCEPTIONS.get(status, "InternalServerException")
    return Reply(
        status,
        json.dumps({"message": message}).encode(),
        headers=[
            ("x-amzn-errortype", f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/")
        ],
    )


def verify(rec: Recorded, secrets: dict[str, str]) -> str | None:
    """Why the request's SigV4 signature is wrong, None when it is right."""
    auth = rec.headers.get("authorization", "")
    if not auth.startswith("AWS4-HMAC-SHA256 "):
        return "Missing Authentication Token"
    fields = dict(p.strip().split("=", 1) for p in auth[len("AWS4-HMAC-SHA256 ") :].split(","))
    access, date, region, service, _ = fields["Credential"].split("/")
    if access not in secrets:
        return "The security token included in the request is invalid."
    signed = fields["SignedHeaders"].split(";")
    headers = {name: rec.headers.get(name, "") for name in signed}
    request = AWSRequest(
        method=rec.method,
        url=f"https://{rec.headers['host']}{rec.path}",
        data=rec.body,
        headers=headers,
    )
    request.context["timestamp"] = rec.headers.get("x-amz-date", "")
    creds = Credentials(access, secrets[access], rec.headers.get("x-amz-security-token"))
    signer = SigV4Auth(creds, service, region)
    expected = signer.signature(
        signer.string_to_sign(request, signer.canonical_request(request)), request
    )
    if expected != fields["Signature"] or date != request.context["timestamp"][:8]:
        return (
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method. Consult the service "
            "documentation for details."
        )
    return None


class BedrockServer(ProviderServer):
    def __init__(self) -> None:
        super().__init__()
        self.secrets = {ACCESS_KEY: SECRET_KEY}

    def answer(self, rec: Recorded, fault: Fault) -> Reply:
        problem = verify(rec, self.secrets)
        if problem:
            return _error(
                403,
                problem,
                "UnrecognizedClientException"
                if "token" in problem
                else "InvalidSignatureException",
            )
        if fault.status == 429:
            return _error(429, "Too many requests, please wait before trying again.")
        if fault.status:
            return _error(fault.status, "The server encountered an internal error.")
        parts = rec.path.split("/")
        if (
            len(parts) != 4
            or parts[1] != "model"
            or parts[3] not in ("converse", "converse-stream", "invoke")
        ):
            return _error(404, "Not found", "UnknownOperationException")
        if parts[3] == "invoke":
            return self._invoke(unquote(parts[2]), rec.json())
        if unquote(parts[2]) != MODEL:
            return _error(400, "The provided model identifier is invalid.")
        body = rec.json()
        problem = self._check(body)
        if problem:
            return _error(400, problem)
        text, tool, stop = ANSWER, None, "end_turn"
        if body.get("toolConfig") and "any" in (body["toolConfig"].get("toolChoice") or {}):
            spec = body["toolConfig"]["tools"][0]["toolSpec"]
            tool = {
                "toolUseId": "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q",
                "name": spec["name"],
                "input": sample(spec["inputSchema"]["json"]),
            }
            text, stop = "", "tool_use"
        elif (body.get("inferenceConfig") or {}).get("maxTokens") == 1:
            text, stop = "Hello", "max_tokens"
        prompt = sum(words(json.dumps(m["content"])) for m in body["messages"])
        usage = {
            "inputTokens": prompt,
            "outputTokens": words(text) or 1,
            "totalTokens": prompt + (words(text) or 1),
        }
        if parts[3] == "converse-stream":
            return Reply(
                200,
                self._stream(text, tool, stop, usage, fault),
                "application/vnd.amazon.eventstream",
            )
        content: list[dict[str, Any]] = [{"text": text}] if text else []
        if tool:
            content.append({"toolUse": tool})
        doc = {
            "output": {"message": {"role": "assistant", "content": content}},
            "stopReason": stop,
            "usage": usage,
            "metrics": {"latencyMs": 42},
        }
        return Reply(200, json.dumps(doc).encode())

    def _invoke(self, model: str, body: dict[str, Any]) -> Reply:
        """InvokeModel for the embedding models: each family has its own body."""
        if model == TITAN_EMBED:
            if not isinstance(body.get("inputText"), str):
                return _error(400, "Malformed input request: #: required key [inputText] not found")
            doc: dict[str, Any] = {
                "embedding": [0.375, -0.5, 0.0],
                "inputTextTokenCount": words(body["inputText"]),
            }
            return Reply(200, json.dumps(doc).encode())
        if model == COHERE_EMBED:
            if not body.get("texts") or "input_type" not in body:
                return _error(400, "Malformed input request: required key [input_type] not found")
            vectors = [[0.625, -0.5, float(i)] for i in range(len(body["texts"]))]
            doc = {
                "id": "emb-1",
                "texts": body["texts"],
                "response_type": "embeddings_by_type",
                "embeddings": {"float": vectors} if body.get("embedding_types") else vectors,
            }
            return Reply(200, json.dumps(doc).encode())
        return _error(400, "The provided model identifier is invalid.")

    def _check(self, body: dict[str, Any]) -> str | None:
        messages = body.get("messages") or []
        if not messages or messages[0]["role"] != "user":
            return "A conversation must start with a user message."
        for a, b in itertools.pairwise(messages):
            if a["role"] == b["role"]:
                return "A conversation must alternate between user and assistant roles."
        uses_tools = any(
            "toolUse" in c or "toolResult" in c for m in messages for c in m["content"]
        )
        if uses_tools and not body.get("toolConfig"):
            return "The toolConfig field must be defined when using toolUse and toolResult."
        return None

    def _stream(
        self,
        text: str,
        tool: dict[str, Any] | None,
        stop: str,
        usage: dict[str, int],
        fault: Fault,
    ) -> Iterator[bytes]:
        yield event("messageStart", {"role": "assistant"})
        if tool:
            start = {"toolUse": {"toolUseId": tool["toolUseId"], "name": tool["name"]}}
            yield event("contentBlockStart", {"contentBlockIndex": 0, "start": start})
            args = json.dumps(tool["input"])
            for piece in (args[: len(args) // 2], args[len(args) // 2 :]):
                yield event(
                    "contentBlockDelta",
                    {"contentBlockIndex": 0, "delta": {"toolUse": {"input": piece}}},
                )
        else:
            for i, w in enumerate(text.split(" ")):
                if fault.stream_error and i == 1:
                    yield exception(
                        "throttlingException", "Too many tokens, please wait before trying again."
                    )
                    return
                piece = w if i == 0 else " " + w
                yield event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": piece}})
        yield event("contentBlockStop", {"contentBlockIndex": 0})
        yield event("messageStop", {"stopReason": stop})
        yield event("metadata", {"usage": usage, "metrics": {"latencyMs": 42}})
