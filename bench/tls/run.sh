#!/usr/bin/env bash
# run.sh - what TLS termination costs: the gateway's CPU time per request over plain HTTP and
# over HTTPS (keep-alive, ECDSA P-256 certificate), and nginx terminating TLS in front of the
# same origin, all with one worker.
#
#   bench/tls/run.sh                      # about 2 minutes
#   DURATION=6 ROUNDS=5 bench/tls/run.sh 2>&1 | tee bench/results/DATE-tls.txt
#
# Targets:
#   /plain     http://  ferrogate (1 worker) -> origin
#   /tls       https:// ferrogate (1 worker, rustls, the same process as /plain) -> origin
#   /nginx     https:// nginx (1 worker, OpenSSL, proxy_pass with upstream keep-alive) -> origin
#   /upstls    http://  ferrogate (the same process) -> https:// origin (TLS towards the
#              upstream, verified against the bench CA; pooled keep-alive connections)
#
#   TARGETS="plain upstls" bench/tls/run.sh     # only what TLS towards upstreams costs
#
# Pinning as in bench/plugins/run.sh: the gateway and the TLS nginx (only one of them loaded at
# a time) on PROXY_CPU; wrk and the origin nginx on LOAD_CPU. CPU time per request is utime +
# stime of every process of the measured service's process group, from /proc/PID/stat.
# wrk (OpenSSL) negotiates TLS 1.3 with both servers; with keep-alive the handshakes are a
# few dozen per run, so this measures the record layer (encryption) cost per request.
#
# Environment: DURATION (6 s), WARMUP (2 s), ROUNDS (5), CONNS (64), PROXY_CPU (1), LOAD_CPU (0),
# PORT_BASE (18190: origin; gateway http +1, gateway https +2, nginx https +3, origin https +4),
# TARGETS ("plain tls nginx upstls"),
# FERROGATE (ferrogate). Logs stay in ${TMPDIR:-/tmp}/ferrogate-bench-tls-UID-PORT_BASE.
#
# Needs: ferrogate, nginx, openssl, wrk, taskset, setsid, ss, curl, pgrep, timeout.
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
TARGETS=${TARGETS:-"plain tls nginx upstls"}

ORIGIN_PORT=$PORT_BASE
GW_PORT=$((PORT_BASE + 1))
GW_TLS_PORT=$((PORT_BASE + 2))
NGINX_TLS_PORT=$((PORT_BASE + 3))
ORIGIN_TLS_PORT=$((PORT_BASE + 4))
WORK=${TMPDIR:-/tmp}/ferrogate-bench-tls-$(id -u)-$PORT_BASE

# shellcheck source=bench/lib.sh
source "$HERE/../lib.sh"

url_of() {
    case $1 in
    plain) echo "http://127.0.0.1:$GW_PORT/plain" ;;
    tls) echo "https://127.0.0.1:$GW_TLS_PORT/tls" ;;
    nginx) echo "https://127.0.0.1:$NGINX_TLS_PORT/nginx" ;;
    upstls) echo "http://127.0.0.1:$GW_PORT/upstls" ;;
    esac
}
service_of() { if [ "$1" = nginx ]; then echo nginxtls; else echo gateway; fi; }

# ---- preflight -------------------------------------------------------------------------
preflight "$FERROGATE" nginx openssl wrk taskset setsid ss curl pgrep timeout -- "$ORIGIN_PORT" "$GW_PORT" "$GW_TLS_PORT" "$NGINX_TLS_PORT" "$ORIGIN_TLS_PORT"
ulimit -n "$(ulimit -Hn)"
rm -rf "$WORK"
mkdir -p "$WORK/origin/tmp" "$WORK/nginxtls/tmp" "$WORK/origintls/tmp"
STARTED=1
chmod 755 "$WORK"

echo "# bench/tls/run.sh $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc --all) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), kernel $(uname -r)"
echo "# $("$FERROGATE" --version 2>&1 | head -1), $(nginx -v 2>&1 | sed 's/.*: //'), $(openssl version), $(wrk -v 2>&1 | awk 'NR == 1 {print $1, $2}')"
rev=$(git -C "$HERE" describe --always --dirty 2>/dev/null || true)
if [ -n "$rev" ]; then echo "# source: git $rev"; fi
echo "# servers (1 worker each) on cpu $PROXY_CPU; wrk (1 thread, $CONNS connections) + origin nginx on cpu $LOAD_CPU"
echo "# $ROUNDS alternating rounds x ${DURATION}s per target after ${WARMUP}s warm-up"

# ---- certificates: a CA and an ECDSA P-256 server certificate for 127.0.0.1 -------------
(
    cd "$WORK"
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key
    openssl req -x509 -new -key ca.key -subj "/CN=bench CA" -days 2 -out ca.pem
    openssl ecparam -name prime256v1 -genkey -noout -out server.ec.key
    openssl pkcs8 -topk8 -nocrypt -in server.ec.key -out server.key
    openssl req -new -key server.key -subj "/CN=127.0.0.1" -out server.csr
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >san.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile san.ext -out server.pem
) >"$WORK/certs.log" 2>&1 || die "cannot make the certificates; see $WORK/certs.log"

# ---- origin ----------------------------------------------------------------------------
start_origin "$ORIGIN_PORT"

# ---- the origin again, over TLS (the gateway's https upstream) ----------------------------------
cat >"$WORK/origintls/nginx.conf" <<NGINX
daemon off;
worker_processes 1;
pid nginx.pid;
error_log error.log error;
worker_rlimit_nofile 20000;
events { worker_connections 8192; }
http {
    access_log off;
    server_tokens off;
    etag off;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    server {
        listen 127.0.0.1:$ORIGIN_TLS_PORT ssl backlog=4096;
        ssl_certificate $WORK/server.pem;
        ssl_certificate_key $WORK/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        default_type application/json;
        location / {
            return 200 '{"ok":true,"service":"origin","message":"hello"}\n';
        }
    }
}
NGINX
start origintls "$LOAD_CPU" nginx -p "$WORK/origintls/" -c "$WORK/origintls/nginx.conf" -e "$WORK/origintls/error.log"

# ---- nginx terminating TLS -----------------------------------------------------------------
cat >"$WORK/nginxtls/nginx.conf" <<NGINX
daemon off;
worker_processes 1;
pid nginx.pid;
error_log error.log error;
worker_rlimit_nofile 20000;
events { worker_connections 8192; }
http {
    access_log off;
    server_tokens off;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    upstream origin {
        server 127.0.0.1:$ORIGIN_PORT;
        keepalive 1024;
    }
    server {
        listen 127.0.0.1:$NGINX_TLS_PORT ssl backlog=4096;
        ssl_certificate $WORK/server.pem;
        ssl_certificate_key $WORK/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto https;
        }
    }
}
NGINX
start nginxtls "$PROXY_CPU" nginx -p "$WORK/nginxtls/" -c "$WORK/nginxtls/nginx.conf" -e "$WORK/nginxtls/error.log"

# ---- gateway -------------------------------------------------------------------------------
cat >"$WORK/gateway.yaml" <<YAML
listen:
  - 127.0.0.1:$GW_PORT
workers: 1
grace_period: 2s
tls:
  listen: [127.0.0.1:$GW_TLS_PORT]
  certificates: [{cert: server.pem, key: server.key}]
upstreams:
  origin:
    targets: [127.0.0.1:$ORIGIN_PORT]
    keepalive: 1024
  origintls:
    targets: [127.0.0.1:$ORIGIN_TLS_PORT]
    keepalive: 1024
    tls: {ca: ca.pem}
routes:
  - {paths: ["/upstls/*", "/upstls"], upstream: origintls}
  - {paths: ["/*"], upstream: origin}
YAML
"$FERROGATE" check "$WORK/gateway.yaml" >"$WORK/check.log" 2>&1 ||
    die "the gateway config does not load: $(cat "$WORK/check.log")"
start gateway "$PROXY_CPU" "$FERROGATE" run -c "$WORK/gateway.yaml" --workers 1 --pid-file "$WORK/gateway.pid"
wait_http "$(url_of plain)" || die "the gateway did not answer; see $WORK/gateway.log"

body=$(curl -fsS "http://127.0.0.1:$ORIGIN_PORT/")
for t in $TARGETS; do
    got=$(curl -sS --cacert "$WORK/ca.pem" -w '%{http_code}' "$(url_of "$t")" 2>&1 || true)
    [ "$got" = "$body"$'\n200' ] || die "GET $(url_of "$t") did not return the origin's body: $got"
done
for t in $TARGETS; do
    case $t in tls | nginx) ;; *) continue ;; esac
    proto=$(curl -sS --cacert "$WORK/ca.pem" -o /dev/null -w '%{scheme}' --http1.1 "$(url_of "$t")")
    [ "$proto" = HTTPS ] || die "$t is not HTTPS ($proto)"
done
log "origin, gateway and nginx are up; bodies match, both TLS endpoints verify against the bench CA"

# ---- measure ---------------------------------------------------------------------------------
write_report_lua
RESULTS=$WORK/results.txt
: >"$RESULTS"
for t in $TARGETS; do wrk_run "$t-warmup" "$(service_of "$t")" "$(url_of "$t")" "$WARMUP"; done
for n in $(seq "$ROUNDS"); do
    for t in $TARGETS; do
        wrk_run "$t-r$n" "$(service_of "$t")" "$(url_of "$t")" "$DURATION"
        echo "$t $n $LAST" >>"$RESULTS"
        log "  round $n $t: $(awk '{printf "%s req/s, p99 %.2f ms, %s cpu us/req, server %s%%, load %s%%, err %s", $1, $3 / 1000, $7, $5, $6, $4}' <<<"$LAST")"
    done
done
check_alive

# ---- report ----------------------------------------------------------------------------------
ratio() {  # per-round cpu us/req of $1 over $2, median
    awk -v a="$1" -v b="$2" '$1 == a {x[$2] = $9} $1 == b {y[$2] = $9}
        END {for (n in x) if (n in y && y[n] > 0) printf "%.3f\n", x[n] / y[n]}' "$RESULTS" | median
}
cat <<EOF

req/s: median of the rounds (min..max); p50/p99: medians of the rounds' percentiles, ms.
cpu us/req: utime + stime of the server's processes per request, median (min..max).
srv%: the server's CPU time as a share of one core; load%: busy share of the load core (L >= 90%).

== GET, 49-byte JSON, wrk -t1 -c$CONNS -d${DURATION}s, keep-alive, $ROUNDS rounds, 1 worker ==
EOF
results_table target srv% "" $TARGETS
echo
echo "per-round cpu us/req (rounds in order):"
for t in $TARGETS; do printf '  %-7s %s\n' "$t" "$(col "$t" 9 | tr '\n' ' ')"; done
echo
has() { [[ " $TARGETS " == *" $1 "* ]]; }
if has upstls; then
    ratio upstls plain | awk '{printf "ferrogate to an https upstream / to a plain one: %.2fx cpu us/req\n", $1}'
fi
has tls && ratio tls plain | awk '{printf "ferrogate TLS / ferrogate plain: %.2fx cpu us/req, target <= 1.5x: %s\n", $1, ($1 <= 1.5 ? "met" : "NOT met")}'
has tls && has nginx && ratio tls nginx | awk '{printf "ferrogate TLS / nginx TLS:       %.2fx cpu us/req, target <= 1.0x: %s\n", $1, ($1 <= 1.0 ? "met" : "NOT met")}'
awk '$11 - $7 > 10 {n++} $10 > m {m = $10} END {
    if (n) printf "\nWARNING: in %d runs other processes used >10%% of the server core (shared machine)\n", n
    if (m > 5) printf "WARNING: up to %.0f%% CPU steal by the host during runs\n", m }' "$RESULTS"
exit 0
