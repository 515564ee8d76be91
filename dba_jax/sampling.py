"""Token picking and the generate loop shared by both decoders (dba_jax.generate.Generator, the KV-cache one, and
dba_jax.hope.decode.MemoryGenerator, the memory blocks'): anything with prefill / decode / batch / max_len / m."""
from __future__ import annotations

import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def pick(logits_BV, key, temperature, vocab: int):
  """Greedy at temperature 0, else a sample from softmax(logits / T); only the first `vocab` logits count."""
  logits = logits_BV[:, :vocab].astype(jnp.float32)
  sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
  return jnp.where(temperature > 0, sampled, jnp.argmax(logits, -1)).astype(jnp.int32)


def generate(gen, prompt_BP, max_new: int, temperature: float = 0.0, seed: int = 0, stop_tokens=(),
             progress: bool = False) -> dict:
  """New tokens per row, each cut before its first stop token (any ids, 0 included only if listed).

  Returns {"tokens": [[...] per row], "stopped": [bool per row], "prefill_s", "decode_s", "new_tokens",
  "decode_steps", "decode_tokens_per_s"}. Sampling keys are fold_in(key(seed), step), so a seed reproduces the
  output."""
  if not math.isfinite(temperature) or temperature < 0:  # a NaN would silently decode greedily
    raise ValueError(f"temperature={temperature} must be a finite number >= 0 (0: greedy)")
  stop, key = set(int(s) for s in stop_tokens), jax.random.key(seed)
  t0 = time.perf_counter()
  logits, state = gen.prefill(prompt_BP)
  tok = np.asarray(pick(logits, jax.random.fold_in(key, 0), jnp.float32(temperature), gen.m.vocab_size))
  prefill_s = time.perf_counter() - t0
  rows, done = [[] for _ in range(gen.batch)], np.zeros(gen.batch, bool)
  budget = min(max_new, gen.max_len - state[1] + 1)
  t1 = last = time.perf_counter()
  steps = 0
  for i in range(budget):
    for b in np.flatnonzero(~done):
      done[b] = int(tok[b]) in stop
      if not done[b]:
        rows[b].append(int(tok[b]))
    if done.all() or i == budget - 1:
      break
    _, state, nxt = gen.decode(state, tok, jax.random.fold_in(key, i + 1), temperature)
    tok, steps = np.asarray(nxt), steps + 1
    if progress and time.perf_counter() - last > 2.0:
      last = time.perf_counter()
      print(f"  generated {i + 1} tokens, {(i + 1) / (last - t1):.1f} tok/s", file=sys.stderr, flush=True)
  decode_s = time.perf_counter() - t1
  return {"tokens": rows, "stopped": done.tolist(), "prefill_s": prefill_s, "decode_s": decode_s,
          "new_tokens": sum(len(r) for r in rows), "decode_steps": steps,
          "decode_tokens_per_s": gen.batch * steps / max(decode_s, 1e-9)}
