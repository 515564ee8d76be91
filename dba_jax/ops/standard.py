"""Softmax attention, MHA / GQA, q/k head dim D and value head dim E free (DBA passes D != E).

  reference: dense in the inputs' dtype (float64 in, float64 math), K/V heads repeated: the ground truth.
  xla:       grouped (no K/V repeat), float32 logits and softmax under bf16 compute; T x S logits in memory.
  pallas:    the flash kernel in dba_kernels.flash_attention (O(T) memory), per device block under a mesh;
             causal masks only: an explicit mask, a bias or returned probabilities run on xla.

Visibility: causal (with `n_prefix` always-visible leading key columns) unless `mask` [B | 1, T, S] is given, as
cached decoding does from key positions. `bias` [B, T, S] is added to every head's logits after scaling
(selective attention's -F when decoding).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dba_jax import mesh as mesh_lib
from dba_jax.ops.base import ACT_HEADS, causal_mask, check_shapes, dispatch, fallback


def _visible(T, S, causal, n_prefix, mask):
  if mask is not None:
    return mask[:, None] if mask.ndim == 3 else mask  # [B, 1, T, S] against [B, H, T, S]
  return causal_mask(T, S, n_prefix) if causal else None


def reference(q_BTHD, k_BSKD, v_BSKE, *, scale=None, causal=True, n_prefix=0, mask=None, bias=None,
              return_probs=False):
  check_shapes(q_BTHD, k_BSKD, v_BSKE)
  H, K, D = q_BTHD.shape[2], k_BSKD.shape[2], q_BTHD.shape[3]
  scale = D ** -0.5 if scale is None else scale
  k_BSHD = jnp.repeat(k_BSKD, H // K, axis=2)
  v_BSHE = jnp.repeat(v_BSKE, H // K, axis=2)
  hi = jax.lax.Precision.HIGHEST
  scores_BHTS = jnp.einsum("bthd,bshd->bhts", q_BTHD, k_BSHD, precision=hi) * scale
  if bias is not None:
    scores_BHTS = scores_BHTS + bias[:, None].astype(scores_BHTS.dtype)
  visible = _visible(q_BTHD.shape[1], k_BSKD.shape[1], causal, n_prefix, mask)
  if visible is not None:
    scores_BHTS = jnp.where(visible, scores_BHTS, -jnp.inf)
  probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
  out = jnp.einsum("bhts,bshe->bthe", probs_BHTS, v_BSHE, precision=hi)
  return (out, probs_BHTS) if return_probs else out


def xla(q_BTHD, k_BSKD, v_BSKE, *, scale=None, causal=True, n_prefix=0, mask=None, bias=None, return_probs=False):
  check_shapes(q_BTHD, k_BSKD, v_BSKE)
  B, T, H, D = q_BTHD.shape
  K = k_BSKD.shape[2]
  scale = D ** -0.5 if scale is None else scale
  q_BTKGD = q_BTHD.reshape(B, T, K, H // K, D)
  scores = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD, preferred_element_type=jnp.float32)
  scores = scores * jnp.float32(scale)
  if bias is not None:
    scores = scores + bias[:, None, None].astype(jnp.float32)
  visible = _visible(T, k_BSKD.shape[1], causal, n_prefix, mask)
  if visible is not None:
    scores = jnp.where(visible if mask is None else visible[:, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKE.dtype)
  out = jnp.einsum("bkgts,bske->btkge", probs, v_BSKE).reshape(B, T, H, v_BSKE.shape[-1])
  return (out, probs.reshape(B, H, T, -1)) if return_probs else out


def pallas(q_BTHD, k_BSKD, v_BSKE, *, scale=None, causal=True, n_prefix=0, mask=None, bias=None,
           return_probs=False):
  from dba_kernels.flash_attention import flash_attention  # lazy: Pallas kernels, ~1.5 s to import
  del mask, bias, return_probs  # dispatch sends those to xla
  check_shapes(q_BTHD, k_BSKD, v_BSKE)
  scale = q_BTHD.shape[-1] ** -0.5 if scale is None else scale
  kernel = lambda q, k, v: flash_attention(q, k, v, scale=scale, causal=causal, n_prefix=n_prefix)
  try:
    return mesh_lib.per_shard(kernel, (ACT_HEADS, ACT_HEADS, ACT_HEADS), ACT_HEADS, q_BTHD, k_BSKD, v_BSKE)
  except ValueError as e:  # heads or batch do not divide the mesh
    fallback("attention", str(e))
    return xla(q_BTHD, k_BSKD, v_BSKE, scale=scale, causal=causal, n_prefix=n_prefix)


PATHS = {"reference": reference, "xla": xla, "pallas": pallas}


def attention(q_BTHD, k_BSKD, v_BSKE, *, scale=None, causal=True, n_prefix=0, mask=None, bias=None,
              return_probs=False, impl="auto"):
  """Softmax attention: out [B, T, H, E], or (out, probs [B, H, T, S]) with return_probs. `scale` defaults to
  D**-0.5."""
  path = dispatch("attention", impl, PATHS, {"an explicit mask": mask is not None, "a logit bias": bias is not None,
                                             "returned probabilities": return_probs})
  return path(q_BTHD, k_BSKD, v_BSKE, scale=scale, causal=causal, n_prefix=n_prefix, mask=mask, bias=bias,
              return_probs=return_probs)
