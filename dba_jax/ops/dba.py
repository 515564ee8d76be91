"""Decoupled bottleneck attention (dba.md §1.2-1.8) as one op.

  score_h = a_h <q_sem, k_sem> sem_scale + b_h <q_geo, k_geo> geo_scale   (RoPE already on the geometric streams)

a, b: the semantic / geometric path weights (1 ungated; the gated model passes [B, T, H, 1]); the scales are
d**-0.5 per path (d**-1 under muP). `null` = (k [K, d_sem + d_geo], v [K, E]): one always-visible null key.

  reference: the two score paths computed separately in the inputs' dtype (float64 in, float64 math).
  xla / pallas: weights and scales folded into the queries, q/k concatenated as [sem | geo] per head, then one
             scale-1 standard attention (dba_jax.ops.standard), null key as an always-visible prefix column.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dba_jax.ops import standard
from dba_jax.ops.base import causal_mask, dispatch


def fold_queries(q_sem, q_geo, *, sem_scale, geo_scale, sem_weight=1.0, geo_weight=1.0):
  """[a q_sem sem_scale | b q_geo geo_scale]: queries for one scale-1 attention over [k_sem | k_geo]."""
  return jnp.concatenate([q_sem * (sem_weight * sem_scale), q_geo * (geo_weight * geo_scale)], axis=-1)


def _null_visible(mask):
  """A visibility mask grown by the always-visible null column in front (None stays None)."""
  return None if mask is None else jnp.concatenate([jnp.ones(mask.shape[:-1] + (1,), bool), mask], axis=-1)


def _prefix_null(k_BSKD, v_BSKE, mask, null):
  """Keys/values with the null token as column 0 (always visible); the mask, if any, grows the same column."""
  B = k_BSKD.shape[0]
  null_k, null_v = null
  k = jnp.concatenate([jnp.broadcast_to(null_k.astype(k_BSKD.dtype), (B, 1) + null_k.shape), k_BSKD], axis=1)
  v = jnp.concatenate([jnp.broadcast_to(null_v.astype(v_BSKE.dtype), (B, 1) + null_v.shape), v_BSKE], axis=1)
  return k, v, _null_visible(mask)


def reference(q_sem, k_sem, q_geo, k_geo, v, *, sem_scale, geo_scale, sem_weight=1.0, geo_weight=1.0, null=None,
              mask=None, return_probs=False):
  B, T, H, ds = q_sem.shape
  K = k_sem.shape[2]
  hi = jax.lax.Precision.HIGHEST
  if null is not None:
    null_k, null_v = null
    null_k = null_k.astype(k_sem.dtype)
    k_sem = jnp.concatenate([jnp.broadcast_to(null_k[:, :ds], (B, 1, K, ds)), k_sem], axis=1)
    k_geo = jnp.concatenate([jnp.broadcast_to(null_k[:, ds:], (B, 1) + k_geo.shape[2:]), k_geo], axis=1)
    v = jnp.concatenate([jnp.broadcast_to(null_v.astype(v.dtype), (B, 1) + null_v.shape), v], axis=1)
    mask = _null_visible(mask)
  rep = lambda x: jnp.repeat(x, H // K, axis=2)
  w = lambda x: x if jnp.ndim(x) == 0 else jnp.moveaxis(x, 2, 1)  # [B, T, H, 1] -> [B, H, T, 1]
  sem = jnp.einsum("bthd,bshd->bhts", q_sem, rep(k_sem), precision=hi) * sem_scale
  geo = jnp.einsum("bthd,bshd->bhts", q_geo, rep(k_geo), precision=hi) * geo_scale
  scores_BHTS = w(sem_weight) * sem + w(geo_weight) * geo
  S = scores_BHTS.shape[-1]
  visible = causal_mask(T, S, 0 if null is None else 1) if mask is None else mask[:, None]
  probs_BHTS = jax.nn.softmax(jnp.where(visible, scores_BHTS, -jnp.inf), axis=-1)
  out = jnp.einsum("bhts,bshe->bthe", probs_BHTS, rep(v), precision=hi)
  return (out, probs_BHTS) if return_probs else out


def _folded(path):
  """xla / pallas: fold, concatenate, prefix the null token, one standard attention at scale 1."""
  def run(q_sem, k_sem, q_geo, k_geo, v, *, sem_scale, geo_scale, sem_weight=1.0, geo_weight=1.0, null=None,
          mask=None, return_probs=False):
    q = fold_queries(q_sem, q_geo, sem_scale=sem_scale, geo_scale=geo_scale, sem_weight=sem_weight,
                     geo_weight=geo_weight)
    k = jnp.concatenate([k_sem, k_geo], axis=-1)
    n_prefix = 0
    if null is not None:
      k, v, mask = _prefix_null(k, v, mask, null)
      n_prefix = 1
    return path(q, k, v, scale=1.0, n_prefix=n_prefix, mask=mask, return_probs=return_probs)
  return run


PATHS = {"reference": reference, "xla": _folded(standard.xla), "pallas": _folded(standard.pallas)}


def dba_attention(q_sem, k_sem, q_geo, k_geo, v, *, sem_scale, geo_scale, sem_weight=1.0, geo_weight=1.0,
                  null=None, mask=None, return_probs=False, impl="auto"):
  """out [B, T, H, E] (or (out, probs [B, H, T, n_null + S]) with return_probs); see the module docstring."""
  path = dispatch("dba_attention", impl, PATHS, {"an explicit mask": mask is not None,
                                                 "returned probabilities": return_probs})
  return path(q_sem, k_sem, q_geo, k_geo, v, sem_scale=sem_scale, geo_scale=geo_scale, sem_weight=sem_weight,
              geo_weight=geo_weight, null=null, mask=mask, return_probs=return_probs)
