#!/usr/bin/env bash
# run.sh - what the WAF (libmodsecurity + OWASP CRS, paranoia 1) costs per request: the same
# requests through two routes of one ferrogate worker, /off (no WAF) and /waf, and the
# gateway's CPU time per request on each.
#
#   bench/waf/run.sh                     # about 2 minutes
#   DURATION=6 ROUNDS=5 bench/waf/run.sh 2>&1 | tee bench/results/DATE-waf-runN.txt
#
# Workloads: a small GET (wrk's default request, with a Host name and a browser-like
# User-Agent), and a POST of a 2 KiB urlencoded form (benign text in 16 fields).
#
# Pinning and CPU accounting as in bench/plugins/run.sh (bench/lib.sh): the gateway (master +
# 1 worker, every thread) alone on PROXY_CPU; wrk and a private origin nginx on LOAD_CPU.
#
# Environment: DURATION (6 s), WARMUP (2 s), ROUNDS (5), CONNS (64), PROXY_CPU (1), LOAD_CPU (0),
# PORT_BASE (18190: the origin; the gateway on PORT_BASE + 1), FERROGATE (ferrogate).
#
# Needs: ferrogate (pip install .), libmodsecurity3 + modsecurity-crs, nginx, wrk, taskset,
# setsid, ss, curl, pgrep, timeout.
set -euo pipefail

DURATION=${DURATION:-6}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-5}
CONNS=${CONNS:-64}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
PORT_BASE=${PORT_BASE:-18190}
FERROGATE=${FERROGATE:-ferrogate}

ORIGIN_PORT=$PORT_BASE
GW_PORT=$((PORT_BASE + 1))
GW_URL=http://127.0.0.1:$GW_PORT
WORK=${TMPDIR:-/tmp}/ferrogate-bench-waf-$(id -u)-$PORT_BASE

HERE_LIB=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$HERE_LIB/lib.sh"
WRK_ARGS=(-H "Host: shop.example" -H "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0")

preflight "$FERROGATE" nginx wrk taskset setsid ss curl pgrep timeout -- "$ORIGIN_PORT" "$GW_PORT"
ulimit -n "$(ulimit -Hn)"
rm -rf "$WORK"
mkdir -p "$WORK/origin"
STARTED=1
chmod 755 "$WORK"

echo "# bench/waf/run.sh $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc --all) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), kernel $(uname -r)"
echo "# $("$FERROGATE" --version 2>&1 | head -1), libmodsecurity $(dpkg-query -W -f='${Version}' libmodsecurity3 2>/dev/null || echo '?'), CRS $(dpkg-query -W -f='${Version}' modsecurity-crs 2>/dev/null || echo '?')"
echo "# gateway (1 worker) alone on cpu $PROXY_CPU; wrk (1 thread, $CONNS connections) + origin nginx on cpu $LOAD_CPU"

start_origin "$ORIGIN_PORT"
cat >"$WORK/gateway.yaml" <<YAML
listen:
  - 127.0.0.1:$GW_PORT
workers: 1
grace_period: 2s
waf:
  rules: crs
  paranoia: 1
upstreams:
  origin:
    targets:
      - 127.0.0.1:$ORIGIN_PORT
    keepalive: 1024
routes:
  - name: "off"
    paths: ["/off/*"]
    upstream: origin
    waf: off
  - name: waf
    paths: ["/waf/*"]
    upstream: origin
YAML
"$FERROGATE" check "$WORK/gateway.yaml" >"$WORK/check.log" 2>&1 ||
    die "the gateway config does not load: $(cat "$WORK/check.log")"
start gateway "$PROXY_CPU" "$FERROGATE" run -c "$WORK/gateway.yaml" --workers 1 --pid-file "$WORK/gateway.pid"
wait_http "$GW_URL/off/" || die "the gateway did not answer; see $WORK/gateway.log"
got=$(curl -s -o /dev/null -w '%{http_code}' "$GW_URL/waf/?id=1%27%20OR%20%271%27=%271" -H "Host: shop.example")
[ "$got" = 403 ] || die "/waf let an SQL injection through ($got): is the WAF on?"

# A 2 KiB form of ordinary text: what a comment or checkout form posts.
FORM=$(python3 - <<'PY'
import urllib.parse
words = "the quick brown fox jumps over the lazy dog while customers review their orders".split()
fields = {f"field{i}": " ".join(words[(i + j) % len(words)] for j in range(40)) for i in range(16)}
body = urllib.parse.urlencode(fields)[:2048]
print(body.rstrip("+%0123456789ABCDEF"))
PY
)
echo "# form body: ${#FORM} bytes"
got=$(curl -s -o /dev/null -w '%{http_code}' -X POST --data "$FORM" "$GW_URL/waf/" -H "Host: shop.example")
[ "$got" = 200 ] || die "/waf refused the benign form ($got)"

# wrk_run always loads $WORK/report.lua: the POST rounds append the request to it.
set_workload() {
    write_report_lua
    if [ "$1" = post ]; then
        {
            echo 'wrk.method = "POST"'
            echo 'wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"'
            printf 'wrk.body = "%s"\n' "$FORM"
        } >>"$WORK/report.lua"
    fi
}

RESULTS=$WORK/results.txt
: >"$RESULTS"
for w in get post; do
    set_workload "$w"
    for r in off waf; do wrk_run "$w-$r-warmup" gateway "$GW_URL/$r/" "$WARMUP"; done
done
for n in $(seq "$ROUNDS"); do
    for w in get post; do
        set_workload "$w"
        for r in off waf; do
            wrk_run "$w-$r-r$n" gateway "$GW_URL/$r/" "$DURATION"
            echo "$w-$r $n $LAST" >>"$RESULTS"
            log "  round $n $w /$r: $(awk '{printf "%s req/s, p99 %.2f ms, %s cpu us/req, err %s", $1, $3 / 1000, $7, $4}' <<<"$LAST")"
        done
    done
done
check_alive

deltas() {  # per round: cpu us/req of $1-waf minus $1-off
    awk -v w="$1" '$1 == w "-off" {base[$2] = $9} $1 == w "-waf" {cur[$2] = $9}
        END {for (n in cur) if (n in base) printf "%.2f\n", cur[n] - base[n]}' "$RESULTS"
}
cat <<EOF

cpu us/req: utime + stime of the gateway's processes per request, median of $ROUNDS rounds.
added: median over the rounds of (/waf - /off) cpu us/req, both taken in the same round.

EOF
printf '%-10s %8s %8s %8s %10s %6s\n' workload "req/s" "p99 ms" "cpu us" "(min..max)" err
for k in get-off get-waf post-off post-waf; do
    printf '%-10s %8.0f %8.2f %8.2f %10s %6d\n' "$k" "$(col "$k" 3 | median)" \
        "$(col "$k" 5 | median | awk '{print $1 / 1000}')" "$(col "$k" 9 | median)" \
        "($(col "$k" 9 | sort -g | head -1)..$(col "$k" 9 | sort -g | tail -1))" \
        "$(col "$k" 6 | awk '{s += $1} END {print s + 0}')"
done
echo
for w in get post; do
    deltas "$w" | median | awk -v w="$w" '{printf "WAF added, %s: %+.1f cpu us/req\n", w, $1}'
done
