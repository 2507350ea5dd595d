# lib.sh - what the bench scripts share: pinned services in their own process groups, wrk
# runs with the CPU time of a service measured from /proc, and cleanup at exit.
#
# The sourcing script sets WORK (its scratch directory), PROXY_CPU, LOAD_CPU and CONNS before
# calling anything here, and `STARTED=1` once WORK is its own. WRK_ARGS holds extra wrk
# arguments (headers).
# shellcheck shell=bash

WRK_ARGS=()

log() { printf '[%3ds] %s\n' "$SECONDS" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

declare -A PGID=()   # service -> its process group (started with setsid)
WRK_PID=
STARTED=             # set once WORK belongs to this run

# shellcheck disable=SC2317  # called through trap
cleanup() {
    local rc=$? pid _
    trap - EXIT INT TERM
    trap '' PIPE
    if [ -n "$WRK_PID" ]; then kill -TERM "$WRK_PID" 2>/dev/null || true; fi
    for pid in "${PGID[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for pid in "${PGID[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "${#PGID[@]}" -gt 0 ]; then log "stopped ${#PGID[@]} services (process groups ${PGID[*]})"; fi
    if [ "$rc" != 0 ] && [ -n "$STARTED" ]; then log "logs in $WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CPU CMD...: run CMD pinned to CPU, in its own process group
start() {
    local name=$1 cpu=$2; shift 2
    setsid taskset -c "$cpu" "$@" >"$WORK/$name.log" 2>&1 &
    PGID[$name]=$!
    log "started $name (pid $!, cpu $cpu)"
}

wait_http() {  # URL: wait up to 20 s for a 200
    local _
    for _ in $(seq 200); do
        curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

check_alive() {
    local name
    for name in "${!PGID[@]}"; do
        kill -0 "${PGID[$name]}" 2>/dev/null || die "$name exited; see $WORK/$name.log"
    done
}

# "busy steal total" jiffies of a CPU list (1, 0-2 or 0,2), from /proc/stat
cpu_sample() {
    awk -v list="$1" 'BEGIN {
            n = split(list, part, ",")
            for (i = 1; i <= n; i++)
                if (split(part[i], r, "-") == 2) { for (c = r[1]; c <= r[2]; c++) want["cpu" c] = 1 }
                else want["cpu" part[i]] = 1 }
        $1 in want { b += $2+$3+$4+$7+$8; s += $9; t += $2+$3+$4+$5+$6+$7+$8+$9 }
        END { print b + 0, s + 0, t + 0 }' /proc/stat
}

# utime + stime jiffies of every process in service $1's process group (all threads included)
service_jiffies() {
    local p t=0
    for p in $(pgrep -g "${PGID[$1]}"); do
        t=$((t + $(awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$t"
}

# wrk_run LABEL SERVICE URL SECONDS: wrk (with WRK_ARGS) against URL, CPU of SERVICE's
# process group; sets LAST to
#   "rps p50_us p99_us errors gw% load% cpu_us_per_req steal% proxycore% requests"
# Runs in this shell (not inside $(...)) so that cleanup can always stop wrk.
LAST=
wrk_run() {
    local label=$1 svc=$2 url=$3 secs=$4 out s0 s1 p0 p1 a0 a1
    out=$WORK/wrk-$label.txt
    check_alive
    s0=$(service_jiffies "$svc")
    p0=$(cpu_sample "$PROXY_CPU"); a0=$(cpu_sample "$LOAD_CPU")
    timeout $((secs + 20)) taskset -c "$LOAD_CPU" \
        wrk -t1 -c"$CONNS" -d"${secs}s" --timeout 5s --latency -s "$WORK/report.lua" \
        "${WRK_ARGS[@]}" "$url" >"$out" 2>&1 &
    WRK_PID=$!
    wait "$WRK_PID" || true
    WRK_PID=
    s1=$(service_jiffies "$svc")
    p1=$(cpu_sample "$PROXY_CPU"); a1=$(cpu_sample "$LOAD_CPU")
    grep -q '^RESULT' "$out" || die "wrk produced no result for $label; see $out"
    LAST=$(awk -v s="$((s1 - s0))" -v p0="$p0" -v p1="$p1" -v a0="$a0" -v a1="$a1" '
        BEGIN { split(p0, P0, " "); split(p1, P1, " "); split(a0, A0, " "); split(a1, A1, " ") }
        /^RESULT/ {
            for (i = 2; i <= NF; i++) { split($i, kv, "="); r[kv[1]] = kv[2] }
            secs = r["duration_us"] / 1e6
            ptot = P1[3] - P0[3]; atot = A1[3] - A0[3]
            pcore = 100 * (P1[1] - P0[1]) / ptot; load = 100 * (A1[1] - A0[1]) / atot
            steal = 100 * ((P1[2] - P0[2]) + (A1[2] - A0[2])) / (ptot + atot)
            us_req = r["requests"] > 0 ? s * 10000 / r["requests"] : 0   # 1 jiffy = 10000 us
            printf "%.0f %d %d %d %.0f %.0f %.2f %.1f %.0f %d\n", r["requests"] / secs, r["p50_us"],
                r["p99_us"], r["socket_errors"] + r["non2xx"], s / secs, load, us_req, steal, pcore,
                r["requests"]
        }' "$out")
}

# measure_rounds NAME...: a warm-up run of each $GW_URL/NAME through the gateway, then ROUNDS
# rounds of one run each, in turn (so a noisy moment hits every name); appends "NAME ROUND" +
# LAST to $RESULTS and logs each run.
measure_rounds() {
    local n r
    for r in "$@"; do wrk_run "$r-warmup" gateway "$GW_URL/$r" "$WARMUP"; done
    for n in $(seq "$ROUNDS"); do
        for r in "$@"; do
            wrk_run "$r-r$n" gateway "$GW_URL/$r" "$DURATION"
            echo "$r $n $LAST" >>"$RESULTS"
            log "  round $n /$r: $(awk '{printf "%s req/s, p99 %.2f ms, %s cpu us/req, gateway %s%%, load %s%%, err %s", $1, $3 / 1000, $7, $5, $6, $4}' <<<"$LAST")"
        done
    done
    check_alive
}

# preflight TOOL... -- PORT...: every tool on PATH, two CPUs, 100 clock ticks per second (the
# CPU accounting assumes it) and the ports free; dies saying what is missing.
preflight() {
    local tool p
    while [ "$#" -gt 0 ] && [ "$1" != -- ]; do
        command -v "$1" >/dev/null || die "missing tool: $1"
        shift
    done
    [ "$#" -gt 0 ] && shift
    [ "$(nproc --all)" -ge 2 ] || die "needs at least 2 CPUs"
    [ "$(getconf CLK_TCK)" = 100 ] || die "CPU accounting assumes 100 clock ticks per second"
    for p in "$@"; do
        [ -z "$(ss -ltnH "sport = :$p")" ] || die "port $p is already in use (set PORT_BASE)"
    done
}

median() { sort -g | awk '{v[NR] = $1} END {if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

# The rounds' results: one line per wrk run in $RESULTS, "NAME ROUND" then the fields of LAST
# (3 rps 4 p50_us 5 p99_us 6 errors 7 gw% 8 load% 9 cpu_us_per_req ...). col NAME N: field N
# of NAME's lines, one per round.
col() { awk -v r="$1" -v c="$2" '$1 == r {print $c}' "$RESULTS"; }

# results_table TITLE CPU_TITLE PREFIX NAME...: the usual table, a row per NAME (shown as
# PREFIX NAME): req/s, p50, p99 and cpu us/req as medians of the rounds (min..max), the server's
# and the load core's busy shares (L: load core saturated) and the errors summed.
results_table() {
    local title=$1 cpu_title=$2 prefix=$3 n
    shift 3
    printf '%-8s %7s %-15s %6s %6s %6s %-13s %5s %6s %5s\n' "$title" "req/s" "(min..max)" p50 p99 \
        "cpu us" "(min..max)" "$cpu_title" load% err
    for n in "$@"; do
        awk -v r="$prefix$n" \
            -v rps="$(col "$n" 3 | median)" -v lo="$(col "$n" 3 | sort -g | head -1)" \
            -v hi="$(col "$n" 3 | sort -g | tail -1)" \
            -v p50="$(col "$n" 4 | median)" -v p99="$(col "$n" 5 | median)" \
            -v us="$(col "$n" 9 | median)" -v ulo="$(col "$n" 9 | sort -g | head -1)" \
            -v uhi="$(col "$n" 9 | sort -g | tail -1)" \
            -v gw="$(col "$n" 7 | median)" -v load="$(col "$n" 8 | median)" \
            -v err="$(col "$n" 6 | awk '{s += $1} END {print s + 0}')" 'BEGIN {
            printf "%-8s %7.0f %-15s %6.2f %6.2f %6.2f %-13s %5.0f %5.0f%1s %5d\n", r, rps,
                "(" lo ".." hi ")", p50 / 1000, p99 / 1000, us, "(" ulo ".." uhi ")", gw, load,
                (load >= 90 ? "L" : " "), err }'
    done
}


# write_report_lua: the wrk script whose summary line wrk_run parses
write_report_lua() {
    cat >"$WORK/report.lua" <<'LUA'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d socket_errors=%d non2xx=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
LUA
}

# start_origin PORT [LOCATIONS]: the benchmarks' origin, an nginx worker on LOAD_CPU answering
# a 49-byte JSON body from memory (keep-alive without a request cap, no access log), with
# LOCATIONS (nginx `location` blocks) tried first. Its files live in $WORK/origin.
start_origin() {
    local port=$1 locations=${2:-}
    mkdir -p "$WORK/origin/tmp"
    cat >"$WORK/origin/nginx.conf" <<NGINX
daemon off;
worker_processes 1;
pid origin.pid;
error_log error.log error;
worker_rlimit_nofile 20000;
events {
    worker_connections 8192;
}
http {
    access_log off;
    server_tokens off;
    etag off;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    client_max_body_size 64m;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    server {
        listen 127.0.0.1:$port backlog=4096;
        default_type application/json;
$locations
        location / {
            return 200 '{"ok":true,"service":"origin","message":"hello"}\n';
        }
    }
}
NGINX
    start origin "$LOAD_CPU" nginx -p "$WORK/origin/" -c "$WORK/origin/nginx.conf" -e "$WORK/origin/error.log"
    wait_http "http://127.0.0.1:$port/" || die "origin did not start; see $WORK/origin.log"
}
