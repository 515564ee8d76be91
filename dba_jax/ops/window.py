"""Sliding-window softmax attention with always-visible leading keys, without a [T, T] mask or logits.

k and v hold `n_prefix` leading keys (Titans' persistent tokens) and then the T sequence keys. Query i sees every
prefix key and the sequence keys j with i − window < j <= i (its own included: Mistral's window).
  reference: dense, an explicit [T, n_prefix + T] mask over standard.reference: the ground truth (float64-capable).
  xla:       queries in blocks of `window`: block b attends to the prefix and to key blocks b − 1 and b, so logits
             are [B, K, G, n_blocks, window, n_prefix + 2·window]: O(T·(window + n_prefix)) memory, forward and
             backward (autodiff of the same einsums). A window >= T is one block (causal attention). Measured,
             compiled for v5p (H 12, D 64, bf16, window 512, 8 prefix keys, forward + backward): temp 0.8 GiB at
             T 8192 and 1.7 GiB at 16384 (the dense masked path: 4.7 and 18.8 GiB).
No Pallas kernel yet: impl 'pallas' runs xla (logged once), 'auto' runs xla everywhere. Probabilities
(return_probs, for probes) come back in the dense layout [B, H, T, n_prefix + T]: that one materialises.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dba_jax.ops import standard
from dba_jax.ops.base import check_shapes, fallback, positions_mask, resolve_impl


def window_mask(T: int, window: int, n_prefix: int = 0):
  """[T, n_prefix + T] bool: the prefix columns, then keys j with i − window < j <= i."""
  pos = jnp.arange(T)
  return jnp.concatenate([jnp.ones((T, n_prefix), bool), positions_mask(pos, pos, window)], axis=1)


def reference(q_BTHD, k_BSKD, v_BSKE, *, window: int, n_prefix: int = 0, scale=None, return_probs=False):
  check_shapes(q_BTHD, k_BSKD, v_BSKE)
  mask = window_mask(q_BTHD.shape[1], window, n_prefix)[None]
  return standard.reference(q_BTHD, k_BSKD, v_BSKE, scale=scale, mask=mask, return_probs=return_probs)


def _blocks(x_BT, n: int, W: int):
  """[B, T, ...] zero-padded to n·W and split into [B, n, W, ...]."""
  B, T = x_BT.shape[:2]
  x = jnp.pad(x_BT, [(0, 0), (0, n * W - T)] + [(0, 0)] * (x_BT.ndim - 2))
  return x.reshape((B, n, W) + x_BT.shape[2:])


def xla(q_BTHD, k_BSKD, v_BSKE, *, window: int, n_prefix: int = 0, scale=None, return_probs=False):
  check_shapes(q_BTHD, k_BSKD, v_BSKE)
  B, T, H, D = q_BTHD.shape
  K, E, P = k_BSKD.shape[2], v_BSKE.shape[-1], n_prefix
  if k_BSKD.shape[1] != P + T:
    raise ValueError(f"window attention needs n_prefix + T keys: got {k_BSKD.shape[1]} for T={T}, n_prefix={P}")
  G, W = H // K, min(window, T)
  n = -(-T // W)
  acc = jnp.promote_types(q_BTHD.dtype, jnp.float32)
  q = _blocks(q_BTHD, n, W).reshape(B, n, W, K, G, D)
  # Block b's keys: the prefix (repeated per block: P / W more keys), block b − 1 (zeros before the first, masked)
  # and block b; a single block needs no neighbour. One score einsum and one softmax over them.
  nb = 2 if n > 1 else 1

  def local(x_BSK):
    x = _blocks(x_BSK[:, P:], n, W)
    prefix = jnp.broadcast_to(x_BSK[:, None, :P], (B, n, P) + x_BSK.shape[2:])
    parts = [prefix, jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))[:, :n], x] if nb == 2 else [prefix, x]
    return jnp.concatenate(parts, 2)  # [B, n, P + nb·W, K, ·]

  r, c = jnp.arange(W)[:, None], jnp.arange(nb * W)[None, :] - (nb - 1) * W  # key offset from the block start
  seen = (c <= r)[None] & (c > r - window)[None] & (jnp.arange(n)[:, None, None] * W + c[None] >= 0)
  visible = jnp.concatenate([jnp.ones((n, W, P), bool), seen], -1)  # [n, W, P + nb·W]
  scale = jnp.asarray(D ** -0.5 if scale is None else scale, acc)
  scores = jnp.einsum("bnwkgd,bnskd->bkgnws", q, local(k_BSKD), preferred_element_type=acc) * scale
  scores = jnp.where(visible[None, None, None], scores, jnp.finfo(acc).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKE.dtype)
  out = jnp.einsum("bkgnws,bnske->bnwkge", probs, local(v_BSKE)).reshape(B, n * W, H, E)[:, :T]
  return (out, _dense_probs(probs, T, P, n, W, nb)) if return_probs else out


def _dense_probs(probs, T: int, P: int, n: int, W: int, nb: int):
  """Blocked probabilities [B, K, G, n, W, P + nb·W] placed into the dense [B, H, T, P + T] layout (for probes)."""
  B, K, G = probs.shape[:3]
  rows = (jnp.arange(n)[:, None] * W + jnp.arange(W)[None]).reshape(-1)  # [n·W]
  cols = jnp.arange(n)[:, None] * W - (nb - 1) * W + jnp.arange(nb * W)[None]  # [n, nb·W] key positions
  cols = jnp.where(cols >= 0, P + cols, P + n * W)  # before the first key: out of range, dropped
  local = probs[..., P:].reshape(B, K, G, n * W, nb * W)
  dense = jnp.zeros((B, K, G, n * W, P + n * W), probs.dtype).at[..., :P].set(
      probs[..., :P].reshape(B, K, G, n * W, P))
  dense = dense.at[:, :, :, rows[:, None], jnp.repeat(cols, W, axis=0)].set(local, mode="drop")
  return dense[:, :, :, :T, :P + T].reshape(B, K * G, T, P + T)


def window_attention(q_BTHD, k_BSKD, v_BSKE, *, window: int, n_prefix: int = 0, scale=None, return_probs=False,
                     impl="auto"):
  """Sliding-window attention (window >= 1) over [prefix ; sequence] keys (S = n_prefix + T): out [B, T, H, E],
  or (out, probs [B, H, T, S]) with return_probs. `scale` defaults to D**-0.5."""
  impl = resolve_impl(impl)
  if window < 1:
    raise ValueError(f"window={window} must be >= 1")
  if impl == "pallas":
    fallback("window_attention", "no Pallas kernel for sliding windows yet")
  path = reference if impl == "reference" else xla
  return path(q_BTHD, k_BSKD, v_BSKE, window=window, n_prefix=n_prefix, scale=scale, return_probs=return_probs)
