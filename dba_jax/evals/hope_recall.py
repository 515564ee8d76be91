"""`dba-eval hope recall`: train a tiny Titans model on the token-level passkey (dba_jax/hope/recall.py) and score
it at the training length and beyond, with the memory as trained, its writes off and off, on the same fresh prompts.

Per length and arm: accuracy of the 2-way key choice with its Wilson interval and the exact binomial p against
chance (1/2); per length: exact McNemar tests of the memory against each baseline (paired: the same prompts). Every
p-value of the run is also Holm-adjusted over the whole table (`p_holm`), since one run makes many comparisons.
"""
from __future__ import annotations

import sys

from dba_jax.evals import stats
from dba_jax.evals.common import EvalError
from dba_jax.hope import recall

CHANCE = 0.5


def results(c, params, lengths, samples: int, seed: int, n_keys: int) -> list[dict]:
  """One row per length: each arm's accuracy, interval and p against chance; McNemar of the memory vs the others."""
  rows, ps = [], []
  for T in lengths:
    right = recall.score(c, params, T, samples, seed, n_keys)
    row = {"length": T, "samples": samples, "train_length": c.data.seq_len}
    for arm, r in right.items():
      k = int(r.sum())
      row[arm] = {"acc": k / samples, "ci95": stats.wilson_interval(k, samples),
                  "p_chance": stats.binomial_greater(k, samples, CHANCE)}
      ps.append((row[arm], "p_chance"))
    for arm in right:
      if arm != "memory":
        row[f"memory_vs_{arm}"] = stats.mcnemar_exact(right["memory"], right[arm])
        ps.append((row[f"memory_vs_{arm}"], "p"))
    rows.append(row)
  for (d, key), adj in zip(ps, stats.holm([d[key] for d, key in ps])):
    d[f"{key}_holm"] = adj
  return rows


def command(args, c) -> dict:
  """Train on c (one seed), then score every --lengths value (default 1x, 2x, 4x the training length)."""
  T = c.data.seq_len
  lengths = list(args.lengths) or [T, 2 * T, 4 * T]
  try:
    for n in lengths:
      recall.check(c.model, n, args.keys)
  except ValueError as e:
    raise EvalError(str(e)) from None
  log = lambda s: print(f"recall {c.model.block}: {s}", file=sys.stderr, flush=True)
  try:
    params, loss = recall.train(c, args.steps or c.train.steps, c.train.batch_size, args.seed, args.keys, log,
                                carry=args.carry)
  except ValueError as e:
    raise EvalError(str(e)) from None
  rows = results(c, params, lengths, args.samples, args.seed + 1000, args.keys)
  for r in rows:
    log(f"{r['length']} tokens: " + ", ".join(f"{a} {r[a]['acc']:.3f}" for a in recall.ARMS) +
        f"; memory vs off McNemar p {r['memory_vs_memory_off']['p']:.2g}")
  return {"task": "recall", "block": c.model.block, "seed": args.seed, "keys": args.keys, "carry": args.carry,
          "steps": int(len(loss)), "final_answer_ce": float(loss[-10:].mean()), "chance": CHANCE,
          "by_length": rows}
