"""Greedy-decoding evaluation of the tiny addition models (others.md A.6; `dba-addition-eval`, `dba-eval addition`).

  dba-addition-eval --checkpoint best_456p_s43.pt [--strict] [--out X.json]
  dba-addition-eval --checkpoint runs/add456 [--which last]     (every model_<i> of a run)

The problems are evaluate_checkpoints': the 10,000-pair test split of holdout splits (val 5000, test 10000) for
each of 10 seeds, 100,000 in all. The splits come from our random stream (data.holdout_splits), so they are
different numbers than the original's with the same distribution. Exact match compares the 11 sum digits and
ignores the 12th token (as the original does); strict also requires it to be EOS.
"""
from __future__ import annotations

import argparse
import sys
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from dba_jax.addition import checkpoint, data
from dba_jax.addition.model import Arch, count_params, forward, greedy_decode
from dba_jax.cli import command, entry, int_at_least, listed, refuse_existing, write_json


def make_decoder(a: Arch):
  """jit(params, prompt (B, 22)) -> 12 greedy tokens (B, 12)."""
  return jax.jit(lambda params, prompt_BP: greedy_decode(lambda ids: forward(a, params, ids), prompt_BP))


def decode_all(decode, prompt_NP: np.ndarray, batch_size: int) -> np.ndarray:
  """Decode in fixed-size batches (the last one padded, so one compilation serves every batch)."""
  out = []
  for i in range(0, len(prompt_NP), batch_size):
    chunk = prompt_NP[i:i + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
    out.append(np.asarray(decode(jnp.asarray(chunk)))[:batch_size - pad])
  return np.concatenate(out) if out else np.zeros((0, data.TARGET_LEN), np.int32)


def score(tokens_N12: np.ndarray, a_N: np.ndarray, b_N: np.ndarray) -> dict:
  """Per-problem correctness: `exact` (11 digits), `strict` (and EOS), `digit_ok` (N, 11)."""
  want_N12 = data.encode(a_N, b_N)[:, data.PROMPT_LEN:]
  digit_ok = tokens_N12[:, :data.SUM_DIGITS] == want_N12[:, :data.SUM_DIGITS]
  exact = digit_ok.all(axis=1)
  return {"exact": exact, "strict": exact & (tokens_N12[:, -1] == data.EOS), "digit_ok": digit_ok}


def _failure(seed, a, b, tokens, digit_ok) -> dict:
  got = tokens[:data.SUM_DIGITS]
  return {"seed": int(seed), "a": int(a), "b": int(b), "expected": int(a + b),
          "got": int(data.decode_sum(np.clip(got, 0, 9)[None])[0]) if np.all(got <= 9) else None,
          "tokens": [int(t) for t in tokens], "wrong_digits_lsd_first": [int(i) for i in np.flatnonzero(~digit_ok)]}


def evaluate(decode, seeds=data.EVAL_SEEDS, limit: int = 0, batch_size: int = 2000, strict: bool = False,
             max_failures: int = 20, val_size: int = 5000, test_size: int = 10000) -> dict:
  """Aggregate and per-seed exact match of `decode(prompt (B, 22)) -> (B, 12)` on each seed's test split
  (first `limit` problems of each when limit > 0). `strict` picks which exact match is the headline."""
  per_seed, failures = {}, []
  tot = {"n": 0, "exact": 0, "strict": 0, "digits": np.zeros(data.SUM_DIGITS), "eos": 0}
  for seed in seeds:
    sp = data.holdout_splits(val_size, test_size, seed)
    a_N, b_N = sp["test_a"], sp["test_b"]
    if limit:
      a_N, b_N = a_N[:limit], b_N[:limit]
    tokens = decode_all(decode, data.encode(a_N, b_N)[:, :data.PROMPT_LEN], batch_size)
    s = score(tokens, a_N, b_N)
    ok = s["strict"] if strict else s["exact"]
    per_seed[str(seed)] = {"exact_match": float(ok.mean()), "errors": int((~ok).sum()),
                           "exact_match_eos_unchecked": float(s["exact"].mean()),
                           "exact_match_strict": float(s["strict"].mean())}
    tot["n"] += len(a_N)
    tot["exact"] += int(s["exact"].sum())
    tot["strict"] += int(s["strict"].sum())
    tot["digits"] += s["digit_ok"].sum(0)
    tot["eos"] += int((tokens[:, -1] == data.EOS).sum())
    for i in np.flatnonzero(~ok)[:max(0, max_failures - len(failures))]:
      failures.append(_failure(seed, a_N[i], b_N[i], tokens[i], s["digit_ok"][i]))
  n = max(tot["n"], 1)
  headline = tot["strict"] if strict else tot["exact"]
  return {"multi_seed_validation": {
      "total_examples": tot["n"], "num_test_sets": len(seeds), "strict": strict,
      "aggregate_exact_match": headline / n, "aggregate_errors": tot["n"] - headline,
      "aggregate_exact_match_eos_unchecked": tot["exact"] / n, "aggregate_exact_match_strict": tot["strict"] / n,
      "per_digit_accuracy_lsd_first": (tot["digits"] / n).tolist(),
      "digit_accuracy": float(tot["digits"].sum() / (n * data.SUM_DIGITS)), "eos_accuracy": tot["eos"] / n,
      "per_seed": per_seed}, "failures": failures}


def evaluate_checkpoint(loaded, **kw) -> dict:
  """evaluate() of one checkpoint.Loaded, with evaluate_checkpoints' header fields."""
  params = jax.tree.map(jnp.asarray, loaded.params)
  dec = make_decoder(loaded.arch)
  t0 = time.perf_counter()
  res = evaluate(lambda p: dec(params, p), **kw)
  m = loaded.meta
  return {"checkpoint": loaded.name, "parameters": count_params(loaded.arch),
          "config": {k: v for k, v in vars(loaded.arch).items()},
          "training": {"seed": m.get("seed"), "total_steps": m.get("total_steps"), "best_step": m.get("step"),
                       "val_exact": m.get("val_exact")},
          **res, "eval_seconds": time.perf_counter() - t0}


@command("dba-addition-eval", argv0=False)
def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="dba-addition-eval", description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="a .pt file, a best/ or last/ dir, a model_<i>/ dir or a run dir")
  p.add_argument("--which", default="best", choices=("best", "last"), help="checkpoint of a run/model dir")
  p.add_argument("--strict", action="store_true", help="exact match also requires EOS as the 12th token")
  p.add_argument("--out", default="", help="write the JSON here (always printed)")
  p.add_argument("--force", action="store_true", help="replace an existing --out file")
  # Range-checked by their types before any checkpoint is read (argparse: one line, exit 2).
  p.add_argument("--batch-size", type=int_at_least(1), default=2000)
  p.add_argument("--limit", type=int_at_least(0), default=0,
                 help="first N problems of each seed's split (0, the default: all 10,000)")
  p.add_argument("--seeds", type=listed(int_at_least(0)), default=list(data.EVAL_SEEDS),
                 help="comma-separated split seeds (integers >= 0)")
  p.add_argument("--failures", type=int_at_least(0), default=20, help="failure samples to keep")
  args = p.parse_args(argv)
  twice = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
  if twice:
    print(f"dba-addition-eval: error: --seeds lists {', '.join(map(str, twice))} more than once; each seed is one test "
          "split, scored once", file=sys.stderr)
    return 2
  refuse_existing("dba-addition-eval", args.out, args.force)
  try:
    models = checkpoint.load(args.checkpoint, args.which)
  except (ValueError, OSError) as e:  # ConversionError, torch_io.CheckpointReadError
    print(f"dba-addition-eval: error: {e}", file=sys.stderr)
    return 2
  except (EOFError, zipfile.BadZipFile) as e:  # a truncated params.npz
    print(f"dba-addition-eval: error: {args.checkpoint}: a truncated or corrupt params.npz ({e})", file=sys.stderr)
    return 2
  seeds = tuple(args.seeds)
  results = [evaluate_checkpoint(m, seeds=seeds, limit=args.limit, batch_size=args.batch_size, strict=args.strict,
                                 max_failures=args.failures) for m in models]
  for r in results:
    v = r["multi_seed_validation"]
    print(f"{r['checkpoint']}: {r['parameters']} params, exact match {v['aggregate_exact_match']:.6f} "
          f"({v['aggregate_errors']} errors / {v['total_examples']}{', strict' if args.strict else ''}), "
          f"digit acc {v['digit_accuracy']:.6f}", file=sys.stderr)
  out = results[0] if len(results) == 1 else {"models": results}
  print(write_json(args.out, out))
  return 0


cli = entry(main)


if __name__ == "__main__":
  cli()
