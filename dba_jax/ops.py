"""Attention and RoPE: the only place attention math lives.

`attention(..., impl=...)` is the switch every attention kind goes through:
  reference: dense, dtype-generic (float64 in, float64 math), the ground truth for tests and kernels.
  xla:       grouped (no K/V repeat), float32 logits and softmax under bf16 compute; T x T logits in memory.
  pallas:    the flash kernel in dba_kernels (O(T) memory; q/k and v head dims may differ, as DBA needs);
             interpret mode on CPU, Triton on GPU, Mosaic on TPU. Run per device block under a mesh.
  auto:      pallas on GPU/TPU, xla on CPU. The default.

Shape letters: B batch, T query positions, S key positions, H query heads, K key/value heads, G = H // K,
D q/k head dim, E value head dim.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from dba_jax import mesh as mesh_lib

IMPLS = ("reference", "xla", "pallas", "auto")
ACT_HEADS = ("batch", "seq", "act_heads", None)  # logical axes of [B, T, H, D] activations
log = logging.getLogger("dba_jax")
_warned: set = set()


def fallback(what: str, reason: str):
  """Log once per (op, reason) that a kernel request runs on XLA instead."""
  if (what, reason) not in _warned:
    _warned.add((what, reason))
    log.warning("%s: using the XLA path: %s", what, reason)


def resolve_impl(impl: str, allowed: tuple = IMPLS) -> str:
  """'auto' -> 'pallas' on GPU/TPU, 'xla' on CPU (interpret mode is for tests, not speed)."""
  if impl not in allowed:
    raise ValueError(f"impl={impl!r} is not one of {allowed}")
  if impl == "auto":
    return "pallas" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "xla"
  return impl


def selective_attention(q_BTHD, k_BTHD, v_BTHD, *, impl="auto", protect_bos=True, allow_self_mask=False,
                        selection_head=0, scale=None, **variants):
  """Selective attention (Leviathan et al.); see dba_jax.selective for the math and the variant keywords."""
  from dba_jax import selective
  return selective.selective_attention(q_BTHD, k_BTHD, v_BTHD, impl=impl, protect_bos=protect_bos,
                                       allow_self_mask=allow_self_mask, selection_head=selection_head, scale=scale,
                                       **variants)


def rope_angles(positions_T: jax.Array, dim: int, base: float, dtype) -> tuple[jax.Array, jax.Array]:
  """cos/sin [T, dim/2] for rotate-half RoPE; angles in at least float32 (float64 under float64 inputs)."""
  ft = jnp.promote_types(dtype, jnp.float32)
  inv_freq = base ** (-jnp.arange(0, dim, 2, dtype=ft) / dim)
  angle_TF = positions_T.astype(ft)[:, None] * inv_freq[None, :]
  # Tables are cast to the activation dtype before use, as in the PyTorch original.
  return jnp.cos(angle_TF).astype(dtype), jnp.sin(angle_TF).astype(dtype)


def apply_rope(x_BTHD: jax.Array, positions_T: jax.Array, base: float) -> jax.Array:
  """Half-split ("rotate_half", NeoX/Llama) RoPE over the full head dim."""
  D = x_BTHD.shape[-1]
  cos_TF, sin_TF = rope_angles(positions_T, D, base, x_BTHD.dtype)
  cos, sin = cos_TF[None, :, None, :], sin_TF[None, :, None, :]
  x1, x2 = x_BTHD[..., : D // 2], x_BTHD[..., D // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def visible_mask(T: int, S: int, n_prefix: int = 0) -> jax.Array:
  """[T, S] bool: query i sees key columns < n_prefix (null tokens) and real keys j <= i."""
  q_T1 = jnp.arange(T)[:, None]
  k_1S = jnp.arange(S)[None, :] - n_prefix
  return (k_1S <= q_T1) | (k_1S < 0)


def _check(q_BTHD, k_BSKD, v_BSKE):
  B, T, H, D = q_BTHD.shape
  Bk, S, K, Dk = k_BSKD.shape
  if (Bk, S, K) != v_BSKE.shape[:3] or Bk != B or Dk != D or H % K:
    raise ValueError(f"attention shapes do not fit: q {q_BTHD.shape}, k {k_BSKD.shape}, v {v_BSKE.shape} "
                     "(need equal batch, k/v equal length and heads, q/k equal head dim, heads % kv_heads == 0)")


def attention_reference(q_BTHD, k_BSKD, v_BSKE, *, scale=None, causal=True, n_prefix=0):
  """Dense softmax attention in the inputs' dtype; K/V heads repeat-interleaved to H."""
  _check(q_BTHD, k_BSKD, v_BSKE)
  H, K, D = q_BTHD.shape[2], k_BSKD.shape[2], q_BTHD.shape[3]
  scale = D ** -0.5 if scale is None else scale
  k_BSHD = jnp.repeat(k_BSKD, H // K, axis=2)
  v_BSHE = jnp.repeat(v_BSKE, H // K, axis=2)
  hi = jax.lax.Precision.HIGHEST
  scores_BHTS = jnp.einsum("bthd,bshd->bhts", q_BTHD, k_BSHD, precision=hi) * scale
  if causal:
    mask_TS = visible_mask(q_BTHD.shape[1], k_BSKD.shape[1], n_prefix)
    scores_BHTS = jnp.where(mask_TS, scores_BHTS, -jnp.inf)
  probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
  return jnp.einsum("bhts,bshe->bthe", probs_BHTS, v_BSHE, precision=hi)


def attention_xla(q_BTHD, k_BSKD, v_BSKE, *, scale=None, causal=True, n_prefix=0):
  _check(q_BTHD, k_BSKD, v_BSKE)
  B, T, H, D = q_BTHD.shape
  K = k_BSKD.shape[2]
  scale = D ** -0.5 if scale is None else scale
  q_BTKGD = q_BTHD.reshape(B, T, K, H // K, D)
  scores = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD, preferred_element_type=jnp.float32)
  scores = scores * jnp.float32(scale)
  if causal:
    mask_TS = visible_mask(T, k_BSKD.shape[1], n_prefix)
    scores = jnp.where(mask_TS, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKE.dtype)
  out_BTKGE = jnp.einsum("bkgts,bske->btkge", probs, v_BSKE)
  return out_BTKGE.reshape(B, T, H, v_BSKE.shape[-1])


def attention_pallas(q_BTHD, k_BSKD, v_BSKE, *, scale=None, causal=True, n_prefix=0):
  from dba_kernels.flash_attention import flash_attention
  _check(q_BTHD, k_BSKD, v_BSKE)
  scale = q_BTHD.shape[-1] ** -0.5 if scale is None else scale
  kernel = lambda q, k, v: flash_attention(q, k, v, scale=scale, causal=causal, n_prefix=n_prefix)
  try:
    return mesh_lib.per_shard(kernel, (ACT_HEADS, ACT_HEADS, ACT_HEADS), ACT_HEADS, q_BTHD, k_BSKD, v_BSKE)
  except ValueError as e:  # heads or batch do not divide the mesh
    fallback("attention", str(e))
    return attention_xla(q_BTHD, k_BSKD, v_BSKE, scale=scale, causal=causal, n_prefix=n_prefix)


def attention(q_BTHD, k_BSKD, v_BSKE, *, scale=None, causal=True, n_prefix=0, impl="auto"):
  """Softmax attention. `scale` defaults to D**-0.5; `n_prefix` leading key columns are always visible."""
  impl = resolve_impl(impl)
  if impl == "pallas":
    return attention_pallas(q_BTHD, k_BSKD, v_BSKE, scale=scale, causal=causal, n_prefix=n_prefix)
  if impl == "reference":
    return attention_reference(q_BTHD, k_BSKD, v_BSKE, scale=scale, causal=causal, n_prefix=n_prefix)
  return attention_xla(q_BTHD, k_BSKD, v_BSKE, scale=scale, causal=causal, n_prefix=n_prefix)
