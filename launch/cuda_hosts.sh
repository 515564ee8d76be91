#!/usr/bin/env bash
# One process per CUDA host over ssh, JAX's distributed runtime with the first host as coordinator.
# Each host needs this checkout at the same path (or --repo DIR); each installs its own .venv with EXTRAS=cuda.
#   launch/cuda_hosts.sh [--dry-run] --hosts gpu0,gpu1 [--port 8476] [--repo DIR] -- DBA_TRAIN_ARGS...
# A single host named localhost (or this machine's name) runs here without ssh.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
exec env PYTHONPATH="$REPO" "${PYTHON:-python3}" -m dba_jax.launch cuda "$@"
