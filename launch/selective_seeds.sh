#!/usr/bin/env bash
# Issue 18, selective attention: every variant of configs/selective_quick.py over 5 seeds (T 256), selective vs
# unselective at T 512, then the pruning claim per seed and context: the smallest per-layer KV budgets (real
# eviction while decoding) whose loss stays within the unselective model's, and within 1 % of the model's own.
# Resumable: finished runs and existing prune results are kept; stop it any time and run it again.
#   launch/selective_seeds.sh [WORKDIR]        (about 3 h on a 2-core CPU; results in WORKDIR/*.md)
source "$(dirname "$0")/env.sh"
W="${1:-runs/seeds}"
SEEDS="${SEEDS:-0 1 2 3 4}"
JOBS="${JOBS:-2}"
run() { dba-seeds run --config=configs/selective_quick.py --seeds $SEEDS --jobs "$JOBS" "$@"; }
run --variants selective unselective --workdir "$W/quick"
run --variants selective_t512 unselective_t512 --workdir "$W/t512"
run --variants leaky protect mempen --workdir "$W/quick"
dba-seeds report --workdir "$W/quick" --baseline unselective --force
dba-seeds report --workdir "$W/t512" --baseline unselective_t512 --force
mkdir -p "$W/pruning"
for s in $SEEDS; do
  for pair in "quick:selective:unselective:256:32" "t512:selective_t512:unselective_t512:512:16"; do
    IFS=: read -r dir sel unsel T windows <<< "$pair"
    out="$W/pruning/T${T}_seed$s.json"
    [ -f "$out" ] || dba-eval prune --checkpoint "$W/$dir/$sel/seed$s" --target-from "$W/$dir/$unsel/seed$s" \
        --per-layer --within 0.01 --max-windows "$windows" --ratios 1,0.5,0.25,0.125,0.0625,0.03125 \
        --out "$out" > /dev/null
  done
done
dba-seeds pruning "$W"/pruning/T*_seed*.json --out "$W/pruning/summary.md" --force
