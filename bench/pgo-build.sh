#!/usr/bin/env bash
# pgo-build.sh - build a profile-guided (PGO) wheel of ferrogate for this machine's toolchain.
#
#   bash bench/pgo-build.sh            # -> dist/ferrogate-*.whl
#
# 1. a wheel whose Rust code counts what runs (-Cprofile-generate);
# 2. that gateway proxies a training load (wrk: small GETs at 64 and 256 connections, POSTs
#    with a body, unmatched paths) to its built-in echo upstream, and exits;
# 3. the counts are merged and the wheel is built again with them (-Cprofile-use), so LLVM
#    lays out and inlines the request path as it actually runs.
#
# Why it is a script and not the default build: the profile belongs to one LLVM version and
# one revision of the source (docs/benchmarks.md has what it buys). Needs wrk and the
# toolchain's llvm-profdata (`rustup component add llvm-tools`). Python dependencies come from
# the environment running the script (the training venv sees its site-packages).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[%3ds] %s\n' "$SECONDS" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

PYTHON=${PYTHON:-python}
PORT=${PGO_PORT:-18290}
ECHO_PORT=$((PORT + 1))
OUT=${PGO_OUT:-dist}
# one target dir per phase, kept between runs: a rebuild after a small change is incremental
TARGETS=${PGO_TARGET_DIR:-$PWD/target/pgo}

command -v wrk >/dev/null || die "wrk is missing (apt-get install wrk)"
profdata=$(find "$(rustc --print sysroot)" -name llvm-profdata -type f 2>/dev/null | head -1)
[ -n "$profdata" ] || die "llvm-profdata is missing: rustup component add llvm-tools"

work=$(mktemp -d "${TMPDIR:-/tmp}/ferrogate-pgo.XXXXXX")
gateway=
cleanup() {
    local rc=$?
    if [ -n "$gateway" ]; then kill -TERM -- "-$gateway" 2>/dev/null || true; fi
    if [ "$rc" = 0 ]; then rm -rf "$work"; else log "logs in $work"; fi
}
trap cleanup EXIT

log "1/3 instrumented wheel"
RUSTFLAGS="-Cprofile-generate=$work/raw" CARGO_TARGET_DIR=$TARGETS/generate \
    "$PYTHON" -m pip wheel --no-deps -q -w "$work/generate" . >"$work/generate.log" 2>&1 ||
    die "the instrumented build failed; see $work/generate.log"
rm -rf "$work/raw"   # counts from build scripts run during the build
"$PYTHON" -m venv --system-site-packages "$work/venv"
"$work/venv/bin/pip" install -q --no-deps --force-reinstall "$work"/generate/ferrogate-*.whl

log "2/3 training load"
cat >"$work/gateway.yaml" <<YAML
listen:
  - 127.0.0.1:$PORT
workers: 1
grace_period: 2s
echo:
  listen: 127.0.0.1:$ECHO_PORT
upstreams:
  echo:
    targets:
      - 127.0.0.1:$ECHO_PORT
    keepalive: 1024
routes:
  - name: api
    paths: ["/api/*"]
    upstream: echo
YAML
cat >"$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = string.rep('{"id":1,"name":"ferrogate"},', 40)
LUA
# every process writes its own counts (%p), flushed when it exits
LLVM_PROFILE_FILE="$work/raw/%p-%m.profraw" setsid "$work/venv/bin/ferrogate" run -c "$work/gateway.yaml" \
    --pid-file "$work/gateway.pid" >"$work/gateway.log" 2>&1 &
gateway=$!
for _ in $(seq 100); do
    curl -fs -o /dev/null "http://127.0.0.1:$PORT/api/ready" && break
    sleep 0.1
done
curl -fs -o /dev/null "http://127.0.0.1:$PORT/api/ready" || die "the gateway did not start; see $work/gateway.log"
url=http://127.0.0.1:$PORT
wrk -t1 -c64 -d8s "$url/api/items?page=2" >/dev/null
wrk -t1 -c256 -d8s "$url/api/items" >/dev/null
wrk -t1 -c32 -d4s -s "$work/post.lua" "$url/api/items" >/dev/null
wrk -t1 -c8 -d2s "$url/elsewhere" >/dev/null
kill -TERM -- "-$gateway"
for _ in $(seq 100); do kill -0 "$gateway" 2>/dev/null || break; sleep 0.1; done
gateway=
"$profdata" merge -o "$work/ferrogate.profdata" "$work"/raw/*.profraw

log "3/3 optimized wheel"
mkdir -p "$OUT"
RUSTFLAGS="-Cprofile-use=$work/ferrogate.profdata" CARGO_TARGET_DIR=$TARGETS/use \
    "$PYTHON" -m pip wheel --no-deps -q -w "$OUT" . >"$work/use.log" 2>&1 ||
    die "the optimized build failed; see $work/use.log"
log "done: $(ls -t "$OUT"/ferrogate-*.whl | head -1) (install it with pip install --force-reinstall)"
