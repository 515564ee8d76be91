"""Behaviour suites: scoring rules (dba.md §5.1), suite shape and determinism, statistics, the runner."""
import json
import math

import numpy as np
import pytest

from dba_jax.evals import behavior as bh, stats
from dba_jax.evals.behavior import CONTAINED, EXACT, NONE, Probe, classify, suite_v2

# Hash of behavior_v2(42). It pins the generator across machines and Python / numpy versions; change it only
# together with a deliberate template change (and say so in the notes: old results are then not comparable).
V2_SEED42_SHA256 = "93d376413772a6e9acc530bf0dfafc4f1872232a11596e69e398c877be2ed53c"


# ------------------------------------------------------------------------------------------------- scoring

def test_exact_is_whole_output_or_first_line_after_stripping():
  assert classify("Paris", "Paris") == EXACT
  assert classify("  Paris \n", " Paris") == EXACT  # surrounding whitespace never counts
  assert classify(" Paris\nThe capital of Spain is Madrid", "Paris") == EXACT  # first line
  assert classify("\n\nParis\nmore", "Paris") == EXACT  # leading blank lines are stripped first
  assert classify("Paris.", "Paris") == CONTAINED  # not exact: the stop is part of the line
  assert classify("", "Paris") == NONE
  assert classify("anything", "") == NONE  # an empty answer is never matched


def test_case_and_inner_whitespace_are_not_normalised():
  assert classify("paris", "Paris") == NONE
  assert classify("PARIS is big", "Paris") == NONE
  assert classify("a  quiet town", "a quiet town") == NONE
  assert classify("it was a quiet town", "a quiet town") == CONTAINED


def test_longer_strings_are_contained_as_plain_substrings_anywhere():
  assert classify("The answer is lantern.", "lantern") == CONTAINED
  assert classify("first\nsecond has lantern", "lantern") == CONTAINED  # whole output, not just line 1
  assert classify("lanterns", "lantern") == CONTAINED  # substring: no word boundary needed above 3 chars
  assert classify("lamp", "lantern") == NONE


def test_short_strings_need_a_token_boundary():
  assert classify("yes.", "yes") == CONTAINED
  assert classify("I say yes, surely", "yes") == CONTAINED
  assert classify("(yes)", "yes") == CONTAINED
  assert classify("yesterday", "yes") == NONE  # inside a word
  assert classify("eyes", "yes") == NONE
  assert classify("yes!", "yes") == CONTAINED  # '!' is not a boundary char but line 1 starts with it
  assert classify("say yes!", "yes") == NONE  # ... which only helps at the start of the first line
  assert classify("}\n", "}") == EXACT
  assert classify("} and more", "}") == CONTAINED


def test_integer_extraction():
  assert bh.extract_integers("2 + 2 = 4") == [2, 2, 4]
  assert bh.extract_integers("from -3 to +5, then 10") == [-3, 5, 10]
  assert bh.extract_integers("no digits") == []


def test_integer_answers_contained_only_when_unambiguous():
  assert classify("42", 42) == EXACT
  assert classify("42\n43", 42) == EXACT
  assert classify("42 apples", 42) == CONTAINED  # the only integer on the line
  assert classify("6 * 7 = 42", 42) == CONTAINED  # an equation
  assert classify("I think the Answer: 42 or 41", 42) == CONTAINED  # "answer", any case
  assert classify("it is 42 not 41", 42) == CONTAINED  # " is "
  assert classify("40 41 42 43", 42) == NONE  # counting past it earns nothing
  assert classify("43", 42) == NONE
  assert classify("420", 42) == NONE  # integers are whole tokens
  assert classify("x\n42", 42) == NONE  # only the first line is read for integers
  assert classify("-6", -6) == EXACT
  assert classify("2 - 8 = -6", -6) == CONTAINED
  assert classify("6", -6) == NONE


def test_score_values_and_multiple_choice_is_all_or_nothing():
  p = Probe("p", "c", "integer", "3 * 4 =", 12)
  assert [bh.score(o, p) for o in ("12", "3 * 4 = 12", "13")] == [1.0, 0.5, 0.0]
  mc = Probe("m", "c", "multiple_choice", "Sky is", " blue", (" red", " blue"))
  assert bh.score(" blue", mc) == 1.0 and bh.score(" red", mc) == 0.0


def test_probe_validates_itself():
  with pytest.raises(ValueError, match="not one of its choices"):
    Probe("m", "c", "multiple_choice", "x", " a", (" b", " c"))
  with pytest.raises(ValueError, match="int answer"):
    Probe("i", "c", "integer", "x", "4")
  with pytest.raises(ValueError, match="kind"):
    Probe("k", "c", "generation", "x", "4")


def test_multiple_choice_picks_the_highest_logprob():
  p = Probe("m", "c", "multiple_choice", "The sky is", " blue", (" red", " blue", " green"))
  table = {" red": -2.0, " blue": -0.5, " green": -3.0}
  seen = []

  def logprob(prompt, completion):
    seen.append((prompt, completion))
    return table[completion]

  got = bh.choose(p, logprob)
  assert got["chosen"] == " blue" and got["logprobs"] == [-2.0, -0.5, -3.0]
  assert got["margin"] == pytest.approx(1.5)
  assert seen == [("The sky is", c) for c in p.choices]  # every choice scored as a completion of the prompt
  table[" green"] = 0.0
  got = bh.choose(p, logprob)
  assert got["chosen"] == " green" and got["margin"] == pytest.approx(-0.5)
  tie = bh.choose(p, lambda _, c: 0.0)
  assert tie["chosen"] == " red"  # ties go to the first choice, deterministically


# ------------------------------------------------------------------------------------------------- suites

def test_v1_has_at_least_117_probes_in_15_categories_with_unique_ids():
  v1 = bh.behavior_v1()
  assert len(v1) >= 117
  cats = bh.categories(v1)
  assert len(cats) >= 15
  assert len({p.id for p in v1}) == len(v1)
  assert {p.kind for p in v1} == set(bh.KINDS)
  assert all(sum(p.category == c for p in v1) >= 5 for c in cats)
  # Answer positions vary, so a model that always picks the first choice does not look good.
  positions = [p.choices.index(p.answer) for p in v1 if p.kind == "multiple_choice"]
  assert len(set(positions)) >= 3 and positions.count(0) < 0.6 * len(positions)


def test_v2_is_20_categories_of_30_with_unique_ids_and_prompts():
  v2 = bh.behavior_v2(42)
  assert len(v2) == 600
  cats = bh.categories(v2)
  assert len(cats) == 20 and all(sum(p.category == c for p in v2) == 30 for c in cats)
  assert len({p.id for p in v2}) == 600
  assert len({p.prompt for p in v2}) == 600
  for must in ("copy", "noisy_copy", "binding", "multi_hop", "long_context", "injection", "topic_switch",
               "paired_curve"):
    assert must in cats


def test_v2_same_seed_is_byte_identical_and_seeds_differ():
  a, b = bh.to_jsonl(bh.behavior_v2(42)), bh.to_jsonl(bh.behavior_v2(42))
  assert a == b
  assert bh.suite_sha256(bh.behavior_v2(42)) == V2_SEED42_SHA256
  assert bh.suite_sha256(bh.behavior_v2(7)) != V2_SEED42_SHA256
  assert len(a.splitlines()) == 600 and json.loads(a.splitlines()[0])["id"] == "copy_00_word"
  assert bh.from_jsonl(a) == bh.behavior_v2(42)  # a saved suite reloads exactly


def test_v2_paired_groups_share_their_base_item():
  v2 = bh.behavior_v2(3)
  groups = {}
  for p in v2:
    if p.category == "paired_curve":
      groups.setdefault(p.metadata["pair_group"], []).append(p)
  assert len(groups) == 6
  for members in groups.values():
    assert [m.metadata["level"] for m in members] == [0, 1, 2, 4, 8]
    assert len({(m.answer, m.choices) for m in members}) == 1
    assert all(members[0].prompt.split("\n")[0][:20] == m.prompt[:20] for m in members)


def test_dedupe_ids_renames_collisions_and_keeps_every_probe():
  ps = [Probe(i, "c", "exact", str(k), "a") for k, i in enumerate(["x", "y", "x", "x", "x__2"])]
  out = suite_v2._dedupe_ids(ps)
  assert [p.id for p in out] == ["x", "y", "x__3", "x__4", "x__2"]  # "x__2" was taken by a real probe
  assert [p.prompt for p in out] == ["0", "1", "2", "3", "4"]
  assert out[2].metadata["renamed_from"] == "x"


# ------------------------------------------------------------------------------------------------- statistics

def test_wilson_interval_matches_hand_computed_values():
  # 5/10, z = 1.96: centre (0.5 + 0.19208) / 1.38416 = 0.5, half 1.96 * sqrt(0.025 + 0.009604) / 1.38416
  lo, hi = stats.wilson_interval(5, 10)
  assert lo == pytest.approx(0.236593, abs=1e-5) and hi == pytest.approx(0.763407, abs=1e-5)
  # 0/10: [0, z^2/n / (1 + z^2/n)] = [0, 0.384146 / 1.384146]
  assert stats.wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-5)
  # 1/117 (the logged baseline exact rate on v1), far from symmetric around 0.85 %: z^2/n = 0.032833,
  # centre (0.008547 + 0.016417) / 1.032833 = 0.024170, half 1.96 * sqrt(7.2426e-5 + 7.0156e-5) / 1.032833 = 0.022660
  lo, hi = stats.wilson_interval(1, 117)
  assert lo == pytest.approx(0.001510, abs=1e-5) and hi == pytest.approx(0.046830, abs=1e-5)
  assert stats.wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_bootstrap_contains_the_true_delta_and_is_reproducible():
  rng = np.random.default_rng(0)
  n = 400
  a = (rng.random(n) < 0.3).astype(float)
  b = a.copy()
  flip = rng.choice(np.flatnonzero(a == 0), 40, replace=False)  # b solves 40 more probes: delta exactly 0.1
  b[flip] = 1.0
  res = stats.paired_bootstrap(a, b, n_resamples=4000, seed=1)
  assert res["delta"] == pytest.approx(0.1)
  lo, hi = res["ci"]
  assert lo < 0.1 < hi
  # Pairing keeps the CI tight (an unpaired bootstrap of these two columns would straddle 0).
  assert lo > 0.06 and hi < 0.14
  assert stats.paired_bootstrap(a, b, n_resamples=4000, seed=1) == res
  # Unit weights are the unweighted statistic.
  assert stats.paired_bootstrap(a, b, weights=np.ones(n), n_resamples=4000, seed=1) == res
  # Continuous weights take the CI off the 1/n lattice, so the seed visibly matters (and is honoured).
  w = rng.random(n) + 0.5
  one = stats.paired_bootstrap(a, b, weights=w, n_resamples=500, seed=1)
  assert stats.paired_bootstrap(a, b, weights=w, n_resamples=500, seed=1) == one
  assert stats.paired_bootstrap(a, b, weights=w, n_resamples=500, seed=2)["ci"] != one["ci"]


def test_bootstrap_coverage_on_simulated_models():
  # Two models with true accuracies 0.40 / 0.50 on fresh 300-probe samples: the 90 % CI must cover 0.1 most times.
  rng = np.random.default_rng(5)
  hits = 0
  for trial in range(40):
    u = rng.random(300)
    a, b = (u < 0.40).astype(float), (u < 0.50).astype(float)  # correlated, like two models on one suite
    lo, hi = stats.paired_bootstrap(a, b, n_resamples=500, seed=trial, alpha=0.1)["ci"]
    hits += lo <= 0.1 <= hi
  assert hits >= 32


def test_difficulty_weighting_on_a_hand_made_case():
  base = [EXACT, CONTAINED, NONE, NONE]
  w = bh.difficulty_weights(base)
  assert w.tolist() == [1, 2, 3, 3]
  model = [0.0, 1.0, 0.5, 0.0]  # misses the easy one, solves the medium one, half of one hard one
  assert bh.weighted_score(model, w) == pytest.approx((0 + 2 + 1.5 + 0) / 9)


def test_weighted_score_reproduces_the_logged_baseline_figure():
  # dba.md §5.1: baseline on 117 probes, easy 1 / medium 37 / hard 79, scored against itself -> 12.18 %.
  recs = [{"id": str(i), "category": "c", "match": m}
          for i, m in enumerate([EXACT] + [CONTAINED] * 37 + [NONE] * 79)]
  agg = bh.aggregate(recs)
  assert agg["weighted_pct"] == pytest.approx(100 * 38 / 312)
  assert agg["hard_pct"] == pytest.approx(100 / 117)
  assert agg["soft_pct"] == pytest.approx(100 * 38 / 117)  # the logged 32.48 %
  assert agg["difficulty"] == {"easy": 1, "medium": 37, "hard": 79}


def test_mcnemar_exact_by_hand():
  a = [True] * 5 + [False] * 2 + [True] * 3
  b = [False] * 5 + [True] * 2 + [True] * 3
  res = stats.mcnemar_exact(a, b)
  assert (res["only_a"], res["only_b"]) == (5, 2)
  assert res["p"] == pytest.approx(2 * (1 + 7 + 21) / 128)  # 2 * P(X <= 2), X ~ Bin(7, 1/2)


# ------------------------------------------------------------------------------------------------- runner

def _tiny_suite():
  return [Probe("e1", "copy", "exact", "In: hi\nOut:", "hi"),
          Probe("i1", "math", "integer", "3 * 4 =", 12),
          Probe("i2", "math", "integer", "1, 2, 3, 4, 5, 6,", 7),
          Probe("m1", "facts", "multiple_choice", "Sky:", " blue", (" red", " blue", " green"))]


def _fake_model(outputs, logprobs):
  def generate(prompt):
    assert prompt != "Sky:", "multiple choice must not be generated"
    return outputs[prompt]

  return generate, lambda prompt, completion: logprobs[completion]


def test_run_suite_with_fake_callables_gives_the_expected_aggregates():
  gen, lp = _fake_model({"In: hi\nOut:": " hi\nIn:", "3 * 4 =": " 3 * 4 = 12", "1, 2, 3, 4, 5, 6,": " 1 2 3 7"},
                        {" red": -3.0, " blue": -1.0, " green": -2.0})
  calls = []
  res = bh.run_suite(_tiny_suite(), gen, lp, progress=lambda i, n, pid: calls.append((i, n, pid)))
  assert [r["match"] for r in res["records"]] == [EXACT, CONTAINED, NONE, EXACT]
  assert res["records"][3]["chosen"] == " blue" and res["records"][3]["margin"] == pytest.approx(1.0)
  assert calls[-1] == (4, 4, "m1")
  agg = res["aggregates"]
  assert (agg["exact"], agg["contained"], agg["none"]) == (2, 1, 1)
  assert agg["hard_pct"] == pytest.approx(50.0)
  assert agg["soft_pct"] == pytest.approx(75.0)
  assert agg["partial_pct"] == pytest.approx(62.5)
  assert agg["weighted_pct"] == pytest.approx(100 * 3 / 7)  # own baseline: weights 1, 2, 3, 1
  assert agg["per_category"]["math"]["soft_pct"] == pytest.approx(50.0)
  assert agg["per_category"]["math"]["weighted_pct"] == pytest.approx(100 * 1 / 5)
  lo, hi = agg["hard_ci_pct"]
  assert lo < 50 < hi
  json.dumps(res)  # JSON-able as is
  # Against a baseline that failed everything, every weight is 3: weighted == partial.
  res2 = bh.run_suite(_tiny_suite(), gen, lp, baseline_matches={p.id: NONE for p in _tiny_suite()})
  assert res2["aggregates"]["weighted_pct"] == pytest.approx(62.5)


def test_run_suite_needs_logprob_fn_for_multiple_choice():
  gen, _ = _fake_model({}, {})
  with pytest.raises(ValueError, match="log-prob"):
    bh.run_suite(_tiny_suite()[3:], gen, None)


def test_compare_runs_weights_by_baseline_and_reports_deltas():
  gen_a, lp = _fake_model({"In: hi\nOut:": "no", "3 * 4 =": "12", "1, 2, 3, 4, 5, 6,": "8"},
                          {" red": -1.0, " blue": -2.0, " green": -3.0})
  gen_b, lp_b = _fake_model({"In: hi\nOut:": "hi", "3 * 4 =": "12", "1, 2, 3, 4, 5, 6,": "=7"},
                            {" red": -3.0, " blue": -1.0, " green": -2.0})
  runs = {"base": bh.run_suite(_tiny_suite(), gen_a, lp), "new": bh.run_suite(_tiny_suite(), gen_b, lp_b)}
  out = bh.compare_runs(runs, "base", n_resamples=200, seed=0)
  # base matches: none, exact, none, none -> weights 3, 1, 3, 3; new: exact, exact, contained, exact.
  new = out["models"]["new"]
  assert new["aggregates"]["weighted_pct"] == pytest.approx(100 * (3 + 1 + 1.5 + 3) / 10)
  assert out["models"]["base"]["aggregates"]["weighted_pct"] == pytest.approx(10.0)
  d = new["vs_baseline"]
  assert d["hard"]["delta_pp"] == pytest.approx(50.0)
  assert d["weighted"]["delta_pp"] == pytest.approx(75.0)
  assert d["mcnemar_exact"]["only_b"] == 2
  assert d["per_category_weighted_delta_pct"]["facts"] == pytest.approx(100.0)
  assert not math.isnan(d["soft"]["ci_pp"][0])
  json.dumps(out)
