"""What the fused selective kernels share on every backend (dba_kernels.selective_flash documents the math):
static settings (_Cfg), the head-to-mask and head-to-kv maps, and the per-tile math (masks, S, F, online softmax,
dZ, the selection and k/v gradients) that the CPU/GPU kernels (selective_flash) and the TPU kernels
(selective_flash_tpu) both call."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


BLOCK_Q = 64  # CPU / GPU defaults
BLOCK_K = 64
BLOCK_TPU = 128  # TPU default for both: MXU- and lane-sized tiles
MIN_BLOCK = 16  # Triton dots need every dimension >= 16
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite, so no inf - inf; exp() of it is exactly 0


@dataclasses.dataclass(frozen=True)
class _Cfg:
  scale: float
  protect_bos: bool
  allow_self_mask: bool
  bq: int
  bk: int
  T: int
  src: int  # q head that is mask 0's source; mask n's source is q head src + n
  n_masks: int  # M
  first: int  # first attending q head: attending head a is q head first + a
  n_att: int  # A, the attending (output) heads
  group: int  # q heads per kv head (1 without GQA)

  @property
  def per(self):
    return self.n_att // self.n_masks  # attending heads in each mask's block

  @property
  def split(self):
    return self.per * self.n_masks  # attending heads from here on wrap to masks 0, 1, ...


def _kv(cfg: _Cfg, h):
  """kv head read by q head h (traced or static)."""
  if cfg.group == 1:
    return h
  if isinstance(h, int):
    return h // cfg.group
  return jax.lax.div(h, _i32(cfg.group))  # h >= 0: truncating division, fewer ops than floor division


def _mask_of(cfg: _Cfg, a):
  """Mask used by attending head a, as dba_jax.ops.selective.mask_assignment (int32 arithmetic: block index maps)."""
  if cfg.n_masks == 1:
    return 0
  block = jax.lax.div(a, _i32(cfg.per))
  return block if cfg.split == cfg.n_att else jnp.where(a < cfg.split, block, a - cfg.split)


def _fold_mask_heads(cfg: _Cfg, n, fn, init):
  """fn folded over the attending heads that use mask n: its block of `per` heads, then its remainder head."""
  lo = _i32(0) if cfg.n_masks == 1 else n * cfg.per  # one mask: static bounds, every head
  acc = jax.lax.fori_loop(lo, lo + cfg.per, fn, init)
  if cfg.split < cfg.n_att:  # masks n < A - split own one more head, split + n
    extra = cfg.split + n
    acc = jax.lax.fori_loop(extra, extra + (n < cfg.n_att - cfg.split).astype(jnp.int32), fn, acc)
  return acc


def _head_slots(cfg: _Cfg) -> int:
  """Attending heads per mask at most (TPU head grid axis): its block, plus a slot for a remainder head."""
  return cfg.per + (cfg.split < cfg.n_att)


def _mask_head(cfg: _Cfg, n, j):
  """(attending head, valid) in slot j < _head_slots of mask n, the heads _fold_mask_heads visits in that order;
  mask n's empty remainder slot repeats its block's last head (so its index maps fetch nothing new), or head 0
  for a mask without heads (more masks than attending heads)."""
  a = n * cfg.per + j
  if cfg.split == cfg.n_att:
    return a, jnp.bool_(True)
  in_block, has_extra = j < cfg.per, n < cfg.n_att - cfg.split
  return jnp.where(in_block, a, jnp.where(has_extra, cfg.split + n, jnp.maximum(a - 1, 0))), in_block | has_extra


# ------------------------------------------------------------------------------------------- in-kernel helpers

def _dot(a, b, acc, trans_b=False):
  """a @ b (or a @ b^T) with `acc` accumulation; full precision for f32/f64 operands."""
  if a.dtype != b.dtype:
    raise TypeError(f"dot operands differ: {a.dtype} vs {b.dtype}")
  prec = jax.lax.Precision.DEFAULT if a.dtype == jnp.bfloat16 else jax.lax.Precision.HIGHEST
  dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=acc)


def _iota2(shape, dim):
  return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _strict_lower(n, acc):
  return (_iota2((n, n), 1) < _iota2((n, n), 0)).astype(acc)  # [i, k] = 1 for k < i


def _strict_upper(n, acc):
  return (_iota2((n, n), 1) > _iota2((n, n), 0)).astype(acc)  # [k, i] = 1 for i > k


def _tile_masks(cfg: _Cfg, qb, kb):
  """causal and kept (selection-eligible) entries of the [Bq, Bk] tile at query block qb, key block kb."""
  rows_QK = qb * cfg.bq + _iota2((cfg.bq, cfg.bk), 0)
  cols_QK = kb * cfg.bk + _iota2((cfg.bq, cfg.bk), 1)
  causal_QK = cols_QK <= rows_QK
  keep_QK = causal_QK
  if cfg.protect_bos:
    keep_QK = keep_QK & (cols_QK != 0)
  if not cfg.allow_self_mask:
    keep_QK = keep_QK & (cols_QK != rows_QK)
  return causal_QK, keep_QK


def _scores(cfg: _Cfg, qs_QD, ks_KD, keep_QK, acc):
  """Selection head's scaled logits and S = ReLU on the kept entries (future entries are not kept)."""
  lsel_QK = _dot(qs_QD, ks_KD, acc, trans_b=True) * cfg.scale
  return lsel_QK, jnp.where(keep_QK, jnp.maximum(lsel_QK, 0), 0).astype(acc)


def _logits(cfg: _Cfg, q_QD, k_KD, f_QK, causal_QK, acc):
  z_QK = _dot(q_QD, k_KD, acc, trans_b=True) * cfg.scale - f_QK
  return jnp.where(causal_QK, z_QK, MASK_VALUE)


def _dz(cfg, q_QD, k_KD, v_KE, do_QE, lse_Q1, delta_Q1, f_QK, causal_QK, acc):
  """Probabilities and the gradient of the pre-softmax logits (L_h - F) for one head's tile."""
  p_QK = jnp.exp(_logits(cfg, q_QD, k_KD, f_QK, causal_QK, acc) - lse_Q1)
  dp_QK = _dot(do_QE, v_KE, acc, trans_b=True)
  return p_QK, p_QK * (dp_QK - delta_Q1)


def _f_tile(cfg: _Cfg, qb, kb, qs_QD, ks_KD, c_1K, tril_QQ, acc):
  """(causal, kept, selection logits, F) of the tile (qb, kb): F = C (earlier query blocks) + in-tile prefix."""
  causal_QK, keep_QK = _tile_masks(cfg, qb, kb)
  lsel_QK, s_QK = _scores(cfg, qs_QD, ks_KD, keep_QK, acc)
  return causal_QK, keep_QK, lsel_QK, c_1K + _dot(tril_QQ, s_QK, acc)


def _softmax_step(cfg: _Cfg, q_QD, k_KD, v_KE, f_QK, causal_QK, state, acc):
  """One key block of the online softmax: state (unnormalised out, running max, running sum) -> updated."""
  o_QE, m_Q1, l_Q1 = state
  z_QK = _logits(cfg, q_QD, k_KD, f_QK, causal_QK, acc)
  m_new_Q1 = jnp.maximum(m_Q1, z_QK.max(axis=1, keepdims=True))
  rescale_Q1 = jnp.exp(m_Q1 - m_new_Q1)
  p_QK = jnp.exp(z_QK - m_new_Q1)
  o_QE = rescale_Q1 * o_QE + _dot(p_QK.astype(v_KE.dtype), v_KE, acc)
  return o_QE, m_new_Q1, rescale_Q1 * l_Q1 + p_QK.sum(axis=1, keepdims=True)


def _sel_grad(keep_QK, lsel_QK, ds_QK):
  """G = dS on the kept entries where the selection logit is positive (ReLU'(0) = 0, as jax.nn.relu)."""
  return jnp.where(keep_QK & (lsel_QK > 0), ds_QK, 0)


def _kv_grads(p_QK, dz_QK, q_QD, do_QE, acc):
  """One query block's contributions (P^T dO, dZ^T q) to a key block's dv and (unscaled) dk."""
  return _dot(p_QK.T.astype(do_QE.dtype), do_QE, acc), _dot(dz_QK.T.astype(q_QD.dtype), q_QD, acc)


def _i32(n):
  return jnp.asarray(n, jnp.int32)  # loop bounds and block indices stay int32 under jax.enable_x64


def _n_key_blocks(cfg, qb):
  """Key blocks with any causal entry for query block qb: ceil((qb + 1) Bq / Bk) (lax.div: Triton-safe ints)."""
  return jax.lax.div((qb + 1) * cfg.bq + cfg.bk - 1, _i32(cfg.bk))


def _first_query_block(cfg, kb):
  """First query block whose rows reach key block kb; earlier ones see only future keys there."""
  return jax.lax.div(kb * cfg.bk, _i32(cfg.bq))


def _acc(dtype):
  return jnp.promote_types(dtype, jnp.float32)
