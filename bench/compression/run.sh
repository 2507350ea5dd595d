#!/usr/bin/env bash
# run.sh - what response compression costs: the same 16 KiB JSON document through one
# ferrogate worker, asked for without compression and with each coding, and the gateway's
# CPU time per request for each.
#
#   bench/compression/run.sh                      # a little under 2 minutes
#   DURATION=6 ROUNDS=5 bench/compression/run.sh 2>&1 | tee bench/results/DATE-compression.txt
#   CACHE=1 bench/compression/run.sh             # the route caches: every case is a cache hit
#   PEER=1 bench/compression/run.sh              # also nginx as the proxy, gzip on, same level
#
# Cases (all GET /data.json through one route, the top-level `compression` settings with
# their default levels unless LEVELS says otherwise; only the request's Accept-Encoding differs):
#   plain   no Accept-Encoding: sent as it is
#   gzip    Accept-Encoding: gzip
#   br      Accept-Encoding: br
#   zstd    Accept-Encoding: zstd
# With PEER=1, two more cases load an nginx proxy (1 worker, on the gateway's core, `gzip on`
# at the gateway's gzip level, keep-alive to the same origin) in place of the gateway:
#   nginx-plain, nginx-gzip
#
# The document is 16,384 bytes of API-like JSON (ids, names, e-mail addresses, timestamps,
# numbers: made with a fixed seed), served by the origin nginx from a file.
#
# Pinning as in bench/plugins/run.sh: the gateway (master + 1 worker) alone on PROXY_CPU;
# wrk and a private origin nginx on LOAD_CPU. CPU time is utime + stime of the gateway's
# process group, before and after each wrk run. Everything listens on 127.0.0.1.
#
# Environment: DURATION (6 s), WARMUP (2 s), ROUNDS (4), CONNS (64), PROXY_CPU (1), LOAD_CPU (0),
# PORT_BASE (18190: the origin; the gateway on PORT_BASE + 1), CASES ("plain gzip br zstd"; the
# first is the reference), LEVELS (the YAML of `compression.level`, default "{gzip: 1, br: 4,
# zstd: 3}", the config's defaults), CACHE (0; 1 gives the route `cache: {default_ttl: 1h}`, so each coding is
# compressed once and then sent from the entry), FERROGATE (ferrogate). Logs and raw wrk output stay in
# ${TMPDIR:-/tmp}/ferrogate-bench-compression-UID-PORT_BASE until the next run.
#
# Needs: ferrogate (pip install .), nginx, wrk, taskset, setsid, ss, curl, pgrep, timeout, python3
# with brotli and zstandard (the test extra) to check the bodies.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DURATION=${DURATION:-6}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-4}
CONNS=${CONNS:-64}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
PORT_BASE=${PORT_BASE:-18190}
FERROGATE=${FERROGATE:-ferrogate}
CASES=${CASES:-"plain gzip br zstd"}
LEVELS=${LEVELS:-"{gzip: 1, br: 4, zstd: 3}"}
CACHE=${CACHE:-0}
PEER=${PEER:-0}

ORIGIN_PORT=$PORT_BASE
GW_PORT=$((PORT_BASE + 1))
ORIGIN_URL=http://127.0.0.1:$ORIGIN_PORT
GW_URL=http://127.0.0.1:$GW_PORT
WORK=${TMPDIR:-/tmp}/ferrogate-bench-compression-$(id -u)-$PORT_BASE

HERE_LIB=$(cd "$HERE/.." && pwd)
# shellcheck source=bench/lib.sh
source "$HERE_LIB/lib.sh"
WRK_ARGS=()

accept_of() {
    case $1 in
    plain | nginx-plain) ;;
    gzip | br | zstd) echo "$1" ;;
    nginx-gzip) echo gzip ;;
    *) die "unknown case $1 (plain gzip br zstd nginx-plain nginx-gzip)" ;;
    esac
}
# The service a case loads, and its URL.
svc_of() { case $1 in nginx-*) echo peer ;; *) echo gateway ;; esac; }
url_of() { case $1 in nginx-*) echo "$PEER_URL/data.json" ;; *) echo "$GW_URL/data.json" ;; esac; }
PEER_URL=http://127.0.0.1:$((PORT_BASE + 2))
if [ "$PEER" = 1 ]; then CASES="$CASES nginx-plain nginx-gzip"; fi

# ---- preflight -------------------------------------------------------------------------
preflight "$FERROGATE" nginx wrk taskset setsid ss curl pgrep timeout python3 -- "$ORIGIN_PORT" "$GW_PORT" "$((PORT_BASE + 2))"
for c in $CASES; do accept_of "$c" >/dev/null; done
ulimit -n "$(ulimit -Hn)"
rm -rf "$WORK"
mkdir -p "$WORK/origin/www"
STARTED=1
chmod 755 "$WORK"

estimate=$(( $(wc -w <<<"$CASES") * (WARMUP + ROUNDS * DURATION) * 105 / 100 + 10 ))
echo "# bench/compression/run.sh $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc --all) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), kernel $(uname -r)"
echo "# $("$FERROGATE" --version 2>&1 | head -1), $(nginx -v 2>&1 | sed 's/.*: //'), $(wrk -v 2>&1 | awk 'NR == 1 {print $1, $2}')"
rev=$(git -C "$HERE" describe --always --dirty 2>/dev/null || true)
if [ -n "$rev" ]; then echo "# source: git $rev"; fi
echo "# gateway (1 worker) alone on cpu $PROXY_CPU; wrk (1 thread, $CONNS connections) + origin nginx (1 worker) on cpu $LOAD_CPU"
echo "# levels: $LEVELS; route cache: $([ "$CACHE" = 1 ] && echo on || echo off); $ROUNDS alternating rounds x ${DURATION}s per case after ${WARMUP}s warm-up; about ${estimate}s"

# ---- origin ----------------------------------------------------------------------------
python3 - "$WORK/origin/www/data.json" <<'PY'
import json, random, sys
rng = random.Random(9)
first = ["ada", "grace", "alan", "edsger", "barbara", "donald", "frances", "ken", "radia", "linus"]
last = ["lovelace", "hopper", "turing", "dijkstra", "liskov", "knuth", "allen", "thompson"]
items, doc = [], b""
while True:
    n = len(items)
    f, l = rng.choice(first), rng.choice(last)
    items.append({
        "id": 100000 + rng.randrange(900000), "name": f"{f.title()} {l.title()}",
        "email": f"{f}.{l}{rng.randrange(100)}@example.com",
        "created": f"2026-{rng.randrange(1, 13):02}-{rng.randrange(1, 29):02}T{rng.randrange(24):02}:{rng.randrange(60):02}:{rng.randrange(60):02}Z",
        "active": rng.random() < 0.7, "score": round(rng.random() * 100, 2),
        "tags": rng.sample(["admin", "beta", "billing", "eu", "us", "trial", "vip"], 2),
    })
    candidate = json.dumps({"items": items, "next": f"/users?after={n}"}).encode()
    if len(candidate) > 16384:
        break
    doc = candidate
open(sys.argv[1], "wb").write(doc + b" " * (16384 - len(doc)))
PY
start_origin "$ORIGIN_PORT" "        location = /data.json {
            root $WORK/origin/www;
        }"

# ---- gateway ---------------------------------------------------------------------------
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
compression:
  level: $LEVELS
routes:
  - name: all
    paths: ["/*"]
    upstream: origin
YAML
if [ "$CACHE" = 1 ]; then echo "    cache: {default_ttl: 1h}" >>"$WORK/gateway.yaml"; fi
"$FERROGATE" check "$WORK/gateway.yaml" >"$WORK/check.log" 2>&1 ||
    die "the gateway config does not load: $(cat "$WORK/check.log")"
start gateway "$PROXY_CPU" "$FERROGATE" run -c "$WORK/gateway.yaml" --workers 1 --pid-file "$WORK/gateway.pid"
wait_http "$GW_URL/data.json" || die "the gateway did not answer; see $WORK/gateway.log"
if [ "$PEER" = 1 ]; then
    gzip_level=$(sed -n 's/.*gzip: *\([0-9]*\).*/\1/p' <<<"$LEVELS")
    mkdir -p "$WORK/peer/tmp"
    cat >"$WORK/peer/nginx.conf" <<NGINX
daemon off;
worker_processes 1;
pid peer.pid;
error_log error.log error;
worker_rlimit_nofile 20000;
events { worker_connections 8192; }
http {
    access_log off;
    server_tokens off;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    proxy_temp_path tmp/proxy;
    client_body_temp_path tmp/body;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    upstream origin { server 127.0.0.1:$ORIGIN_PORT; keepalive 1024; }
    server {
        listen 127.0.0.1:$((PORT_BASE + 2)) backlog=4096;
        gzip on;
        gzip_comp_level ${gzip_level:-4};
        gzip_types application/json;
        gzip_min_length 1024;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
NGINX
    start peer "$PROXY_CPU" nginx -p "$WORK/peer/" -c "$WORK/peer/nginx.conf" -e "$WORK/peer/error.log"
    wait_http "$PEER_URL/data.json" || die "the nginx peer did not answer; see $WORK/peer.log"
fi

for c in $CASES; do
    a=$(accept_of "$c")
    curl -fsS -H "Accept-Encoding: $a" -D "$WORK/$c.head" -o "$WORK/$c.body" "$(url_of "$c")" ||
        die "GET /data.json ($c) failed"
    python3 - "$WORK/$c.body" "$WORK/origin/www/data.json" "$c" <<'PY' || die "the $c body does not decode to the origin's"
import gzip, sys
import brotli, zstandard
raw, want, coding = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read(), sys.argv[3]
decode = {"plain": bytes, "gzip": gzip.decompress, "br": brotli.decompress,
          "zstd": lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b),
          "nginx-plain": bytes, "nginx-gzip": gzip.decompress}[coding]
assert decode(raw) == want
print(f"{coding} {len(raw)}")
PY
done >"$WORK/sizes.txt"
log "origin and gateway are up; every coding decodes to the origin's 16,384 bytes"

# ---- measure ---------------------------------------------------------------------------
RESULTS=$WORK/results.txt   # case round, then the fields of LAST
: >"$RESULTS"
set_accept() {
    local a
    a=$(accept_of "$1")
    WRK_ARGS=()
    if [ -n "$a" ]; then WRK_ARGS=(-H "Accept-Encoding: $a"); fi
}
for c in $CASES; do set_accept "$c"; wrk_run "$c-warmup" "$(svc_of "$c")" "$(url_of "$c")" "$WARMUP"; done
for n in $(seq "$ROUNDS"); do
    for c in $CASES; do
        set_accept "$c"
        wrk_run "$c-r$n" "$(svc_of "$c")" "$(url_of "$c")" "$DURATION"
        echo "$c $n $LAST" >>"$RESULTS"
        log "  round $n $c: $(awk '{printf "%s req/s, p99 %.2f ms, %s cpu us/req, gateway %s%%, load %s%%, err %s", $1, $3 / 1000, $7, $5, $6, $4}' <<<"$LAST")"
    done
done
check_alive

# ---- report ----------------------------------------------------------------------------
# results.txt fields: 1 case 2 round 3 rps 4 p50_us 5 p99_us 6 errors 7 gw% 8 load%
#   9 cpu_us_per_req 10 steal% 11 proxycore% 12 requests
ratio() {  # CASE FIELD: median over the rounds of CASE / reference, same round
    awk -v r="$1" -v ref="$ref" -v f="$2" '$1 == ref {base[$2] = $f} $1 == r {cur[$2] = $f}
        END {for (n in cur) if (n in base && base[n] > 0) printf "%.3f\n", cur[n] / base[n]}' "$RESULTS" | median
}
ref=${CASES%% *}
cat <<EOF

req/s: median of the rounds (min..max).  cpu us/req: utime + stime of the gateway's processes
per request, median of the rounds.  rps ratio / cpu ratio: median over the rounds of (case /
$ref), both taken in the same round.  bytes: the response body on the wire.
gw%: the gateway's CPU time as a share of one core (~100 = saturated).  load%: busy share of
the load core (wrk + origin); L marks >= 90%.  err: socket errors + non-2xx, summed.

== GET /data.json, 16,384-byte JSON, wrk -t1 -c$CONNS -d${DURATION}s, $ROUNDS rounds, 1 worker ==
EOF
printf '%-11s %6s %7s %-15s %6s %6s %6s %6s %5s %6s %5s\n' case bytes "req/s" "(min..max)" p99 \
    "cpu us" "rps" "cpu" gw% load% err
printf '%-11s %6s %7s %-15s %6s %6s %6s %6s %5s %6s %5s\n' "" "" "" "" ms "/req" ratio ratio "" "" ""
for c in $CASES; do
    awk -v c="$c" -v bytes="$(awk -v c="$c" '$1 == c {print $2}' "$WORK/sizes.txt")" \
        -v rps="$(col "$c" 3 | median)" -v lo="$(col "$c" 3 | sort -g | head -1)" -v hi="$(col "$c" 3 | sort -g | tail -1)" \
        -v p99="$(col "$c" 5 | median)" -v us="$(col "$c" 9 | median)" \
        -v rr="$(ratio "$c" 3)" -v cr="$(ratio "$c" 9)" \
        -v gw="$(col "$c" 7 | median)" -v load="$(col "$c" 8 | median)" \
        -v err="$(col "$c" 6 | awk '{s += $1} END {print s + 0}')" 'BEGIN {
        printf "%-11s %6d %7.0f %-15s %6.2f %6.2f %6.2f %6.2f %5.0f %5.0f%1s %5d\n", c, bytes, rps,
            "(" lo ".." hi ")", p99 / 1000, us, rr, cr, gw, load, (load >= 90 ? "L" : " "), err }'
done
if [ "$ref" = plain ] && [[ " $CASES " == *" gzip "* ]]; then
    echo
    ratio gzip 3 | awk '{printf "gzip: %.0f%% of the plain req/s (costs %.0f%%), target: costs < 40%%: %s\n",
        100 * $1, 100 * (1 - $1), (1 - $1 < 0.4 ? "met" : "NOT met")}'
fi
if [ "$PEER" = 1 ]; then
    ref=nginx-plain
    ratio nginx-gzip 3 | awk '{printf "nginx gzip: %.0f%% of nginx'"'"'s plain req/s (costs %.0f%%)\n", 100 * $1, 100 * (1 - $1)}'
fi
awk '$11 - $7 > 10 {n++} $10 > m {m = $10} END {
    if (n) printf "\nWARNING: in %d runs other processes used >10%% of the gateway core (shared machine)\n", n
    if (m > 5) printf "WARNING: up to %.0f%% CPU steal by the host during runs\n", m }' "$RESULTS"
errors=$(grep -c '"level":"error"' "$WORK/gateway.log" || true)
if [ "$errors" != 0 ]; then
    echo "WARNING: the gateway logged $errors error events; see $WORK/gateway.log"
fi
exit 0
