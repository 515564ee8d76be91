"""Train the quickstart baseline and DBA models on the embedded corpus and print their comparison.

  python -m dba_jax.quickstart [--workdir runs/quickstart] [--steps N]
"""
from __future__ import annotations

from dba_jax import signals

if __name__ == "__main__":  # the stop handler before the heavy imports below (as dba_jax/main.py)
  signals.install("quickstart", stops=True)

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from dba_jax import rundir, train  # noqa: E402
from dba_jax.cli import command, entry, int_at_least, parse_flags  # noqa: E402
from dba_jax.configlib import ConfigError  # noqa: E402
from dba_jax.evals import runs_table  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.py")


def load_config(variant: str):
  return parse_flags(["quickstart", f"--config={CONFIG}:{variant}"]).config


@command("quickstart", errors=(ConfigError,), argv0=False)
def main(argv, stop=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="runs/quickstart")
  p.add_argument("--steps", type=int_at_least(1), default=None, help="override train.steps for both models")
  args = p.parse_args(argv)
  rows = []
  for variant in ("baseline", "dba"):
    c = load_config(variant)
    if args.steps:
      c.train.steps = args.steps
    print(f"== training quickstart:{variant} ==", file=sys.stderr)
    run_dir = os.path.join(args.workdir, variant)
    stopped = train.train(c, run_dir, stop=stop).get("stopped")
    if stopped:
      print(f"stopped by {stopped}; the same command resumes", file=sys.stderr)
      return 0
    rows.append(runs_table.summarize(run_dir))
  text = runs_table.table(rows)
  rundir.atomic_write(os.path.join(args.workdir, "comparison.md"), text + "\n")
  plot = os.path.join(args.workdir, "loss_curves.svg")
  runs_table.loss_curves_svg([os.path.join(args.workdir, v) for v in ("baseline", "dba")], plot)
  print(text)
  print(f"loss curves: {plot}")
  return 0


if __name__ == "__main__":
  entry(main, stops=True)()
