#!/usr/bin/env bash
# translate.sh - what a format-translating AI route costs: OpenAI clients calling model `fast`,
# served by an Anthropic-style provider, through ferrogate and through the LiteLLM proxy in the
# same run. CPU time per completion and p50 latency, one request at a time (c1) and with the
# gateway saturated (c64).
#
#   bench/ai/translate.sh                          # about 2 minutes
#   ROUNDS=5 bench/ai/translate.sh 2>&1 | tee bench/results/DATE-ai-translate.txt
#
# ../shared/bench/ai/ai-peers.sh measures the pass-through route (its providers speak OpenAI's
# format only); this is its sibling for translation. The provider is nginx answering
# POST /v1/messages from memory with a fixed Anthropic Messages reply (14 input and 12 output
# tokens), so everything measured in front of it is gateway work. Both gateways check the
# client's key; ferrogate also counts tokens against a per-minute limit and a daily budget and
# writes a usage record per request (as bench/ai-gateway.sh does); LiteLLM runs as ai-peers.sh
# runs it (no database, logging off). Each gateway alone on PROXY_CPU with one worker; wrk and
# the provider on LOAD_CPU. Issue 7's target: ferrogate's CPU per translated completion at
# most 1/30 of LiteLLM's.
#
# Environment: DURATION (6 s), WARMUP (2 s), ROUNDS (3), PROXY_CPU (1), LOAD_CPU (0),
# PORT_BASE (18190: provider; ferrogate +1, LiteLLM +2), FERROGATE (ferrogate),
# VENV_DIR (/tmp/ai-bench-venvs: LiteLLM's venv, as ai-peers.sh makes it; made here if missing),
# LITELLM_SPEC (litellm[proxy]==1.108.7).
#
# Needs: ferrogate (pip install .), nginx, wrk, taskset, setsid, ss, curl, pgrep, timeout, python3.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DURATION=${DURATION:-6}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-3}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
PORT_BASE=${PORT_BASE:-18190}
FERROGATE=${FERROGATE:-ferrogate}
VENV_DIR=${VENV_DIR:-/tmp/ai-bench-venvs}
LITELLM_SPEC=${LITELLM_SPEC:-litellm[proxy]==1.108.7}
CONNS=1

PROVIDER_PORT=$PORT_BASE
declare -A URL=([ferrogate]=http://127.0.0.1:$((PORT_BASE + 1)) [litellm]=http://127.0.0.1:$((PORT_BASE + 2)))
WORK=${TMPDIR:-/tmp}/ferrogate-bench-ai-translate-$(id -u)-$PORT_BASE
RESULTS=$WORK/results.txt

# shellcheck source=bench/lib.sh
source "$HERE/../lib.sh"

preflight "$FERROGATE" nginx wrk taskset setsid ss curl pgrep timeout python3 -- \
    "$PROVIDER_PORT" "$((PORT_BASE + 1))" "$((PORT_BASE + 2))"
ulimit -n "$(ulimit -Hn)"
LITELLM=$VENV_DIR/litellm/bin/litellm
if [ ! -x "$LITELLM" ]; then
    log "installing $LITELLM_SPEC into $VENV_DIR/litellm (once)"
    python3 -m venv "$VENV_DIR/litellm"
    "$VENV_DIR/litellm/bin/pip" install -q "$LITELLM_SPEC" >"$VENV_DIR/litellm.install.log" 2>&1 ||
        die "pip install failed; see $VENV_DIR/litellm.install.log"
fi
rm -rf "$WORK"
mkdir -p "$WORK/provider/tmp" "$WORK/home"
STARTED=1
chmod 755 "$WORK"

echo "# bench/ai/translate.sh $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc --all) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), kernel $(uname -r)"
rev=$(git -C "$HERE" describe --always --dirty 2>/dev/null || true)
if [ -n "$rev" ]; then echo "# source: git $rev"; fi
echo "# each gateway (1 worker) alone on cpu $PROXY_CPU; wrk (1 thread) + provider nginx on cpu $LOAD_CPU"
echo "# $("$VENV_DIR/litellm/bin/pip" list 2>/dev/null | awk '$1 == "litellm" {print "litellm " $2}'); $ROUNDS alternating rounds x ${DURATION}s after ${WARMUP}s warm-up"

# The provider: Anthropic's Messages API answered from memory (the body is read and ignored).
reply='{"id":"msg_01BenchInstant0000000000001","type":"message","role":"assistant","model":"claude-3-5-haiku-20241022","content":[{"type":"text","text":"Hello! This reply comes from the instant benchmark provider."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":14,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":12,"service_tier":"standard"}}'
cat >"$WORK/provider/nginx.conf" <<NGINX
daemon off;
worker_processes 1;
pid provider.pid;
error_log error.log error;
worker_rlimit_nofile 20000;
events { worker_connections 8192; }
http {
    access_log off;
    server_tokens off;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    client_body_buffer_size 64k;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    default_type application/json;
    server {
        listen 127.0.0.1:$PROVIDER_PORT backlog=4096;
        location = /v1/messages { return 200 '$reply\n'; }
        location = /ok { return 200 'ok\n'; }
    }
}
NGINX
start provider "$LOAD_CPU" nginx -p "$WORK/provider/" -c nginx.conf
wait_http "http://127.0.0.1:$PROVIDER_PORT/ok" || die "the provider did not start; see $WORK/provider/error.log"

cat >"$WORK/gateway.yaml" <<YAML
listen:
  - ${URL[ferrogate]#http://}
workers: 1
grace_period: 2s
consumers:
  bench:
    credentials: [{type: key-auth, key: sk-bench-1234}]
ai:
  deployments:
    - {name: claude, provider: anthropic, url: "http://127.0.0.1:$PROVIDER_PORT", model: claude-3-5-haiku-20241022, api_key: sk-provider-dummy}
  models:
    fast: [claude]
  prices:
    claude-3-5-haiku-20241022: {input: 0.80, output: 4.00}
  consumers:
    bench: {models: [fast], tpm: 1000000000, budget: {day: 1000000}}
  usage: {log: $WORK/usage.jsonl, metrics: false, analytics: false}
YAML
"$FERROGATE" check "$WORK/gateway.yaml" >"$WORK/check.log" 2>&1 ||
    die "the gateway config does not load: $(cat "$WORK/check.log")"
cat >"$WORK/litellm.yaml" <<YAML
model_list:
  - model_name: fast
    litellm_params:
      model: anthropic/claude-3-5-haiku-20241022
      api_base: http://127.0.0.1:$PROVIDER_PORT
      api_key: sk-provider-dummy
litellm_settings:
  callbacks: []
  success_callback: []
  failure_callback: []
  set_verbose: false
  json_logs: false
  turn_off_message_logging: true
  num_retries: 0
  request_timeout: 30
router_settings:
  num_retries: 0
general_settings:
  master_key: sk-bench-1234
  disable_spend_logs: true
  disable_error_logs: true
YAML

start ferrogate "$PROXY_CPU" "$FERROGATE" run -c "$WORK/gateway.yaml" --workers 1 --pid-file "$WORK/gateway.pid"
start litellm "$PROXY_CPU" env HOME="$WORK/home" XDG_CACHE_HOME="$WORK/home/.cache" \
    LITELLM_LOG=ERROR LITELLM_MODE=PRODUCTION LITELLM_LOCAL_MODEL_COST_MAP=True \
    LITELLM_LOCAL_BLOG_POSTS=True LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS=True \
    LITELLM_LOCAL_AUTOROUTER_PRESETS=True LITELLM_LOCAL_POLICY_TEMPLATES=True \
    "$LITELLM" --config "$WORK/litellm.yaml" --host 127.0.0.1 --port "${URL[litellm]##*:}" --num_workers 1

request='{"model":"fast","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":64,"temperature":0.7}'
chat() {  # URL: one completion, the reply on stdout
    curl -fsS --max-time 10 -H 'Authorization: Bearer sk-bench-1234' -H 'Content-Type: application/json' \
        -d "$request" "$1/v1/chat/completions"
}
for t in ferrogate litellm; do
    for _ in $(seq 900); do chat "${URL[$t]}" >"$WORK/$t.reply" 2>/dev/null && break; sleep 0.1; done
    check_alive
    # The gate: the provider's text, finish_reason and usage, translated to OpenAI's shape.
    python3 - "$WORK/$t.reply" "$t" <<'PY' || die "$t did not translate the reply (see $WORK/$t.reply)"
import json, sys
r = json.load(open(sys.argv[1]))
c = r["choices"][0]
assert r["object"] == "chat.completion", r
assert c["message"]["content"] == "Hello! This reply comes from the instant benchmark provider.", c
assert c["finish_reason"] == "stop", c
u = r["usage"]
assert (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (14, 12, 26), u
print(f"  {sys.argv[2]}: translated reply checked (content, finish_reason stop, usage 14+12)")
PY
done

write_report_lua
cat >>"$WORK/report.lua" <<LUA
wrk.method = "POST"
wrk.body = '$request'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-1234"
LUA

idle() {  # wait (up to 5 s) until the gateway core is quiet, so one target's tail is not the next one's cost
    local _ a b
    for _ in $(seq 50); do
        a=$(cpu_sample "$PROXY_CPU"); sleep 0.1; b=$(cpu_sample "$PROXY_CPU")
        awk -v a="$a" -v b="$b" 'BEGIN {split(a, x, " "); split(b, y, " "); t = y[3] - x[3];
            exit !(t > 0 && (y[1] - x[1]) / t < 0.05)}' && return 0
    done
    log "  the gateway core stayed busy for 5 s (another process on cpu $PROXY_CPU?)"
}
: >"$RESULTS"
for CONNS in 1 64; do
    for t in ferrogate litellm; do idle; wrk_run "$t-c$CONNS-warmup" "$t" "${URL[$t]}/v1/chat/completions" "$WARMUP"; done
    for n in $(seq "$ROUNDS"); do
        for t in ferrogate litellm; do
            idle
            wrk_run "$t-c$CONNS-r$n" "$t" "${URL[$t]}/v1/chat/completions" "$DURATION"
            echo "$t-c$CONNS $n $LAST" >>"$RESULTS"
            log "  c$CONNS round $n $t: $(awk '{printf "%s req/s, p50 %.2f ms, %s cpu us/req, err %s", $1, $2 / 1000, $7, $4}' <<<"$LAST")"
        done
    done
done

for c in 1 64; do
    echo
    echo "== c$c: wrk -t1 -c$c -d${DURATION}s, POST /v1/chat/completions (OpenAI in, Anthropic out), $ROUNDS rounds =="
    results_table target "gw%" "" "ferrogate-c$c" "litellm-c$c"
    f=$(col "ferrogate-c$c" 9 | median); l=$(col "litellm-c$c" 9 | median)
    awk -v f="$f" -v l="$l" 'BEGIN { if (f > 0) printf "cpu per completion: ferrogate / litellm = 1/%.0f\n", l / f }'
done
echo
echo "memory (RSS at the end, MiB): ferrogate $(($(for p in $(pgrep -g "${PGID[ferrogate]}"); do awk '/VmRSS/ {print $2}' "/proc/$p/status"; done | awk '{s += $1} END {print s + 0}') / 1024)), litellm $(($(for p in $(pgrep -g "${PGID[litellm]}"); do awk '/VmRSS/ {print $2}' "/proc/$p/status"; done | awk '{s += $1} END {print s + 0}') / 1024))"
