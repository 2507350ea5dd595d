#!/usr/bin/env bash
# cpu-split.sh - user and kernel CPU time per request of a running proxy, under wrk.
#
#   bash bench/cpu-split.sh PID URL [CONNECTIONS] [SECONDS]
#
# PID is any process of the proxy (its whole process group is counted: master and workers);
# URL is what wrk requests through it. wrk runs on core 0 (pin the proxy elsewhere, e.g. with
# `taskset -c 1`), 2 s of warm-up, then the measured run. Prints req/s and utime / stime per
# request from /proc/PID/stat, which tells whether a gap to another proxy is in user space
# (ours to shrink) or in the kernel (the same syscalls cost the same for everyone).
#
# Example, ferrogate beside nginx, both proxying to the same origin:
#   bash bench/cpu-split.sh "$(cat /tmp/gw.pid)" http://127.0.0.1:18084/ 256 5
#   bash bench/cpu-split.sh "$(cat /tmp/nginx.pid)" http://127.0.0.1:18081/ 256 5
set -euo pipefail

pid=${1:?usage: cpu-split.sh PID URL [CONNECTIONS] [SECONDS]}
url=${2:?usage: cpu-split.sh PID URL [CONNECTIONS] [SECONDS]}
conns=${3:-256}
secs=${4:-5}

command -v wrk >/dev/null || { echo "wrk is missing (apt-get install wrk)" >&2; exit 1; }
pgid=$(ps -o pgid= -p "$pid" | tr -d ' ')
[ -n "$pgid" ] || { echo "no process $pid" >&2; exit 1; }

# utime and stime (clock ticks) summed over the process group
ticks() {
    local p
    for p in $(pgrep -g "$pgid"); do
        # fields 14 and 15, counted after the command name (which may hold spaces)
        sed -e 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12, $13}'
    done | awk '{u += $1; s += $2} END {print u + 0, s + 0}'
}

taskset -c 0 wrk -t1 -c"$conns" -d2s "$url" >/dev/null
read -r u0 s0 < <(ticks)
out=$(taskset -c 0 wrk -t1 -c"$conns" -d"${secs}s" --latency "$url")
read -r u1 s1 < <(ticks)
reqs=$(awk '/requests in/ {print $1}' <<<"$out")
awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v r="$reqs" -v hz="$(getconf CLK_TCK)" -v secs="$secs" 'BEGIN {
    printf "req/s %.0f  user %.2f  sys %.2f  total %.2f us/req\n",
        r / secs, u / hz * 1e6 / r, s / hz * 1e6 / r, (u + s) / hz * 1e6 / r
}'
grep -E " (50|99)%" <<<"$out"
