#!/usr/bin/env bash
# Command 2: install dba_jax with its test dependencies into .venv and run the test suite.
# Extra arguments go to pytest (e.g. `-m slow` for the slow tier, `-k data`).
EXTRAS=dev source "$(dirname "$0")/env.sh"
# The checkpoint-conversion tests build their PyTorch models with torch (the CPU wheel is on the dev machines'
# local index). Elsewhere the install may fail: those tests then skip.
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q torch==2.13.0 ||
    echo "warning: could not install torch==2.13.0; the PyTorch conversion tests will be skipped" >&2
fi
exec python -m pytest -n "${TEST_WORKERS:-2}" --durations=25 "$@"
