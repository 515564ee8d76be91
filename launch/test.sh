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
# The TPU compile tests (tests/test_tpu_compile.py, tests/test_aot.py) compile for real TPU chips with libtpu, from
# the tpu extra (jax[tpu] at this jax's version: +684 MB in .venv). Where it cannot be installed they skip.
if ! python -c "import libtpu" 2>/dev/null; then
  python -m pip install -q -e ".[tpu]" ||
    echo "warning: could not install the tpu extra (libtpu); the TPU compile tests will be skipped" >&2
fi
# tests/test_triton_cubin.py compiles the Pallas-Triton kernels to sm_80 / sm_90 cubins with no GPU, through pip
# Triton (the `cubin` extra: +1 GB in .venv, ~20 s). Where it cannot be installed those tests skip.
if ! python -c "import triton" 2>/dev/null; then
  python -m pip install -q -e ".[cubin]" ||
    echo "warning: could not install the cubin extra (triton); the cubin tests will be skipped" >&2
fi
# Many tests (and the CLIs they start as subprocesses) compile the same tiny programs: a compilation cache shared
# by every worker and subprocess of this run compiles each once (measured: the SIGKILL fault-matrix test 175 s ->
# 116 s). A fresh directory per run, removed at exit, so nothing carries over between versions.
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  JAX_COMPILATION_CACHE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/dba_jax_test_cache.XXXXXX")"
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
export JAX_COMPILATION_CACHE_DIR JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
python -m pytest -n "${TEST_WORKERS:-2}" --durations=25 "$@"
