# Sourced by the launch scripts: make (or reuse) the project venv and install dba_jax into it.
#   DBA_VENV   where the venv lives (default: <repo>/.venv)
#   PYTHON     interpreter to build it with (default: python3; needs >= 3.11)
#   EXTRAS     pip extras to install, e.g. "dev" or "cuda" (default: none)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DBA_VENV="${DBA_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "dba_jax needs Python >= 3.11; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=..." >&2; exit 2; }
if [ ! -x "$DBA_VENV/bin/python" ]; then
  "$PYTHON" -m venv "$DBA_VENV"
  "$DBA_VENV/bin/python" -m pip install -q --upgrade pip
fi
spec="$REPO"
[ -n "${EXTRAS:-}" ] && spec="$REPO[$EXTRAS]"
"$DBA_VENV/bin/python" -m pip install -q -e "$spec"
export PATH="$DBA_VENV/bin:$PATH"
cd "$REPO"
