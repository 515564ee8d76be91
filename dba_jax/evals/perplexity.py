"""Perplexity: which tokens are scored, and how (`dba-eval ppl`: `command`).

Which tokens perplexity scores (`perplexity`):
  default: non-overlapping windows of seq_len + 1 tokens starting at 0, seq_len, 2 seq_len, ... of each shard
    (neighbouring windows share one boundary token). The model reads the first seq_len tokens of a window and
    every token after the window's first is scored once, conditioned only on the tokens of its own window.
    Tokens after the last whole window of a shard are not scored; the first token of each shard never is.
  overlap=True (the anchor's `ppl_fineweb`, dba.md §6): windows start every `stride` tokens (default 1) and
    all seq_len targets of every window count, so a token is scored up to seq_len / stride times with different
    contexts (many with very short ones). The anchor also read its training file; we read the split asked for.
  ppl = exp(sum NLL / scored tokens). The softmax runs over the first `vocab_limit` logits (default the
  tokenizer's vocab_size, e.g. 50257 of 50304 padded GPT-2 logits).
"""
from __future__ import annotations

import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dba_jax import data, losses
from dba_jax.evals.common import EvalError, load_checkpoint, read_checkpoint_config


def _nll_fn(model, vocab_limit: int):
  """jit(tokens [B, L + 1], weights [B, L]) -> (sum of weighted NLL, sum of weights), float32."""
  apply = model._apply

  def fn(params, windows_BL1, weights_BL):
    nll = losses.nll(apply(params, windows_BL1[:, :-1]), windows_BL1[:, 1:], vocab_limit)
    return (nll * weights_BL).sum(), weights_BL.sum()

  return jax.jit(fn)


def windows(tokens, seq_len: int, stride: int):
  """data.Windows over one 1-D token array or a list of shards."""
  shards = [np.asarray(tokens)] if np.ndim(tokens[0]) == 0 else [np.asarray(s) for s in tokens]
  return data.Windows(shards, seq_len, stride)


def perplexity(model, config, tokens, seq_len: int, overlap: bool = False, vocab_limit: int | None = None,
               stride: int = 1, batch_size: int = 8, max_windows: int = 0, progress: bool = False) -> dict:
  """Perplexity of `model` (dba_jax.model.Model) on `tokens` (one 1-D array or a list of shards); see the
  module docstring for exactly which tokens count. `config` is the run config (or its model section)."""
  m = config.model if "model" in config else config
  vocab_limit = int(vocab_limit or m.vocab_size)
  w = windows(tokens, seq_len, stride if overlap else seq_len)
  if len(w) == 0:
    raise ValueError(f"the data holds no window of {seq_len + 1} tokens; give a smaller seq_len")
  n = len(w) if not max_windows else min(len(w), max_windows)
  # With max_windows, spread the windows evenly over the data rather than taking its start.
  idx = np.arange(n) if n == len(w) else np.linspace(0, len(w) - 1, n).astype(int)
  fn = _nll_fn(model, vocab_limit)
  total, count = 0.0, 0.0
  t0 = last = time.perf_counter()
  for start in range(0, n, batch_size):
    chunk = [w[int(i)] for i in idx[start:start + batch_size]]
    real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - real)  # one compiled shape: padding rows get weight 0
    weights = np.zeros((batch_size, seq_len), np.float32)
    weights[:real] = 1.0
    s, c = fn(model.params, jnp.asarray(np.stack(chunk), jnp.int32), jnp.asarray(weights))
    total, count = total + float(s), count + float(c)
    if progress and time.perf_counter() - last > 5.0:
      last = time.perf_counter()
      print(f"  {start + real}/{n} windows, {count / (last - t0):,.0f} tok/s, running ppl "
            f"{math.exp(total / count):.4f}", file=sys.stderr, flush=True)
  nll = total / count
  return {"ppl": math.exp(nll), "nll": nll, "scored_tokens": int(count), "windows": int(n),
          "mode": "overlap" if overlap else "non_overlapping", "stride": stride if overlap else seq_len,
          "seq_len": seq_len, "vocab_limit": vocab_limit, "seconds": time.perf_counter() - t0}


def command(args) -> dict:
  """`dba-eval ppl`: perplexity of --checkpoint on its run's --split; the JSON names the checkpoint step scored."""
  c = read_checkpoint_config(args.checkpoint)
  try:  # the data first: a missing or broken file is refused before the model loads
    tokens = getattr(data.load_splits(c.data, c.model.vocab_size), args.split)
  except data.DataError as e:
    raise EvalError(str(e)) from None
  model, c = load_checkpoint(args.checkpoint)
  try:
    seq_len = args.seq_len or c.data.seq_len
    r = perplexity(model, c, tokens, seq_len, overlap=args.overlap, vocab_limit=args.vocab_limit, stride=args.stride,
                   batch_size=args.batch_size, max_windows=args.max_windows, progress=True)
  except ValueError as e:  # no window of seq_len + 1 tokens in the split
    raise EvalError(str(e)) from None
  r.update(checkpoint=args.checkpoint, step=model.step, checkpoint_dir=model.checkpoint_dir, split=args.split)
  print(f"{args.checkpoint} (step {model.step}): {args.split} ppl {r['ppl']:.4f} (nll {r['nll']:.4f}) over "
        f"{r['scored_tokens']:,} tokens, {r['mode']}, {r['scored_tokens'] / r['seconds']:,.0f} tok/s", file=sys.stderr)
  return r
