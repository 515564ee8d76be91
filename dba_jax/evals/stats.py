"""The statistics every eval reports with, in one place (pure Python + numpy, no scipy).

  wilson_interval   a binomial proportion's interval (behaviour scores, HOPE needle accuracy, LatentWire exact match)
  paired_bootstrap  percentile bootstrap of a paired score delta over the same probes (behaviour comparisons)
  mcnemar_exact     exact McNemar test on paired right/wrong outcomes (behaviour comparisons)
  binomial_greater  exact one-sided binomial p of k or more successes of n at chance p0 (accuracy vs chance)
  holm              Holm's step-down adjustment of a family of p-values (one results table, many cells)
  summary           n, mean, sample std, min, max (dba-seeds)
  paired            paired differences over seeds: mean, std, Student's t with its two-sided p, exact sign-flip p
  sign_flip_p       the exact two-sided sign-flip permutation p of paired differences (all 2^n sign patterns)
  t_two_sided_p     P(|T| >= |t|) for Student's t (through the regularised incomplete beta function `betainc`)
  mean_interval     a sample mean with its Student-t interval and the t-test p against 0 (any n: no enumeration)
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np


# ------------------------------------------------------------------------------------------------- proportions

def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
  """Wilson score interval for k successes in n trials (95 % by default); unlike the normal approximation it
  stays inside [0, 1] and is not degenerate at 0 or n successes, which matters at the ~1 % exact rates seen."""
  if n == 0:
    return 0.0, 1.0
  p = k / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap(scores_a: Sequence[float], scores_b: Sequence[float], *, weights: Sequence[float] | None = None,
                     n_resamples: int = 10_000, seed: int = 0, alpha: float = 0.05) -> dict:
  """Percentile bootstrap of mean(b) - mean(a) over the same probes, resampling probes (not models) so the
  pairing is kept. With `weights` the statistic is the weighted score (resampled weights included).

  Returns {"delta": point estimate on all probes, "ci": (lo, hi), "n_resamples", "seed", "alpha"}."""
  a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or a.size == 0:
    raise ValueError(f"paired scores must be two equal, non-empty 1-D arrays; got {a.shape} and {b.shape}")
  w = np.ones_like(a) if weights is None else np.asarray(weights, np.float64)
  rng = np.random.default_rng(seed)
  deltas = np.empty(n_resamples)
  chunk = max(1, 2_000_000 // a.size)  # bounds memory at ~16 MB of indices whatever the suite size
  for start in range(0, n_resamples, chunk):
    idx = rng.integers(0, a.size, size=(min(chunk, n_resamples - start), a.size))
    ws = w[idx]
    deltas[start:start + len(idx)] = ((b[idx] - a[idx]) * ws).sum(1) / ws.sum(1)
  lo, hi = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
  return {"delta": float(np.dot(b - a, w) / w.sum()), "ci": (float(lo), float(hi)),
          "n_resamples": n_resamples, "seed": seed, "alpha": alpha}


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
  """Two-sided exact McNemar test on paired right/wrong outcomes (binomial test on the discordant pairs)."""
  a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
  only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
  n, k = only_a + only_b, min(only_a, only_b)
  tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n if n else 1.0
  return {"only_a": only_a, "only_b": only_b, "p": min(1.0, 2 * tail)}


def binomial_greater(k: int, n: int, p0: float) -> float:
  """P(X >= k) for X ~ Binomial(n, p0), exact (summed in log space, so any n works)."""
  if k <= 0:
    return 1.0
  if k > n:
    return 0.0
  log_pmf = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p0)
             + (n - i) * math.log1p(-p0) for i in range(k, n + 1)]
  top = max(log_pmf)
  return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in log_pmf))


def holm(pvalues: Sequence[float]) -> list[float]:
  """Holm-adjusted p-values (family-wise error control over every test in one table), in the input order."""
  order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
  out, running = [0.0] * len(pvalues), 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
    out[i] = running
  return out


# ------------------------------------------------------------------------------------------------- means over seeds

def summary(xs: list[float]) -> dict:
  """n, mean, sample standard deviation (n - 1; NaN for one value), min and max."""
  n = len(xs)
  mean = sum(xs) / n
  sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
  return {"n": n, "mean": mean, "std": sd, "min": min(xs), "max": max(xs)}


def sign_flip_p(diffs: Sequence[float]) -> float:
  """Exact two-sided sign-flip permutation p of paired differences: the share of the 2^n sign patterns whose
  |mean| reaches the observed one. No normality assumed; n stays small (seeds), so enumerating is cheap."""
  n = len(diffs)
  observed = abs(sum(diffs) / n) - 1e-12
  flips = [abs(sum(s * x for s, x in zip(signs, diffs))) / n for signs in itertools.product((1, -1), repeat=n)]
  return sum(f >= observed for f in flips) / len(flips)


def paired(a: list[float], b: list[float]) -> dict:
  """Paired comparison of a - b: mean, std, t, two-sided t-test p, exact sign-flip permutation p, a < b count."""
  d = [x - y for x, y in zip(a, b)]
  st = summary(d)
  n, mean, sd = len(d), st["mean"], st["std"]
  t = mean / (sd / math.sqrt(n)) if n > 1 and sd > 0 else (math.copysign(math.inf, mean) if mean else 0.0)
  return {"n": n, "mean_diff": mean, "std_diff": sd, "t": t,
          "p_t": t_two_sided_p(t, n - 1) if n > 1 else float("nan"),
          "p_sign_flip": sign_flip_p(d), "a_lower": sum(x < 0 for x in d), "diffs": d}


# ------------------------------------------------------------------------------------------------- Student's t

def _betacf(a: float, b: float, x: float) -> float:
  """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
  tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 300):
    for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
      d = 1.0 + num * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + num / c
      c = c if abs(c) > tiny else tiny
      h *= d * c
    if abs(d * c - 1.0) < 1e-14:
      break
  return h


def betainc(a: float, b: float, x: float) -> float:
  """I_x(a, b), the regularised incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
  if x <= 0.0 or x >= 1.0:
    return max(0.0, min(1.0, x))
  ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
  if x < (a + 1.0) / (a + b + 2.0):
    return math.exp(ln) * _betacf(a, b, x) / a
  return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
  """P(|T| >= |t|) for Student's t with df degrees of freedom."""
  if not math.isfinite(t):
    return 0.0
  return betainc(df / 2.0, 0.5, df / (df + t * t))


def mean_interval(xs: Sequence[float], alpha: float = 0.05) -> dict:
  """{"mean", "ci": (lo, hi), "p": two-sided t-test of mean 0}: the critical t found by bisection on
  t_two_sided_p, so it needs no table (NaN interval and p for fewer than 2 values)."""
  st = summary(list(xs))
  n, mean, sd = st["n"], st["mean"], st["std"]
  if n < 2:
    return {"mean": mean, "ci": (float("nan"), float("nan")), "p": float("nan")}
  lo, hi = 0.0, 1e3
  for _ in range(100):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if t_two_sided_p(mid, n - 1) > alpha else (lo, mid)
  half = hi * sd / math.sqrt(n)
  t = mean / (sd / math.sqrt(n)) if sd > 0 else (math.copysign(math.inf, mean) if mean else 0.0)
  return {"mean": mean, "ci": (mean - half, mean + half), "p": t_two_sided_p(t, n - 1) if sd > 0 else float(mean == 0)}
