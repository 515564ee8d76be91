"""Selective attention (Leviathan et al.; selective.md §1.2, §3) as one op: the selection mask F, its variants,
the memory penalties, and the cached (decoding) form.

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

Paths (`impl`): reference (dense, the inputs' dtype throughout: float64 in, float64 out), xla (float32 logits
and softmax, F by the `spec.scan` scan), pallas_scan (as xla with the blocked Pallas scans), pallas (the fused
O(T)-memory kernel dba_kernels.selective_flash for head selection and dedicated selection heads; other variants
run on pallas_scan and say why once), auto (pallas on GPU/TPU, xla on CPU).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dba_jax import mesh as mesh_lib
from dba_jax.ops import standard
from dba_jax.ops.base import causal_mask, causal_zero, dispatch, fallback

SCANS = ("reference", "xla", "pallas")
IMPLS = ("reference", "xla", "pallas_scan", "pallas", "auto")
PROTECTIONS = ("none", "zero", "head_two", "linear_combo", "linear_combo_head_two", "leaky_relu", "big_constant")


@dataclasses.dataclass(frozen=True)
class SelectiveSpec:
  """The static variant of selective attention, built once from model.selective (dba_jax.attention.selective.spec)
  and shared by every call.

  Selection sources (selective.md §4.5): by default head `selection_head` selects and still attends.
  `selection_heads=m > 0`: the first m heads only select (m masks, assigned to the other H - m heads by
  `mask_assignment`; their values are dropped, so the output has H - m heads): m = 1 is "none_with_no_head",
  2 "two_masks", H/2 "one_mask_per_head". `selection_slices=s` with one selection head ("n_sliced_masks"): its
  q/k split into s slices of D/s dims, each slice's logits (at the full-head scale) one mask.
  `protection` picks a protect-and-attack kind (PROTECTIONS) post-processed by protection_scale / _bias;
  `scan` is the F scan of the xla path, `scan_dtype` its accumulator."""
  protect_bos: bool = True
  allow_self_mask: bool = False
  selection_head: int = 0
  relu_leak: float = 0.0
  relu_after_cumsum: bool = False
  scan: str = "xla"
  scan_dtype: Any = None
  disable_selection: bool = False
  protection: str = "none"
  leaky_alpha: float = 0.0
  leaky_bias: float = 0.0
  protection_scale: float = 1.0
  protection_bias: float = 0.0
  selection_heads: int = 0
  selection_slices: int = 1
  latent_multiplier: float = 1.0

  def cacheable(self) -> list[str]:
    """The variants cached decoding (`cached_attention`) does not support; empty when it does."""
    extras = {"selection_heads": self.selection_heads, "protection": self.protection != "none"}
    return [k for k, v in extras.items() if v]


class Weights(NamedTuple):
  """Learned selection parameters, each (w, b) or None. combo: "with_head_zero" mix of all heads' logits into the
  selection source; protect: the linear_combo protections' mix; latent ("n_latent_masks"): [N, A] and [A], the N
  sources (slices or dedicated heads) mixed into one mask per attending head as c * (sum_n w_na latent_n + b_a)
  (c = spec.latent_multiplier), causally re-masked (the original left the bias at future positions, which adds
  j * ReLU(b_a) to F[:, j]; an inert quirk at zero bias, not reproduced)."""
  combo: tuple | None = None
  protect: tuple | None = None
  latent: tuple | None = None


class Result(NamedTuple):
  out: jax.Array                       # [B, T, A, E], A attending heads
  f: jax.Array | None = None           # F [B, masks, T, S] (with return_mask)
  residual: jax.Array | None = None    # causally zeroed logits for the next layer (residual masks)
  probs: jax.Array | None = None       # [B, A, T, S] (with return_probs)


# ------------------------------------------------------------------------------------------- the mask F

def selection_scores(logits_BTS, *, protect_bos=True, allow_self_mask=False, relu_leak=0.0):
  """S from one head's scaled logits [..., T, S] (future entries may be anything; they are zeroed)."""
  T, S = logits_BTS.shape[-2:]
  causal = causal_mask(T, S)
  x = jnp.where(causal, logits_BTS, 0)
  s = _relu(x, relu_leak)
  keep = causal
  if protect_bos:
    keep = keep & (jnp.arange(S) != 0)[None, :]
  if not allow_self_mask:
    keep = keep & ~jnp.eye(T, S, dtype=bool)
  return jnp.where(keep, s, 0)


def _relu(x, leak):
  return jax.nn.relu(x) if leak == 0.0 else jnp.where(x >= 0, x, leak * x)


def _check_x64(dtype):
  if jnp.dtype(dtype) == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError("a float64 scan needs 64-bit JAX: set JAX_ENABLE_X64=1 (or use jax.enable_x64(True))")


def _shift_down(x):
  """Inclusive -> exclusive along axis -2: row 0 becomes 0."""
  return jnp.concatenate([jnp.zeros_like(x[..., :1, :]), x[..., :-1, :]], axis=-2)


def exclusive_cumsum(s_TS, *, impl="xla", dtype=None):
  """F[..., i, j] = sum_{k < i} s[..., k, j], accumulated in `dtype` (default: at least float32).

  reference: jnp.cumsum in the input dtype (float64 in, float64 out); xla: log-depth associative scan;
  pallas: the blocked kernel in dba_kernels (triangular-matmul prefix within a block, carry across blocks)."""
  acc = jnp.promote_types(s_TS.dtype, jnp.float32) if dtype is None else jnp.dtype(dtype)
  _check_x64(acc)
  x = s_TS.astype(acc)
  if impl == "reference":
    return _shift_down(jnp.cumsum(x, axis=-2))
  if impl == "xla":
    return _shift_down(jax.lax.associative_scan(jnp.add, x, axis=x.ndim - 2))
  if impl == "pallas":
    from dba_kernels import cumsum as kcumsum  # lazy: Pallas kernels, ~1.5 s to import
    return kcumsum.exclusive_cumsum(x)
  raise ValueError(f"selective scan impl={impl!r} is not one of {SCANS}")


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
      from dba_kernels import protect_attack as kpa  # lazy: Pallas kernels, ~1.5 s to import
      damage = kpa.protect_and_attack(s.astype(acc), protection_BTS.astype(acc))
    else:
      damage = protect_and_attack(s.astype(acc), protection_BTS.astype(acc))
    f = _shift_down(damage)
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
  p_prev = _shift_down(p_TS)
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


def protection_scores(kind, logits_BHTS, *, combo_w=None, combo_b=None, leaky_alpha=0.0, leaky_bias=0.0,
                      scale=1.0, bias=0.0):
  """P for a protection kind (selective.md §3.7) from the layer's scaled logits (future entries are zeroed
  before any nonlinearity, so no -inf turns into +inf protection)."""
  T, S = logits_BHTS.shape[-2:]
  causal = causal_mask(T, S)
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
  saturated = causal_zero(jnp.minimum(f_BTS, tau)).sum(-1) / tau  # [B, T]
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


# --------------------------------------------------------------------------------------------------- paths

def _materialised(q_BTHD, k_BTHD, v_BTHD, spec: SelectiveSpec, *, scale, weights: Weights, residual_BHTS,
                  keep_fn, precise: bool, scan: str):
  """The dense path (reference when `precise`: the inputs' dtype at HIGHEST precision; xla otherwise: float32
  logits). `keep_fn(F_heads [B, A|1, T, S]) -> bool` (evaluation-time context pruning) drops keys like future
  keys."""
  B, T, H, D = q_BTHD.shape
  if k_BTHD.shape != (B, T, H, D) or v_BTHD.shape[:3] != (B, T, H):
    raise ValueError(f"selective attention needs q, k [B, T, H, D] and v [B, T, H, E] with equal B, T, H; got "
                     f"{q_BTHD.shape}, {k_BTHD.shape}, {v_BTHD.shape}")
  if not 0 <= spec.selection_head < H:
    raise ValueError(f"selection_head={spec.selection_head} is not a head index (H={H})")
  m = spec.selection_heads
  if not 0 <= m < H:
    raise ValueError(f"selection_heads={m} must leave at least one attending head (H={H})")
  hi = jax.lax.Precision.HIGHEST if precise else None
  if precise:
    logits = jnp.einsum("bthd,bshd->bhts", q_BTHD, k_BTHD, precision=hi) * scale
  else:
    logits = jnp.einsum("bthd,bshd->bhts", q_BTHD, k_BTHD, preferred_element_type=jnp.float32) * jnp.float32(scale)
  causal = causal_mask(T)
  if residual_BHTS is not None:
    logits = jnp.where(causal, logits, 0) + residual_BHTS.astype(logits.dtype)
  pre_selection = logits
  if weights.combo is not None:
    w_H, b = weights.combo
    source = jnp.einsum("bhts,h->bts", jnp.where(causal, logits, 0), w_H.astype(logits.dtype)) + b
    sources = source[:, None]
  elif m and spec.selection_slices > 1:
    n = spec.selection_slices
    if m != 1 or D % n:
      raise ValueError(f"selection_slices={n} needs selection_heads=1 and a head dim ({D}) it divides")
    q_s, k_s = (x[:, :, 0].reshape(B, T, n, D // n) for x in (q_BTHD, k_BTHD))
    sources = jnp.einsum("btnd,bsnd->bnts", q_s, k_s, precision=hi).astype(logits.dtype) * scale
  elif m:
    sources = logits[:, :m]
  else:
    sources = logits[:, spec.selection_head:spec.selection_head + 1]
  if weights.latent is not None:
    w_NA, b_A = weights.latent
    mixed = jnp.einsum("bnts,na->bats", jnp.where(causal, sources, 0), w_NA.astype(logits.dtype))
    sources = spec.latent_multiplier * (mixed + b_A.astype(logits.dtype)[None, :, None, None])
  f = jnp.zeros((B, sources.shape[1], T, T), logits.dtype)
  if not spec.disable_selection:
    p = None
    if spec.protection != "none":
      combo_w, combo_b = weights.protect or (None, None)
      p = protection_scores(spec.protection, logits, combo_w=combo_w, combo_b=combo_b, leaky_alpha=spec.leaky_alpha,
                            leaky_bias=spec.leaky_bias, scale=spec.protection_scale, bias=spec.protection_bias)
    f = selection_mask(sources, protect_bos=spec.protect_bos, allow_self_mask=spec.allow_self_mask,
                       relu_leak=spec.relu_leak, relu_after_cumsum=spec.relu_after_cumsum, impl=scan,
                       dtype=spec.scan_dtype, protection_BTS=None if p is None else p[:, None])
  if m:
    logits, v_BTHD = logits[:, m:], v_BTHD[:, :, m:]
    f_heads = f[:, jnp.asarray(mask_assignment(f.shape[1], H - m))] if f.shape[1] > 1 else f
  else:
    f_heads = f
  if not spec.disable_selection:
    logits = logits - f_heads.astype(logits.dtype)
  visible = causal if keep_fn is None else causal[None, None] & keep_fn(f_heads)
  logits = jnp.where(visible, logits, -jnp.inf)  # after the subtraction: future entries stay exactly -inf
  probs = jax.nn.softmax(logits, axis=-1)
  f = f if f.shape[1] > 1 or m else f[:, 0]
  if precise:
    out = jnp.einsum("bhts,bshe->bthe", probs, v_BTHD, precision=hi)
  else:
    out = jnp.einsum("bhts,bshe->bthe", probs.astype(v_BTHD.dtype), v_BTHD)
  return Result(out, f, None if residual_BHTS is None else jnp.where(causal, pre_selection, 0), probs)


def _reference(q, k, v, spec, **kw):
  return _materialised(q, k, v, spec, precise=True, scan="reference", **kw)


def _xla(q, k, v, spec, **kw):
  return _materialised(q, k, v, spec, precise=False, scan="xla", **kw)


def _pallas_scan(q, k, v, spec, **kw):
  return _materialised(q, k, v, spec, precise=False, scan="pallas", **kw)


def _fused(q_BTHD, k_BTHD, v_BTHD, spec, *, scale, **_):
  """The O(T)-memory fused kernel, per device block; heads stay whole (every head's gradient feeds dF)."""
  from dba_kernels.selective_flash import selective_flash_attention  # lazy: Pallas kernels, ~1.5 s to import
  logical = ("batch", "seq", None, None)
  kernel = lambda q, k, v: selective_flash_attention(
      q, k, v, scale=scale, protect_bos=spec.protect_bos, allow_self_mask=spec.allow_self_mask,
      selection_head=spec.selection_head, selection_heads=spec.selection_heads)
  try:
    return Result(mesh_lib.per_shard(kernel, (logical,) * 3, logical, q_BTHD, k_BTHD, v_BTHD))
  except ValueError as e:
    fallback("selective_attention", str(e))
    return _xla(q_BTHD, k_BTHD, v_BTHD, spec, scale=scale, weights=Weights(), residual_BHTS=None, keep_fn=None)


def _scanned(q, k, v, spec, **kw):
  """The xla path as spec.scan (the model's `model.selective.scan`) configures it: the reference scan (dense reference
  path), the log-depth scan, or the Pallas scans."""
  return {"reference": _reference, "xla": _xla, "pallas": _pallas_scan}[spec.scan](q, k, v, spec, **kw)


PATHS = {"reference": _reference, "xla": _scanned, "pallas_scan": _pallas_scan, "pallas": _fused}


def apply(q_BTHD, k_BTHD, v_BTHD, spec: SelectiveSpec, *, scale=None, weights: Weights = Weights(),
          residual_BHTS=None, keep_fn=None, return_mask=False, return_probs=False, impl="auto") -> Result:
  """softmax(L_h - F) V for every attending head h, as a Result (F, the next layer's residual logits and the
  probabilities filled in when the path computes them; see SelectiveSpec for the variants).
  `residual_BHTS` ("residual_attention_masks"): added to the causally zeroed logits of every head before selection."""
  scale = q_BTHD.shape[-1] ** -0.5 if scale is None else scale
  unsupported = {"relu_leak": spec.relu_leak != 0.0, "relu_after_cumsum": spec.relu_after_cumsum,
                 "scan_dtype": spec.scan_dtype not in (None, "float32", jnp.float32),
                 "disable_selection": spec.disable_selection, "protection": spec.protection != "none",
                 "combo": weights.combo is not None, "latent": weights.latent is not None,
                 "selection_slices": bool(spec.selection_heads) and spec.selection_slices > 1,
                 "residual masks": residual_BHTS is not None, "return_mask": return_mask,
                 "key pruning": keep_fn is not None, "returned probabilities": return_probs}
  # A fused-kernel request it cannot serve keeps the Pallas scans (F is materialised).
  path = dispatch("selective_attention", impl, PATHS, unsupported, fallback_to="pallas_scan")
  return path(q_BTHD, k_BTHD, v_BTHD, spec, scale=scale, weights=weights, residual_BHTS=residual_BHTS,
              keep_fn=keep_fn)


def selective_attention(q_BTHD, k_BTHD, v_BTHD, spec: SelectiveSpec | None = None, *, impl="xla", scale=None,
                        combo=None, protect_combo=None, latent=None, residual_BHTS=None, return_mask=False,
                        key_keep_fn=None, **variant):
  """The convenience form of `apply`: the variant as keywords (SelectiveSpec's fields) or a spec; learned
  selection weights as (w, b) pairs. Returns out, or (out, F [B, masks, T, S]) with return_mask; with
  `residual_BHTS`, the summed logits come last."""
  spec = SelectiveSpec(**variant) if spec is None else dataclasses.replace(spec, **variant)
  r = apply(q_BTHD, k_BTHD, v_BTHD, spec, scale=scale, weights=Weights(combo, protect_combo, latent),
            residual_BHTS=residual_BHTS, keep_fn=key_keep_fn, return_mask=return_mask, impl=impl)
  parts = (r.out,) + ((r.f,) if return_mask else ()) + ((r.residual,) if residual_BHTS is not None else ())
  return parts if len(parts) > 1 else r.out


# ------------------------------------------------------------------------------------------- cached form

def cached_attention(q_BTHD, k_BSHD, v_BSHE, spec: SelectiveSpec, *, scale, mask_BTS, q_pos_T, k_pos_BS, valid_T,
                     colsum_BS, return_probs=False):
  """Selective attention of a chunk of queries over cached keys (decoding). colsum_BS carries, per key slot, the
  column sums of S over every earlier query, so the chunk's F rows are colsum + the in-chunk exclusive cumsum
  (F[i, j] = sum_{k < i} S[k, j], as above). Rows with valid_T False (padding) add nothing to the carry.
  Returns (out or (out, probs), F rows [B, T, S], updated colsum)."""
  bad = spec.cacheable()
  if bad:
    raise NotImplementedError(f"cached decoding supports head selection only; not {', '.join(bad)}")
  h = spec.selection_head
  L = jnp.einsum("btd,bsd->bts", q_BTHD[:, :, h], k_BSHD[:, :, h], preferred_element_type=jnp.float32)
  L = L * jnp.float32(scale)
  s = _relu(jnp.where(mask_BTS, L, 0), spec.relu_leak)
  keep = mask_BTS & valid_T[None, :, None]
  if spec.protect_bos:
    keep = keep & (k_pos_BS != 0)[:, None, :]
  if not spec.allow_self_mask:
    keep = keep & (k_pos_BS[:, None, :] != q_pos_T[None, :, None])
  s = jnp.where(keep, s, 0)
  inclusive = jnp.cumsum(s, axis=1)
  f = colsum_BS[:, None, :] + _shift_down(inclusive)
  if spec.relu_after_cumsum:
    f = jax.nn.relu(f)
  bias = None if spec.disable_selection else -f
  out = standard.xla(q_BTHD, k_BSHD, v_BSHE, scale=scale, mask=mask_BTS, bias=bias, return_probs=return_probs)
  return out, f, colsum_BS + inclusive[:, -1]
