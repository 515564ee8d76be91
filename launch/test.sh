#!/usr/bin/env bash
# Command 2: install dba_jax with its test dependencies into .venv and run the test suite.
# Extra arguments go to pytest (e.g. `-m slow` for the slow tier, `-k data`).
EXTRAS=dev source "$(dirname "$0")/env.sh"
exec python -m pytest -n "${TEST_WORKERS:-2}" "$@"
