#!/usr/bin/env bash
# Train on this machine: its CPU (or its one GPU with EXTRAS=cuda), or N CPU processes over loopback.
#   launch/local.sh [--dry-run] [--processes N] [--devices-per-process D] DBA_TRAIN_ARGS...
#   launch/local.sh --config=configs/quickstart.py:dba --workdir=runs/dba
#   launch/local.sh --processes 2 --config=configs/quickstart.py:dba --workdir=runs/dba2
# --dry-run prints the exact command(s) and installs nothing; dba-train's own dry run is --dry_run.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
own=(); dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --processes|--devices-per-process|--port) own+=("$1" "$2"); shift 2 ;;
    *) break ;;
  esac
done
if [ "$dry" = 1 ]; then
  exec env PYTHONPATH="$REPO" "${PYTHON:-python3}" -m dba_jax.launch local --dry-run \
    --python "${DBA_VENV:-$REPO/.venv}/bin/python" ${own[@]+"${own[@]}"} -- "$@"
fi
source "$REPO/launch/env.sh"
exec python -m dba_jax.launch local --python "$DBA_VENV/bin/python" ${own[@]+"${own[@]}"} -- "$@"
