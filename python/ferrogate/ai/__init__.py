"""The AI gateway: an OpenAI-compatible API over many model providers (docs/ai.md)."""
