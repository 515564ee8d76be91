"""Next-token negative log-likelihood: the one loss function training, evaluation and pruning share."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def nll(logits_BTV, targets_BT, vocab: int):
  """Per-token NLL [B, T] (any leading shape) in (at least) float32 over the first `vocab` logits: padded vocab
  columns (and any beyond a --vocab-limit) are masked out of the normaliser."""
  logits = logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32))  # float64 stays float64
  if logits.shape[-1] > vocab:
    lead = (1,) * (logits.ndim - 1)
    logits = jnp.where(jnp.arange(logits.shape[-1]).reshape(lead + (-1,)) < vocab, logits, -jnp.inf)
  return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets_BT[..., None], -1)[..., 0]
