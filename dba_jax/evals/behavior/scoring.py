"""Scoring a model on probes (dba.md §5.1): match classes, multiple choice by log-prob, aggregates, the runner.

`run_suite` takes plain callables, so it works with any generator (dba_jax/generate.py or a stub in tests).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dba_jax.evals.behavior.probes import CONTAINED, DIFFICULTY_NAME, DIFFICULTY_WEIGHT, EXACT, NONE, RAW_SCORE, Probe
from dba_jax.evals.stats import wilson_interval

# ------------------------------------------------------------------------------------------------- scoring

_INT_RE = re.compile(r"[+-]?\d+")
# A short answer counts as contained only as a whole token: these characters may sit around it.
_LEFT_EDGE = r"(?:^|[\s\[\(\{,;:])"
_RIGHT_EDGE = r"(?:[\s\]\)\},;:.]|$)"


def extract_integers(text: str) -> list[int]:
  """Signed integers in order of appearance: "2 + 2 = 4" -> [2, 2, 4]; "x-3" -> [-3]."""
  return [int(m) for m in _INT_RE.findall(text)]


def first_line(text: str) -> str:
  return text.strip().split("\n")[0].strip()


def classify(output: str, expected: Any) -> str:
  """EXACT / CONTAINED / NONE for a generated `output` (dba.md §5.1).

  Both sides are stripped of surrounding whitespace; nothing else is normalised (case and inner whitespace
  count). EXACT: the whole output or its first line equals the answer. CONTAINED:
  * integer answers: the answer is among the integers of the first line, and it is the only one there or the
    line reads like a statement of a result ("=", "answer" (any case) or " is "), so "1 2 3 4 5" does not
    earn credit for 4 but "2 + 2 = 4" does;
  * answers of at most 3 characters: the answer appears as a whole token anywhere in the output, or the first
    line starts with it followed by a non-alphanumeric character ("Yes." for "Yes");
  * longer answers: plain substring of the output.
  """
  out, exp = output.strip(), str(expected).strip()
  if not exp:
    return NONE
  line = first_line(out)
  if out == exp or line == exp:
    return EXACT
  if _INT_RE.fullmatch(exp):
    return _classify_integer(line, int(exp))
  if len(exp) <= 3:
    return CONTAINED if _short_token_found(out, line, exp) else NONE
  return CONTAINED if exp in out else NONE


def _classify_integer(line: str, expected: int) -> str:
  found = extract_integers(line)
  if expected not in found:
    return NONE
  low = line.lower()
  statement = "=" in line or "answer" in low or " is " in low
  return CONTAINED if len(found) == 1 or statement else NONE


def _short_token_found(out: str, line: str, exp: str) -> bool:
  if re.search(_LEFT_EDGE + re.escape(exp) + _RIGHT_EDGE, out):
    return True
  rest = line[len(exp):]
  return line.startswith(exp) and (not rest or not rest[0].isalnum())


def score(output: str, probe: Probe) -> float:
  """Raw score of an output for a probe: 1 exact, 0.5 contained, 0 none. For a multiple-choice probe `output`
  is the chosen choice (see `choose`), which is right or wrong: 1 or 0."""
  return RAW_SCORE[match(output, probe)]


def match(output: str, probe: Probe) -> str:
  if probe.kind == "multiple_choice":
    return EXACT if output == probe.answer else NONE
  return classify(output, probe.answer)


LogprobFn = Callable[[str, str], float]
GenerateFn = Callable[[str], str]


def choose(probe: Probe, logprob_fn: LogprobFn) -> dict:
  """Pick the choice with the highest log p(choice | prompt); ties go to the earlier choice.

  Returns the chosen string, every choice's log-prob and the margin log p(answer) - best other (positive iff
  the model prefers the right answer), which is more informative than right/wrong for weak models."""
  lps = [float(logprob_fn(probe.prompt, c)) for c in probe.choices]
  best = int(np.argmax(lps))
  right = probe.choices.index(probe.answer)
  others = [lp for i, lp in enumerate(lps) if i != right]
  margin = lps[right] - max(others) if others else float("inf")
  return {"chosen": probe.choices[best], "logprobs": lps, "margin": margin}


# ------------------------------------------------------------------------------------------------- weights

def difficulty_weights(baseline_matches: Sequence[str]) -> np.ndarray:
  """x1 for probes the baseline got exactly, x2 contained, x3 failed."""
  return np.array([DIFFICULTY_WEIGHT[m] for m in baseline_matches], dtype=np.float64)


def weighted_score(scores: Sequence[float], weights: Sequence[float]) -> float:
  """sum(raw * w) / sum(w): the share of the attainable weighted points that the model earned."""
  w = np.asarray(weights, np.float64)
  return float(np.dot(np.asarray(scores, np.float64), w) / w.sum()) if w.sum() > 0 else 0.0


# ------------------------------------------------------------------------------------------------- aggregates

def _summary(matches: Sequence[str], weights: np.ndarray) -> dict:
  n = len(matches)
  exact, contained = matches.count(EXACT), matches.count(CONTAINED)
  raw = [RAW_SCORE[m] for m in matches]
  share = (lambda k: 100.0 * k / n) if n else (lambda k: 0.0)
  return {
      "n": n, "exact": exact, "contained": contained, "none": n - exact - contained,
      "hard_pct": share(exact),
      "soft_pct": share(exact + contained),  # exact or contained (the anchor's "soft")
      "partial_pct": share(sum(raw)),  # exact + 0.5 x contained
      "weighted_pct": 100.0 * weighted_score(raw, weights),
      "hard_ci_pct": tuple(100.0 * x for x in wilson_interval(exact, n)),
      "soft_ci_pct": tuple(100.0 * x for x in wilson_interval(exact + contained, n)),
  }


def aggregate(records: Sequence[Mapping], baseline_matches: Mapping[str, str] | None = None) -> dict:
  """Overall and per-category scores of run records (`run_suite`'s "records").

  `baseline_matches` maps probe id -> the baseline model's match and sets the difficulty weights; without it
  the run is its own baseline (what the baseline model's row of a comparison is)."""
  base = baseline_matches or {r["id"]: r["match"] for r in records}
  missing = [r["id"] for r in records if r["id"] not in base]
  if missing:
    raise KeyError(f"baseline has no result for {len(missing)} probes, e.g. {missing[:3]}")
  matches = [r["match"] for r in records]
  weights = difficulty_weights([base[r["id"]] for r in records])
  out = _summary(matches, weights)
  out["difficulty"] = {DIFFICULTY_NAME[m]: sum(base[r["id"]] == m for r in records) for m in (EXACT, CONTAINED, NONE)}
  out["per_category"] = {}
  for cat in dict.fromkeys(r["category"] for r in records):
    idx = [i for i, r in enumerate(records) if r["category"] == cat]
    out["per_category"][cat] = _summary([matches[i] for i in idx], weights[idx])
  return out


# ------------------------------------------------------------------------------------------------- runner

def run_probe(probe: Probe, generate_fn: GenerateFn | None, logprob_fn: LogprobFn | None) -> dict:
  """One JSON-able record: multiple choice by log-prob, everything else by generation."""
  rec = {"id": probe.id, "category": probe.category, "kind": probe.kind, "answer": probe.answer}
  if probe.kind == "multiple_choice":
    if logprob_fn is None:
      raise ValueError(f"{probe.id} is multiple choice and is scored by log-prob: pass logprob_fn")
    rec.update(choose(probe, logprob_fn))
    out = rec["chosen"]
  else:
    if generate_fn is None:
      raise ValueError(f"{probe.id} is scored on generated text: pass generate_fn")
    out = rec["output"] = str(generate_fn(probe.prompt))
  rec["match"] = match(out, probe)
  rec["score"] = RAW_SCORE[rec["match"]]
  return rec


def run_suite(probes: Sequence[Probe], generate_fn: GenerateFn | None = None, logprob_fn: LogprobFn | None = None,
              *, baseline_matches: Mapping[str, str] | None = None,
              progress: Callable[[int, int, str], None] | None = None) -> dict:
  """Run every probe and score it.

  generate_fn(prompt) -> the model's continuation (greedy, e.g. 32 new tokens, the prompt not included);
  logprob_fn(prompt, completion) -> log p(completion | prompt) summed over the completion's tokens;
  baseline_matches: {probe id: match} of the baseline model (see `aggregate`); progress(i, n, probe_id).
  Returns {"records": [per-probe dicts], "aggregates": aggregate(...)}, all JSON-serialisable."""
  records = []
  for i, p in enumerate(probes):
    if progress:
      progress(i + 1, len(probes), p.id)
    records.append(run_probe(p, generate_fn, logprob_fn))
  return {"records": records, "aggregates": aggregate(records, baseline_matches)}

