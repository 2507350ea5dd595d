#!/usr/bin/env bash
# run.sh - route-lookup scaling: the same requests through ferrogate with 10 and with 10,000
# routes. Lookup cost should depend on the path, not on the number of routes, so req/s should
# stay about the same.
#
#   bash bench/routes/run.sh                      # about 1 minute
#   DURATION=10 COUNTS="10 1000 10000" bash bench/routes/run.sh
#
# The gateway runs with one worker pinned to PROXY_CPU; wrk and the built-in echo upstream run
# on LOAD_CPU. Everything listens on 127.0.0.1. Needs: ferrogate (pip install .), wrk, taskset,
# setsid, ss, curl.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DURATION=${DURATION:-5}        # seconds per measured wrk run (after a 1 s warm-up)
CONNS=${CONNS:-32}             # wrk connections
PROXY_CPU=${PROXY_CPU:-1}      # the gateway's worker
LOAD_CPU=${LOAD_CPU:-0}        # wrk and the echo upstream
PORT=${PORT:-18090}
ECHO_PORT=${ECHO_PORT:-18091}
COUNTS=${COUNTS:-"10 10000"}
FERROGATE=${FERROGATE:-ferrogate}
PYTHON=${PYTHON:-python3}

log() { printf '[%3ds] %s\n' "$SECONDS" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for tool in wrk taskset setsid ss curl "$FERROGATE" "$PYTHON"; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
[ "$(nproc --all)" -ge 2 ] || die "needs at least 2 CPUs"
for p in "$PORT" "$ECHO_PORT"; do
    [ -z "$(ss -ltnH "sport = :$p")" ] || die "port $p is already in use"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ferrogate-routes.XXXXXX")
GW_PID=
WRK_PID=

stop_gateway() {
    [ -n "$GW_PID" ] || return 0
    kill -TERM "$GW_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$GW_PID" 2>/dev/null || break; sleep 0.1; done
    # the gateway was started with setsid: its process group id is its pid
    kill -KILL -- "-$GW_PID" 2>/dev/null || true
    wait "$GW_PID" 2>/dev/null || true
    GW_PID=
}

# shellcheck disable=SC2317  # called through trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$WRK_PID" ]; then kill -TERM "$WRK_PID" 2>/dev/null || true; fi
    stop_gateway
    if [ "$rc" = 0 ]; then rm -rf "$WORK"; else log "logs kept in $WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wrk_rps LABEL HOST PATH SECONDS: sets LAST to the req/s. Runs in this shell (not inside
# $(...)) so that cleanup can always stop wrk.
LAST=
wrk_rps() {
    local out=$WORK/wrk-$1.txt
    timeout $(($4 + 20)) taskset -c "$LOAD_CPU" \
        wrk -t1 -c"$CONNS" -d"${4}s" --timeout 5s -H "Host: $2" "http://127.0.0.1:$PORT$3" >"$out" 2>&1 &
    WRK_PID=$!
    wait "$WRK_PID" || die "wrk failed; see $out"
    WRK_PID=
    if grep -q 'Non-2xx' "$out"; then die "non-2xx answers in $out"; fi
    LAST=$(awk '/^Requests\/sec:/ {print $2}' "$out")
    [ -n "$LAST" ] || die "no result from wrk; see $out"
}

declare -A RESULT=()
for n in $COUNTS; do
    config=$WORK/routes-$n.yaml
    "$PYTHON" "$HERE/gen_config.py" --routes "$n" --listen "127.0.0.1:$PORT" \
        --echo "127.0.0.1:$ECHO_PORT" >"$config"
    # targets present in every config: an exact-host route and an any-host route in the middle
    k=$(( (n / 2) / 2 * 2 ))
    exact_host="svc$k.example.test" exact_path="/svc$k/users/42"
    any_path="/svc$((k + 1))/users/42"

    log "$n routes: starting ferrogate (1 worker on cpu $PROXY_CPU)"
    setsid taskset -c "$PROXY_CPU" "$FERROGATE" run -c "$config" --workers 1 \
        --pid-file "$WORK/gateway-$n.pid" >"$WORK/gateway-$n.log" 2>&1 &
    GW_PID=$!
    ok=0
    for _ in $(seq 600); do
        if curl -fsS -o /dev/null --max-time 1 -H "Host: $exact_host" "http://127.0.0.1:$PORT$exact_path" 2>/dev/null; then
            ok=1; break
        fi
        kill -0 "$GW_PID" 2>/dev/null || die "ferrogate exited; see $WORK/gateway-$n.log"
        sleep 0.1
    done
    [ "$ok" = 1 ] || die "ferrogate did not answer within 60 s; see $WORK/gateway-$n.log"
    curl -fsS -o /dev/null -H "Host: other.test" "http://127.0.0.1:$PORT$any_path" ||
        die "the any-host route $any_path did not answer"
    # move the echo upstream (the process listening on ECHO_PORT) off the proxy core
    for pid in $(ss -ltnpH "sport = :$ECHO_PORT" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
        taskset -a -p -c "$LOAD_CPU" "$pid" >/dev/null
    done

    wrk_rps "$n-warmup" "$exact_host" "$exact_path" 1
    wrk_rps "$n-exact" "$exact_host" "$exact_path" "$DURATION"
    RESULT[$n,exact]=$LAST
    wrk_rps "$n-any" "other.test" "$any_path" "$DURATION"
    RESULT[$n,any]=$LAST
    log "$n routes: exact host ${RESULT[$n,exact]} req/s, any host ${RESULT[$n,any]} req/s"
    stop_gateway
done

echo
echo "route lookup scaling: wrk -t1 -c$CONNS -d${DURATION}s, gateway 1 worker on cpu $PROXY_CPU"
printf '%-8s %22s %22s\n' routes "exact host (req/s)" "any host (req/s)"
first=
for n in $COUNTS; do
    printf '%-8s %22.0f %22.0f\n' "$n" "${RESULT[$n,exact]}" "${RESULT[$n,any]}"
    first=${first:-$n}
done
for n in $COUNTS; do
    [ "$n" = "$first" ] && continue
    awk -v a="${RESULT[$first,exact]}" -v b="${RESULT[$n,exact]}" -v c="${RESULT[$first,any]}" \
        -v d="${RESULT[$n,any]}" -v n="$n" -v f="$first" \
        'BEGIN { printf "%s vs %s routes: %.2fx (exact host), %.2fx (any host)\n", n, f, b / a, d / c }'
done
