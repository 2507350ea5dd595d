#!/usr/bin/env bash
# run.sh - what Python plugins cost per request: the same GET through four routes of one
# ferrogate worker, each route with a different plugin chain, and the gateway's CPU time per
# request on each.
#
#   bench/plugins/run.sh                      # a little over 2 minutes
#   DURATION=6 ROUNDS=5 bench/plugins/run.sh 2>&1 | tee bench/results/DATE-plugins-runN.txt
#
# Routes (all to the same origin, which answers a 49-byte JSON body):
#   /none     no plugin
#   /noop     noop: on_request returns None                       (bench/plugins/noop.py)
#   /rt       request-transformer: add 2 headers, remove 1 (sent by wrk on every route)
#   /stream   noop-stream: on_response_chunk returns None          (bench/plugins/noop.py)
#   /limit    one node-wide rate limit by client address, never hit (only with ROUTES=...)
#   /cluster  one Redis-backed (scope: cluster) limit, never hit; starts a private
#             redis-server on PORT_BASE + 2 (only with ROUTES=...)
#   /keyauth  key-auth: wrk sends a consumer's API key (to every route) (only with ROUTES=...)
#   /jwt      jwt: one RS256 token (sent to every route), verified once then cached; its sub
#             goes upstream as a header (only with ROUTES=...; needs PyJWT[crypto])
#
#   ROUTES="none limit cluster" bench/plugins/run.sh     # what rate limits cost
#   ROUTES="none keyauth" bench/plugins/run.sh           # what API key authentication costs
#   ROUTES="none jwt" bench/plugins/run.sh               # what JWT authentication costs
#
# Pinning as in ../shared/bench/peers.sh: the gateway (master + 1 worker, every thread) alone
# on PROXY_CPU; wrk and a private origin nginx on LOAD_CPU. The gateway's CPU time is
# utime + stime of every process in its process group, from /proc/PID/stat, before and after
# each wrk run. Everything listens on 127.0.0.1 and is stopped at exit.
#
# Environment: DURATION (6 s), WARMUP (2 s), ROUNDS (5), CONNS (64), PROXY_CPU (1), LOAD_CPU (0),
# PORT_BASE (18090: the origin; the gateway on PORT_BASE + 1), ROUTES ("none noop rt stream"; the
# first one is the reference of the delta column), FERROGATE (ferrogate). Logs and raw wrk output
# stay in ${TMPDIR:-/tmp}/ferrogate-bench-plugins-UID-PORT_BASE until the next run.
#
# Needs: ferrogate (pip install .), nginx, wrk, taskset, setsid, ss, curl, pgrep, timeout.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
seen=
DURATION=${DURATION:-6}          # seconds per measured wrk run
WARMUP=${WARMUP:-2}              # seconds of warm-up per route, before the first round
ROUNDS=${ROUNDS:-5}              # alternating rounds: none noop rt stream none noop ...
CONNS=${CONNS:-64}               # wrk connections
PROXY_CPU=${PROXY_CPU:-1}        # the gateway
LOAD_CPU=${LOAD_CPU:-0}          # wrk and the origin
PORT_BASE=${PORT_BASE:-18090}    # origin on PORT_BASE, gateway on PORT_BASE + 1
FERROGATE=${FERROGATE:-ferrogate}
ROUTES=${ROUTES:-"none noop rt stream"}

ORIGIN_PORT=$PORT_BASE
GW_PORT=$((PORT_BASE + 1))
ORIGIN_URL=http://127.0.0.1:$ORIGIN_PORT
GW_URL=http://127.0.0.1:$GW_PORT
# one fixed directory per user and port: reruns overwrite it instead of piling up
WORK=${TMPDIR:-/tmp}/ferrogate-bench-plugins-$(id -u)-$PORT_BASE

HERE_LIB=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$HERE_LIB/lib.sh"
# Sent on every route, so that each request carries the same headers; only /keyauth reads it.
BENCH_KEY=bench-key-4f3a2b1c0d9e8f7a
WRK_ARGS=(-H "X-Debug: 1" -H "apikey: $BENCH_KEY")

# ---- preflight -------------------------------------------------------------------------
preflight "$FERROGATE" nginx wrk taskset setsid ss curl pgrep timeout -- "$ORIGIN_PORT" "$GW_PORT"
for r in $ROUTES; do
    case $r in none | noop | rt | stream | limit | cluster | keyauth | jwt) ;; *) die "unknown route $r (none noop rt stream limit cluster keyauth jwt)" ;; esac
done
ulimit -n "$(ulimit -Hn)"
rm -rf "$WORK"
mkdir -p "$WORK/origin"
STARTED=1
chmod 755 "$WORK"

estimate=$(( $(wc -w <<<"$ROUTES") * (WARMUP + ROUNDS * DURATION) * 105 / 100 + 10 ))
echo "# bench/plugins/run.sh $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc --all) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), kernel $(uname -r)"
echo "# $("$FERROGATE" --version 2>&1 | head -1), $(nginx -v 2>&1 | sed 's/.*: //'), $(wrk -v 2>&1 | awk 'NR == 1 {print $1, $2}'), $(python3 --version 2>&1)"
rev=$(git -C "$HERE" describe --always --dirty 2>/dev/null || true)
if [ -n "$rev" ]; then echo "# source: git $rev"; fi
boundary=$(python3 -c 'import ferrogate.hooks as h; print("compiled" if h.__file__.endswith((".so", ".pyd")) else "plain Python")' 2>/dev/null || echo unknown)
echo "# plugin hook boundary (ferrogate.hooks): $boundary"
echo "# gateway (1 worker) alone on cpu $PROXY_CPU; wrk (1 thread, $CONNS connections) + origin nginx (1 worker) on cpu $LOAD_CPU"
echo "# $ROUNDS alternating rounds x ${DURATION}s per route after ${WARMUP}s warm-up; about ${estimate}s"
q0=$(cpu_sample "$PROXY_CPU"); r0=$(cpu_sample "$LOAD_CPU"); sleep 1; q1=$(cpu_sample "$PROXY_CPU"); r1=$(cpu_sample "$LOAD_CPU")
awk -v a="$q0 $r0" -v b="$q1 $r1" 'BEGIN {split(a, A, " "); split(b, B, " ")
    busy = 100 * (B[1] - A[1] + B[4] - A[4]) / (B[3] - A[3] + B[6] - A[6] + 1)
    if (busy > 10) printf "# WARNING: the machine is %.0f%% busy before the run: expect noisy numbers\n", busy }'

# ---- origin ----------------------------------------------------------------------------
# The shared origin config listens on a fixed port; this one is the same origin (small JSON
# from memory, keep-alive without a request cap, no access log) on ORIGIN_PORT. /*/headers
# answers with the headers this benchmark sets, to check what reached the origin.
# /*/headers answers with the headers this benchmark sets, to check what reached the origin.
start_origin "$ORIGIN_PORT" '        location ~ /headers$ {
            return 200 "a=$http_x_bench_tenant b=$http_x_bench_source debug=$http_x_debug\n";
        }'
REDIS_PORT=$((PORT_BASE + 2))
if [[ " $ROUTES " == *" cluster "* ]]; then
    start redis "$LOAD_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no
    for _ in $(seq 100); do
        [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && break
        sleep 0.1
    done
fi

# ---- gateway ---------------------------------------------------------------------------
write_report_lua
if [[ " $ROUTES " == *" jwt "* ]]; then
    # an RS256 key pair made for this run and one token signed with it, valid for a day
    python3 - "$WORK" <<'PY' || die "cannot make the /jwt token (pip install 'PyJWT[crypto]')"
import sys, time
import jwt
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import rsa
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
pub = key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)
open(sys.argv[1] + "/jwt.pem", "wb").write(pub)
now = int(time.time())
claims = {"iss": "bench", "sub": "bench-user", "iat": now, "exp": now + 86400}
open(sys.argv[1] + "/jwt.token", "w").write(jwt.encode(claims, key, algorithm="RS256"))
PY
    WRK_ARGS+=(-H "Authorization: Bearer $(cat "$WORK/jwt.token")")
fi

{
    cat <<YAML
listen:
  - 127.0.0.1:$GW_PORT
workers: 1
grace_period: 2s
plugins_dir: $HERE
upstreams:
  origin:
    targets:
      - 127.0.0.1:$ORIGIN_PORT
    keepalive: 1024
YAML
    if [[ " $ROUTES " == *" cluster "* ]]; then
        printf 'rate_limiting:\n  redis: {url: "redis://127.0.0.1:%s/0"}\n' "$REDIS_PORT"
    fi
    if [[ " $ROUTES " == *" keyauth "* ]]; then
        printf 'consumers:\n  bench:\n    credentials:\n      - {type: key-auth, key: "%s"}\n' "$BENCH_KEY"
    fi
    cat <<YAML
routes:
YAML
    # /none is always there: the checks below use it
    for r in none $ROUTES; do
        case " $seen " in *" $r "*) continue ;; esac
        seen="$seen $r"
        printf '  - name: %s\n    paths: ["/%s/*"]\n    upstream: origin\n' "$r" "$r"
        case $r in
        noop) printf '    plugins:\n      - name: noop\n' ;;
        stream) printf '    plugins:\n      - name: noop-stream\n' ;;
        keyauth) printf '    plugins:\n      - name: key-auth\n' ;;
        jwt) printf '    plugins:\n      - name: jwt\n        config:\n          algorithms: [RS256]\n          consumer_keys: false\n          keys: [{algorithm: RS256, public_key: {file: "%s"}}]\n          claims_to_headers: {sub: x-user-id}\n' "$WORK/jwt.pem" ;;
        # limits far above what one core can serve: counted on every request, never hit
        limit) printf '    rate_limits:\n      - {limit: 1000000000, per: 1s}\n' ;;
        # a worker leases 1% (10,000 requests) at a time: Redis is asked a few times a second
        cluster) printf '    rate_limits:\n      - {limit: 1000000, per: 1s, scope: cluster}\n' ;;
        rt) cat <<YAML
    plugins:
      - name: request-transformer
        config:
          add:
            headers:
              x-bench-tenant: acme
              x-bench-source: gateway
          remove:
            headers: [x-debug]
YAML
            ;;
        esac
    done
} >"$WORK/gateway.yaml"
"$FERROGATE" check "$WORK/gateway.yaml" >"$WORK/check.log" 2>&1 ||
    die "the gateway config does not load: $(cat "$WORK/check.log")"
# no access log: the gateway writes none unless configured to
start gateway "$PROXY_CPU" "$FERROGATE" run -c "$WORK/gateway.yaml" --workers 1 --pid-file "$WORK/gateway.pid"
wait_http "$GW_URL/none" || die "the gateway did not answer; see $WORK/gateway.log"

body=$(curl -fsS "$ORIGIN_URL/")
for r in $ROUTES; do
    got=$(curl -sS "${WRK_ARGS[@]}" -w '%{http_code}' "$GW_URL/$r" 2>&1 || true)
    [ "$got" = "$body"$'\n200' ] || die "GET /$r did not return the origin's body: $got (see $WORK/gateway.log)"
done
want_none="a= b= debug=1"
[ "$(curl -fsS -H "X-Debug: 1" "$GW_URL/none/headers")" = "$want_none" ] ||
    die "/none changed the request headers"
if [[ " $ROUTES " == *" rt "* ]]; then
    got=$(curl -fsS -H "X-Debug: 1" "$GW_URL/rt/headers")
    [ "$got" = "a=acme b=gateway debug=" ] || die "/rt: the request-transformer did not apply its rules ($got)"
fi
if [[ " $ROUTES " == *" keyauth "* ]]; then
    got=$(curl -sS -o /dev/null -w '%{http_code}' "$GW_URL/keyauth" 2>&1 || true)
    [ "$got" = 401 ] || die "/keyauth without the key answered $got, not 401"
fi
if [[ " $ROUTES " == *" jwt "* ]]; then
    got=$(curl -sS -o /dev/null -w '%{http_code}' "$GW_URL/jwt" 2>&1 || true)
    [ "$got" = 401 ] || die "/jwt without the token answered $got, not 401"
fi
log "origin and gateway are up; bodies match on every route, /rt applies its header rules"

# ---- measure ---------------------------------------------------------------------------
RESULTS=$WORK/results.txt   # route round, then the fields of LAST
: >"$RESULTS"
# shellcheck disable=SC2086
measure_rounds $ROUTES

# ---- report ----------------------------------------------------------------------------
# results.txt fields: 1 route 2 round 3 rps 4 p50_us 5 p99_us 6 errors 7 gw% 8 load%
#   9 cpu_us_per_req 10 steal% 11 proxycore% 12 requests
# per-round CPU us/req of route $1 minus that of /none in the same round
deltas() {
    awk -v r="$1" '$1 == "none" {base[$2] = $9} $1 == r {cur[$2] = $9}
        END {for (n in cur) if (n in base) printf "%.2f\n", cur[n] - base[n]}' "$RESULTS"
}
ref=${ROUTES%% *}
cat <<EOF

req/s: median of the rounds (min..max); p50/p99: medians of the rounds' percentiles, ms.
cpu us/req: utime + stime of the gateway's processes (master + worker, all threads) per request,
median of the rounds (min..max).  delta: median over the rounds of (route - /$ref) cpu us/req,
both taken in the same round.  gw%: the gateway's CPU time as a share of one core (~100 =
saturated).  load%: busy share of the load core (wrk + origin); L marks >= 90%.
err: socket errors + non-2xx responses, summed over the rounds.

== GET /ROUTE, 49-byte JSON, wrk -t1 -c$CONNS -d${DURATION}s, $ROUNDS rounds, 1 worker ==
EOF
printf '%-8s %7s %-15s %6s %6s %6s %-13s %6s %5s %6s %5s\n' route "req/s" "(min..max)" p50 p99 \
    "cpu us" "(min..max)" delta gw% load% err
printf '%-8s %7s %-15s %6s %6s %6s %-13s %6s %5s %6s %5s\n' "" "" "" "" "" "/req" "" "us/req" "" "" ""
for r in $ROUTES; do
    delta=-
    if [ "$r" != "$ref" ]; then delta=$(deltas "$r" | median | awk '{printf "%+.2f", $1}'); fi
    awk -v r="/$r" -v delta="$delta" \
        -v rps="$(col "$r" 3 | median)" -v lo="$(col "$r" 3 | sort -g | head -1)" -v hi="$(col "$r" 3 | sort -g | tail -1)" \
        -v p50="$(col "$r" 4 | median)" -v p99="$(col "$r" 5 | median)" \
        -v us="$(col "$r" 9 | median)" -v ulo="$(col "$r" 9 | sort -g | head -1)" -v uhi="$(col "$r" 9 | sort -g | tail -1)" \
        -v gw="$(col "$r" 7 | median)" -v load="$(col "$r" 8 | median)" \
        -v err="$(col "$r" 6 | awk '{s += $1} END {print s + 0}')" 'BEGIN {
        printf "%-8s %7.0f %-15s %6.2f %6.2f %6.2f %-13s %6s %5.0f %5.0f%1s %5d\n", r, rps,
            "(" lo ".." hi ")", p50 / 1000, p99 / 1000, us, "(" ulo ".." uhi ")", delta, gw, load,
            (load >= 90 ? "L" : " "), err }'
done
echo
echo "per-round cpu us/req (rounds in order):"
for r in $ROUTES; do
    printf '  %-8s %s\n' "/$r" "$(col "$r" 9 | tr '\n' ' ')"
done

if [ "$ref" = none ]; then
    echo
    verdict() {  # ROUTE LIMIT LABEL
        [[ " $ROUTES " == *" $1 "* ]] || { echo "$3: not measured"; return; }
        deltas "$1" | median | awk -v l="$2" -v t="$3" '{
            if (l == "") printf "%s: %+.2f us/req (reported)\n", t, $1
            else printf "%s: %+.2f us/req, target <= %s: %s\n", t, $1, l, ($1 <= l ? "met" : "NOT met") }'
    }
    verdict noop 5 "noop plugin (on_request)"
    verdict rt 10 "request-transformer (add 2 headers, remove 1)"
    verdict stream "" "noop-stream plugin (on_response_chunk)"
    if [[ " $ROUTES " == *" keyauth "* ]]; then
        # per round: /keyauth cpu us/req over /none's, both taken in the same round
        awk '$1 == "none" {base[$2] = $9} $1 == "keyauth" {cur[$2] = $9}
            END {for (n in cur) if (n in base && base[n] > 0) printf "%.3f\n", cur[n] / base[n]}' "$RESULTS" |
            median | awk '{printf "key-auth: %.2fx the cpu us/req of /none, target <= 1.5x: %s\n", $1, ($1 <= 1.5 ? "met" : "NOT met")}'
    fi
    if [[ " $ROUTES " == *" jwt "* ]]; then
        awk '$1 == "none" {base[$2] = $9} $1 == "jwt" {cur[$2] = $9}
            END {for (n in cur) if (n in base && base[n] > 0) printf "%.3f\n", cur[n] / base[n]}' "$RESULTS" |
            median | awk '{printf "jwt (RS256, cached): %.2fx the cpu us/req of /none, target <= 2.0x: %s\n", $1, ($1 <= 2.0 ? "met" : "NOT met")}'
    fi
fi

awk '$11 - $7 > 10 {n++} $10 > m {m = $10} END {
    if (n) printf "\nWARNING: in %d runs other processes used >10%% of the gateway core (shared machine)\n", n
    if (m > 5) printf "WARNING: up to %.0f%% CPU steal by the host during runs\n", m }' "$RESULTS"
errors=$(grep -c '"level":"error"' "$WORK/gateway.log" || true)
if [ "$errors" != 0 ]; then
    echo "WARNING: the gateway logged $errors error events; see $WORK/gateway.log"
fi
exit 0
