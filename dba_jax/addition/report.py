"""One table per addition sweep: every seed's grokking steps, best validation, test split and 100,000-problem score.

  dba-addition-report runs/add401 runs/add302 [--eval eval100k.json] [--out table.md] [--force]

Reads each run directory's summary.json (written when dba-addition-train finishes) and, where present,
RUN/<--eval> (from `dba-addition-eval --checkpoint RUN --out RUN/eval100k.json`). Every seed is listed; the
last lines give the grokking step distribution (seeds reaching 0.99 validation exact match) and the best seed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

from dba_jax import rundir
from dba_jax.cli import CommandError, command, entry, refuse_existing

TARGET = 0.9999  # the bar on the 100,000 held-out problems


def _step(s) -> str:
  return "never" if s is None else str(s)


def run_table(run_dir: str, eval_name: str) -> tuple[list[str], dict]:
  """Markdown lines for one run and what the cross-run line needs; raises ValueError naming what is missing."""
  path = os.path.join(run_dir, "summary.json")
  if not os.path.isdir(run_dir):
    raise ValueError("no such run directory")
  if not os.path.isfile(path):
    raise ValueError(f"{path} does not exist: the run is not finished (dba-addition-train resumes it)")
  with open(path) as f:
    s = json.load(f)
  by_seed = {}
  eval_path = os.path.join(run_dir, eval_name)
  if os.path.isfile(eval_path):
    with open(eval_path) as f:
      e = json.load(f)
    for r in e.get("models", [e]):
      by_seed[r["training"]["seed"]] = r["multi_seed_validation"]
  hours = s["steps"] / s["steps_per_s"] / 3600 if s.get("steps_per_s") else float("nan")
  lines = [f"**{run_dir}**: {s['params']} parameters, {s['num_models']} seeds, {s['steps']} steps, "
           f"{s['steps_per_s']:.1f} steps/s for all seeds together (~{hours:.1f} h of training)", "",
           "| seed | val 0.5 at | val 0.99 at | val 1.0 at | best val (step) | test 10k | 100k exact | 100k errors |",
           "|---|---|---|---|---|---|---|---|"]
  scores = []
  for m in s["models"]:
    v = by_seed.get(m["seed"])
    exact = v["aggregate_exact_match"] if v else None
    scores.append((exact if exact is not None else -1.0, m["seed"]))
    lines.append(f"| {m['seed']} | {_step(m.get('grok_step_0.5'))} | {_step(m.get('grok_step_0.99'))} | "
                 f"{_step(m.get('grok_step_1'))} | {m['best_val_exact']:.4f} ({m['best_step']}) | "
                 f"{m['best_test_exact']:.4f} | {'' if v is None else f'{exact:.5f}'} | "
                 f"{'' if v is None else v['aggregate_errors']} |")
  grokked = sorted(m["grok_step_0.99"] for m in s["models"] if m.get("grok_step_0.99") is not None)
  best_exact, best_seed = max(scores)
  head = {"run": run_dir, "params": s["params"], "seeds": s["num_models"],
          "reached_target": sum(x >= TARGET for x, _ in scores)}
  lines.append("")
  if grokked:
    lines.append(f"Grokked (val ≥ 0.99): {len(grokked)} of {s['num_models']} seeds, at steps {grokked} "
                 f"(median {statistics.median(grokked):g}).")
  else:
    lines.append(f"Grokked (val ≥ 0.99): 0 of {s['num_models']} seeds.")
  if by_seed:
    lines.append(f"100k exact match ≥ {TARGET}: {head['reached_target']} of {len(by_seed)} evaluated seeds; best "
                 f"seed {best_seed} at {best_exact:.5f}.")
  return lines, head


@command("dba-addition-report", argv0=False)
def main(argv) -> int:
  p = argparse.ArgumentParser(prog="dba-addition-report", description=__doc__.splitlines()[0])
  p.add_argument("runs", nargs="+", help="dba-addition-train run directories (with summary.json)")
  p.add_argument("--eval", default="eval100k.json", help="dba-addition-eval output inside each run directory")
  p.add_argument("--out", default="", help="also write the markdown here")
  p.add_argument("--force", action="store_true", help="replace an existing --out file")
  args = p.parse_args(argv)
  seen = [os.path.realpath(r) for r in args.runs]
  twice = sorted({r for r, real in zip(args.runs, seen) if seen.count(real) > 1})
  if twice:
    raise CommandError(f"{', '.join(twice)}: the same run given more than once; list each run once")
  refuse_existing("dba-addition-report", args.out, args.force)
  out, heads = [], []
  for run in args.runs:
    try:
      lines, head = run_table(run, args.eval)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
      raise CommandError(f"{run}: {e}") from None
    out += lines + [""]
    heads.append(head)
  passing = [h for h in heads if h["reached_target"]]
  if passing:
    h = min(passing, key=lambda h: h["params"])
    out.append(f"Smallest with a seed at ≥ {TARGET} on the 100,000 problems: {h['params']} parameters "
               f"({h['run']}, {h['reached_target']} of {h['seeds']} seeds).")
  text = "\n".join(out)
  print(text)
  if args.out:
    rundir.atomic_write(args.out, text + "\n")
  return 0


cli = entry(main)


if __name__ == "__main__":
  cli()
