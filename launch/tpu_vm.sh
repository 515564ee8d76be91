#!/usr/bin/env bash
# The same command on every worker of a Cloud TPU VM slice (gcloud ... ssh --worker=all); JAX finds the
# coordinator itself (--distributed). The checkout must exist at --repo on every worker (e.g. via a startup
# script or `gcloud compute tpus tpu-vm scp`); each worker installs its own .venv with EXTRAS=tpu.
#   launch/tpu_vm.sh [--dry-run] --name my-v5p-64 --zone us-east5-a [--project P] [--repo DIR] -- DBA_TRAIN_ARGS...
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
exec env PYTHONPATH="$REPO" "${PYTHON:-python3}" -m dba_jax.launch tpu "$@"
