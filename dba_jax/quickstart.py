"""Train the quickstart baseline and DBA models on the embedded corpus and print their comparison.

  python -m dba_jax.quickstart [--workdir runs/quickstart] [--steps N]
"""
from __future__ import annotations

import argparse
import os
import sys

from dba_jax import train
from dba_jax.cli import command, entry, parse_flags
from dba_jax.configlib import ConfigError
from dba_jax.evals import runs_table

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.py")


def load_config(variant: str):
  return parse_flags(["quickstart", f"--config={CONFIG}:{variant}"]).config


@command("quickstart", errors=(ConfigError,), argv0=False)
def main(argv) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="runs/quickstart")
  p.add_argument("--steps", type=int, default=None, help="override train.steps for both models")
  args = p.parse_args(argv)
  rows = []
  for variant in ("baseline", "dba"):
    c = load_config(variant)
    if args.steps:
      c.train.steps = args.steps
    print(f"== training quickstart:{variant} ==", file=sys.stderr)
    run_dir = os.path.join(args.workdir, variant)
    train.train(c, run_dir)
    rows.append(runs_table.summarize(run_dir))
  text = runs_table.table(rows)
  with open(os.path.join(args.workdir, "comparison.md"), "w") as f:
    f.write(text + "\n")
  plot = os.path.join(args.workdir, "loss_curves.svg")
  runs_table.loss_curves_svg([os.path.join(args.workdir, v) for v in ("baseline", "dba")], plot)
  print(text)
  print(f"loss curves: {plot}")
  return 0


if __name__ == "__main__":
  entry(main)()
