"""Passkey retrieval with and without memory (`dba-eval hope passkey --checkpoint DIR`; others.md B.7, short filler).

A prompt hides "The pass key is KEY-dddd. Remember it." among filler sentences ("This is filler sentence number
i.") and ends with "What is the pass key? The pass key is KEY-". The model reads it (with the answer) through the
two-pass online loop (dba_jax.hope.step): every answer token is scored in its chunk's read pass, before that chunk's
own update, so the memory holds only what came before. A sample is right when log p(true key) > log p(distractor);
chance is 0.5. "memory" uses the run's teach settings; "baseline" the same model with the teach scale at 0 (the fast
weights never move). The needle sits in the first chunk and the question in the last, so attention (chunk-local)
cannot see the key: only the memory can carry it.
"""
from __future__ import annotations

import numpy as np


def passkey_sample(rng, n_filler: int, chunk: int, tokenizer):
  """(tokens of prompt + true key, tokens of prompt + distractor, key length in tokens), left-padded with spaces to
  a whole number of chunks."""
  key, other = rng.choice(9000, size=2, replace=False) + 1000
  filler = [f"This is filler sentence number {i}. " for i in range(n_filler)]
  needle = f"The pass key is KEY-{key}. Remember it. "
  text = needle + "".join(filler) + "What is the pass key? The pass key is KEY-"
  ids = [tokenizer.encode(text + str(k)) for k in (key, other)]
  n = len(ids[0])
  pad = (-(n - 1)) % chunk  # inputs (all but the last token) fill whole chunks
  space = tokenizer.encode(" ")[0]
  return [np.asarray([space] * pad + list(x), np.int32) for x in ids], len(tokenizer.encode(str(key)))


def passkey(model, config, samples: int = 32, n_filler: int = 12, seed: int = 0) -> dict:
  """Accuracy of the 2-way choice with memory and without, and the CMS updates that fired per sample."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from dba_jax import data
  from dba_jax.hope import step as hope_step
  m = config.model
  h = m.hope
  chunk = h.online_chunk or config.data.seq_len
  tok = data.get_tokenizer(config.data.tokenizer)
  off = h.copy_and_resolve_references()
  off.teach_scale = 0.0
  # The teach schedule at the end of its warmup: the full teach scale (before any decay).
  run = {name: jax.jit(lambda p, t, hh=hh: hope_step.memory_forward(nnx.merge(model.graphdef, p), t, h.teach_warmup,
                                                                   hh, m.vocab_size, training=False))
         for name, hh in (("memory", h), ("baseline", off))}
  rng = np.random.default_rng(seed)
  right = {"memory": 0, "baseline": 0}
  fired, length = [], 0
  for _ in range(samples):
    (true_ids, other_ids), k = passkey_sample(rng, n_filler, chunk, tok)
    length = len(true_ids)
    for name, fn in run.items():
      lp = []
      for ids in (true_ids, other_ids):
        out = fn(model.params, jnp.asarray(ids)[None])
        lp.append(-float(out.token_nll[0, -k:].sum()))
        if name == "memory" and ids is true_ids:
          fired.append(int(out.fired.sum()))
      right[name] += lp[0] > lp[1]
  acc = {name: right[name] / samples for name in right}
  return {"task": "passkey", "samples": samples, "tokens": length, "chunk": chunk, "chance": 0.5,
          "baseline_acc": acc["baseline"], "memory_acc": acc["memory"], "delta": acc["memory"] - acc["baseline"],
          "updates_fired_per_sample": float(np.mean(fired))}
