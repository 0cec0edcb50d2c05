#!/usr/bin/env bash
# The scorer's held-out figures: for each of K folds (by the md5 of the text), train weights
# without that fold, build the plugin with them, and let `tollgate policy eval` screen every
# fold with the plugin that never saw it.
#
#   plugins/policy_scorer/train/heldout.sh DATA.jsonl OUT [K]
#   tollgate policy eval DATA.jsonl --folds K --plugins --plugin-dir 'OUT/fold{fold}'
#
# The fold builds use their own target folder (OUT/target): the bundled plugin keeps the
# shipped weights.
set -euo pipefail
data=$(realpath "$1")
out=$(realpath -m "$2")
k=${3:-5}
here=$(cd "$(dirname "$0")" && pwd)
plugins=$(cd "$here/../.." && pwd)
mkdir -p "$out"
for ((i = 0; i < k; i++)); do
  mkdir -p "$out/fold$i"
  [ -e "$out/fold$i/weights.bin" ] || (cd "$here" && python3 train.py "$data" --out "$out/fold$i/weights.bin" --folds "$k" --except-fold "$i")
  POLICY_SCORER_WEIGHTS="$out/fold$i/weights.bin" CARGO_TARGET_DIR="$out/target" \
    cargo build --quiet --release --target wasm32-wasip2 --manifest-path "$plugins/Cargo.toml" -p policy_scorer
  cp "$out/target/wasm32-wasip2/release/policy_scorer.wasm" "$out/fold$i/policy_scorer.wasm"
done
echo "now: tollgate policy eval $data --folds $k --plugins --plugin-dir '$out/fold{fold}'"
