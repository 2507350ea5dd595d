"""AWS Bedrock Runtime's Converse API (``/model/{modelId}/converse``, ``converse-stream``).

Requests are signed with SigV4 by botocore's signer. Options: ``region`` (else ``AWS_REGION`` /
``AWS_DEFAULT_REGION``), ``access_key_id``, ``secret_access_key``, ``session_token`` (else the
``AWS_*`` environment variables); a deployment with an ``api_key`` and no access key sends it as
a Bedrock API key (``Authorization: Bearer``). ``additional_model_request_fields`` is passed on.
Streams are AWS event streams (``application/vnd.amazon.eventstream``), decoded by botocore.
Converse has no JSON mode: ``response_format`` becomes a system instruction.

Embeddings go through InvokeModel (``/model/{modelId}/invoke``) for Amazon Titan text
embeddings (one input per request, as Titan takes them) and Cohere Embed models on Bedrock
(``options.input_type``, default ``search_document``).
"""

from __future__ import annotations

import os
import uuid
from typing import Any, cast
from urllib.parse import quote, urlsplit

import msgspec
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.eventstream import EventStreamBuffer, ParserError

from ferrogate.ai.adapters.base import (
    Adapter,
    Deployment,
    ProviderRequest,
    StreamTranslator,
    Translated,
    Unsupported,
    Usage,
    error_body,
)
from ferrogate.ai.adapters.wire import (
    ChunkMaker,
    completion,
    data_url,
    decode,
    embedding_inputs,
    embeddings_list,
    encode,
    fallback_message,
    json_args,
    text_of,
    tool_call,
    wants_usage_chunk,
)

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}
# the statuses Bedrock answers each exception with, by the name its event streams use
_EXCEPTION_STATUS = {
    "validationexception": 400,
    "accessdeniedexception": 403,
    "resourcenotfoundexception": 404,
    "modeltimeoutexception": 408,
    "modelerrorexception": 424,
    "modelstreamerrorexception": 424,
    "modelnotreadyexception": 429,
    "throttlingexception": 429,
    "servicequotaexceededexception": 429,
    "internalserverexception": 500,
    "serviceunavailableexception": 503,
}
_STATUS_EXCEPTION = {
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}
_IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}


def _client_status(status: int) -> int:
    # a model's own failure is a bad gateway to the client, as OpenAI would say
    return 502 if status == 424 else status


def _host(dep: Deployment, region: str) -> str:
    """The Host the engine sends (the target's authority, port included), which is signed."""
    url = dep.url or f"https://bedrock-runtime.{region}.amazonaws.com"
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def sign(dep: Deployment, path: str, body: bytes) -> list[tuple[str, str]]:
    """The headers of a Bedrock request, its SigV4 signature (or API key) included."""
    opts = dep.options
    region = str(
        opts.get("region")
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or ""
    )
    if not region:
        raise Unsupported(f"deployment {dep.name}: no AWS region configured")
    host = _host(dep, region)
    headers = [("content-type", "application/json"), ("accept", "application/json")]
    access = opts.get("access_key_id") or os.environ.get("AWS_ACCESS_KEY_ID")
    if not access and dep.api_key:
        return [*headers, ("authorization", f"Bearer {dep.api_key}")]
    secret = opts.get("secret_access_key") or os.environ.get("AWS_SECRET_ACCESS_KEY")
    token = opts.get("session_token") or (
        None if opts.get("access_key_id") else os.environ.get("AWS_SESSION_TOKEN")
    )
    if not access or not secret:
        raise Unsupported(f"deployment {dep.name}: no AWS credentials configured")
    request = AWSRequest(
        method="POST", url=f"https://{host}{path}", data=body, headers=dict(headers)
    )
    request.headers["host"] = host
    SigV4Auth(Credentials(str(access), str(secret), token), "bedrock", region).add_auth(request)
    return [(k.lower(), v) for k, v in request.headers.items() if k.lower() != "host"]


def _image(part: dict[str, Any]) -> dict[str, Any]:
    iu = part.get("image_url")
    url = iu.get("url", "") if isinstance(iu, dict) else str(iu or "")
    parsed = data_url(url)
    if parsed is None or parsed[0] not in _IMAGE_FORMATS:
        raise Unsupported("images for Bedrock models must be data: URLs of png, jpeg, gif or webp")
    return {"image": {"format": _IMAGE_FORMATS[parsed[0]], "source": {"bytes": parsed[1]}}}


def _blocks(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if part.get("text"):
                out.append({"text": part["text"]})
        elif kind == "image_url":
            out.append(_image(part))
        else:
            raise Unsupported(f"content parts of type {kind!r} are not supported")
    return out


def _converse_body(dep: Deployment, req: dict[str, Any]) -> dict[str, Any]:
    system: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    used_tools = False

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        # Converse wants user and assistant turns alternating: consecutive ones merge
        if not blocks:
            return
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})

    for m in req.get("messages") or ():
        role = m.get("role")
        if role in ("system", "developer"):
            text = text_of(m.get("content"))
            if text:
                system.append({"text": text})
        elif role == "user":
            add("user", _blocks(m.get("content")))
        elif role == "assistant":
            blocks = _blocks(text_of(m.get("content")))
            for c in m.get("tool_calls") or ():
                fn = c.get("function") or {}
                used_tools = True
                blocks.append(
                    {
                        "toolUse": {
                            "toolUseId": c.get("id", ""),
                            "name": fn.get("name", ""),
                            "input": json_args(fn.get("arguments")),
                        }
                    }
                )
            add("assistant", blocks)
        elif role == "tool":
            add(
                "user",
                [
                    {
                        "toolResult": {
                            "toolUseId": m.get("tool_call_id", ""),
                            "content": [{"text": text_of(m.get("content"))}],
                        }
                    }
                ],
            )
    rf = req.get("response_format")
    if isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema"):
        instruction = "Answer with a single JSON object and nothing else."
        schema = (rf.get("json_schema") or {}).get("schema")
        if schema is not None:
            instruction += " It must conform to this JSON schema: " + encode(schema).decode()
        system.append({"text": instruction})
    body: dict[str, Any] = {"messages": messages}
    if system:
        body["system"] = system
    config: dict[str, Any] = {}
    for src, dst in (
        ("max_tokens", "maxTokens"),
        ("max_completion_tokens", "maxTokens"),
        ("temperature", "temperature"),
        ("top_p", "topP"),
    ):
        if req.get(src) is not None:
            config[dst] = req[src]
    stop = req.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else stop
    if config:
        body["inferenceConfig"] = config
    tools = req.get("tools")
    choice = req.get("tool_choice")
    if tools and (choice != "none" or used_tools):
        specs = []
        for t in tools:
            fn = t.get("function") or {}
            spec: dict[str, Any] = {
                "name": fn.get("name", ""),
                "inputSchema": {"json": fn.get("parameters") or {"type": "object"}},
            }
            if fn.get("description"):
                spec["description"] = fn["description"]
            specs.append({"toolSpec": spec})
        tool_config: dict[str, Any] = {"tools": specs}
        if choice == "required":
            tool_config["toolChoice"] = {"any": {}}
        elif isinstance(choice, dict):
            tool_config["toolChoice"] = {
                "tool": {"name": (choice.get("function") or {}).get("name", "")}
            }
        elif choice == "auto":
            tool_config["toolChoice"] = {"auto": {}}
        body["toolConfig"] = tool_config
    extra = dep.options.get("additional_model_request_fields")
    if isinstance(extra, dict):
        body["additionalModelRequestFields"] = extra
    return body


def _usage(u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    return Usage(
        prompt_tokens=int(u.get("inputTokens") or 0),
        completion_tokens=int(u.get("outputTokens") or 0),
    )


def translate_error(status: int, body: bytes, exception: str | None = None) -> Translated:
    try:
        doc = decode(body)
    except msgspec.DecodeError:
        doc = None
    msg = None
    if isinstance(doc, dict):
        msg = doc.get("message") or doc.get("Message")
        kind = doc.get("__type")
        if isinstance(kind, str) and not exception:
            exception = kind.rpartition("#")[2]
    if exception:
        status = _EXCEPTION_STATUS.get(exception.lower(), status)
    code = exception or _STATUS_EXCEPTION.get(status)
    if code:
        code = code[0].upper() + code[1:]
    out_status = _client_status(status)
    message = msg if isinstance(msg, str) else fallback_message(status, body)
    return Translated(out_status, error_body(out_status, message, code=code), None)


class BedrockStream:
    def __init__(self, dep: Deployment, req: dict[str, Any]) -> None:
        self.usage: Usage | None = None
        self._buf = EventStreamBuffer()
        self._chunks = ChunkMaker(f"chatcmpl-{uuid.uuid4().hex}", dep.model)
        self._usage_chunk = wants_usage_chunk(req)
        self._tool_of_block: dict[int, int] = {}
        self._broken = False

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        if self._broken:
            return []
        self._buf.add_data(data)
        out: list[dict[str, Any]] = []
        try:
            for message in self._buf:
                # the stubs mistype the headers; botocore gives a dict of name -> value
                headers = cast(dict[str, Any], message.headers)
                out.extend(self._message(headers, message.payload))
        except ParserError:
            self._broken = True
            out.append(error_body(502, "the provider sent a malformed event stream"))
        return out

    def close(self) -> list[dict[str, Any]]:
        return []

    def _message(self, headers: dict[str, Any], payload: bytes) -> list[dict[str, Any]]:
        kind = headers.get(":message-type")
        if kind == "exception":
            name = str(headers.get(":exception-type") or "")
            body = translate_error(500, payload, name).body
            return [body] if body else []
        if kind == "error":
            message = str(headers.get(":error-message") or headers.get(":error-code") or "")
            return [error_body(500, message or "the provider failed mid-stream")]
        event = headers.get(":event-type")
        try:
            doc = decode(payload) if payload else {}
        except msgspec.DecodeError:
            return [error_body(502, "the provider sent a malformed stream event")]
        chunk = self._chunks.chunk
        if event == "messageStart":
            return [chunk({"role": "assistant", "content": ""})]
        if event == "contentBlockStart":
            use = (doc.get("start") or {}).get("toolUse")
            if use:
                index = len(self._tool_of_block)
                self._tool_of_block[int(doc.get("contentBlockIndex") or 0)] = index
                call = tool_call(use.get("toolUseId", ""), use.get("name", ""), "")
                return [chunk({"tool_calls": [{"index": index, **call}]})]
        elif event == "contentBlockDelta":
            delta = doc.get("delta") or {}
            if delta.get("text"):
                return [chunk({"content": delta["text"]})]
            use = delta.get("toolUse")
            if use and use.get("input"):
                index = self._tool_of_block.get(int(doc.get("contentBlockIndex") or 0), 0)
                return [
                    chunk(
                        {"tool_calls": [{"index": index, "function": {"arguments": use["input"]}}]}
                    )
                ]
        elif event == "messageStop":
            return [chunk({}, _FINISH.get(doc.get("stopReason") or "end_turn", "stop"))]
        elif event == "metadata":
            self.usage = _usage(doc.get("usage"))
            if self.usage is not None and self._usage_chunk:
                return [self._chunks.usage_chunk(self.usage)]
        return []


class BedrockAdapter(Adapter):
    provider = "bedrock"
    stream_content_type = "application/vnd.amazon.eventstream"

    def _request(self, dep: Deployment, operation: str, body: dict[str, Any]) -> ProviderRequest:
        path = f"{dep.base_path}/model/{quote(dep.model, safe='')}/{operation}"
        raw = encode(body)
        return ProviderRequest("POST", path, sign(dep, path, raw), raw)

    def chat_request(self, dep: Deployment, req: dict[str, Any], stream: bool) -> ProviderRequest:
        return self._request(
            dep, "converse-stream" if stream else "converse", _converse_body(dep, req)
        )

    def chat_response(
        self, dep: Deployment, status: int, body: bytes, req: dict[str, Any]
    ) -> Translated:
        if not 200 <= status < 300:
            return translate_error(status, body)
        doc = decode(body)
        content = ((doc.get("output") or {}).get("message") or {}).get("content") or []
        text = "".join(b["text"] for b in content if isinstance(b, dict) and "text" in b)
        calls = [
            tool_call(
                b["toolUse"].get("toolUseId", ""),
                b["toolUse"].get("name", ""),
                encode(b["toolUse"].get("input") or {}).decode(),
            )
            for b in content
            if isinstance(b, dict) and "toolUse" in b
        ]
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text if text or not calls else None,
            "refusal": None,
        }
        if calls:
            message["tool_calls"] = calls
        usage = _usage(doc.get("usage"))
        finish = _FINISH.get(doc.get("stopReason") or "end_turn", "stop")
        out = completion(f"chatcmpl-{uuid.uuid4().hex}", dep.model, message, finish, usage)
        return Translated(status, out, usage)

    def chat_stream(self, dep: Deployment, req: dict[str, Any]) -> StreamTranslator:
        return BedrockStream(dep, req)

    def embeddings_request(self, dep: Deployment, req: dict[str, Any]) -> ProviderRequest:
        texts = embedding_inputs(req)
        body: dict[str, Any]
        if _family(dep.model) == "cohere":
            body = {
                "texts": texts,
                "input_type": dep.options.get("input_type") or "search_document",
                "embedding_types": ["float"],
            }
        elif _family(dep.model) == "amazon":
            if len(texts) != 1:
                raise Unsupported("Titan embedding models take one input per request")
            body = {"inputText": texts[0]}
            if req.get("dimensions"):
                body["dimensions"] = req["dimensions"]
        else:
            raise Unsupported(f"{dep.model} is not a Titan or Cohere embedding model")
        return self._request(dep, "invoke", body)

    def embeddings_response(
        self, dep: Deployment, status: int, body: bytes, req: dict[str, Any]
    ) -> Translated:
        if not 200 <= status < 300:
            return translate_error(status, body)
        doc = decode(body)
        if _family(dep.model) == "cohere":
            emb = doc.get("embeddings")
            vectors = emb.get("float") if isinstance(emb, dict) else emb
            # Cohere on Bedrock reports its token count only in a response header
            usage = None
        else:
            vectors = [doc.get("embedding") or []]
            usage = Usage(prompt_tokens=int(doc.get("inputTextTokenCount") or 0))
        out = embeddings_list(vectors or [], dep.model, usage.prompt_tokens if usage else 0, req)
        return Translated(status, out, usage)


def _family(model: str) -> str:
    """The provider part of a model id (``amazon.titan-embed-text-v2:0`` -> ``amazon``),
    regional inference profiles (``us.cohere...``) included."""
    parts = model.rpartition("/")[2].split(".")
    if len(parts) > 2 and len(parts[0]) <= 4 and parts[1] in ("amazon", "cohere"):
        return parts[1]
    return parts[0]


ADAPTER = BedrockAdapter()
