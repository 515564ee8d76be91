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
IMPLS = ("reference", "xla", "pallas_scan", "pallas", "auto")


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


def _check_x64(dtype):
  if jnp.dtype(dtype) == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError("a float64 scan needs 64-bit JAX: set JAX_ENABLE_X64=1 (or use jax.enable_x64(True))")


def exclusive_cumsum(s_TS, *, impl="xla", dtype=None):
  """F[..., i, j] = sum_{k < i} s[..., k, j], accumulated in `dtype` (default: at least float32).

  reference: jnp.cumsum in the input dtype (float64 in, float64 out); xla: log-depth associative scan;
  pallas: the blocked kernel in dba_kernels (triangular-matmul prefix within a block, carry across blocks)."""
  acc = jnp.promote_types(s_TS.dtype, jnp.float32) if dtype is None else jnp.dtype(dtype)
  _check_x64(acc)
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
                   impl="xla", dtype=None, protection_BTS=None):
  """F for one mask. With `protection_BTS`, F is the protect-and-attack damage instead of the plain cumsum."""
  s = selection_scores(logits_BTS, protect_bos=protect_bos, allow_self_mask=allow_self_mask, relu_leak=relu_leak)
  if protection_BTS is None:
    f = exclusive_cumsum(s, impl=impl, dtype=dtype)
  else:
    acc = jnp.promote_types(s.dtype, jnp.float32) if dtype is None else jnp.dtype(dtype)
    _check_x64(acc)
    if impl == "pallas":
      from dba_kernels import protect_attack as kpa
      damage = kpa.protect_and_attack(s.astype(acc), protection_BTS.astype(acc))
    else:
      damage = protect_and_attack(s.astype(acc), protection_BTS.astype(acc))
    f = jnp.concatenate([jnp.zeros_like(damage[..., :1, :]), damage[..., :-1, :]], axis=-2)
  return jax.nn.relu(f) if relu_after_cumsum else f


# ------------------------------------------------------------------------------------- protect and attack
#
# Per key column, scanning queries t: the attack a_t = S[t, j] first spends the protection pool R (damage is
# what the pool cannot absorb), then the pool gains p_t = P[t, j]; so protection from query t shields the key
# only from later queries. F = accumulated damage (then shifted like the plain cumsum). With P = 0, F = cumsum(S).
# Each turn is the map r -> U + ReLU(r - V) on the pool (damage ReLU(V - r)), with P rolled down one step,
# u = ReLU(P'_t - a_t), v = ReLU(a_t - P'_t); composing two turns gives
# (U1, V1) . (U2, V2) = (U2 + ReLU(U1 - V2), V1 + ReLU(V2 - U1)): associative, so a log-depth scan computes it.

def _pa_combine(first, second):
  u1, v1 = first
  u2, v2 = second
  return u2 + jax.nn.relu(u1 - v2), v1 + jax.nn.relu(v2 - u1)


def _pa_forward(a_TS, p_TS):
  """(damage V, pool U) after each turn, inclusive, along axis -2."""
  p_prev = jnp.concatenate([jnp.zeros_like(p_TS[..., :1, :]), p_TS[..., :-1, :]], axis=-2)
  u, v = jax.nn.relu(p_prev - a_TS), jax.nn.relu(a_TS - p_prev)
  pool, damage = jax.lax.associative_scan(_pa_combine, (u, v), axis=a_TS.ndim - 2)
  return damage, pool


def _reverse_cumsum(x):
  return jnp.flip(jax.lax.associative_scan(jnp.add, jnp.flip(x, -2), axis=x.ndim - 2), -2)


def _first_flagged(flag, value):
  """out[t] = value[e(t)] with e(t) the first k >= t where flag[k] (0 if none), along axis -2."""
  def last_set_wins(a, b):  # on the reversed axis: the latest flagged element seen so far
    fa, va = a
    fb, vb = b
    return fa | fb, jnp.where(fb, vb, va)

  f, v = jax.lax.associative_scan(last_set_wins, (jnp.flip(flag, -2), jnp.flip(jnp.where(flag, value, 0), -2)),
                                  axis=flag.ndim - 2)
  return jnp.flip(jnp.where(f, v, 0), -2)


@jax.custom_vjp
def protect_and_attack(a_TS, p_TS):
  """Accumulated damage D[t, j] >= 0 (inclusive of turn t) for attacks a and protections p, along axis -2."""
  return _pa_forward(a_TS, p_TS)[0]


def _pa_fwd(a_TS, p_TS):
  damage, pool = _pa_forward(a_TS, p_TS)
  return damage, (pool == 0,)


def _pa_bwd(res, g_damage):
  """Closed form (subgradient convention: a turn that empties the pool exactly counts as damage). With
  R_t = sum_{k >= t} dH_k, H = -damage: dA_t = -R_{e(t)}, dP_t = R_{e(t+1)}, e(t) = first damaged turn >= t."""
  (hit,) = res
  r = _reverse_cumsum(-g_damage)  # gradients arrive for D = -H
  g_at = _first_flagged(hit, r)
  d_a = -g_at
  d_p = jnp.concatenate([g_at[..., 1:, :], jnp.zeros_like(g_at[..., :1, :])], axis=-2)
  return d_a, d_p


protect_and_attack.defvjp(_pa_fwd, _pa_bwd)


PROTECTIONS = ("none", "zero", "head_two", "linear_combo", "linear_combo_head_two", "leaky_relu", "big_constant")


def protection_scores(kind, logits_BHTS, *, combo_w=None, combo_b=None, leaky_alpha=0.0, leaky_bias=0.0,
                      scale=1.0, bias=0.0):
  """P for a protection kind (selective.md §3.7) from the layer's scaled logits (future entries are zeroed
  before any nonlinearity, so no -inf turns into +inf protection)."""
  T, S = logits_BHTS.shape[-2:]
  causal = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]
  x = jnp.where(causal, logits_BHTS, 0)
  if kind == "zero":
    p = jnp.zeros_like(x[:, 0])
  elif kind == "head_two":
    p = jax.nn.relu(x[:, 1])
  elif kind in ("linear_combo", "linear_combo_head_two"):
    p = jnp.where(causal, jax.nn.relu(jnp.einsum("bhts,h->bts", x, combo_w.astype(x.dtype)) + combo_b), 0)
  elif kind == "leaky_relu":
    p = jax.nn.relu(-leaky_alpha * x[:, 0] + leaky_bias)
  elif kind == "big_constant":
    p = jnp.full_like(x[:, 0], 50.0)
  else:
    raise ValueError(f"protection kind {kind!r} is not one of {PROTECTIONS}")
  if scale != 1.0:
    p = p * scale
  if bias != 0.0:
    p = jax.nn.relu(p + bias)
  return p


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


def mask_assignment(n_masks: int, n_heads: int) -> list[int]:
  """Which mask each attending head uses: blocks of n_heads // n_masks heads per mask (repeat-interleave),
  the remainder wrapping to the first masks, as the original code did."""
  per = n_heads // n_masks
  return [i // per for i in range(per * n_masks)] + list(range(n_heads % n_masks))


def _fused(q_BTHD, k_BTHD, v_BTHD, **kw):
  """The O(T)-memory fused kernel, per device block; heads stay whole (every head's gradient feeds dF)."""
  from dba_jax import mesh as mesh_lib, ops
  from dba_kernels.selective_flash import selective_flash_attention
  logical = ("batch", "seq", None, None)
  kernel = lambda q, k, v: selective_flash_attention(q, k, v, **kw)
  try:
    return mesh_lib.per_shard(kernel, (logical,) * 3, logical, q_BTHD, k_BTHD, v_BTHD)
  except ValueError as e:
    ops.fallback("selective_attention", str(e))
    return selective_attention(q_BTHD, k_BTHD, v_BTHD, impl="xla", **kw)


def selective_attention(q_BTHD, k_BTHD, v_BTHD, *, impl="xla", protect_bos=True, allow_self_mask=False,
                        selection_head=0, scale=None, relu_leak=0.0, relu_after_cumsum=False, scan_dtype=None,
                        disable_selection=False, protection="none", protection_args=None, selection_heads=0,
                        selection_slices=1, combo=None, latent=None, residual_BHTS=None, return_mask=False,
                        key_keep_fn=None):
  """softmax(L_h - F) V for every head h, F from head `selection_head` (see the module docstring).

  impl: reference (dense, the inputs' dtype throughout: float64 in, float64 out), xla (float32 logits, softmax
  and a log-depth scan), pallas_scan (as xla with the blocked Pallas scans), pallas (the fused O(T)-memory
  kernel dba_kernels.selective_flash for head selection and dedicated selection heads; other variants fall back
  to pallas_scan with a logged reason), auto (pallas on GPU/TPU, xla on CPU). `protection` picks a protect-and-attack
  kind (PROTECTIONS; its keywords go in `protection_args`).

  Selection sources (selective.md §4.5): by default head `selection_head` selects and still attends.
  `selection_heads=m > 0`: the first m heads only select (m masks, assigned to the other H - m heads by
  `mask_assignment`; their values are dropped, so the output has H - m heads): m = 1 is "none_with_no_head",
  2 "two_masks", H/2 "one_mask_per_head".
  `selection_slices=s` with one selection head ("n_sliced_masks"): its q/k split into s slices of D/s dims,
  each slice's logits (at the full-head scale) one mask. `combo=(w_H, b)`: S comes from sum_h w_h L_h + b over all heads'
  (causally zeroed) logits, the "with_head_zero" linear combination. `latent=(w_NA, b_A, c)` ("n_latent_masks"): the
  N sources (slices or dedicated heads) are latent masks, mixed into one mask per attending head A as
  c * (sum_n w_na latent_n + b_a), causally re-masked (the original left the bias at future positions, which adds
  j * ReLU(b_a) to F[:, j]; an inert quirk at zero bias, not reproduced).
  `residual_BHTS` ("residual_attention_masks"): added to the causally zeroed logits of every head before selection.
  `key_keep_fn` (evaluation-time context pruning, dba_jax.pruning): a function of the per-head F [B, masks, T, S]
  returning a boolean keep mask broadcastable to the logits; the keys it drops get -inf, like future keys.
  Returns out, or (out, F [B, masks, T, S]) with masks = max(m, 1); with `residual_BHTS`, also the summed logits."""
  from dba_jax import ops
  B, T, H, D = q_BTHD.shape
  impl = ops.resolve_impl(impl, IMPLS)
  if impl == "pallas":
    unsupported = {"relu_leak": relu_leak != 0.0, "relu_after_cumsum": relu_after_cumsum,
                   "scan_dtype": scan_dtype not in (None, "float32", jnp.float32), "disable_selection": disable_selection,
                   "protection": protection != "none", "combo": combo is not None, "latent": latent is not None,
                   "selection_slices": bool(selection_heads) and selection_slices > 1,
                   "residual masks": residual_BHTS is not None, "return_mask": return_mask,
                   "key pruning": key_keep_fn is not None}
    reasons = [k for k, bad in unsupported.items() if bad]
    if not reasons:
      return _fused(q_BTHD, k_BTHD, v_BTHD, scale=scale, protect_bos=protect_bos, allow_self_mask=allow_self_mask,
                    selection_head=selection_head, selection_heads=selection_heads)
    ops.fallback("selective_attention", "the fused kernel does not support " + ", ".join(reasons) +
                 " (F is materialised; the scans use the Pallas kernels)")
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
  if residual_BHTS is not None:
    logits = jnp.where(causal, logits, 0) + residual_BHTS.astype(logits.dtype)
  pre_selection = logits
  m = selection_heads
  if not 0 <= m < H:
    raise ValueError(f"selection_heads={m} must leave at least one attending head (H={H})")
  if combo is not None:
    w_H, b = combo
    source = jnp.einsum("bhts,h->bts", jnp.where(causal, logits, 0), w_H.astype(logits.dtype)) + b
    sources = source[:, None]
  elif m and selection_slices > 1:
    if m != 1 or D % selection_slices:
      raise ValueError(f"selection_slices={selection_slices} needs selection_heads=1 and a head dim ({D}) it divides")
    n = selection_slices
    q_s, k_s = (x[:, :, 0].reshape(B, T, n, D // n) for x in (q_BTHD, k_BTHD))
    hi = jax.lax.Precision.HIGHEST if impl == "reference" else None
    sources = jnp.einsum("btnd,bsnd->bnts", q_s, k_s, precision=hi).astype(logits.dtype) * scale
  elif m:
    sources = logits[:, :m]
  else:
    sources = logits[:, selection_head:selection_head + 1]
  if latent is not None:
    w_NA, b_A, mult = latent
    mixed = jnp.einsum("bnts,na->bats", jnp.where(causal, sources, 0), w_NA.astype(logits.dtype))
    sources = mult * (mixed + b_A.astype(logits.dtype)[None, :, None, None])
  f = jnp.zeros((B, sources.shape[1], T, T), logits.dtype)
  if not disable_selection:
    p = None if protection == "none" else protection_scores(protection, logits, **(protection_args or {}))
    f = selection_mask(sources, protect_bos=protect_bos, allow_self_mask=allow_self_mask,
                       relu_leak=relu_leak, relu_after_cumsum=relu_after_cumsum,
                       impl="pallas" if impl in ("pallas", "pallas_scan") else impl, dtype=scan_dtype,
                       protection_BTS=None if p is None else p[:, None])
  if m:
    logits, v_BTHD = logits[:, m:], v_BTHD[:, :, m:]
    f_heads = f[:, jnp.asarray(mask_assignment(f.shape[1], H - m))] if f.shape[1] > 1 else f
  else:
    f_heads = f
  if not disable_selection:
    logits = logits - f_heads.astype(logits.dtype)
  visible = causal if key_keep_fn is None else causal[None, None] & key_keep_fn(f_heads)
  logits = jnp.where(visible, logits, -jnp.inf)  # after the subtraction: future entries stay exactly -inf
  probs = jax.nn.softmax(logits, axis=-1)
  f = f if f.shape[1] > 1 or m else f[:, 0]
  if impl == "reference":
    out = jnp.einsum("bhts,bshe->bthe", probs, v_BTHD, precision=jax.lax.Precision.HIGHEST)
  else:
    out = jnp.einsum("bhts,bshe->bthe", probs.astype(v_BTHD.dtype), v_BTHD)
  if residual_BHTS is not None:
    summed = jnp.where(causal, pre_selection, 0)
    return (out, f, summed) if return_mask else (out, summed)
  return (out, f) if return_mask else out
