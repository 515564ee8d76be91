"""Behaviour suites for small language models: probes, scoring, comparison and a model-agnostic runner.

  probes    the `Probe` record, match constants, canonical JSONL and the suite's SHA-256
  suite_v1  `behavior_v1()`: 121 hand-written probes in 15 categories (the DBA log's "117 probes", dba.md §5.1)
  suite_v2  `behavior_v2(seed)`: a seeded generator of 20 categories x 30 = 600 tests (dba.md §5.2), byte-identical
            on every Python / numpy version
  scoring   classify / score / match / choose, aggregates, `run_probe` and `run_suite`
  report    `compare_runs`: deltas against a baseline (paired bootstrap, exact McNemar; dba_jax/evals/stats.py)

Scoring follows dba.md §5.1 (EXACT 1, CONTAINED 0.5, NONE 0 on greedy output), except that multiple-choice
probes are scored by completion log-probability (argmax over the choices), as the anchor intended but did not do
in its multi-model path. Aggregates: hard % (exact), soft % (exact or contained, the anchor's definition, which
reproduces its logged 32.48 % = 38/117), partial % (mean raw score, i.e. exact + 0.5 x contained), weighted %
(difficulty weights x1/x2/x3 from the baseline model's match), per category, Wilson intervals, a seeded paired
bootstrap and an exact McNemar test for deltas between two models on the same probes.

The names below are re-exported so that callers write `behavior.run_suite(...)`. Pure Python + numpy: nothing
here imports JAX.
"""
from dba_jax.evals.behavior.probes import (CONTAINED, DIFFICULTY_NAME, DIFFICULTY_WEIGHT, EXACT, KINDS, NONE,
                                           RAW_SCORE, Probe, categories, from_jsonl, suite_sha256, to_jsonl)
from dba_jax.evals.behavior.report import by_difficulty, compare_runs
from dba_jax.evals.behavior.scoring import (GenerateFn, LogprobFn, aggregate, choose, classify, difficulty_weights,
                                            extract_integers, first_line, match, run_probe, run_suite, score,
                                            weighted_score)
from dba_jax.evals.behavior.suite_v1 import behavior_v1
from dba_jax.evals.behavior.suite_v2 import V2_CATEGORIES, behavior_v2

__all__ = ["CONTAINED", "DIFFICULTY_NAME", "DIFFICULTY_WEIGHT", "EXACT", "KINDS", "NONE", "RAW_SCORE", "V2_CATEGORIES",
           "GenerateFn", "LogprobFn", "Probe", "aggregate", "behavior_v1", "behavior_v2", "by_difficulty", "categories",
           "choose", "classify", "compare_runs", "difficulty_weights", "extract_integers", "first_line", "from_jsonl",
           "match", "run_probe", "run_suite", "score", "suite_sha256", "to_jsonl", "weighted_score"]
