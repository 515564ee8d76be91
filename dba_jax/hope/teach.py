"""The teach signal δ (others.md B.3): the inner loop's error, its scale / clip / schedule and the surprise gate."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def closed_form(logits_BTV, targets_BT, mask_BT, vocab: int):
  """(softmax − onehot) · mask / N = ∂(mean CE over the N active tokens)/∂logits, with the softmax over the first
  `vocab` logits (padded vocab columns are not classes: 0 there). The model's readout pulls it back to δ at the last
  block's output (hope/step.py)."""
  logits = logits_BTV.astype(jnp.float32) if logits_BTV.dtype != jnp.float64 else logits_BTV
  cols = jnp.arange(logits.shape[-1]).reshape((1, 1, -1))
  p = jax.nn.softmax(jnp.where(cols < vocab, logits, -jnp.inf), axis=-1)
  err = p - jax.nn.one_hot(targets_BT, logits.shape[-1], dtype=p.dtype)
  n = jnp.maximum(mask_BT.sum(), 1).astype(p.dtype)
  return err * (mask_BT[..., None].astype(p.dtype) / n)


def scale_and_clip(delta_BTd, scale, clip: float):
  """s = scale · δ, then per token s / max(1, ‖s‖ / clip) (clip 0: none)."""
  s = scale * delta_BTd
  if clip > 0:
    s = s / jnp.maximum(1.0, jnp.linalg.norm(s, axis=-1, keepdims=True) / clip)
  return s


def schedule(step, scale: float, warmup: int = 0, decay_start: int = 0, decay_duration: int = 0):
  """scale · min(1, (step+1)/warmup) · (1 − clip((step+1−decay_start)/decay_duration, 0, 1)); warmup 0 or
  decay_duration 0 switch that factor off (the original's pilot decayed to exactly 0 from step ≈140k)."""
  s = jnp.asarray(step, jnp.float32) + 1.0
  out = jnp.float32(scale)
  if warmup > 0:
    out = out * jnp.minimum(1.0, s / warmup)
  if decay_duration > 0:
    out = out * (1.0 - jnp.clip((s - decay_start) / decay_duration, 0.0, 1.0))
  return out


def surprise(s_BTd, mask_BT):
  """Mean per-token ‖scaled δ‖ of each row over its active tokens: [B]."""
  norms = jnp.linalg.norm(s_BTd, axis=-1) * mask_BT
  return norms.sum(-1) / jnp.maximum(mask_BT.sum(-1), 1)


def entropy(logits_BTV, vocab: int):
  """Predictive entropy (nats) per token over the first `vocab` logits: [B, T]."""
  logits = logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32))
  cols = jnp.arange(logits.shape[-1]).reshape((1, 1, -1))
  logp = jax.nn.log_softmax(jnp.where(cols < vocab, logits, -jnp.inf), axis=-1)
  return -jnp.where(cols < vocab, jnp.exp(logp) * logp, 0.0).sum(-1)


def gate(metric: str, threshold: float, s_LBTd, mask_BT, nll_BT, logits_BTV, vocab: int):
  """[L, B]: which rows of each layer update. A row's surprise (hope.surprise_metric: teach_norm, the layer's mean
  ‖s‖; loss, the row's mean CE; logit_entropy, its mean entropy, over active tokens) must reach the threshold (the
  original compares one batch-wide value; here each row carries its own memory), and a row with no teach signal
  updates nothing."""
  norm_LB = surprise(s_LBTd, mask_BT[None])
  row = lambda v_BT: (v_BT * mask_BT).sum(-1) / jnp.maximum(mask_BT.sum(-1), 1)
  if metric == "teach_norm":
    value = norm_LB
  elif metric == "loss":
    value = jnp.broadcast_to(row(nll_BT.astype(jnp.float32)), norm_LB.shape)
  elif metric == "logit_entropy":
    value = jnp.broadcast_to(row(entropy(logits_BTV, vocab)), norm_LB.shape)
  else:
    raise ValueError(f"hope.surprise_metric={metric!r} is not one of teach_norm, loss, logit_entropy")
  return (value >= threshold) & (norm_LB > 0)
