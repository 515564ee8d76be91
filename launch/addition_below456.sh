#!/usr/bin/env bash
# Issue 18, addition below 456 parameters from scratch: each config (default 401p, then 302p) trains 8 seeds in
# one jitted step, then every seed's best checkpoint is scored on the 100,000 held-out problems and one table
# lists every seed's grokking steps and scores. Resumable: a run killed at any point continues from its last
# evaluation with the same command; finished runs and evaluations are kept.
#   launch/addition_below456.sh [WORKDIR]      (about 1.5 h per config for 8 seeds on one core)
#   VARIANTS="401p" SEEDS=8 launch/addition_below456.sh
source "$(dirname "$0")/env.sh"
W="${1:-runs/addition_below456}"
VARIANTS="${VARIANTS:-401p 302p}"
SEEDS="${SEEDS:-8}"
mkdir -p "$W"
runs=()
for v in $VARIANTS; do
  dir="$W/$v"
  [ -f "$dir/summary.json" ] || dba-addition-train --config="configs/addition.py:$v" --workdir="$dir" \
      --config.train.num_models="$SEEDS"
  [ -f "$dir/eval100k.json" ] || dba-addition-eval --checkpoint "$dir" --out "$dir/eval100k.json" > /dev/null
  runs+=("$dir")
done
dba-addition-report "${runs[@]}" --out "$W/report.md" --force
