"""The HOPE / Titans results table from launch/hope_results.sh's run folders (markdown on stdout, and plots).

  python -m dba_jax.evals.hope_report OUT_DIR VARIANT [VARIANT ...]
  python -m dba_jax.evals.hope_report --recall RECALL.json [...]     (`dba-eval hope recall` outputs)

Per variant: parameters, the last logged train loss (mean of the last 3 logs) and eval loss at equal steps; passkey and
NIAH accuracy per length with memory, writes off and memory off (95% Wilson intervals), the exact binomial p of the
memory against chance and the exact McNemar p of memory vs memory off, each also Holm-adjusted over every test of the
table (the note under it says how many); continual CE of segment A re-read after B and C with the paired difference's
interval. Also OUT_DIR/needles.png: every variant's needle accuracy against length.
"""
from __future__ import annotations

import json
import os
import sys

import jax

from dba_jax import loading, model as model_lib, plots
from dba_jax.evals import stats


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
        ci = lambda name: "{:.3f} [{:.2f}, {:.2f}]".format(row[f"{name}_acc"], *row[f"{name}_ci95"])
        needle_rows.append((f"| {v} | {task} | {row['tokens']} ({row['tokens'] / r['train_len']:.1f}x) | "
                            f"{row['samples']} | {ci('baseline')} | {ci('writes_off')} | {ci('memory')} |",
                            row["memory_p_chance"], row["memory_vs_baseline"]["p"]))
    r = _load(os.path.join(d, "continual.json"))
    if r is not None:
      b, m = r["baseline"], r["memory"]
      first = lambda x: " / ".join(f"{x['first_read'][k]:.3f}" for k in r["order"][:3])
      dci = lambda k: "{:+.3f} [{:+.3f}, {:+.3f}]".format(r["delta"][k], *r["delta_ci95"][k])
      continual_rows.append(f"| {v} | {r['samples']} | {first(b)} | {first(m)} | {b['reread_after_itself']:.3f} → "
                            f"{m['reread_after_itself']:.3f} ({dci('reread_after_itself')}) | "
                            f"{b['reread_after_others']:.3f} → {m['reread_after_others']:.3f} "
                            f"({dci('reread_after_others')}) | {m['updates_fired_per_sample']:.0f} |")
  out_lines = lines
  if needle_rows:
    out_lines += ["", "| variant | task | prompt tokens (x train) | n | memory off | writes off | memory | "
                  "p vs chance (Holm) | McNemar p vs off (Holm) |", "|---|---|---|---|---|---|---|---|---|"]
    out_lines += _with_holm(needle_rows)
  if continual_rows:
    out_lines += ["", "| variant | n | first read CE (code / prose / arith), without | with memory | A re-read at once "
                  "(without → with, paired Δ [95% CI]) | A re-read after B, C (without → with, Δ [CI]) | updates |",
                  "|---|---|---|---|---|---|---|"] + continual_rows
  if panels:
    out_lines += ["", f"plot: {plots.memory_accuracy(panels, os.path.join(out, 'needles.png'))}"]
  return "\n".join(out_lines)


def _with_holm(rows) -> list[str]:
  """Rows (text, p vs chance, McNemar p) as table lines, each p beside its Holm adjustment over the whole table."""
  flat = [p for _, *ps in rows for p in ps]
  adj = stats.holm(flat)
  lines = []
  for i, (text, *ps) in enumerate(rows):
    cells = [f"{p:.2g} ({a:.2g})" for p, a in zip(ps, adj[2 * i:2 * i + 2])]
    lines.append(f"{text} {' | '.join(cells)} |")
  return lines + ["", f"Holm: {len(flat)} tests in this table (each row: memory vs chance, memory vs memory off); "
                  "the adjusted p controls the chance of any false positive among them at that level."]


def recall_table(paths: list[str]) -> str:
  """`dba-eval hope recall` outputs as one table: accuracy per arm and length, tests Holm-adjusted over the table."""
  rows = []
  for path in paths:
    r = json.load(open(path))
    for row in r["by_length"]:
      ci = lambda a: "{:.3f} [{:.2f}, {:.2f}]".format(row[a]["acc"], *row[a]["ci95"])
      rows.append((f"| {r['block']} | {r.get('titans_lr', '')} | {r.get('carry') or ''} | {r['seed']} | {r['steps']} | "
                   f"{row['length']} "
                   f"({row['length'] / row['train_length']:.0f}x) | {row['samples']} | {ci('memory_off')} | "
                   f"{ci('writes_off')} | {ci('memory')} |", row["memory"]["p_chance"],
                   row["memory_vs_memory_off"]["p"]))
  head = ["| block | titans_lr | carry | seed | steps | prompt tokens (x train) | n | memory off | writes off | memory | "
          "p vs chance (Holm) | McNemar p vs off (Holm) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  return "\n".join(head + _with_holm(rows))


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__)
    return 0 if argv else 2
  if argv[0] == "--recall":
    missing = [p for p in argv[1:] if not os.path.isfile(p)]
    if missing or len(argv) < 2:
      print(f"dba_jax.evals.hope_report: error: --recall needs dba-eval hope recall JSON files "
            f"({missing[0] if missing else 'none given'} is not a file)", file=sys.stderr)
      return 2
    print(recall_table(argv[1:]))
    return 0
  if not os.path.isdir(argv[0]):
    print(f"dba_jax.evals.hope_report: error: {argv[0]} is not a directory", file=sys.stderr)
    return 2
  print(table(argv[0], argv[1:]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
