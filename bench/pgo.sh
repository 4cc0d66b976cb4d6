#!/usr/bin/env bash
# Regenerates the profile that release builds are optimised with (pgo/x86_64-unknown-linux-gnu.profdata,
# handed to rustc by scripts/build-native.mjs). Usage: bench/pgo.sh [--no-tests]
#
# 1. Builds the addon instrumented (-Cprofile-generate, its own target directory) in place of the
#    root build; 2. drives it with the benchmark's traffic: HTTP/1.1 keep-alive and new connections,
#    HTTPS keep-alive and new connections, HTTP/2 over TLS, 1 MiB responses, raw TCP; 3. runs the
#    TypeScript tests on it (unless --no-tests), so every feature's code has counts and none is
#    laid out as never-run; 4. merges the counts (sparse) into the profile; 5. rebuilds the addon
#    normally, with the new profile.
#
# Rerun it after changes to the request paths: a function whose code changed since the profile
# was taken is optimised without it (rustc says nothing), so a stale profile loses the gain where
# the code moved, and only there. Needs nginx, wrk, h2load, iperf3 and rustup's llvm-tools
# component (for llvm-profdata of rustc's own LLVM).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
run_tests=1
[ "${1:-}" = --no-tests ] && run_tests=0
sysroot="$(rustc --print sysroot)"
profdata="$(ls "$sysroot"/lib/rustlib/*/bin/llvm-profdata 2>/dev/null | head -1 || true)"
if [ -z "$profdata" ]; then
  rustup component add llvm-tools >/dev/null
  profdata="$(ls "$sysroot"/lib/rustlib/*/bin/llvm-profdata | head -1)"
fi
for tool in nginx wrk h2load iperf3; do
  command -v "$tool" >/dev/null || { echo "pgo.sh: $tool is missing" >&2; exit 2; }
done
work="$(mktemp -d)"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { node -e "const s=require('net').createServer().listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})"; }
wait_port() { for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

echo "pgo.sh: instrumented build"
# RUSTFLAGS takes precedence over the target's flags: the instrumented build ignores the old profile.
RUSTFLAGS="-Cprofile-generate=$work/raw" CARGO_TARGET_DIR="$root/target/pgo-generate" \
  node scripts/build-native.mjs --release > "$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }
npx tsc -p tsconfig.json

backend_port="$(free_port)"
mkdir -p "$work/nginx/logs" "$work/www"
head -c 1048576 /dev/zero > "$work/www/1m.bin"
cat > "$work/nginx/nginx.conf" <<CONF
worker_processes 1; daemon off; pid nginx.pid; error_log logs/error.log crit;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; sendfile on;
  server { listen 127.0.0.1:$backend_port; root $work/www;
    location = /1m.bin { }
    location / { return 200 "ok"; } } }
CONF
nginx -p "$work/nginx" -c nginx.conf & pids+=($!)
iperf_port="$(free_port)"
iperf3 -s -p "$iperf_port" > /dev/null 2>&1 & pids+=($!)
wait_port "$backend_port"; wait_port "$iperf_port"
tls="$work/tls"; mkdir -p "$tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=bench.test -days 2 \
  -keyout "$tls/key.pem" -out "$tls/cert.pem" > /dev/null 2>&1

# Starts the proxy in a mode of bench/proxy-smartproxy.mjs, runs the load, stops it cleanly (the
# counts are written as the process exits).
drive() {
  local mode="$1" backend="$2"; shift 2
  local port; port="$(free_port)"
  node bench/proxy-smartproxy.mjs "$port" "$backend" "$mode" "$tls/cert.pem" "$tls/key.pem" > "$work/proxy.log" 2>&1 &
  local proxy=$!
  wait_port "$port"
  "$@" "$port"
  kill -TERM "$proxy"; wait "$proxy" 2>/dev/null || true
}
http_loads() {
  wrk -t1 -c32 -d3s -H 'Host: bench.test' "http://127.0.0.1:$1/" > /dev/null
  wrk -t1 -c512 -d2s -H 'Host: bench.test' "http://127.0.0.1:$1/" > /dev/null
  wrk -t1 -c32 -d2s -H 'Host: bench.test' -H 'Connection: close' "http://127.0.0.1:$1/" > /dev/null
  wrk -t1 -c8 -d2s -H 'Host: bench.test' "http://127.0.0.1:$1/1m.bin" > /dev/null
}
https_loads() {
  wrk -t1 -c32 -d3s "https://127.0.0.1:$1/" > /dev/null
  wrk -t1 -c32 -d2s -H 'Connection: close' "https://127.0.0.1:$1/" > /dev/null
  h2load -t1 -c16 -m10 -D 3 "https://127.0.0.1:$1/" > /dev/null
}
tcp_loads() {
  iperf3 -c 127.0.0.1 -p "$1" -n 512M > /dev/null
  iperf3 -c 127.0.0.1 -p "$1" -n 512M -R > /dev/null
}
echo "pgo.sh: traffic"
drive http "$backend_port" http_loads
drive https "$backend_port" https_loads
drive tcp "$iperf_port" tcp_loads
if [ "$run_tests" = 1 ]; then
  echo "pgo.sh: tests"
  # For coverage, not verdicts: a test that fails here (the instrumented build is slower) has
  # still run its code.
  LLVM_PROFILE_FILE="$work/raw/tests-%m.profraw" node scripts/run-tests.mjs --no-cargo > "$work/tests.log" 2>&1 || true
  echo "pgo.sh: tests: $(tail -1 "$work/tests.log")"
fi

mkdir -p pgo
"$profdata" merge --sparse -o pgo/x86_64-unknown-linux-gnu.profdata "$work"/raw/*.profraw
echo "pgo.sh: $(du -h pgo/x86_64-unknown-linux-gnu.profdata | cut -f1) profile written; rebuilding with it"
node scripts/build-native.mjs --release > "$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }
npx tsc -p tsconfig.json
