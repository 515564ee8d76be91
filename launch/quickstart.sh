#!/usr/bin/env bash
# Command 1: install into .venv, train the quickstart baseline and DBA models on the embedded corpus (CPU),
# print the comparison table. Extra arguments go to `python -m dba_jax.quickstart` (--workdir, --steps).
source "$(dirname "$0")/env.sh"
exec python -m dba_jax.quickstart "$@"
