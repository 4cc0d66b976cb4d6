#!/usr/bin/env bash
# Instructions per request of our proxy process (user space, all threads), counted by callgrind: a
# measure this noisy VM cannot blur (repeat runs agree within 0.1 %), for changes too small to
# show in req/s. Usage: bench/instructions.sh [MODE ...] (modes of bench/proxy-smartproxy.mjs;
# default: http http-affinity http-affinity-redis). Needs valgrind, nginx, redis-server, h2load and
# a release build (pnpm build). Every request carries `X-Session: bench-session`, so the modes
# differ by the feature alone. Per mode: 2,000 unmeasured requests, then N (INSTR_REQUESTS, default
# 10000) keep-alive requests over 32 connections (h2load --h1); the count covers exactly those.
# Mode `haproxy` counts HAProxy run the same way (nbthread 1, option http-keep-alive, http-reuse
# always, option forwardfor; needs haproxy), so the two figures can be compared within one run.
# Mode `nginx` counts an nginx proxy the same way (one process: `master_process off`, so valgrind
# follows the process that serves; upstream `keepalive 1024`, HTTP/1.1, X-Forwarded-For: the
# configuration of bench/run.mjs).
# With KEEP_DIR set, the callgrind files stay there (callgrind.MODE.*) for callgrind_annotate.
# CALLGRIND_ARGS adds options to our proxy's valgrind (e.g. --dump-instr=yes for callgrind_annotate).
# With INSTR_CACHE=1 callgrind also simulates the caches (--cache-sim=yes, level 1 as this CPU's)
# and each mode's line adds its level-1 instruction and data misses and its data writes per
# request: how much memory a request touches, which costs more than its instructions when other
# work shares the cache.
# With INSTR_NEWCONN=1 the requests come one per connection (see below). INSTR_CONNS sets the
# keep-alive connections (default 32): with many, each connection's own state is cold when its
# next request comes, and the cache misses show it.
# With INSTR_H2=1 the client speaks HTTP/2 over cleartext (prior knowledge; h2load -c16 -m10)
# to the proxy, which still forwards HTTP/1.1 to the backend: the HTTP/2 front end's cost.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
requests="${INSTR_REQUESTS:-10000}"
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(http http-affinity http-affinity-redis)
for tool in valgrind callgrind_control nginx redis-server redis-cli h2load curl; do
  command -v "$tool" >/dev/null || { echo "instructions.sh: $tool is missing" >&2; exit 2; }
done
if [ -n "${KEEP_DIR:-}" ]; then work="$KEEP_DIR"; rm -rf "$work"; mkdir -p "$work"; else work="$(mktemp -d)"; fi
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; [ -n "${KEEP_DIR:-}" ] || rm -rf "$work"; }
trap cleanup EXIT
free_port() { node -e "const s=require('net').createServer().listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})"; }
wait_port() { for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

backend_port="$(free_port)"
mkdir -p "$work/nginx/logs"
cat > "$work/nginx/nginx.conf" <<CONF
worker_processes 1; daemon off; pid nginx.pid; error_log logs/error.log crit;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$backend_port; location / { return 200 "ok"; } } }
CONF
nginx -p "$work/nginx" -c nginx.conf & pids+=($!)
redis_port="$(free_port)"
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null & pids+=($!)
wait_port "$backend_port"; wait_port "$redis_port"

header=(-H 'X-Session: bench-session')
if [ "${INSTR_CACHE:-0}" = 1 ]; then CALLGRIND_ARGS="${CALLGRIND_ARGS:-} --cache-sim=yes"; fi
if [ "${INSTR_H2:-0}" = 1 ]; then load=(-c 16 -m 10); else load=(--h1 -c "${INSTR_CONNS:-32}"); fi
# With INSTR_NEWCONN=1 each request comes on a new connection (`Connection: close`, which h2load
# answers by connecting again): accept, the first request and the close, per request.
if [ "${INSTR_NEWCONN:-0}" = 1 ]; then load=(--h1 -c 8); header+=(-H 'Connection: close'); fi
for mode in "${modes[@]}"; do
  port="$(free_port)"
  out="$work/callgrind.$mode"
  if [ "$mode" = haproxy ]; then
    command -v haproxy >/dev/null || { echo "instructions.sh: haproxy is missing" >&2; exit 2; }
    printf '%s\n' 'global' '  nbthread 1' 'defaults' '  mode http' '  timeout connect 5s' '  timeout client 60s' \
      '  timeout server 60s' '  option http-keep-alive' '  option forwardfor' '  http-reuse always' \
      'frontend bench' "  bind 127.0.0.1:$port" '  default_backend be' 'backend be' "  server s1 127.0.0.1:$backend_port" > "$work/haproxy.cfg"
    valgrind --tool=callgrind ${CALLGRIND_ARGS:-} --callgrind-out-file="$out" haproxy -db -f "$work/haproxy.cfg" > "$work/proxy.log" 2>&1 &
  elif [ "$mode" = nginx ]; then
    mkdir -p "$work/nginx-proxy/logs"
    cat > "$work/nginx-proxy/nginx.conf" <<CONF
worker_processes 1; master_process off; daemon off; pid nginx.pid; error_log logs/error.log crit;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 75s;
  upstream be { server 127.0.0.1:$backend_port; keepalive 1024; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$port; server_name bench.test;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; proxy_max_temp_file_size 0; } } }
CONF
    valgrind --tool=callgrind ${CALLGRIND_ARGS:-} --callgrind-out-file="$out" nginx -p "$work/nginx-proxy" -c nginx.conf > "$work/proxy.log" 2>&1 &
  else
    BENCH_REDIS_URL="redis://127.0.0.1:$redis_port" valgrind --tool=callgrind ${CALLGRIND_ARGS:-} --callgrind-out-file="$out" \
      node "$root/bench/proxy-smartproxy.mjs" "$port" "$backend_port" "$mode" > "$work/proxy.log" 2>&1 &
  fi
  proxy=$!
  wait_port "$port"
  curl -s "${header[@]}" "http://127.0.0.1:$port/" > /dev/null
  h2load -n 2000 "${load[@]}" "${header[@]}" "http://127.0.0.1:$port/" > /dev/null
  callgrind_control -d "$proxy" > /dev/null 2>&1   # part 1: start-up and warm-up
  done_line="$(h2load -n "$requests" "${load[@]}" "${header[@]}" "http://127.0.0.1:$port/" | grep 'requests:')"
  callgrind_control -d "$proxy" > /dev/null 2>&1   # part 2: the measured requests
  kill "$proxy"; wait "$proxy" 2>/dev/null || true
  succeeded="$(sed -E 's/.* ([0-9]+) succeeded.*/\1/' <<<"$done_line")"
  [ "$succeeded" = "$requests" ] || { echo "$mode: only $succeeded of $requests requests succeeded" >&2; exit 1; }
  total="$(grep -h '^summary:' "$out.2" | awk '{print $2}')"
  misses=""
  if [ "${INSTR_CACHE:-0}" = 1 ]; then
    # events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
    misses="$(grep -h '^summary:' "$out.2" | awk -v n="$requests" '{printf ", %.0f L1 instruction misses, %.0f L1 data misses (%.0f on reads, %.0f on writes), %.0f data writes, %.0f last-level data misses", $5/n, ($6+$7)/n, $6/n, $7/n, $4/n, ($9+$10)/n}')"
  fi
  echo "$mode: $(( total / requests )) instructions per request$misses"
done
