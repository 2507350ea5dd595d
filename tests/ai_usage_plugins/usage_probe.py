"""A plugin that reports AI usage the way the ai-gateway plugin does, from request headers, so
that the usage pipeline (log, metrics, analytics) is tested apart from any provider."""

import time

import msgspec

from ferrogate import LogInfo, Plugin, Request, Response
from ferrogate.ai.usage import UsageRecord, UsageRecorder, UsageSettings


class UsageProbe(Plugin):
    name = "t-ai-usage"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        usage: UsageSettings = UsageSettings()

    def __init__(self, config: "UsageProbe.Config") -> None:
        super().__init__(config)
        self.recorder = UsageRecorder(config.usage)

    def on_request(self, req: Request) -> None:
        req.ctx["t0"] = time.time()

    def on_log(self, req: Request, resp: Response, info: LogInfo) -> None:
        h = req.headers
        self.recorder.record(
            UsageRecord(
                time=req.ctx.get("t0") or time.time(),
                request_id=req.request_id,
                route="ai",
                consumer=h.get("x-consumer"),
                model=h.get("x-model") or "fast",
                deployment="oai-main",
                provider="openai",
                provider_model="gpt-4o-mini",
                prompt_tokens=int(h.get("x-prompt") or 0),
                completion_tokens=int(h.get("x-completion") or 0),
                estimated=h.get("x-estimated") == "1",
                cost_usd=float(h.get("x-cost") or 0),
                latency_ms=info.duration * 1000,
                ttft_ms=5.0 if h.get("x-stream") == "1" else None,
                status=info.status,
                stream=h.get("x-stream") == "1",
                fallbacks=int(h.get("x-fallbacks") or 0),
            )
        )
