#!/usr/bin/env bash
# Load benchmark of issue 19's layout: a mock upstream (nginx serving the recorded OpenAI
# fixtures) and the load generator (wrk) pinned to core 0, the gateway (`tollgate serve`, release
# build, bundled `openai` plugin pointed at nginx) alone on core 1. Per cell: requests/s, p50
# and p99 (wrk --latency), and the gateway's CPU per request (utime+stime from /proc/PID/stat
# over the cell, divided by the requests completed). Prints a markdown table.
#
#   tests/bench/load/run.sh                 # 5 s a cell
#   LOAD_SECONDS=8 TOLLGATE_BIN=path tests/bench/load/run.sh
#
# Cells: direct (nginx), json and stream, anonymous (a free model, screened) and billed (a
# funded key with limits and the default policy set, a priced model), at concurrency 1 and 64.
# Needs two cores. Installs wrk and nginx-light with apt-get if they are missing.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
secs="${LOAD_SECONDS:-5}"
warm="${LOAD_WARM_SECONDS:-1}"
gw_core="${LOAD_GATEWAY_CORE:-1}"
load_core="${LOAD_CLIENT_CORE:-0}"
port_json="${LOAD_PORT_BASE:-18180}"
port_stream=$((port_json + 1))
port_gw=$((port_json + 2))
port_op=$((port_json + 3))
port_bare=$((port_json + 4))

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  if [ "$(id -u)" = 0 ]; then apt-get install -y "${need[@]}" >&2; else sudo apt-get install -y "${need[@]}" >&2; fi
fi
nginx_bin="$(command -v nginx || echo /usr/sbin/nginx)"

bin="${TOLLGATE_BIN:-}"
if [ -z "$bin" ]; then
  (cd "$repo" && cargo build --release --bin tollgate >&2)
  bin="${CARGO_TARGET_DIR:-$repo/target}/release/tollgate"
fi
# The floor: a bare hyper proxy (tests/bench/load/bare_proxy.rs); LOAD_BARE=0 leaves it out.
bare="${LOAD_BARE_BIN:-}"
if [ -z "$bare" ] && [ "${LOAD_BARE:-1}" = 1 ]; then
  bare="$(cd "$repo" && cargo bench --no-run --bench bare_proxy 2>&1 | tee /dev/stderr \
    | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)"
  case "$bare" in /*|"") ;; *) bare="$repo/$bare" ;; esac
fi

work="$(mktemp -d /tmp/tollgate-load.XXXXXX)"
chmod 755 "$work"   # nginx workers (another user when started as root) read the fixtures
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# --- the mock upstream: nginx, one worker, on the load generator's core ---------------------
mkdir -p "$work/www" "$work/nginx"
cp "$repo/tests/fixtures/openai/chat.json" "$work/www/chat.json"
cp "$repo/tests/fixtures/openai/chat_stream.sse" "$work/www/chat_stream.sse"
cat > "$work/nginx/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  types { }
  # A POST to a static file is a 405; its error page (a GET) is the fixture, with status 200.
  server {
    listen 127.0.0.1:$port_json;
    default_type application/json;
    root $work/www;
    location / { error_page 405 =200 /chat.json; try_files /chat.json =404; }
  }
  server {
    listen 127.0.0.1:$port_stream;
    default_type text/event-stream;
    root $work/www;
    location / { error_page 405 =200 /chat_stream.sse; try_files /chat_stream.sse =404; }
  }
}
NGINX
taskset -c "$load_core" "$nginx_bin" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" &
pids+=($!)

# --- the gateway, alone on its core ----------------------------------------------------------
mkdir -p "$work/plugins" "$work/data"
cat > "$work/config.yaml" <<YAML
server: { listen: "127.0.0.1:$port_gw" }
operator: { listen: "127.0.0.1:$port_op" }
plugins: { dir: "$work/plugins", watch: false }
database: { url: "sqlite://$work/data/load.db" }   # in its own folder, as by default (data/)
moderation: { policies_dir: "$repo/policies", watch: false }
auth: { anonymous_models: [bench-json, bench-stream] }
channels:
  - { name: json, plugin: openai, base_url: "http://127.0.0.1:$port_json/v1", api_key_env: LOAD_UPSTREAM_KEY }
  - { name: stream, plugin: openai, base_url: "http://127.0.0.1:$port_stream/v1", api_key_env: LOAD_UPSTREAM_KEY }
models:
  - { name: bench-json, channel: json, upstream_model: gpt-4o-mini, free: true }
  - { name: bench-stream, channel: stream, upstream_model: gpt-4o-mini, free: true }
  - { name: bench-json-billed, channel: json, upstream_model: gpt-4o-mini, price: { input_per_token: 150000, output_per_token: 600000 } }
  - { name: bench-stream-billed, channel: stream, upstream_model: gpt-4o-mini, price: { input_per_token: 150000, output_per_token: 600000 } }
log: { filter: info, json: true }   # the default filter
YAML
export LOAD_UPSTREAM_KEY=sk-load
cli() { "$bin" "$@" --config "$work/config.yaml"; }
cli accounts create load >/dev/null
cli credits add load 1000000 >/dev/null
key="$(cli keys create --account load --name load --policy-set default \
  --requests-per-minute 10000000 --tokens-per-minute 10000000000 --concurrent-requests 1000 \
  --spend-per-day-usd 1000000 2>/dev/null | sed -n 's/.*"key": *"\([^"]*\)".*/\1/p')"
[ -n "$key" ] || { echo "no key created" >&2; exit 1; }

taskset -c "$gw_core" "$bin" serve --config "$work/config.yaml" >"$work/gateway.log" 2>&1 &
gw=$!
pids+=($gw)
if [ -n "$bare" ]; then
  BARE_LISTEN="127.0.0.1:$port_bare" BARE_UPSTREAM="127.0.0.1:$port_json" taskset -c "$gw_core" "$bare" >"$work/bare.log" 2>&1 &
  bare_pid=$!
  pids+=($bare_pid)
fi
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$port_op/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$port_op/readyz" >/dev/null || { cat "$work/gateway.log" >&2; exit 1; }

body() { printf '{"model":"%s","stream":%s,"messages":[{"role":"user","content":"Say hello in one short sentence."}]}' "$1" "$2"; }

# ticks of CPU (utime + stime) of a process, all its threads
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz="$(getconf CLK_TCK)"

# wrk's latency line ("50%  123.00us") in µs
to_us() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
    if (u == "us") m = 1; else if (u == "ms") m = 1000; else if (u == "s") m = 1000000; else m = 1;
    printf "%.0f", n * m }'
}

# one cell: URL, body, auth, concurrency, pid to measure (or "-")
cell() {
  local url="$1" body="$2" auth="$3" conc="$4" pid="$5" out t0 t1
  LOAD_BODY="$body" LOAD_AUTH="$auth" taskset -c "$load_core" wrk -t1 -c"$conc" -d"${warm}s" \
    -s "$here/post.lua" "$url" >/dev/null
  t0=0; [ "$pid" != - ] && t0="$(ticks "$pid")"
  out="$(LOAD_BODY="$body" LOAD_AUTH="$auth" taskset -c "$load_core" wrk -t1 -c"$conc" -d"${secs}s" \
    --latency -s "$here/post.lua" "$url")"
  t1=0; [ "$pid" != - ] && t1="$(ticks "$pid")"
  [ -n "${LOAD_DEBUG:-}" ] && echo "$url $conc: $out" >&2
  local reqs rps p50 p99 errs cpu
  reqs="$(echo "$out" | awk '/requests in/ {print $1}')"
  rps="$(echo "$out" | awk '/Requests\/sec/ {printf "%.0f", $2}')"
  p50="$(to_us "$(echo "$out" | awk '$1 == "50%" {print $2}')")"
  p99="$(to_us "$(echo "$out" | awk '$1 == "99%" {print $2}')")"
  errs="$(echo "$out" | awk '/Non-2xx/ {print $NF} /Socket errors/ {print $0}' | tr '\n' ' ')"
  if [ "$pid" != - ] && [ "${reqs:-0}" -gt 0 ]; then
    cpu="$(awk -v a="$t0" -v b="$t1" -v r="$reqs" -v hz="$hz" 'BEGIN { printf "%.0f", (b - a) / hz / r * 1e6 }')"
  else
    cpu="-"
  fi
  echo "$rps|$p50|$p99|$cpu|${errs:-0}"
}

gwurl="http://127.0.0.1:$port_gw/v1/chat/completions"
echo "load: ${secs}s a cell (after ${warm}s of warm-up), wrk -t1, gateway on core $gw_core, nginx and wrk on core $load_core, $(date -u +%FT%TZ), $("$bin" --version 2>/dev/null || echo tollgate)"
echo
echo "| target | mode | conc | rps | p50 µs | p99 µs | gateway CPU µs/req | errors |"
echo "|---|---|---:|---:|---:|---:|---:|---:|"
row() { # label mode conc result
  IFS='|' read -r rps p50 p99 cpu errs <<<"$4"
  echo "| $1 | $2 | $3 | $rps | $p50 | $p99 | $cpu | $errs |"
}
for mode in json stream; do
  port=$port_json; stream=false
  [ "$mode" = stream ] && { port=$port_stream; stream=true; }
  for conc in 1 64; do
    row "direct (nginx)" "$mode" "$conc" "$(cell "http://127.0.0.1:$port/v1/chat/completions" "$(body gpt-4o-mini $stream)" "" "$conc" -)"
    if [ -n "$bare" ] && [ "$mode" = json ]; then
      row "bare hyper proxy" "$mode" "$conc" "$(cell "http://127.0.0.1:$port_bare/v1/chat/completions" "$(body gpt-4o-mini $stream)" "" "$conc" "$bare_pid")"
    fi
    row "tollgate, no key" "$mode" "$conc" "$(cell "$gwurl" "$(body "bench-$mode" $stream)" "" "$conc" "$gw")"
    row "tollgate, key + limits + billing + screening" "$mode" "$conc" "$(cell "$gwurl" "$(body "bench-$mode-billed" $stream)" "Bearer $key" "$conc" "$gw")"
  done
done
if grep -q '"level":"ERROR"' "$work/gateway.log"; then
  echo; echo "gateway errors:"; grep '"level":"ERROR"' "$work/gateway.log" | head -5
fi
