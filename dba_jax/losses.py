"""Next-token negative log-likelihood: the one loss function training, evaluation and pruning share."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def nll(logits_BTV, targets_BT, vocab: int):
  """Per-token NLL [B, T] (any leading shape) in (at least) float32 over the first `vocab` logits: padded vocab
  columns (and any beyond a --vocab-limit) are masked out of the normaliser."""
  logits = logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32))  # float64 stays float64
  if logits.shape[-1] > vocab:
    lead = (1,) * (logits.ndim - 1)
    logits = jnp.where(jnp.arange(logits.shape[-1]).reshape(lead + (-1,)) < vocab, logits, -jnp.inf)
  return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets_BT[..., None], -1)[..., 0]


def fused_head_nll_mean(h_Nd, w_Vd, targets_N, vocab: int, chunk: int):
  """mean_n NLL(h_n . w^T, target_n) over the first `vocab` columns of w, never holding [N, V] logits.

  The vocab projection (a tied or untied head, w [V, d]) and softmax cross-entropy in one: under jax.grad the
  forward pass also forms the gradients, chunk by chunk of `chunk` rows (softmax - one-hot, then both
  matmuls), so backward only scales them by the incoming cotangent. Same three matmuls as the unfused
  head, without the [N, V] float32 logits kept for backward and re-read there. Float32 (or wider) throughout."""
  N = h_Nd.shape[0]
  if N % chunk:
    raise ValueError(f"fused cross-entropy: {N} rows are not a multiple of the chunk {chunk}")
  dt = jnp.promote_types(jnp.promote_types(h_Nd.dtype, w_Vd.dtype), jnp.float32)
  return _fused_nll(h_Nd.astype(dt), w_Vd.astype(dt), targets_N, vocab, chunk)


def _chunk_stats(h_cd, w_Vd, t_c, vocab):
  logits_cV = jnp.einsum("cd,vd->cv", h_cd, w_Vd)
  if logits_cV.shape[-1] > vocab:
    logits_cV = jnp.where(jnp.arange(logits_cV.shape[-1])[None, :] < vocab, logits_cV, -jnp.inf)
  lse_c = jax.nn.logsumexp(logits_cV, -1)
  return logits_cV, lse_c, lse_c - jnp.take_along_axis(logits_cV, t_c[:, None], -1)[:, 0]


def _fused_forward(h_Nd, w_Vd, targets_N, vocab, chunk, with_grads):
  N, d = h_Nd.shape
  hs, ts = h_Nd.reshape(N // chunk, chunk, d), targets_N.reshape(N // chunk, chunk)

  def body(carry, xs):
    total, dw_Vd = carry
    h_cd, t_c = xs
    logits_cV, lse_c, nll_c = _chunk_stats(h_cd, w_Vd, t_c, vocab)
    if not with_grads:
      return (total + nll_c.sum(), dw_Vd), None
    # d(mean NLL)/d logits = (softmax - one-hot) / N; padded columns have softmax 0.
    g_cV = jnp.exp(logits_cV - lse_c[:, None])
    g_cV = (g_cV - jax.nn.one_hot(t_c, g_cV.shape[-1], dtype=g_cV.dtype)) / N
    return (total + nll_c.sum(), dw_Vd + jnp.einsum("cv,cd->vd", g_cV, h_cd)), jnp.einsum("cv,vd->cd", g_cV, w_Vd)

  zero = (jnp.zeros((), h_Nd.dtype), jnp.zeros_like(w_Vd) if with_grads else jnp.zeros((), h_Nd.dtype))
  (total, dw_Vd), dh = jax.lax.scan(body, zero, (hs, ts))
  return total / N, (None if dh is None else dh.reshape(N, d)), dw_Vd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused_nll(h_Nd, w_Vd, targets_N, vocab, chunk):
  return _fused_forward(h_Nd, w_Vd, targets_N, vocab, chunk, False)[0]


def _fused_nll_fwd(h_Nd, w_Vd, targets_N, vocab, chunk):
  loss, dh_Nd, dw_Vd = _fused_forward(h_Nd, w_Vd, targets_N, vocab, chunk, True)
  return loss, (dh_Nd, dw_Vd, targets_N)


def _fused_nll_bwd(vocab, chunk, res, ct):
  dh_Nd, dw_Vd, targets_N = res
  return ct * dh_Nd, ct * dw_Vd, np.zeros(targets_N.shape, jax.dtypes.float0)


_fused_nll.defvjp(_fused_nll_fwd, _fused_nll_bwd)
