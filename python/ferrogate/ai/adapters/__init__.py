"""Provider adapters, one module per provider; each module defines ``ADAPTER``."""

from __future__ import annotations

import importlib

from ferrogate.ai.adapters.base import Adapter

# provider name in the config -> module of this package
PROVIDERS = {
    "openai": "openai",
    "openai-compatible": "openai",
    "azure": "azure",
    "mistral": "mistral",
    "ollama": "ollama",
    "anthropic": "anthropic",
    "gemini": "gemini",
    "cohere": "cohere",
    "bedrock": "bedrock",
}


def adapter_for(provider: str) -> Adapter:
    """The adapter of a provider named in the config (its module is imported on first use)."""
    module = importlib.import_module(f"{__name__}.{PROVIDERS[provider]}")
    adapter: Adapter = module.ADAPTER
    return adapter
