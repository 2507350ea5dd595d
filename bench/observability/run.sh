#!/usr/bin/env bash
# run.sh - what observability costs per request: the same GET through three ferrogate
# gateways (1 worker each) that differ only in what they observe, and each one's CPU time per
# request.
#
#   bench/observability/run.sh                      # about 2 minutes
#   DURATION=6 ROUNDS=5 bench/observability/run.sh 2>&1 | tee bench/results/DATE-observability.txt
#
# Gateways (all to the same origin, which answers a 49-byte JSON body):
#   off      nothing observed (no status listener, no access log)
#   full     access log to a file (every request), Prometheus metrics, analytics store
#   traced   full + tracing, 10% of traces sampled and exported over OTLP/HTTP to a sink
#
# Pinning as in ../shared/bench/peers.sh: the gateways (master + 1 worker, every thread) on
# PROXY_CPU, only one of them under load at a time; wrk, the origin nginx and the OTLP sink
# (the same nginx) on LOAD_CPU. A gateway's CPU time is utime + stime of every process in its
# process group (the master that ingests analytics included), from /proc/PID/stat. Rounds
# alternate between the gateways so that machine noise spreads over all three.
#
# Environment: DURATION (6 s), WARMUP (2 s), ROUNDS (5), CONNS (64), PROXY_CPU (1), LOAD_CPU (0),
# PORT_BASE (18190: the origin; gateways and their status listeners above it), GATEWAYS
# ("off full traced"; the first is the reference of the ratio column), FERROGATE (ferrogate).
# Logs and raw wrk output stay in ${TMPDIR:-/tmp}/ferrogate-bench-observability-UID-PORT_BASE.
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
PORT_BASE=${PORT_BASE:-18190}
FERROGATE=${FERROGATE:-ferrogate}
GATEWAYS=${GATEWAYS:-"off full traced"}
ORIGIN_PORT=$PORT_BASE
ORIGIN_URL=http://127.0.0.1:$ORIGIN_PORT
WORK=${TMPDIR:-/tmp}/ferrogate-bench-observability-$(id -u)-$PORT_BASE

# shellcheck source=bench/lib.sh
source "$HERE/../lib.sh"

declare -A URL=()

# ---- preflight -------------------------------------------------------------------------
for g in $GATEWAYS; do
    case $g in off | full | traced) ;; *) die "unknown gateway $g (off full traced)" ;; esac
done
preflight "$FERROGATE" nginx wrk taskset setsid ss curl pgrep timeout -- $(seq "$PORT_BASE" $((PORT_BASE + 6)))
ulimit -n "$(ulimit -Hn)"
rm -rf "$WORK"
mkdir -p "$WORK/origin/tmp"
STARTED=1
chmod 755 "$WORK"

estimate=$(( $(wc -w <<<"$GATEWAYS") * (WARMUP + ROUNDS * DURATION) * 105 / 100 + 15 ))
echo "# bench/observability/run.sh $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc --all) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), kernel $(uname -r)"
echo "# $("$FERROGATE" --version 2>&1 | head -1), $(nginx -v 2>&1 | sed 's/.*: //'), $(wrk -v 2>&1 | awk 'NR == 1 {print $1, $2}')"
rev=$(git -C "$HERE" describe --always --dirty 2>/dev/null || true)
if [ -n "$rev" ]; then echo "# source: git $rev"; fi
echo "# gateways (1 worker each) on cpu $PROXY_CPU, one loaded at a time; wrk (1 thread, $CONNS connections) + origin nginx + OTLP sink on cpu $LOAD_CPU"
echo "# $ROUNDS alternating rounds x ${DURATION}s per gateway after ${WARMUP}s warm-up; about ${estimate}s"

# ---- origin and OTLP sink ----------------------------------------------------------------
# the OTLP sink: accepts and discards span exports
start_origin "$ORIGIN_PORT" "        location = /v1/traces {
            return 200 '';
        }"
write_report_lua

# ---- gateways ----------------------------------------------------------------------------
i=0
for g in $GATEWAYS; do
    i=$((i + 1))
    port=$((PORT_BASE + 2 * i - 1))
    status_port=$((PORT_BASE + 2 * i))
    mkdir -p "$WORK/$g"
    {
        cat <<YAML
listen: [127.0.0.1:$port]
workers: 1
grace_period: 2s
upstreams:
  origin:
    targets: [127.0.0.1:$ORIGIN_PORT]
    keepalive: 1024
routes:
  - name: api
    paths: ["/api/*"]
    upstream: origin
YAML
        if [ "$g" != off ]; then
            cat <<YAML
status:
  listen: 127.0.0.1:$status_port
  admin_token: bench
access_log:
  path: access.log
analytics:
  path: analytics.db
YAML
        fi
        if [ "$g" = traced ]; then
            cat <<YAML
tracing:
  endpoint: $ORIGIN_URL/v1/traces
  sample: 0.1
YAML
        fi
    } >"$WORK/$g/gateway.yaml"
    "$FERROGATE" check "$WORK/$g/gateway.yaml" >"$WORK/$g/check.log" 2>&1 ||
        die "the $g config does not load: $(cat "$WORK/$g/check.log")"
    start "$g" "$PROXY_CPU" "$FERROGATE" run -c "$WORK/$g/gateway.yaml" --workers 1 --pid-file "$WORK/$g/gateway.pid"
    URL[$g]=http://127.0.0.1:$port
    wait_http "${URL[$g]}/api/items" || die "gateway $g did not answer; see $WORK/$g.log"
done
body=$(curl -fsS "$ORIGIN_URL/")
for g in $GATEWAYS; do
    got=$(curl -sS -w '%{http_code}' "${URL[$g]}/api/items?page=2" 2>&1 || true)
    [ "$got" = "$body"$'\n200' ] || die "gateway $g did not return the origin's body: $got"
done
log "origin and gateways are up"

# ---- measure ---------------------------------------------------------------------------
RESULTS=$WORK/results.txt
: >"$RESULTS"
for g in $GATEWAYS; do wrk_run "$g-warmup" "$g" "${URL[$g]}/api/items?page=2" "$WARMUP"; done
for n in $(seq "$ROUNDS"); do
    for g in $GATEWAYS; do
        wrk_run "$g-r$n" "$g" "${URL[$g]}/api/items?page=2" "$DURATION"
        echo "$g $n $LAST" >>"$RESULTS"
        log "  round $n $g: $(awk '{printf "%s req/s, p99 %.2f ms, %s cpu us/req, gateway %s%%, load %s%%, err %s", $1, $3 / 1000, $7, $5, $6, $4}' <<<"$LAST")"
    done
done
check_alive
# the full gateways must really have observed: lines in the access log, a metrics scrape
for g in $GATEWAYS; do
    [ "$g" = off ] && continue
    lines=$(wc -l <"$WORK/$g/access.log" 2>/dev/null || echo 0)
    [ "$lines" -gt 0 ] || die "gateway $g wrote no access log lines"
    log "$g: $lines access log lines"
done

# ---- report ----------------------------------------------------------------------------
ratios() {  # per-round cpu us/req of $1 over that of the reference in the same round
    awk -v r="$1" -v ref="$2" '$1 == ref {base[$2] = $9} $1 == r {cur[$2] = $9}
        END {for (n in cur) if (n in base && base[n] > 0) printf "%.3f\n", cur[n] / base[n]}' "$RESULTS"
}
ref=${GATEWAYS%% *}
cat <<EOF

req/s: median of the rounds (min..max); p50/p99: medians of the rounds' percentiles, ms.
cpu us/req: utime + stime of the gateway's processes (master + worker, all threads) per request,
median of the rounds (min..max).  ratio: median over the rounds of (gateway / $ref) cpu us/req,
both taken in the same round.  gw%: the gateway's CPU as a share of one core.  load%: busy share
of the load core (wrk + origin); L marks >= 90%.  err: socket errors + non-2xx, summed.

== GET /api/items?page=2, 49-byte JSON, wrk -t1 -c$CONNS -d${DURATION}s, $ROUNDS rounds, 1 worker ==
EOF
printf '%-8s %7s %-15s %6s %6s %6s %-13s %6s %5s %6s %5s\n' gateway "req/s" "(min..max)" p50 p99 \
    "cpu us" "(min..max)" ratio gw% load% err
for g in $GATEWAYS; do
    ratio=-
    if [ "$g" != "$ref" ]; then ratio=$(ratios "$g" "$ref" | median | awk '{printf "%.2fx", $1}'); fi
    awk -v r="$g" -v ratio="$ratio" \
        -v rps="$(col "$g" 3 | median)" -v lo="$(col "$g" 3 | sort -g | head -1)" -v hi="$(col "$g" 3 | sort -g | tail -1)" \
        -v p50="$(col "$g" 4 | median)" -v p99="$(col "$g" 5 | median)" \
        -v us="$(col "$g" 9 | median)" -v ulo="$(col "$g" 9 | sort -g | head -1)" -v uhi="$(col "$g" 9 | sort -g | tail -1)" \
        -v gw="$(col "$g" 7 | median)" -v load="$(col "$g" 8 | median)" \
        -v err="$(col "$g" 6 | awk '{s += $1} END {print s + 0}')" 'BEGIN {
        printf "%-8s %7.0f %-15s %6.2f %6.2f %6.2f %-13s %6s %5.0f %5.0f%1s %5d\n", r, rps,
            "(" lo ".." hi ")", p50 / 1000, p99 / 1000, us, "(" ulo ".." uhi ")", ratio, gw, load,
            (load >= 90 ? "L" : " "), err }'
done
echo
echo "per-round cpu us/req (rounds in order):"
for g in $GATEWAYS; do
    printf '  %-8s %s\n' "$g" "$(col "$g" 9 | tr '\n' ' ')"
done
if [ "$ref" = off ]; then
    echo
    for pair in "full 1.2 access log + metrics + analytics" "traced 1.3 + tracing at 10%"; do
        read -r g limit label <<<"$pair"
        [[ " $GATEWAYS " == *" $g "* ]] || continue
        ratios "$g" off | median | awk -v l="$limit" -v t="$label" '{
            printf "%s: %.2fx the CPU per request of everything off, target <= %sx: %s\n", t, $1, l, ($1 <= l ? "met" : "NOT met") }'
    done
fi
awk '$11 - $7 > 10 {n++} $10 > m {m = $10} END {
    if (n) printf "\nWARNING: in %d runs other processes used >10%% of the gateway core (shared machine)\n", n
    if (m > 5) printf "WARNING: up to %.0f%% CPU steal by the host during runs\n", m }' "$RESULTS"
exit 0
