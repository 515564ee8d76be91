#!/usr/bin/env bash
# Train any config on this machine's CPU (or its one GPU with EXTRAS=cuda):
#   launch/local.sh --config=configs/quickstart.py:dba --workdir=runs/dba [--config.train.steps=100]
# --print-only shows the command instead of running it.
set -euo pipefail
if [ "${1:-}" = "--print-only" ]; then shift; echo "dba-train $*"; exit 0; fi
source "$(dirname "$0")/env.sh"
exec dba-train "$@"
