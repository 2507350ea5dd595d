#!/usr/bin/env bash
# peers-gateway.sh - start ferrogate as the gateway under test of the shared peers benchmark.
#
#   GATEWAY_NAME=ferrogate GATEWAY_CMD='exec bench/peers-gateway.sh' ../shared/bench/peers.sh
#
# (run from the repository root, with ferrogate installed: pip install .)
# peers.sh runs this under `bash -c`, pinned to one core, in its own process group, and exports
# ORIGIN_URL. It writes a config with one catch-all route to ORIGIN_URL (upstream pool of 1024
# idle connections, no access log) and runs the gateway in the foreground with one worker, so
# the worker stays in this process group and is stopped with it.
#
# Environment: ORIGIN_URL (required), GATEWAY_PORT (default 18084), FERROGATE (default: ferrogate).
set -euo pipefail

: "${ORIGIN_URL:?ORIGIN_URL is not set (peers.sh exports it)}"
port=${GATEWAY_PORT:-18084}
ferrogate=${FERROGATE:-ferrogate}

# one fixed directory per user and port: reruns overwrite it instead of piling up
origin=${ORIGIN_URL#http://}
origin=${origin%/}
dir=${TMPDIR:-/tmp}/ferrogate-peers-$(id -u)-$port
mkdir -p "$dir"
config=$dir/gateway.yaml
cat >"$config" <<YAML
listen:
  - 127.0.0.1:$port
workers: 1
grace_period: 2s
upstreams:
  origin:
    targets:
      - $origin
    keepalive: 1024
routes:
  - name: all
    paths: ["/*"]
    upstream: origin
YAML

# no access log: the gateway writes none unless configured to
exec "$ferrogate" run -c "$config" --workers 1 --pid-file "$dir/gateway.pid"
