"""The ai-gateway plugin's handling of an OpenAI stream, whatever the chunking of the bytes:
events pass unchanged, the usage chunk the gateway asked for is read and removed again."""

from __future__ import annotations

import json

import msgspec
import pytest

from ferrogate.ai.plugin import AiGateway, _Flight
from ferrogate.config import load_config_text
from ferrogate.hooks import Request, Response

CONFIG = """
listen: ['127.0.0.1:0']
ai:
  deployments:
    - {name: a, provider: openai, url: 'http://127.0.0.1:9', model: m}
  models: {fast: [a]}
"""


def plugin() -> AiGateway:
    loaded = load_config_text(CONFIG)
    [route] = [r for r in loaded.normalized["routes"] if r["name"] == "ai-chat"]
    entry = route["plugins"]["entries"][0]
    return AiGateway(msgspec.convert(entry["config"], AiGateway.Config))


def event(doc: object) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


BODY = b"".join(
    [
        event({"choices": [{"index": 0, "delta": {"content": "Hel"}}], "usage": None}),
        event({"choices": [{"index": 0, "delta": {"content": "lo"}}], "usage": None}),
        event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None}),
        event({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2}}),
        b"data: [DONE]\n\n",
    ]
)
USAGE = event({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2}})


def run(p: AiGateway, pieces: list[bytes], include_usage: bool) -> tuple[bytes, _Flight]:
    f = _Flight()
    f.dep = p.state.deps["a"]
    f.stream = True
    f.status = 200
    f.include_usage = include_usage
    req = Request("POST", "/v1/chat/completions")
    req.ctx["ai"] = f
    resp = Response(200)
    out = []
    for i, piece in enumerate(pieces):
        got = p.on_response_chunk(req, resp, piece, i == len(pieces) - 1)
        out.append(piece if got is None else got)
    return b"".join(out), f


@pytest.mark.parametrize("include_usage", [False, True])
def test_split_anywhere(include_usage: bool) -> None:
    p = plugin()
    expected = BODY if include_usage else BODY.replace(USAGE, b"")
    for cut in range(1, len(BODY)):
        for pieces in ([BODY[:cut], BODY[cut:]], [BODY[:cut], BODY[cut:], b""]):
            out, f = run(p, pieces, include_usage)
            assert out == expected, cut
            assert f.usage is not None
            assert (f.usage.prompt_tokens, f.usage.completion_tokens) == (11, 2)


def test_byte_by_byte() -> None:
    out, f = run(plugin(), [BODY[i : i + 1] for i in range(len(BODY))] + [b""], False)
    assert out == BODY.replace(USAGE, b"")
    assert f.usage is not None and f.usage.completion_tokens == 2
