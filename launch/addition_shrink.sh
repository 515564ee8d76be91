#!/usr/bin/env bash
# Below 456 parameters: start from a trained adder (default: the released best_456p_s43.pt), shrink one thing
# per stage (a rank by truncated SVD; last, the exact folds: block norm weights into the next linears and
# shareA_tieKV's q/k/v products into shareA_folded; see dba_jax/addition/shrink.py),
# fine-tune (configs/addition.py:456p+ft), and score every stage on the 100,000 held-out problems.
# Greedy: each stage starts from the last accepted stage's best checkpoint; a stage whose validation exact
# match stays below 0.99 is rejected (reported, its change dropped) and the ladder goes on with the next one.
#   launch/addition_shrink.sh [CHECKPOINT] [WORKDIR]
source "$(dirname "$0")/env.sh"
SRC="${1:-../shared/fixtures/addition/best_456p_s43.pt}"
OUT="${2:-runs/addition_shrink}"
[ -f "$SRC" ] || [ -d "$SRC" ] || { echo "addition_shrink: no checkpoint at $SRC" >&2; exit 2; }
mkdir -p "$OUT"

# name : the override this stage adds to those of every accepted stage before it
STAGES=(
  "ffn2:--config.model.ffn_rank=2"
  "qkv2:--config.model.qkv_rank=2"
  "out1:--config.model.attn_out_rank=1"
  "pos2:--config.model.pos_rank=2"
  "ffn1:--config.model.ffn_rank=1"
  "pos1:--config.model.pos_rank=1"
  "fold:--config.model.block_norm_weight=False --config.model.tie_qkv=shareA_folded"
)
overrides=()
for stage in "${STAGES[@]}"; do
  name="${stage%%:*}"
  dir="$OUT/$name"
  if [ ! -f "$dir/summary.json" ]; then
    python -m dba_jax.addition.train --config=configs/addition.py:456p+ft --workdir="$dir" \
      --config.train.init_from="$SRC" --config.train.seed=44 "${overrides[@]}" ${stage#*:}  # unquoted: a stage may add several flags
  fi
  val=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["models"][0]["best_val_exact"])' \
    "$dir/summary.json")
  if ! python -c 'import sys; sys.exit(float(sys.argv[1]) < 0.99)' "$val"; then
    echo "addition_shrink: $name rejected (best validation exact match $val < 0.99)"; continue
  fi
  python -m dba_jax.evals.addition --checkpoint "$dir/model_0/best" --out "$dir/eval.json" > /dev/null
  python -c 'import json, sys; e = json.load(open(sys.argv[1])); v = e["multi_seed_validation"]
print("addition_shrink: %s accepted: %d params, validation %s, 100k exact match %.5f (%d errors)" % (
    sys.argv[2], e["parameters"], sys.argv[3], v["aggregate_exact_match"], v["aggregate_errors"]))' \
    "$dir/eval.json" "$name" "$val"
  overrides+=(${stage#*:})
  SRC="$dir/model_0/best"
done
