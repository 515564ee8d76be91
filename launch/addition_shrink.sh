#!/usr/bin/env bash
# Below 456 parameters: start from a trained adder (default: the released best_456p_s43.pt), shrink one factor
# per stage (truncated SVD, dba_jax/addition/shrink.py), fine-tune (configs/addition.py:456p+ft), and score every
# stage on the 100,000 held-out problems. Each stage starts from the previous stage's best checkpoint; the ladder
# stops at the first stage whose validation exact match stays below 0.99.
#   launch/addition_shrink.sh [CHECKPOINT] [WORKDIR]
source "$(dirname "$0")/env.sh"
SRC="${1:-../shared/fixtures/addition/best_456p_s43.pt}"
OUT="${2:-runs/addition_shrink}"
[ -f "$SRC" ] || [ -d "$SRC" ] || { echo "addition_shrink: no checkpoint at $SRC" >&2; exit 2; }
mkdir -p "$OUT"

# name : the overrides that stay in force from this stage on
STAGES=(
  "ffn2:--config.model.ffn_rank=2"
  "qkv2:--config.model.qkv_rank=2"
  "out1:--config.model.attn_out_rank=1"
  "pos2:--config.model.pos_rank=2"
  "ffn1:--config.model.ffn_rank=1"
)
overrides=()
for stage in "${STAGES[@]}"; do
  name="${stage%%:*}"
  overrides+=("${stage#*:}")
  dir="$OUT/$name"
  if [ ! -f "$dir/summary.json" ]; then
    python -m dba_jax.addition.train --config=configs/addition.py:456p+ft --workdir="$dir" \
      --config.train.init_from="$SRC" --config.train.seed=44 "${overrides[@]}"
  fi
  python -m dba_jax.addition.eval --checkpoint "$dir/model_0/best" --out "$dir/eval.json" > /dev/null
  if ! python - "$dir" <<'EOF'
import json, sys
s, e = json.load(open(f"{sys.argv[1]}/summary.json")), json.load(open(f"{sys.argv[1]}/eval.json"))
v = e["multi_seed_validation"]
print(f"{sys.argv[1]}: {e['parameters']} params, val {s['models'][0]['best_val_exact']:.4f}, "
      f"100k exact {v['aggregate_exact_match']:.5f} ({v['aggregate_errors']} errors)")
sys.exit(0 if s["models"][0]["best_val_exact"] >= 0.99 else 1)
EOF
  then
    echo "addition_shrink: $name did not reach 0.99 validation; stopping" >&2; exit 1
  fi
  SRC="$dir/model_0/best"
done
