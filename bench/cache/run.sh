#!/usr/bin/env bash
# run.sh - what the response cache saves: the same GET through one ferrogate worker on a
# route without a cache (/plain: proxied every time) and on a cached one (/cached: every
# request after the first is a hit), req/s and the gateway's CPU time per request on each.
#
#   bench/cache/run.sh                        # about a minute
#   DURATION=6 ROUNDS=5 bench/cache/run.sh 2>&1 | tee bench/results/DATE-cache.txt
#
# The origin (nginx, 49-byte JSON body) sends no Cache-Control, so /cached gives it a
# `default_ttl`. Pinning as in bench/plugins/run.sh: the gateway (master + 1 worker) alone on
# PROXY_CPU; wrk and the origin on LOAD_CPU. Target (issue 9): a hit at least 1.5x the req/s
# of the uncached route.
#
# Environment: DURATION (6 s), WARMUP (2 s), ROUNDS (5), CONNS (64), PROXY_CPU (1), LOAD_CPU (0),
# PORT_BASE (18110: the origin; the gateway on PORT_BASE + 1), FERROGATE (ferrogate). Logs and
# raw wrk output stay in ${TMPDIR:-/tmp}/ferrogate-bench-cache-UID-PORT_BASE until the next run.
#
# Needs: ferrogate (pip install .), nginx, wrk, taskset, setsid, ss, curl, pgrep, timeout.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DURATION=${DURATION:-6}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-5}
CONNS=${CONNS:-64}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
PORT_BASE=${PORT_BASE:-18110}
FERROGATE=${FERROGATE:-ferrogate}
ROUTES="plain cached"

ORIGIN_PORT=$PORT_BASE
GW_PORT=$((PORT_BASE + 1))
GW_URL=http://127.0.0.1:$GW_PORT
WORK=${TMPDIR:-/tmp}/ferrogate-bench-cache-$(id -u)-$PORT_BASE

# shellcheck source=bench/lib.sh
source "$HERE/../lib.sh"

preflight "$FERROGATE" nginx wrk taskset setsid ss curl pgrep timeout -- "$ORIGIN_PORT" "$GW_PORT"
ulimit -n "$(ulimit -Hn)"
rm -rf "$WORK"
mkdir -p "$WORK/origin"
STARTED=1
chmod 755 "$WORK"

echo "# bench/cache/run.sh $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc --all) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), kernel $(uname -r)"
rev=$(git -C "$HERE" describe --always --dirty 2>/dev/null || true)
if [ -n "$rev" ]; then echo "# source: git $rev"; fi
echo "# gateway (1 worker) alone on cpu $PROXY_CPU; wrk (1 thread, $CONNS connections) + origin nginx on cpu $LOAD_CPU"
echo "# $ROUNDS alternating rounds x ${DURATION}s per route after ${WARMUP}s warm-up"

start_origin "$ORIGIN_PORT"
write_report_lua
cat >"$WORK/gateway.yaml" <<YAML
listen:
  - 127.0.0.1:$GW_PORT
workers: 1
grace_period: 2s
upstreams:
  origin:
    targets:
      - 127.0.0.1:$ORIGIN_PORT
    keepalive: 1024
routes:
  - name: plain
    paths: ["/plain/*"]
    upstream: origin
  - name: cached
    paths: ["/cached/*"]
    upstream: origin
    cache:
      default_ttl: 1h
YAML
"$FERROGATE" check "$WORK/gateway.yaml" >"$WORK/check.log" 2>&1 ||
    die "the gateway config does not load: $(cat "$WORK/check.log")"
start gateway "$PROXY_CPU" "$FERROGATE" run -c "$WORK/gateway.yaml" --workers 1 --pid-file "$WORK/gateway.pid"
wait_http "$GW_URL/plain" || die "the gateway did not answer; see $WORK/gateway.log"

body=$(curl -fsS "http://127.0.0.1:$ORIGIN_PORT/")
for r in $ROUTES; do
    got=$(curl -sS "$GW_URL/$r" 2>&1 || true)
    [ "$got" = "$body" ] || die "GET /$r did not return the origin's body: $got"
done
status=$(curl -sS -o /dev/null -D - "$GW_URL/cached" | tr -d '\r' | awk -F': ' 'tolower($1) == "cache-status" {print $2}')
[ "$status" = "ferrogate; hit" ] || die "/cached is not served from the cache (Cache-Status: $status)"
log "origin and gateway are up; /cached answers from the cache"

RESULTS=$WORK/results.txt
: >"$RESULTS"
# shellcheck disable=SC2086
measure_rounds $ROUTES

cat <<EOF

req/s and cpu us/req: medians of the rounds (min..max). gw%: the gateway's CPU as a share of
one core; load%: busy share of the load core (wrk + origin), L marks >= 90% (then req/s is
capped by the load core, and cpu us/req is the number to read).

== GET, 49-byte JSON, wrk -t1 -c$CONNS -d${DURATION}s, $ROUNDS rounds, 1 worker ==
EOF
results_table route gw% / $ROUTES
echo
# per round: /cached over /plain, both taken in the same round
awk '$1 == "plain" {rps[$2] = $3; us[$2] = $9} $1 == "cached" {crps[$2] = $3; cus[$2] = $9}
    END {for (n in crps) if (n in rps && rps[n] > 0 && cus[n] > 0) printf "%.3f %.3f\n", crps[n] / rps[n], us[n] / cus[n]}' "$RESULTS" >"$WORK/ratios.txt"
awk '{print $1}' "$WORK/ratios.txt" | median |
    awk '{printf "cache hit: %.2fx the req/s of the uncached route, target >= 1.5x: %s\n", $1, ($1 >= 1.5 ? "met" : "NOT met")}'
awk '{print $2}' "$WORK/ratios.txt" | median |
    awk '{printf "cache hit: %.2fx less gateway cpu per request than the uncached route\n", $1}'
exit 0
