#!/usr/bin/env bash
# Instruction counts of one request through the whole gateway (tests/bench/pipeline.rs) under
# `valgrind --tool=callgrind`, broken down by step: inclusive counts of the step functions over
# the measured requests, divided by their number. Deterministic on a shared machine: the judge
# for every change to the request path.
#
#   tests/bench/callgrind.sh                  # the four cells, 200 requests each
#   CG_REQUESTS=50 CG_CELLS="key-json" tests/bench/callgrind.sh
#   CG_BIN=path/to/pipeline-bench tests/bench/callgrind.sh   # another build's bench binary
#   CG_KEEP=dir                                # keep the callgrind files there
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
n="${CG_REQUESTS:-200}"
cells="${CG_CELLS:-anon-json key-json anon-stream key-stream}"
bin="${CG_BIN:-}"
if [ -z "$bin" ]; then
  bin="$(cd "$repo" && cargo bench --no-run --bench pipeline 2>&1 | tee /dev/stderr \
    | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)"
  case "$bin" in /*) ;; *) bin="$repo/$bin" ;; esac
fi
out="${CG_KEEP:-$(mktemp -d /tmp/tollgate-cg.XXXXXX)}"
mkdir -p "$out"

# The report: instructions per request in the gateway (the whole process between the marks,
# minus the bench's own client and mock), by area (self cost, grouped by crate: robust to the
# plugin calls' fiber switches, which confuse callgrind's call tree) and by step (inclusive cost
# of the step's function; the largest entry when callgrind lists it under several files).
report() { # cell n file
  python3 - "$@" <<'PY'
import re, subprocess, sys
cell, n, f = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def annotate(inclusive):
    out = subprocess.run(["callgrind_annotate", f"--inclusive={inclusive}", "--threshold=100",
                          "--auto=no", f], capture_output=True, text=True).stdout
    rows = []
    for l in out.split("\n"):
        m = re.match(r"^\s*([\d,]+) \([^)]*\)\s+(.*)$", l)
        if m and "PROGRAM TOTALS" not in l:
            name = re.sub(r"\s*\[[^\]]*\]$", "", re.sub(r"^[^:]*:", "", m.group(2))).strip()
            rows.append((int(m.group(1).replace(",", "")), name))
    return rows
total = int(re.search(r"^summary:\s*(\d+)", open(f).read(), re.M).group(1))
incl = annotate("yes")
def step(p):
    return max([v for v, name in incl if re.search(p, name)] or [0])
side = step(r"^pipeline::client_request\b") + step(r"^pipeline::mock_connection\b")
steps = [
    ("gateway, whole request", None),
    ("authenticate (key hash, cache)", r"^tollgate::server::caller_of::\{\{closure\}\}"),
    ("body parse (JSON)", r"^tollgate::pipeline::Body::parse\b"),
    ("admission (route, tokens, estimate, limits)", r"^tollgate::pipeline::admission::admit::\{\{closure\}\}"),
    ("  of which the prompt's token count", r"^tollgate::pipeline::tokens::chat\b"),
    ("screening rules", r"^tollgate::moderation::Moderator::rules\b"),
    ("screening, with the policy plugin (fibers: approximate)", r"^tollgate::pipeline::screen::screen::\{\{closure\}\}"),
    ("plugin instance (provider)", r"^tollgate::plugins::session::<impl tollgate::plugins::Plugin>::session::\{\{closure\}\}"),
    ("plugin stores dropped (instance reset)", r"^core::ptr::drop_in_place<wasmtime::runtime::store::StoreInner<tollgate::plugins::GuestState>>"),
    ("upstream URL join", r"^tollgate::upstream::join\b"),
    ("settle + cost into the answer", r"^tollgate::pipeline::money::Bill::settle_json::\{\{closure\}\}"),
    ("charge journal → ledger (writer task)", r"^tollgate::billing::owned::writer::write_loop::\{\{closure\}\}"),
]
out = []
for name, p in steps:
    out.append((name, (total - side) // n if p is None else step(p) // n))
areas = [("wasm guest code (JIT)", r"^0x[0-9a-f]+"), ("wasmtime, cranelift runtime", r"wasmtime|cranelift"),
         ("memset", r"memset"), ("memcpy/memmove", r"memmove|memcpy"),
         ("malloc/free", r"^(malloc|free|_int_|cfree|calloc|realloc|malloc_consolidate|unlink_chunk|__rdl_|__rust_)"),
         ("SQLite", r"^sqlite3|^walChecksum|^pcache|^btree|^sqlite"), ("serde_json", r"serde_json"),
         ("hyper, http, httparse", r"hyper|^<?http::|httparse|h2::"), ("tokio", r"tokio"),
         ("regex, aho-corasick, memchr", r"regex|aho_corasick|memchr"), ("tracing", r"tracing"),
         ("axum, tower", r"axum|tower"), ("sqlx", r"sqlx"), ("reqwest, url, idna", r"reqwest|url::|idna"),
         ("tollgate", r"tollgate")]
self_rows = annotate("no")
skip = r"^(clone|start_thread|\(below main\)|main|__libc_start|0x000000000001ab70)$|thread_start|call_once\{\{vtable|lang_start|__rust_begin_short|^pipeline::|^std::thread::local::LocalKey<T>::with"
sums = {a: 0 for a, _ in areas}
sums["other"] = 0
for v, name in self_rows:
    if re.search(skip, name) or "tests/bench" in name:
        continue
    for a, p in areas:
        if re.search(p, name):
            sums[a] += v
            break
    else:
        sums["other"] += v
for a in sorted(sums, key=lambda a: -sums[a]):
    out.append(("area: " + a, sums[a] // n))
with open(f + ".table", "w") as t:
    for name, v in out:
        t.write(f"{name}\t{v}\n")
PY
}

for c in $cells; do
  key=0; stream=0
  case "$c" in key-*) key=1 ;; esac
  case "$c" in *-stream) stream=1 ;; esac
  f="$out/$c.cg"
  if [ -z "${CG_REUSE:-}" ] || [ ! -f "$f.2" ]; then
    PIPELINE_REQUESTS="$n" PIPELINE_KEY="$key" PIPELINE_STREAM="$stream" \
      valgrind --tool=callgrind --dump-before='*bench_mark*' --callgrind-out-file="$f" "$bin" \
      >"$out/$c.log" 2>&1 || { cat "$out/$c.log" >&2; exit 1; }
  fi
  # the measured requests are the second dump
  report "$c" "$n" "$f.2"
done
printf '| instructions per request |'
for c in $cells; do printf ' %s |' "$c"; done
echo
printf '|---|'; for _ in $cells; do printf -- '---:|'; done; echo
first="$(set -- $cells; echo "$1")"
cut -f1 "$out/$first.cg.2.table" | while IFS= read -r name; do
  printf '| %s |' "$name"
  for c in $cells; do
    v="$(awk -F'\t' -v k="$name" '$1 == k {print $2}' "$out/$c.cg.2.table")"
    printf " %'d |" "${v:-0}"
  done
  echo
done
echo
echo "($n measured requests a cell after 20 of warm-up, one at a time; callgrind files in $out)"
