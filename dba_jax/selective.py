"""Selective attention (Leviathan et al.; selective.md §1.2, §3): the selection mask F and the memory penalties.

Per layer, from the selection head's scaled logits L_0 (causally masked):
  S = ReLU(L_0)  (leaky ReLU with `relu_leak`), future entries 0 *before* the nonlinearity;
  S[:, 0] = 0 unless protect_bos=False (key position 0 of the window, not a token id);
  S[i, i] = 0 unless allow_self_mask;
  F[i, j] = sum_{k < i} S[k, j]  (exclusive cumulative sum down the query axis; row 0 is 0);
  optional ReLU(F) (`relu_after_cumsum`);
  every head attends with softmax(L_h - F).

The original leaky-ReLU / relu_after_cumsum runs applied the nonlinearity to -inf future entries: leaky_relu(-inf)
is -inf, so every key accumulated -inf from row 0 and the runs were unselective (NaN without relu_after_cumsum,
F = 0 with it). Here the future entries are zeroed first, which is the intended math.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

SCANS = ("reference", "xla", "pallas")


def selection_scores(logits_BTS, *, protect_bos=True, allow_self_mask=False, relu_leak=0.0):
  """S from one head's scaled logits [..., T, S] (future entries may be anything; they are zeroed)."""
  T, S = logits_BTS.shape[-2:]
  causal = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]
  x = jnp.where(causal, logits_BTS, 0)
  s = jax.nn.relu(x) if relu_leak == 0.0 else jnp.where(x >= 0, x, relu_leak * x)
  keep = causal
  if protect_bos:
    keep = keep & (jnp.arange(S) != 0)[None, :]
  if not allow_self_mask:
    keep = keep & ~jnp.eye(T, S, dtype=bool)
  return jnp.where(keep, s, 0)


def exclusive_cumsum(s_TS, *, impl="xla", dtype=None):
  """F[..., i, j] = sum_{k < i} s[..., k, j], accumulated in `dtype` (default: at least float32).

  reference: jnp.cumsum in the input dtype (float64 in, float64 out); xla: log-depth associative scan;
  pallas: the blocked kernel in dba_kernels (triangular-matmul prefix within a block, carry across blocks)."""
  acc = jnp.promote_types(s_TS.dtype, jnp.float32) if dtype is None else jnp.dtype(dtype)
  x = s_TS.astype(acc)
  if impl == "reference":
    inclusive = jnp.cumsum(x, axis=-2)
  elif impl == "xla":
    inclusive = jax.lax.associative_scan(jnp.add, x, axis=x.ndim - 2)
  elif impl == "pallas":
    from dba_kernels import cumsum as kcumsum
    return kcumsum.exclusive_cumsum(x)
  else:
    raise ValueError(f"selective scan impl={impl!r} is not one of {SCANS}")
  return jnp.concatenate([jnp.zeros_like(inclusive[..., :1, :]), inclusive[..., :-1, :]], axis=-2)


def selection_mask(logits_BTS, *, protect_bos=True, allow_self_mask=False, relu_leak=0.0, relu_after_cumsum=False,
                   impl="xla", dtype=None):
  s = selection_scores(logits_BTS, protect_bos=protect_bos, allow_self_mask=allow_self_mask, relu_leak=relu_leak)
  f = exclusive_cumsum(s, impl=impl, dtype=dtype)
  return jax.nn.relu(f) if relu_after_cumsum else f


def memory_penalty_paper(f_BTS, tau: float = 1.0):
  """Paper form (§1.4), one layer: mean over the batch of max_i M_i / T, M_i = i - sum_{j<=i} min(F[i,j], tau)/tau
  (the number of keys query i has not yet fully masked). The model averages it over layers."""
  T = f_BTS.shape[-2]
  causal = jnp.arange(f_BTS.shape[-1])[None, :] <= jnp.arange(T)[:, None]
  saturated = jnp.where(causal, jnp.minimum(f_BTS, tau), 0).sum(-1) / tau  # [B, T]
  m = jnp.arange(T, dtype=saturated.dtype)[None, :] - saturated
  return m.max(-1).mean() / T


def memory_penalty_repo(f_BTS, tau: float = 1.0):
  """The form the original code computed (§3.8), one layer: its broadcasting turned max_i M_i into
  mean_{b,i}((T - 1) - FF_sum[b, i]) / T with FF_sum[b, i] = sum_j clamp(F[b, i, j], 0, tau). The model sums
  it over layers (no division by the layer count), as the original did."""
  T = f_BTS.shape[-2]
  ff_sum = jnp.clip(f_BTS, 0, tau).sum(-1)
  return ((T - 1) - ff_sum).mean() / T


MEMORY_PENALTIES = {"paper": memory_penalty_paper, "repo": memory_penalty_repo}


def selective_attention(q_BTHD, k_BTHD, v_BTHD, *, impl="xla", protect_bos=True, allow_self_mask=False,
                        selection_head=0, scale=None, relu_leak=0.0, relu_after_cumsum=False, scan_dtype=None,
                        disable_selection=False, return_mask=False):
  """softmax(L_h - F) V for every head h, F from head `selection_head` (see the module docstring).

  impl: reference (dense, the inputs' dtype throughout: float64 in, float64 out), xla (float32 logits, softmax
  and a log-depth scan), pallas (as xla with the blocked Pallas scan). Returns out_BTHD, or (out, F_BTS)."""
  B, T, H, D = q_BTHD.shape
  if k_BTHD.shape != (B, T, H, D) or v_BTHD.shape[:3] != (B, T, H):
    raise ValueError(f"selective attention needs q, k [B, T, H, D] and v [B, T, H, E] with equal B, T, H; got "
                     f"{q_BTHD.shape}, {k_BTHD.shape}, {v_BTHD.shape}")
  if not 0 <= selection_head < H:
    raise ValueError(f"selection_head={selection_head} is not a head index (H={H})")
  scale = D ** -0.5 if scale is None else scale
  if impl == "reference":
    hi = jax.lax.Precision.HIGHEST
    logits = jnp.einsum("bthd,bshd->bhts", q_BTHD, k_BTHD, precision=hi) * scale
  else:
    logits = jnp.einsum("bthd,bshd->bhts", q_BTHD, k_BTHD, preferred_element_type=jnp.float32) * jnp.float32(scale)
  causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
  f = jnp.zeros((B, T, T), logits.dtype)
  if not disable_selection:
    f = selection_mask(logits[:, selection_head], protect_bos=protect_bos, allow_self_mask=allow_self_mask,
                       relu_leak=relu_leak, relu_after_cumsum=relu_after_cumsum,
                       impl="reference" if impl == "reference" else impl, dtype=scan_dtype)
    logits = logits - f.astype(logits.dtype)[:, None]
  logits = jnp.where(causal, logits, -jnp.inf)  # after the subtraction: future entries stay exactly -inf
  probs = jax.nn.softmax(logits, axis=-1)
  if impl == "reference":
    out = jnp.einsum("bhts,bshe->bthe", probs, v_BTHD, precision=jax.lax.Precision.HIGHEST)
  else:
    out = jnp.einsum("bhts,bshe->bthe", probs.astype(v_BTHD.dtype), v_BTHD)
  return (out, f) if return_mask else out
