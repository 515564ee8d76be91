"""Comparing models on the same probes: deltas against a baseline with paired bootstrap intervals and McNemar."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from dba_jax.evals.behavior.probes import DIFFICULTY_NAME, EXACT, NONE, RAW_SCORE
from dba_jax.evals.behavior.scoring import aggregate, difficulty_weights
from dba_jax.evals.stats import mcnemar_exact, paired_bootstrap


def compare_runs(runs: Mapping[str, dict], baseline: str, *, n_resamples: int = 10_000, seed: int = 0) -> dict:
  """Score several models' `run_suite` results on the same probes against one baseline.

  Per model: aggregates weighted by the baseline's matches; and versus the baseline, bootstrap CIs of the
  hard / soft / weighted deltas (in percentage points), exact McNemar on exact matches, per-category deltas."""
  base_recs = runs[baseline]["records"]
  base_matches = {r["id"]: r["match"] for r in base_recs}
  order = [r["id"] for r in base_recs]
  weights = difficulty_weights([base_matches[i] for i in order])
  out = {"baseline": baseline, "models": {}}
  for name, run in runs.items():
    by_id = {r["id"]: r for r in run["records"]}
    if set(by_id) != set(order):
      raise ValueError(f"{name} was run on different probes from {baseline}")
    recs = [by_id[i] for i in order]
    agg = aggregate(recs, base_matches)
    entry = {"aggregates": agg}
    if name != baseline:
      entry["vs_baseline"] = _deltas(base_recs, recs, weights, n_resamples, seed)
      base_cat = aggregate(base_recs, base_matches)["per_category"]
      entry["vs_baseline"]["per_category_weighted_delta_pct"] = {
          c: agg["per_category"][c]["weighted_pct"] - base_cat[c]["weighted_pct"] for c in agg["per_category"]}
    out["models"][name] = entry
  return out


def _deltas(base_recs, recs, weights, n_resamples, seed) -> dict:
  def column(rs, fn):
    return np.array([fn(r["match"]) for r in rs], np.float64)

  metrics = {"hard": lambda m: float(m == EXACT), "soft": lambda m: float(m != NONE), "partial": RAW_SCORE.get}
  res = {}
  for key, fn in metrics.items():
    res[key] = _pct_points(paired_bootstrap(column(base_recs, fn), column(recs, fn),
                                            n_resamples=n_resamples, seed=seed))
  res["weighted"] = _pct_points(paired_bootstrap(column(base_recs, RAW_SCORE.get), column(recs, RAW_SCORE.get),
                                                 weights=weights, n_resamples=n_resamples, seed=seed))
  res["mcnemar_exact"] = mcnemar_exact([r["match"] == EXACT for r in base_recs], [r["match"] == EXACT for r in recs])
  return res


def _pct_points(boot: dict) -> dict:
  return {"delta_pp": 100 * boot["delta"], "ci_pp": tuple(100 * x for x in boot["ci"]),
          "n_resamples": boot["n_resamples"], "seed": boot["seed"]}



def by_difficulty(records, base_matches) -> dict:
  """Partial score (%) within each baseline-difficulty bucket (easy: baseline exact, medium: contained, hard: none)."""
  out = {}
  for m, name in DIFFICULTY_NAME.items():
    s = [r["score"] for r in records if base_matches[r["id"]] == m]
    out[name] = 100.0 * float(np.mean(s)) if s else None
  return out
