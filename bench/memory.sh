#!/usr/bin/env bash
# memory.sh - a worker's RSS idle, after warm-up, and across a million proxied requests.
#
#   bash bench/memory.sh                    # REQUESTS=1000000 by default, about 30-60 s
#
# Starts a small nginx origin and the gateway (1 worker, bench/peers-gateway.sh's config) on
# 127.0.0.1, sends REQUESTS requests with wrk in bounded slices, prints VmRSS of the worker
# after each slice, and stops everything it started. Needs nginx and wrk.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
REQUESTS=${REQUESTS:-1000000}
ORIGIN_PORT=${ORIGIN_PORT:-18180}
GATEWAY_PORT=${GATEWAY_PORT:-18184}
run=$(mktemp -d /tmp/ferrogate-mem.XXXXXX)
chmod 755 "$run"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

cat >"$run/origin.conf" <<CONF
daemon off; worker_processes 1; pid $run/origin.pid; error_log $run/origin.err error;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$ORIGIN_PORT; default_type application/json;
    location / { return 200 '{"ok":true}\n'; } } }
CONF
setsid nginx -p "$run/" -c "$run/origin.conf" >/dev/null 2>&1 & pids+=($!)
ORIGIN_URL=http://127.0.0.1:$ORIGIN_PORT GATEWAY_PORT=$GATEWAY_PORT setsid bash "$here/peers-gateway.sh" \
    >"$run/gateway.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do curl -fsS -o /dev/null "http://127.0.0.1:$GATEWAY_PORT/" 2>/dev/null && break; sleep 0.1; done
worker=$(pgrep -P "${pids[1]}" -f ferrogate.worker || pgrep -g "${pids[1]}" -f ferrogate.worker)
rss() { awk '/VmRSS/ {print $2}' "/proc/$worker/status"; }
echo "idle worker RSS: $(rss) kB"
timeout 30 wrk -t1 -c64 -d3s "http://127.0.0.1:$GATEWAY_PORT/" >/dev/null
base=$(rss); echo "after warm-up: $base kB"
done_reqs=0; peak=$base
while [ "$done_reqs" -lt "$REQUESTS" ]; do
    n=$(timeout 30 wrk -t1 -c64 -d5s "http://127.0.0.1:$GATEWAY_PORT/" | awk '/requests in/ {print $1}')
    done_reqs=$((done_reqs + n)); now=$(rss); [ "$now" -gt "$peak" ] && peak=$now
    echo "after $done_reqs requests: $now kB"
done
awk -v b="$base" -v p="$peak" 'BEGIN {printf "peak vs warm-up: %+.1f%%\n", 100 * (p - b) / b}'
