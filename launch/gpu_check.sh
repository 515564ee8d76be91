#!/usr/bin/env bash
# Issue 16: on a CUDA host with this checkout freshly copied, check every Pallas kernel against its float64
# reference on the GPU, time fused selective attention against flash attention (ours and cuDNN), measure peak
# memory at T 8192 and GPT-2 small tokens/s and MFU; results/gpu_check-<time>/results.{json,md}.
#   launch/gpu_check.sh [--out DIR] [--sections ...] [--budget-s S]   # all arguments go to python -m dba_jax.gpu_check
#   launch/gpu_check.sh --cpu-dry [--out DIR]                          # the same run on CPU, tiny sizes (no GPU needed)
#   launch/gpu_check.sh --dry-run [...]                                # print the install and check commands only
# Which Python runs it (nothing is downloaded when the first one that fits is already complete):
#   1. $DBA_VENV/bin/python (default .venv, as launch/env.sh) if it sees a GPU (or --cpu-dry) and has the deps;
#   2. the system python3 ($PYTHON) if its jax sees a GPU and it has the deps (the lent GPU machines: jax[cuda]
#      system-wide), run straight from this checkout;
#   3. a venv made with --system-site-packages over that python3 (keeps its CUDA jax), plus `pip install -e .`;
#   4. a plain venv with `pip install -e '.[cuda]'` (needs the network).
# The check itself runs under `timeout` ($GPU_CHECK_TIMEOUT_S, default 450 s); exit status: the check's
# (0 all passed, 1 a kernel failed / disagreed / a section raised, 2 bad arguments), 124 if it had to be killed.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
dry=0; print_only=0; args=()
for a in "$@"; do
  case "$a" in
    --cpu-dry) dry=1; args+=("$a") ;;
    --dry-run) print_only=1 ;;  # as the other launch scripts: print the commands, install and run nothing
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; echo
               py="${DBA_VENV:-$REPO/.venv}/bin/python"; [ -x "$py" ] || py="${PYTHON:-python3}"
               exec env PYTHONPATH="$REPO:$REPO/kernels" "$py" -m dba_jax.gpu_check --help ;;
    *) args+=("$a") ;;
  esac
done
run() { echo "+ $*" >&2; [ "$print_only" = 1 ] || "$@"; }
# An uninstalled checkout imports too: dba_kernels lives at kernels/dba_kernels (pyproject package-dir).
export PYTHONPATH="$REPO:$REPO/kernels${PYTHONPATH:+:$PYTHONPATH}"
SYS_PY="${PYTHON:-python3}"
DEPS='import jax, flax, optax, orbax.checkpoint, grain, ml_collections, tensorboardX, numpy, matplotlib'
VENV="${DBA_VENV:-$REPO/.venv}"
if [ "$dry" = 1 ]; then
  sees() { "$1" -c 'import jax' >/dev/null 2>&1; }
else
  # No NVIDIA device at all: stop before anything installs multi-GB CUDA wheels.
  if [ ! -e /dev/nvidia0 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check.sh: error: no NVIDIA GPU on this machine; run with --cpu-dry for the CPU check" >&2; exit 2
  fi
  sees() { "$1" -c 'import jax; jax.devices("gpu")' >/dev/null 2>&1; }
fi
complete() { [ -x "$1" ] || command -v "$1" >/dev/null 2>&1 || return 1; sees "$1" && "$1" -c "$DEPS" >/dev/null 2>&1; }

if complete "$VENV/bin/python"; then
  py="$VENV/bin/python"
elif complete "$SYS_PY"; then
  py="$SYS_PY"
else
  site=()
  if [ ! -x "$VENV/bin/python" ]; then
    sees "$SYS_PY" && site=(--system-site-packages)  # keep the host's CUDA jax instead of downloading another
    run "$SYS_PY" -m venv ${site[@]+"${site[@]}"} "$VENV"
  fi
  spec="$REPO"
  if [ "$dry" = 0 ]; then  # CUDA jax from pip only when the venv cannot see the host's
    if [ -x "$VENV/bin/python" ]; then sees "$VENV/bin/python" || spec="$REPO[cuda]"
    elif [ ${#site[@]} = 0 ]; then spec="$REPO[cuda]"; fi  # --dry-run: the venv was not made
  fi
  run "$VENV/bin/python" -m pip install -q -e "$spec"
  py="$VENV/bin/python"
  if [ "$print_only" = 0 ] && ! complete "$py"; then
    echo "gpu_check.sh: error: $py still lacks a GPU-enabled jax or a dependency; see:" >&2
    echo "  $py -c '$DEPS; print(jax.devices())'" >&2; exit 2
  fi
fi
cmd=(timeout -k 20 "${GPU_CHECK_TIMEOUT_S:-450}" "$py" -m dba_jax.gpu_check ${args[@]+"${args[@]}"})
if [ "$print_only" = 1 ]; then
  echo "cd $REPO && PYTHONPATH=$PYTHONPATH ${cmd[*]}"; exit 0
fi
echo "gpu_check.sh: using $py ($("$py" -c 'import jax; print("jax", jax.__version__, jax.default_backend())' 2>/dev/null))" >&2
cd "$REPO"
exec "${cmd[@]}"
