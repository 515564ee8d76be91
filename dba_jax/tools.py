"""Every dba_jax console script, and the launcher they share (`python -m dba_jax.tools NAME ARGS...` is the same as
running NAME). The launcher installs the one stop handler (signals.py) before it imports the tool, so a Ctrl-C or
SIGTERM at any moment, start-up included, is handled the tool's way. Standard library only until the tool loads.

A new tool is one line in TOOLS (and its pyproject [project.scripts] entry); the fault matrix and the bad-input
table in tests/ read this table."""
from __future__ import annotations

import importlib
import sys

from dba_jax import signals

# console script -> (module with main and cli, whether it trains: the first signal then saves and stops, exit 0)
TOOLS = {
    "dba-train": ("dba_jax.main", True),
    "dba-addition-train": ("dba_jax.addition.train", True),
    "dba-latentwire-train": ("dba_jax.latentwire.train", True),
    "dba-seeds": ("dba_jax.seeds", True),
    "dba-eval": ("dba_jax.eval_cli", False),
    "dba-addition-eval": ("dba_jax.evals.addition", False),
    "dba-addition-shrink": ("dba_jax.addition.shrink", False),
    "dba-addition-report": ("dba_jax.addition.report", False),
    "dba-convert": ("dba_jax.convert", False),
    "dba-bench": ("dba_jax.bench", False),
    "dba-coord-check": ("dba_jax.coord_check", False),
    "dba-aot": ("dba_jax.aot", False),
    "dba-upcycle": ("dba_jax.upcycle.cli", False),
}


def run(name: str):
  module, trains = TOOLS[name]
  signals.install(name, trains)
  importlib.import_module(module).cli()


# The console scripts' entry points (pyproject: dba-train = "dba_jax.tools:dba_train", ...).
for _name in TOOLS:
  globals()[_name.replace("-", "_")] = lambda _n=_name: run(_n)


if __name__ == "__main__":
  if len(sys.argv) < 2 or sys.argv[1] not in TOOLS:
    sys.exit(f"usage: python -m dba_jax.tools NAME [ARGS...], NAME one of: {', '.join(TOOLS)}")
  sys.argv = [sys.argv[1], *sys.argv[2:]]
  run(sys.argv[0])
