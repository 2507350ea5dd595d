"""Offline token counting for OpenAI-format text and chat messages.

Two ways to count, for two needs:

- :func:`count_text` / :func:`count_messages`: the real BPE (``o200k_base`` for the GPT-4o
  family and newer, ``cl100k_base`` for GPT-4 / GPT-3.5 and the embedding models) run by
  OpenAI's ``tiktoken``. Used for the usage estimate of an answer whose provider did not
  report usage. Exact for OpenAI models (the tests check OpenAI's published counts); for
  other providers' models it is an estimate (their tokenizers differ, typically by 10-20%).
- :func:`estimate_text` / :func:`estimate_messages`: a character-class approximation that
  costs a small fraction as much, for reservations (rate limits in tokens, budgets) before
  the request is sent. Against ``o200k_base``: technical prose +5%, Python source -4%,
  JSON -14%, Japanese +5%, Cyrillic +55%; OpenAI's example conversation (short plain
  English messages) +31%. Reservations are reconciled with the real usage afterwards, so
  an estimate only has to be in the right range.

tiktoken downloads its vocabularies on first use, which the gateway must never do. The
vocabularies come instead from the ``bpe-openai`` wheel (MIT), which ships OpenAI's files
gzipped; they are checked against the SHA-256 that tiktoken itself pins for them, so the
counts are OpenAI's. Building an encoding takes about 0.3 s, once per process: call
:func:`warm` when a config is applied to keep that off the request path.

Cost per call (one core): :func:`count_text` ~1.4 µs plus ~40 ns per character;
:func:`estimate_text` ~0.2 µs whatever the length (ASCII). For OpenAI's six-message example
conversation: :func:`count_messages` ~27 µs, :func:`estimate_messages` ~5 µs.

Chat messages follow OpenAI's accounting for current models: 3 tokens per message, 1 more
when it has a ``name``, 3 to prime the reply. Text parts of content lists are counted;
an image part counts a fixed :data:`IMAGE_TOKENS` (OpenAI's price of a 1024x1024 image at
high detail: 85 + 4 tiles x 170), or :data:`IMAGE_TOKENS_LOW` with ``detail: low``; an
audio or file part counts :data:`OTHER_PART_TOKENS`. Tool calls count their function name
and arguments.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "IMAGE_TOKENS",
    "IMAGE_TOKENS_LOW",
    "OTHER_PART_TOKENS",
    "count_messages",
    "count_text",
    "encoding_name",
    "estimate_messages",
    "estimate_text",
    "warm",
]

IMAGE_TOKENS = 765
IMAGE_TOKENS_LOW = 85
OTHER_PART_TOKENS = 256
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3

# The SHA-256 tiktoken pins for OpenAI's files (tiktoken_ext/openai_public.py).
_SHA256 = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}
# Model id prefixes of the older vocabulary; everything else (GPT-4o, 4.1, 5, o-series, and
# other providers' models, for which any vocabulary is an estimate) uses the newer one.
_CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "gpt-35", "text-embedding-")
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "chatgpt-4o")

_Count = Callable[[str, str | None], int]
_encodings: dict[str, Any] = {}
_lock = threading.Lock()
_build_lock = threading.Lock()
_by_model: dict[str | None, str] = {}


def encoding_name(model: str | None) -> str:
    """The vocabulary used for ``model`` (a provider model id; None: the newest)."""
    name = _by_model.get(model)
    if name is None:
        m = (model or "").lower().rpartition("/")[2]  # "openai/gpt-4" style ids
        if m.startswith(_O200K_PREFIXES) or not m.startswith(_CL100K_PREFIXES):
            name = "o200k_base"
        else:
            name = "cl100k_base"
        if len(_by_model) < 1024:
            _by_model[model] = name
    return name


def _vocabulary_file(name: str) -> Path:
    # Found, not imported: importing bpe_openai builds its own tokenizers (most of a second).
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the bpe-openai package (the BPE vocabularies) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.tiktoken.gz"


def _ranks(name: str) -> dict[bytes, int]:
    data = gzip.decompress(_vocabulary_file(name).read_bytes())
    if hashlib.sha256(data).hexdigest() != _SHA256[name]:
        raise RuntimeError(f"the {name} vocabulary of bpe-openai is not OpenAI's file")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _build(name: str) -> Any:
    import tiktoken
    from tiktoken_ext import openai_public  # type: ignore[import-untyped]

    ranks = _ranks(name)
    # tiktoken's own constructor gives the split pattern and special tokens; only its
    # download is replaced (by the verified local file).
    constructor = getattr(openai_public, name)
    fetch = openai_public.load_tiktoken_bpe
    with _lock:
        openai_public.load_tiktoken_bpe = lambda *args, **kwargs: ranks
        try:
            params = constructor()
        finally:
            openai_public.load_tiktoken_bpe = fetch
    return tiktoken.Encoding(**params)


def _encoding(name: str) -> Any:
    enc = _encodings.get(name)
    if enc is None:
        with _build_lock:
            enc = _encodings.get(name)
            if enc is None:
                enc = _encodings[name] = _build(name)
    return enc


def warm(models: Iterable[str | None] = (None,)) -> None:
    """Build the vocabularies ``models`` need now (about 0.3 s each, once per process)."""
    for name in {encoding_name(m) for m in models}:
        _encoding(name)


def count_text(text: str, model: str | None = None) -> int:
    """Tokens of ``text`` for ``model`` (special-token markers count as plain text)."""
    if not text:
        return 0
    return len(_encoding(encoding_name(model)).encode_ordinary(text))


def estimate_text(text: str) -> int:
    """A quick, slightly high token estimate of ``text`` (no vocabulary needed)."""
    n = len(text)
    if not n:
        return 0
    if text.isascii():
        # Plain English runs ~5 characters a token, technical prose ~4, code and JSON ~3.5.
        return n // 4 + 1
    # CJK takes about a token per character (3 UTF-8 bytes); other scripts fewer.
    return len(text.encode("utf-8")) // 4 + 1


def _part_tokens(part: Any, count: _Count, model: str | None) -> int:
    if not isinstance(part, Mapping):
        return 0
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        return count(text, model) if isinstance(text, str) else 0
    if kind == "image_url":
        image = part.get("image_url")
        detail = image.get("detail") if isinstance(image, Mapping) else None
        return IMAGE_TOKENS_LOW if detail == "low" else IMAGE_TOKENS
    if kind == "refusal":
        text = part.get("refusal")
        return count(text, model) if isinstance(text, str) else 0
    return OTHER_PART_TOKENS


def _value_tokens(key: str, value: Any, count: _Count, model: str | None) -> int:
    if isinstance(value, str):
        return count(value, model)
    if key == "content" and isinstance(value, list):
        return sum(_part_tokens(p, count, model) for p in value)
    if key == "tool_calls" and isinstance(value, list):
        n = 0
        for call in value:
            fn = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(fn, Mapping):
                for field in ("name", "arguments"):
                    text = fn.get(field)
                    if isinstance(text, str):
                        n += count(text, model)
        return n
    return 0


def _messages(messages: Iterable[Any], count: _Count, model: str | None) -> int:
    n = REPLY_PRIMING
    for message in messages:
        n += TOKENS_PER_MESSAGE
        if not isinstance(message, Mapping):
            continue
        for key, value in message.items():
            if key == "role" and count is _estimate:
                n += 1  # every role is one token; the estimate would say two
                continue
            n += _value_tokens(key, value, count, model)
            if key == "name":
                n += TOKENS_PER_NAME
    return n


def count_messages(messages: list[dict[str, Any]], model: str | None = None) -> int:
    """Prompt tokens of a Chat Completions ``messages`` list, as OpenAI counts them."""
    return _messages(messages, count_text, model)


def _estimate(text: str, model: str | None) -> int:
    return estimate_text(text)


def estimate_messages(messages: list[dict[str, Any]], model: str | None = None) -> int:
    """:func:`count_messages` with :func:`estimate_text`: cheap, for reservations (every
    request pays it, so plain-text messages take a short path)."""
    n = REPLY_PRIMING
    for message in messages:
        n += TOKENS_PER_MESSAGE
        if type(message) is not dict:
            if isinstance(message, Mapping):
                n += _messages((message,), _estimate, model) - REPLY_PRIMING - TOKENS_PER_MESSAGE
            continue
        for key, value in message.items():
            if key == "role":
                n += 1
            elif type(value) is str:
                if value:
                    n += (len(value) if value.isascii() else len(value.encode())) // 4 + 1
                if key == "name":
                    n += TOKENS_PER_NAME
            else:
                n += _value_tokens(key, value, _estimate, model)
                if key == "name":
                    n += TOKENS_PER_NAME
    return n
