"""Synthetic text for memory training (data.source = "synthetic"): long-range recall a chunk-local model cannot do.

"passkey": documents that state keys early ("The pass key is KEY-4821. Remember it."), pad with filler sentences,
and ask for them at the end ("What is the pass key? The pass key is KEY-4821."), in the templates of the passkey /
NIAH evals (dba_jax.evals.hope_memory) but with other filler counts and fresh keys, so training teaches the format
while every eval key is new. Mixed with stdlib text (data.mix_stdlib) it keeps the model a language model.
"""
from __future__ import annotations

import numpy as np

FILLER = "This is filler sentence number {}. "


def passkey_document(rng, n_filler: int, needle: str = "The pass key is KEY-{}. Remember it. ",
                     question: str = "What is the pass key? The pass key is KEY-{}.\n") -> str:
  key = int(rng.integers(1000, 10000))
  at = int(rng.integers(0, n_filler // 4 + 1))  # the needle sits in the first quarter
  filler = [FILLER.format(i) for i in range(n_filler)]
  return "".join(filler[:at]) + needle.format(key) + "".join(filler[at:]) + question.format(key)


def passkey_text(n_chars: int, seed: int, max_filler: int = 12) -> str:
  rng = np.random.default_rng(seed)
  out, size = [], 0
  while size < n_chars:
    doc = passkey_document(rng, int(rng.integers(1, max_filler + 1)))
    out.append(doc)
    size += len(doc)
  return "".join(out)


def passkey_long_text(n_chars: int, seed: int) -> str:
  """passkey documents with up to 48 filler sentences (about 1,700 bytes): needle-to-question distances up to the
  T 1024-2048 windows that teach the memory to hold a key over many more writes."""
  return passkey_text(n_chars, seed, max_filler=48)
