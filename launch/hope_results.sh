#!/usr/bin/env bash
# HOPE / Titans results at CPU size (the table in BUILD_NOTES.md "HOPE / Titans results"): every variant of
# configs/hope.py trained STEPS steps on the same data, then passkey / NIAH at 1x, 2x and 4x the training length and
# the continual eval, each with and without memory. Rerun the same command to resume: finished runs and evals are
# kept (dba-train resumes a workdir; an existing eval JSON is not redone).
#   launch/hope_results.sh [OUT_DIR] [STEPS] [VARIANTS...]
source "$(dirname "$0")/env.sh"
OUT="${1:-runs/hope_results}"; STEPS="${2:-300}"; shift $(( $# < 2 ? $# : 2 ))
VARIANTS=("$@")
[ ${#VARIANTS[@]} -gt 0 ] || VARIANTS=(transformer attention selfmod hybrid titans_mac titans_mag titans_mal)
SAMPLES="${SAMPLES:-512}"  # prompts per length: fresh per checkpoint (seeded by its step)
# The training data: passkey documents (1-12 filler sentences) mixed half and half with stdlib text, T 256.
DATA=(--config.data.source=synthetic --config.data.generator=passkey --config.data.mix_stdlib=0.5
      --config.data.seq_len=256 --config.model.max_seq_len=256)
mkdir -p "$OUT"
for v in "${VARIANTS[@]}"; do
  dba-train --config="configs/hope.py:$v" --workdir="$OUT/$v" "${DATA[@]}" --config.train.steps="$STEPS" \
    --config.train.eval_every="$STEPS" --config.train.ckpt_every="$STEPS" --config.train.log_every=50
  case "$v" in transformer) continue ;; esac
  for task in passkey niah; do
    [ -f "$OUT/$v/$task.json" ] || dba-eval hope "$task" --checkpoint "$OUT/$v" --lengths 256,512,1024 \
      --samples "$SAMPLES" --out "$OUT/$v/$task.json" --plot "$OUT/$v/$task.png"
  done
  [ -f "$OUT/$v/continual.json" ] || dba-eval hope continual --checkpoint "$OUT/$v" --lengths 256 \
    --samples 64 --out "$OUT/$v/continual.json"
done
python -m dba_jax.evals.hope_report "$OUT" "${VARIANTS[@]}" | tee "$OUT/results.md"
