#!/usr/bin/env bash
# ai-gateway.sh - start ferrogate as the gateway under test of the shared AI benchmark.
#
#   GATEWAY_NAME=ferrogate GATEWAY_CMD="exec $PWD/bench/ai-gateway.sh" ../shared/bench/ai/ai-peers.sh
#
# (with ferrogate installed: pip install .) ai-peers.sh runs this under `bash -c`, pinned to one
# core, in its own process group, in a scratch directory, and exports PROVIDER_URL (the instant
# OpenAI-format provider) and STREAM_PROVIDER_URL (the streaming one), both OpenAI base URLs.
# The config is what a user would run: the gateway key checked against a consumer, model `fast`
# and `fast-stream` routed by the AI gateway, tokens counted against a per-minute limit and a
# daily budget (with a price table), one usage record per request written to a JSON-lines log.
# No access log, one worker, in the foreground so the worker stays in this process group.
#
# Environment: PROVIDER_URL, STREAM_PROVIDER_URL (required), GATEWAY_PORT (default 18184),
# FERROGATE (default: ferrogate), AI_PROVIDER (default openai: the provider kind of `fast`;
# `anthropic` makes `fast` a format-translating route to an Anthropic-style provider at
# PROVIDER_URL, see bench/ai/README.md).
set -euo pipefail

: "${PROVIDER_URL:?PROVIDER_URL is not set (ai-peers.sh exports it)}"
: "${STREAM_PROVIDER_URL:?STREAM_PROVIDER_URL is not set (ai-peers.sh exports it)}"
port=${GATEWAY_PORT:-18184}
ferrogate=${FERROGATE:-ferrogate}
provider=${AI_PROVIDER:-openai}

dir=${TMPDIR:-/tmp}/ferrogate-ai-bench-$(id -u)-$port
mkdir -p "$dir"
config=$dir/gateway.yaml
cat >"$config" <<YAML
listen:
  - 127.0.0.1:$port
workers: 1
grace_period: 2s
consumers:
  bench:
    credentials: [{type: key-auth, key: sk-bench-1234}]
ai:
  deployments:
    - {name: instant, provider: $provider, url: "$PROVIDER_URL", model: gpt-4o-mini, api_key: sk-provider-instant}
    - {name: streaming, provider: openai, url: "$STREAM_PROVIDER_URL", model: gpt-4o-mini, api_key: sk-provider-stream}
  models:
    fast: [instant]
    fast-stream: [streaming]
  prices:
    gpt-4o-mini: {input: 0.15, output: 0.60}
  consumers:
    bench:
      models: [fast, fast-stream]
      tpm: 1000000000
      budget: {day: 1000000}
  usage:
    log: $dir/usage.jsonl
    metrics: false
    analytics: false
YAML

exec "$ferrogate" run -c "$config" --workers 1 --pid-file "$dir/gateway.pid"
