"""The HOPE / Titans results table from launch/hope_results.sh's run folders (markdown on stdout, and plots).

  python -m dba_jax.evals.hope_report OUT_DIR VARIANT [VARIANT ...]

Per variant: parameters, the last logged train loss (mean of the last 3 logs) and eval loss at equal steps; passkey and
NIAH accuracy per length with and without memory (95% Wilson intervals) and the updates fired; continual CE of
segment A re-read after B and C. Also OUT_DIR/needles.png: every variant's needle accuracy against length.
"""
from __future__ import annotations

import json
import os
import sys

import jax

from dba_jax import loading, model as model_lib, plots


def _jsonl(path: str) -> list:
  return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def _load(path: str):
  return json.load(open(path)) if os.path.exists(path) else None


def n_params(workdir: str) -> int:
  c = loading.read_config(workdir)
  return sum(int(x.size) for x in jax.tree.leaves(model_lib.abstract(c.model)[1]))


def table(out: str, variants: list[str]) -> str:
  lines = ["| variant | params | steps | train loss | eval loss |", "|---|---|---|---|---|"]
  needle_rows, continual_rows, panels = [], [], []
  for v in variants:
    d = os.path.join(out, v)
    if not os.path.exists(os.path.join(d, "config.json")):
      lines.append(f"| {v} | (not run) | | | |")
      continue
    logs = [r for r in _jsonl(os.path.join(d, "metrics.jsonl")) if "loss" in r]
    evals = _jsonl(os.path.join(d, "eval.jsonl"))
    train_loss = sum(r["loss"] for r in logs[-3:]) / max(1, len(logs[-3:]))
    step = logs[-1]["step"] if logs else 0
    ev = f"{evals[-1]['eval_loss']:.4f}" if evals else ""
    lines.append(f"| {v} | {n_params(d):,} | {step} | {train_loss:.4f} | {ev} |")
    for task in ("passkey", "niah"):
      r = _load(os.path.join(d, f"{task}.json"))
      if r is None:
        continue
      panels.append({**r, "title": f"{v}: {task}"})
      for row in r["by_length"]:
        ci = lambda name: "[{:.2f}, {:.2f}]".format(*row[f"{name}_ci95"])
        needle_rows.append(f"| {v} | {task} | {row['tokens']} ({row['tokens'] / r['train_len']:.1f}x) | "
                           f"{row['baseline_acc']:.3f} {ci('baseline')} | {row['memory_acc']:.3f} {ci('memory')} | "
                           f"{row['delta']:+.3f} | {row['updates_fired_per_sample']:.0f} |")
    r = _load(os.path.join(d, "continual.json"))
    if r is not None:
      b, m = r["baseline"], r["memory"]
      first = lambda x: " / ".join(f"{x['first_read'][k]:.3f}" for k in r["order"][:3])
      continual_rows.append(f"| {v} | {first(b)} | {first(m)} | {b['reread_after_itself']:.3f} → "
                            f"{m['reread_after_itself']:.3f} | {b['reread_after_others']:.3f} → "
                            f"{m['reread_after_others']:.3f} | {m['updates_fired_per_sample']:.0f} |")
  out_lines = lines
  if needle_rows:
    out_lines += ["", "| variant | task | prompt tokens (x train) | without memory | with memory | delta | updates |",
                  "|---|---|---|---|---|---|---|"] + needle_rows
  if continual_rows:
    out_lines += ["", "| variant | first read CE (code / prose / arith), without | with memory | A re-read at once "
                  "(without → with) | A re-read after B, C (without → with) | updates |",
                  "|---|---|---|---|---|---|"] + continual_rows
  if panels:
    out_lines += ["", f"plot: {plots.memory_accuracy(panels, os.path.join(out, 'needles.png'))}"]
  return "\n".join(out_lines)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__)
    return 0 if argv else 2
  if not os.path.isdir(argv[0]):
    print(f"dba_jax.evals.hope_report: error: {argv[0]} is not a directory", file=sys.stderr)
    return 2
  print(table(argv[0], argv[1:]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
