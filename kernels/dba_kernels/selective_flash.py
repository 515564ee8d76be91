"""Fused selective attention (selective.md §1.2, §3, §4.5) with O(T) activations: flash-style forward and
backward (Pallas).

Math, for mask n with source head s_n (scaled logits L_h = scale q_h k_{kv(h)}^T): S_n = ReLU(L_{s_n}) on the
causal part (future entries 0), S_n[:, 0] = 0 if protect_bos, S_n[i, i] = 0 unless allow_self_mask;
F_n[i, j] = sum_{k < i} S_n[k, j]; attending head h outputs softmax_{j <= i}(L_h - F_{mask(h)}) v_{kv(h)}.
Supported variants (the same as dba_jax.ops.selective.selective_attention with impl="reference"):
  default          one mask (M = 1) from head `selection_head`, which also attends; all H heads attend.
  selection_heads  m > 0: heads 0..m-1 only select (M = m masks, mask n from head n; their values are unused
                   and their dv is 0); the H - m heads m..H-1 attend, attending head a (0-based among them) with
                   mask dba_jax.ops.selective.mask_assignment(m, H - m)[a] (blocks of (H - m) // m heads per mask,
                   the remainder wrapping to the first masks). m = 1 "none_with_no_head", 2 "two_masks",
                   H / 2 "one_mask_per_head". Needs K = H.
  GQA              k, v with K kv heads, H % K == 0: q head h (attending or selecting) reads kv head h // (H / K).
  protect_bos on/off, allow_self_mask on/off, any `scale`.

Neither S, F nor the probabilities are ever materialised. F_n is rebuilt tile by tile from two pieces:
  C[b, n, qb, j] = sum of S_n[:, j] over all query rows in query blocks before qb (a per-block column carry), and
  the in-tile exclusive prefix: a strictly-lower-triangular ones [Bq, Bq] matmul with the S_n tile
(no cumsum primitive: Mosaic TPU has none and Triton has no reverse one; matmuls run on tensor cores / the MXU).

Kernels on CPU and GPU (Bq = block_q, Bk = block_k, default 64; nq = Tp / Bq, nk = Tp / Bk, Tp = T padded to a
multiple of both, M masks, A attending heads). Each program walks its sequence of blocks in a loop inside, with
whole-sequence [Tp, D] rows as blocks (pointer ranges on a GPU):
  carry   grid (B, M, nk): per mask and key block, walk the query blocks in order recomputing the source head's
          logits tile, and write C before adding each block's column sums. Output C_kq [B, M, nk, nq, Bk].
  forward grid (B, A, nq): one program per (batch, attending head, query block); it streams the causal key
          blocks with an online softmax. Every program recomputes its mask's S tile itself (grid over heads, not
          a loop over heads inside): that costs one extra QK^T per tile but keeps one head's accumulator in
          registers, which scales to many heads on GPUs. Block index maps pick the head's kv head and mask.
          Saves the log-sum-exp per (attending head, query).
  backward, with dZ_h = P_h (dP_h - delta_h), delta_h = rowsum(dO_h O_h), dF_n = -sum_{h: mask(h) = n} dZ_h,
          dS_n[k, j] = sum_{i > k} dF_n[i, j] and G_n = dS_n on the kept, causal entries where L_{s_n} > 0:
    sel_kv  grid (B, M, nk): per mask and key block, walk the query blocks in reverse, summing dZ over that
            mask's heads (a loop inside: its block of heads, then its wrapped remainder head if any) to form the
            dF_n tile; the strict suffix sum is the carry of dF_n column sums from later blocks plus a
            strictly-upper-triangular ones matmul. Accumulates dk_{s_n} += scale G_n^T q_{s_n} and writes the
            carries R[b, n, qb, j] = sum of dF_n[:, j] over query blocks after qb.
    sel_q   grid (B, M, nq): per mask and query block, the same dF_n tiles and R give G_n; dq_{s_n} += scale G_n k.
    dkdv    grid (B, A, nk): the usual flash dk, dv per attending head (logits recomputed with F, as forward).
    dq      grid (B, A, nq): the usual flash dq per attending head.

Kernels on TPU (selective_flash_tpu.py; the tile math both versions share is in _selective_tiles.py. Mosaic;
Bq = Bk = 128 by default): a BlockSpec is a VMEM buffer, so no step may hold a whole
sequence (or all heads). Every kernel is the one above with its in-kernel walk moved onto the grid: one
(query block, key block) tile per step, the walked axis last and "arbitrary" (the others "parallel"), the
running state in VMEM scratch (initialised at the walk's first step, written out at its last), and (Bq, D),
(Bk, D) tiles whose DMAs Mosaic pipelines. Index maps clamp the walked block to the causal range (jnp.minimum /
maximum), so steps of fully-future tiles (skipped with pl.when) ask for the blocks already in VMEM. C and R are
[B, M, nk, nq, 1, Bk] (a (1, Bk) row per step); lse and delta (Bq, 1) column blocks of [B, A, Tp, 1].
  carry    grid (B, M, nk, nq)       column-sum carry (1, Bk) in scratch; writes C[kb, qb] every step.
  forward  grid (B, A, nq, nk)       online softmax state (Bq, E), (Bq, 1) x 2 in scratch.
  sel_kv   grid (B, M, nk, nq, G)    query blocks in reverse (qb = nq - 1 - t); the innermost axis walks the G
                                      head slots of mask n (_mask_head: its block, then its remainder head; an
                                      empty slot repeats a head and is skipped): slot 0 puts the tile's F and
                                      selection logits in scratch, each head subtracts its dZ into a dF scratch
                                      tile, the last slot applies the suffix sum and G^T q_{s_n} (dk_{s_n} in
                                      scratch) and writes R[kb, qb]. G = (A // M) + (A % M > 0); M = 1: G = A.
  sel_q    grid (B, M, nq, nk, G)    the same head slots; dq_{s_n} in scratch.
  dkdv     grid (B, A, nk, nq)       dk, dv (Bk, D), (Bk, E) in scratch.
  dq       grid (B, A, nq, nk)       dq (Bq, D) in scratch.
  VMEM per step (double-buffered blocks, s = input itemsize, a = accumulator itemsize, (Bq, 1) and (1, Bk)
  blocks padded to 128 lanes / 8 sublanes): at most 2 s ((2 Bq + 2 Bk) D + (Bq + Bk) E) for the input tiles,
  + 2 a (2 Bq 128 + 2 8 Bk) for lse, delta and the carry rows, + 2 a Bk D for an output tile, + the scratch,
  at most a (3 Bq Bk + Bk D + 8 Bk) (sel_kv): about 1.4 MiB for f32, Bq = Bk = D = E = 128, whatever T and H
  (plus Mosaic's temporaries, a few [Bq, Bk] float32 tiles). In HBM, O(T) per (batch row, head) as on GPU, plus
  C and R (B M Tp^2 / Bq each, unpadded: layout T(1, 128); 32 MiB per mask and batch row at T 32768).
  Outside the kernels (XLA): transposes to [B, H, T, D], zero padding of T and of head dims to a power of
  two >= 16 (zeros change no dot product), delta, summing dk, dv over each kv head's group of q heads (GQA),
  zeros for the selection-only heads' attention gradients, and adding the selection extras into the source
  heads' dq and dk (so a selection-only head's q, k get gradient only through F).

Extra memory beyond plain flash attention (all float32, float64 for float64 inputs):
  residuals: the log-sum-exp B * A * T besides the q, k, v and out that any attention keeps. The carries C
  (B * M * Tp^2 / Bq values: T = 4096, Bq = 64 gives 1 MiB per mask and batch row) are a forward transient and
  are recomputed in the backward, which keeps the residuals the same on every platform (_backend.per_platform).
  Backward transients: C and R (B * M * Tp^2 / Bq each), transposed copies of both (not on TPU), delta (B * A * Tp),
  the selection extras (B * M * Tp * D each), float32 dq, dk, dv per q head before the group sums and final cast.

Dtypes: bf16, f32 or f64 inputs; logits, S, F, softmax and every accumulator are float32 (float64 for float64
inputs); the output is in the input dtype. Products of input-dtype operands use Precision.HIGHEST for f32/f64
(so Triton does not drop to TF32, which would put a 1e-3 relative error into F) and the native bf16 path for
bf16 (probabilities and dZ are cast to bf16 for their matmuls, as flash attention does). The triangular
matmuls always run in float32 at HIGHEST precision.

Not supported here (use dba_jax.ops.selective): leaky ReLU, relu_after_cumsum, protection, selection slices, combos
and latent masks, residual masks, disable_selection, return_mask, segment ids or non-causal attention, GQA
together with selection_heads.

On CPU the kernels run with interpret=True; on GPU they use the Triton backend; on TPU, Mosaic (dba_kernels.
_backend: the platform is picked when lowered). Tests run the TPU kernels in the interpreter on CPU
(_backend.forced(Target("tpu", interpret=True))); explicit block_q / block_k apply on every platform.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _backend as backend

from . import selective_flash_tpu as tpu
from ._selective_tiles import (_Cfg, _kv, _mask_of, _fold_mask_heads, _dot, _strict_lower, _strict_upper,
                              _tile_masks, _scores, _dz, _f_tile, _softmax_step, _sel_grad, _kv_grads, _i32,
                              _n_key_blocks, _first_query_block, _acc, BLOCK_Q, BLOCK_K, BLOCK_TPU, MIN_BLOCK,
                              MASK_VALUE)


# ------------------------------------------------------------------------------------------------- backend glue

def _call(target: backend.Target, kernel, **kw):
  return backend.pallas_call(kernel, target=target, num_warps=4, num_stages=2, **kw)


# --------------------------------------------------------------------------------------------------- kernels

def _carry_kernel(qs_ref, ks_ref, c_ref, *, cfg: _Cfg, nq: int, acc):
  kb = pl.program_id(2)
  ks_KD = ks_ref[...]
  qb0 = _first_query_block(cfg, kb)

  def zero(qb, _):
    c_ref[pl.ds(qb, 1), :] = jnp.zeros((1, cfg.bk), acc)

  def body(qb, carry_1K):
    c_ref[pl.ds(qb, 1), :] = carry_1K  # exclusive: rows of blocks before qb only
    _, keep_QK = _tile_masks(cfg, qb, kb)
    _, s_QK = _scores(cfg, qs_ref[pl.ds(qb * cfg.bq, cfg.bq), :], ks_KD, keep_QK, acc)
    return carry_1K + s_QK.sum(axis=0, keepdims=True)

  jax.lax.fori_loop(_i32(0), qb0, zero, None)  # carry None: a constant carry does not lower in Triton
  jax.lax.fori_loop(qb0, _i32(nq), body, jnp.zeros((1, cfg.bk), acc))


def _fwd_kernel(q_ref, qs_ref, k_ref, ks_ref, v_ref, c_ref, o_ref, lse_ref, *, cfg: _Cfg, acc):
  qi = pl.program_id(2)
  q_QD, qs_QD = q_ref[...], qs_ref[...]
  tril_QQ = _strict_lower(cfg.bq, acc)

  def body(kb, state):
    ksl = pl.ds(kb * cfg.bk, cfg.bk)
    causal_QK, _, _, f_QK = _f_tile(cfg, qi, kb, qs_QD, ks_ref[ksl, :], c_ref[pl.ds(kb, 1), :], tril_QQ, acc)
    return _softmax_step(cfg, q_QD, k_ref[ksl, :], v_ref[ksl, :], f_QK, causal_QK, state, acc)

  e = o_ref.shape[-1]
  init = (jnp.zeros((cfg.bq, e), acc), jnp.full((cfg.bq, 1), MASK_VALUE, acc), jnp.zeros((cfg.bq, 1), acc))
  # Key block 0 holds key 0, which every row sees, so m and l are finite after the first step.
  o_QE, m_Q1, l_Q1 = jax.lax.fori_loop(_i32(0), _n_key_blocks(cfg, qi), body, init)
  o_ref[...] = (o_QE / l_Q1).astype(o_ref.dtype)
  lse_ref[...] = m_Q1 + jnp.log(l_Q1)


def _sel_kv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, c_ref, r_ref, dks_ref, *, cfg: _Cfg,
                   nq: int, acc):
  n, kb = pl.program_id(1), pl.program_id(2)
  qb0 = _first_query_block(cfg, kb)
  tril_QQ, triu_QQ = _strict_lower(cfg.bq, acc), _strict_upper(cfg.bq, acc)
  src = cfg.src + n
  ks_KD = k_ref[_kv(cfg, src)]

  def body(t, state):
    carry_1K, dks_KD = state
    qb = nq - 1 - t  # reverse order: the carry is the dF column sum over later query blocks
    qsl = pl.ds(qb * cfg.bq, cfg.bq)
    qs_QD = q_ref[src, qsl, :]
    causal_QK, keep_QK, lsel_QK, f_QK = _f_tile(cfg, qb, kb, qs_QD, ks_KD, c_ref[pl.ds(qb, 1), :], tril_QQ, acc)

    def head(a, df_QK):
      h, kvh = cfg.first + a, _kv(cfg, cfg.first + a)
      _, dz_QK = _dz(cfg, q_ref[h, qsl, :], k_ref[kvh], v_ref[kvh], do_ref[a, qsl, :], lse_ref[a, qsl, :],
                     delta_ref[a, qsl, :], f_QK, causal_QK, acc)
      return df_QK - dz_QK  # F_n enters the logits of every head using mask n with a minus sign

    df_QK = _fold_mask_heads(cfg, n, head, jnp.zeros((cfg.bq, cfg.bk), acc))
    r_ref[pl.ds(qb, 1), :] = carry_1K
    ds_QK = carry_1K + _dot(triu_QQ, df_QK, acc)  # dS[k] = sum_{i > k} dF[i]
    g_QK = _sel_grad(keep_QK, lsel_QK, ds_QK)
    dks_KD = dks_KD + _dot(g_QK.T.astype(qs_QD.dtype), qs_QD, acc)
    return carry_1K + df_QK.sum(axis=0, keepdims=True), dks_KD

  init = (jnp.zeros((1, cfg.bk), acc), jnp.zeros(dks_ref.shape, acc))
  carry_1K, dks_KD = jax.lax.fori_loop(_i32(0), nq - qb0, body, init)

  def fill(qb, _):  # blocks entirely above the diagonal: their dF tiles are 0, so the carry is final
    r_ref[pl.ds(qb, 1), :] = carry_1K

  jax.lax.fori_loop(_i32(0), qb0, fill, None)
  dks_ref[...] = (dks_KD * cfg.scale).astype(dks_ref.dtype)


def _sel_q_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, c_ref, r_ref, dqs_ref, *, cfg: _Cfg, acc):
  n, qi = pl.program_id(1), pl.program_id(2)
  tril_QQ, triu_QQ = _strict_lower(cfg.bq, acc), _strict_upper(cfg.bq, acc)
  src = cfg.src + n
  qs_QD = q_ref[src]

  def body(kb, dqs_QD):
    ksl = pl.ds(kb * cfg.bk, cfg.bk)
    ks_KD = k_ref[_kv(cfg, src), ksl, :]
    causal_QK, keep_QK, lsel_QK, f_QK = _f_tile(cfg, qi, kb, qs_QD, ks_KD, c_ref[pl.ds(kb, 1), :], tril_QQ, acc)

    def head(a, df_QK):
      h, kvh = cfg.first + a, _kv(cfg, cfg.first + a)
      _, dz_QK = _dz(cfg, q_ref[h], k_ref[kvh, ksl, :], v_ref[kvh, ksl, :], do_ref[a], lse_ref[a], delta_ref[a],
                     f_QK, causal_QK, acc)
      return df_QK - dz_QK

    df_QK = _fold_mask_heads(cfg, n, head, jnp.zeros((cfg.bq, cfg.bk), acc))
    ds_QK = r_ref[pl.ds(kb, 1), :] + _dot(triu_QQ, df_QK, acc)
    g_QK = _sel_grad(keep_QK, lsel_QK, ds_QK)
    return dqs_QD + _dot(g_QK.astype(ks_KD.dtype), ks_KD, acc)

  dqs_QD = jax.lax.fori_loop(_i32(0), _n_key_blocks(cfg, qi), body, jnp.zeros(dqs_ref.shape, acc))
  dqs_ref[...] = (dqs_QD * cfg.scale).astype(dqs_ref.dtype)


def _dkdv_kernel(q_ref, qs_ref, k_ref, ks_ref, v_ref, do_ref, lse_ref, delta_ref, c_ref, dk_ref, dv_ref, *,
                 cfg: _Cfg, nq: int, acc):
  kb = pl.program_id(2)
  tril_QQ = _strict_lower(cfg.bq, acc)
  k_KD, ks_KD, v_KE = k_ref[...], ks_ref[...], v_ref[...]

  def body(qb, state):
    dk_KD, dv_KE = state
    qsl = pl.ds(qb * cfg.bq, cfg.bq)
    causal_QK, _, _, f_QK = _f_tile(cfg, qb, kb, qs_ref[qsl, :], ks_KD, c_ref[pl.ds(qb, 1), :], tril_QQ, acc)
    q_QD, do_QE = q_ref[qsl, :], do_ref[qsl, :]
    p_QK, dz_QK = _dz(cfg, q_QD, k_KD, v_KE, do_QE, lse_ref[qsl, :], delta_ref[qsl, :], f_QK, causal_QK, acc)
    ddv_KE, ddk_KD = _kv_grads(p_QK, dz_QK, q_QD, do_QE, acc)
    return dk_KD + ddk_KD, dv_KE + ddv_KE

  init = (jnp.zeros(dk_ref.shape, acc), jnp.zeros(dv_ref.shape, acc))
  dk_KD, dv_KE = jax.lax.fori_loop(_first_query_block(cfg, kb), _i32(nq), body, init)
  dk_ref[...] = (dk_KD * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_KE.astype(dv_ref.dtype)


def _dq_kernel(q_ref, qs_ref, k_ref, ks_ref, v_ref, do_ref, lse_ref, delta_ref, c_ref, dq_ref, *, cfg: _Cfg, acc):
  qi = pl.program_id(2)
  tril_QQ = _strict_lower(cfg.bq, acc)
  q_QD, qs_QD, do_QE = q_ref[...], qs_ref[...], do_ref[...]
  lse_Q1, delta_Q1 = lse_ref[...], delta_ref[...]

  def body(kb, dq_QD):
    ksl = pl.ds(kb * cfg.bk, cfg.bk)
    causal_QK, _, _, f_QK = _f_tile(cfg, qi, kb, qs_QD, ks_ref[ksl, :], c_ref[pl.ds(kb, 1), :], tril_QQ, acc)
    k_KD = k_ref[ksl, :]
    _, dz_QK = _dz(cfg, q_QD, k_KD, v_ref[ksl, :], do_QE, lse_Q1, delta_Q1, f_QK, causal_QK, acc)
    return dq_QD + _dot(dz_QK.astype(k_KD.dtype), k_KD, acc)

  dq_QD = jax.lax.fori_loop(_i32(0), _n_key_blocks(cfg, qi), body, jnp.zeros(dq_ref.shape, acc))
  dq_ref[...] = (dq_QD * cfg.scale).astype(dq_ref.dtype)


# ------------------------------------------------------------------------------------------------ pallas calls


def _carries(target: backend.Target, cfg: _Cfg, q, k):
  """C_kq [B, M, nk, nq, Bk]: C_kq[b, n, kb, qb, c] = sum of S_n[:, kb Bk + c] over rows of query blocks < qb."""
  B, _, Tp, D = q.shape
  nq, nk, acc, M = Tp // cfg.bq, Tp // cfg.bk, _acc(q.dtype), cfg.n_masks
  return _call(
      target, functools.partial(_carry_kernel, cfg=cfg, nq=nq, acc=acc),
      grid=(B, M, nk),
      in_specs=[pl.BlockSpec((None, None, Tp, D), lambda b, n, j: (b, cfg.src + n, 0, 0)),
                pl.BlockSpec((None, None, cfg.bk, D), lambda b, n, j: (b, _kv(cfg, cfg.src + n), j, 0))],
      out_specs=pl.BlockSpec((None, None, None, nq, cfg.bk), lambda b, n, j: (b, n, j, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((B, M, nk, nq, cfg.bk), acc),
  )(q, k)


def _swap_blocks(x_kq):
  """[B, M, nk, nq, Bk] <-> [B, M, nq, nk, Bk]: per-key-block programs read one layout, per-query-block ones
  the other."""
  return jnp.swapaxes(x_kq, 2, 3)


def _forward(target: backend.Target, cfg: _Cfg, q, k, v):
  """Padded q [B, H, Tp, D], k [B, K, Tp, D], v [B, K, Tp, E] -> out [B, A, Tp, E], lse [B, A, Tp, 1]."""
  if target.platform == "tpu":
    return tpu._forward_tpu(target, cfg, q, k, v)
  B, H, Tp, D = q.shape
  E, A = v.shape[-1], cfg.n_att
  nq, nk, acc = Tp // cfg.bq, Tp // cfg.bk, _acc(q.dtype)
  c_kq = _carries(target, cfg, q, k)
  hq = lambda a: cfg.first + a  # attending head -> q head
  hs = lambda a: cfg.src + _mask_of(cfg, a)  # attending head -> its mask's source q head
  return _call(
      target, functools.partial(_fwd_kernel, cfg=cfg, acc=acc),
      grid=(B, A, nq),
      in_specs=[pl.BlockSpec((None, None, cfg.bq, D), lambda b, a, i: (b, hq(a), i, 0)),
                pl.BlockSpec((None, None, cfg.bq, D), lambda b, a, i: (b, hs(a), i, 0)),
                pl.BlockSpec((None, None, Tp, D), lambda b, a, i: (b, _kv(cfg, hq(a)), 0, 0)),
                pl.BlockSpec((None, None, Tp, D), lambda b, a, i: (b, _kv(cfg, hs(a)), 0, 0)),
                pl.BlockSpec((None, None, Tp, E), lambda b, a, i: (b, _kv(cfg, hq(a)), 0, 0)),
                pl.BlockSpec((None, None, None, nk, cfg.bk), lambda b, a, i: (b, _mask_of(cfg, a), i, 0, 0))],
      out_specs=[pl.BlockSpec((None, None, cfg.bq, E), lambda b, a, i: (b, a, i, 0)),
                 pl.BlockSpec((None, None, cfg.bq, 1), lambda b, a, i: (b, a, i, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, A, Tp, E), q.dtype), jax.ShapeDtypeStruct((B, A, Tp, 1), acc)],
  )(q, q, k, k, v, _swap_blocks(c_kq))


def _per_q_head(cfg: _Cfg, x_BATD):
  """Attending-head gradients [B, A, Tp, *] -> [B, H, Tp, *]: zeros for the selection-only heads before them."""
  return jnp.pad(x_BATD, ((0, 0), (cfg.first, 0), (0, 0), (0, 0)))


def _per_kv_head(cfg: _Cfg, x_BHTD):
  """[B, H, Tp, *] -> [B, K, Tp, *]: each kv head's gradient is the sum over the q heads that read it."""
  B, H, Tp, D = x_BHTD.shape
  return x_BHTD if cfg.group == 1 else x_BHTD.reshape(B, H // cfg.group, cfg.group, Tp, D).sum(2)


def _backward(target: backend.Target, cfg: _Cfg, q, k, v, out, lse, do):
  """Padded q, k, v, out, do and lse [B, A, Tp, 1] -> dq [B, H, Tp, D], dk [B, K, Tp, D], dv [B, K, Tp, E]. The
  carries C are recomputed (one QK^T pass per mask) rather than kept from the forward."""
  M = cfg.n_masks
  delta = jnp.sum(do.astype(_acc(q.dtype)) * out.astype(_acc(q.dtype)), axis=-1, keepdims=True)  # [B, A, Tp, 1]
  kernels = tpu._backward_kernels_tpu if target.platform == "tpu" else _backward_kernels
  dq, dk, dv, dqs, dks = kernels(target, cfg, q, k, v, do, lse, delta)
  # The source heads' q and k also feed F_n for every head using mask n (for selection-only heads, only that).
  # Sources are contiguous: q heads src..src+M-1, kv heads from src // group (M > 1 only without GQA).
  dq = _per_q_head(cfg, dq).at[:, cfg.src:cfg.src + M].add(dqs)
  kv_src = cfg.src // cfg.group
  dk = _per_kv_head(cfg, _per_q_head(cfg, dk)).at[:, kv_src:kv_src + M].add(dks)
  return dq, dk, _per_kv_head(cfg, _per_q_head(cfg, dv))


def _backward_kernels(target: backend.Target, cfg: _Cfg, q, k, v, do, lse, delta):
  """CPU / GPU backward kernels -> per attending head dq, dk [B, A, Tp, D], dv [B, A, Tp, E] and the selection
  extras dqs, dks [B, M, Tp, D] for the masks' source heads."""
  B, H, Tp, D = q.shape
  K, E, A, M = k.shape[1], v.shape[-1], cfg.n_att, cfg.n_masks
  nq, nk, acc = Tp // cfg.bq, Tp // cfg.bk, _acc(q.dtype)
  bq, bk = cfg.bq, cfg.bk
  c_kq = _carries(target, cfg, q, k)
  c_qk = _swap_blocks(c_kq)
  hq = lambda a: cfg.first + a
  hs = lambda a: cfg.src + _mask_of(cfg, a)

  r_kq, dks = _call(
      target, functools.partial(_sel_kv_kernel, cfg=cfg, nq=nq, acc=acc),
      grid=(B, M, nk),
      in_specs=[pl.BlockSpec((None, H, Tp, D), lambda b, n, j: (b, 0, 0, 0)),
                pl.BlockSpec((None, K, bk, D), lambda b, n, j: (b, 0, j, 0)),
                pl.BlockSpec((None, K, bk, E), lambda b, n, j: (b, 0, j, 0)),
                pl.BlockSpec((None, A, Tp, E), lambda b, n, j: (b, 0, 0, 0)),
                pl.BlockSpec((None, A, Tp, 1), lambda b, n, j: (b, 0, 0, 0)),
                pl.BlockSpec((None, A, Tp, 1), lambda b, n, j: (b, 0, 0, 0)),
                pl.BlockSpec((None, None, None, nq, bk), lambda b, n, j: (b, n, j, 0, 0))],
      out_specs=[pl.BlockSpec((None, None, None, nq, bk), lambda b, n, j: (b, n, j, 0, 0)),
                 pl.BlockSpec((None, None, bk, D), lambda b, n, j: (b, n, j, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, M, nk, nq, bk), acc), jax.ShapeDtypeStruct((B, M, Tp, D), acc)],
  )(q, k, v, do, lse, delta, c_kq)

  dqs = _call(
      target, functools.partial(_sel_q_kernel, cfg=cfg, acc=acc),
      grid=(B, M, nq),
      in_specs=[pl.BlockSpec((None, H, bq, D), lambda b, n, i: (b, 0, i, 0)),
                pl.BlockSpec((None, K, Tp, D), lambda b, n, i: (b, 0, 0, 0)),
                pl.BlockSpec((None, K, Tp, E), lambda b, n, i: (b, 0, 0, 0)),
                pl.BlockSpec((None, A, bq, E), lambda b, n, i: (b, 0, i, 0)),
                pl.BlockSpec((None, A, bq, 1), lambda b, n, i: (b, 0, i, 0)),
                pl.BlockSpec((None, A, bq, 1), lambda b, n, i: (b, 0, i, 0)),
                pl.BlockSpec((None, None, None, nk, bk), lambda b, n, i: (b, n, i, 0, 0)),
                pl.BlockSpec((None, None, None, nk, bk), lambda b, n, i: (b, n, i, 0, 0))],
      out_specs=pl.BlockSpec((None, None, bq, D), lambda b, n, i: (b, n, i, 0)),
      out_shape=jax.ShapeDtypeStruct((B, M, Tp, D), acc),
  )(q, k, v, do, lse, delta, c_qk, _swap_blocks(r_kq))

  dk, dv = _call(
      target, functools.partial(_dkdv_kernel, cfg=cfg, nq=nq, acc=acc),
      grid=(B, A, nk),
      in_specs=[pl.BlockSpec((None, None, Tp, D), lambda b, a, j: (b, hq(a), 0, 0)),
                pl.BlockSpec((None, None, Tp, D), lambda b, a, j: (b, hs(a), 0, 0)),
                pl.BlockSpec((None, None, bk, D), lambda b, a, j: (b, _kv(cfg, hq(a)), j, 0)),
                pl.BlockSpec((None, None, bk, D), lambda b, a, j: (b, _kv(cfg, hs(a)), j, 0)),
                pl.BlockSpec((None, None, bk, E), lambda b, a, j: (b, _kv(cfg, hq(a)), j, 0)),
                pl.BlockSpec((None, None, Tp, E), lambda b, a, j: (b, a, 0, 0)),
                pl.BlockSpec((None, None, Tp, 1), lambda b, a, j: (b, a, 0, 0)),
                pl.BlockSpec((None, None, Tp, 1), lambda b, a, j: (b, a, 0, 0)),
                pl.BlockSpec((None, None, None, nq, bk), lambda b, a, j: (b, _mask_of(cfg, a), j, 0, 0))],
      out_specs=[pl.BlockSpec((None, None, bk, D), lambda b, a, j: (b, a, j, 0)),
                 pl.BlockSpec((None, None, bk, E), lambda b, a, j: (b, a, j, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, A, Tp, D), acc), jax.ShapeDtypeStruct((B, A, Tp, E), acc)],
  )(q, q, k, k, v, do, lse, delta, c_kq)

  dq = _call(
      target, functools.partial(_dq_kernel, cfg=cfg, acc=acc),
      grid=(B, A, nq),
      in_specs=[pl.BlockSpec((None, None, bq, D), lambda b, a, i: (b, hq(a), i, 0)),
                pl.BlockSpec((None, None, bq, D), lambda b, a, i: (b, hs(a), i, 0)),
                pl.BlockSpec((None, None, Tp, D), lambda b, a, i: (b, _kv(cfg, hq(a)), 0, 0)),
                pl.BlockSpec((None, None, Tp, D), lambda b, a, i: (b, _kv(cfg, hs(a)), 0, 0)),
                pl.BlockSpec((None, None, Tp, E), lambda b, a, i: (b, _kv(cfg, hq(a)), 0, 0)),
                pl.BlockSpec((None, None, bq, E), lambda b, a, i: (b, a, i, 0)),
                pl.BlockSpec((None, None, bq, 1), lambda b, a, i: (b, a, i, 0)),
                pl.BlockSpec((None, None, bq, 1), lambda b, a, i: (b, a, i, 0)),
                pl.BlockSpec((None, None, None, nk, bk), lambda b, a, i: (b, _mask_of(cfg, a), i, 0, 0))],
      out_specs=pl.BlockSpec((None, None, bq, D), lambda b, a, i: (b, a, i, 0)),
      out_shape=jax.ShapeDtypeStruct((B, A, Tp, D), acc),
  )(q, q, k, k, v, do, lse, delta, c_qk)
  return dq, dk, dv, dqs, dks


# ---------------------------------------------------------------------------------------------- layout + vjp

def _pad_dim(n):
  return max(MIN_BLOCK, 1 << (n - 1).bit_length())


def _to_kernel(x_BTHD, Tp):
  """[B, T, H, D] -> [B, H, Tp, Dp]: zero rows for padded positions, zero columns up to a power of two."""
  _, T, _, D = x_BTHD.shape
  x = jnp.swapaxes(x_BTHD, 1, 2)
  return jnp.pad(x, ((0, 0), (0, 0), (0, Tp - T), (0, _pad_dim(D) - D)))


def _from_kernel(x_BHTD, T, D, dtype):
  return jnp.swapaxes(x_BHTD[:, :, :T, :D], 1, 2).astype(dtype)


def _for_target(target: backend.Target, cfg: _Cfg) -> _Cfg:
  """cfg with its blocks for `target`: the requested ones (0: the platform's default), at most T padded."""
  tpu = target.platform == "tpu"
  return dataclasses.replace(cfg, bq=_block(cfg.bq or (BLOCK_TPU if tpu else BLOCK_Q), cfg.T, "block_q"),
                             bk=_block(cfg.bk or (BLOCK_TPU if tpu else BLOCK_K), cfg.T, "block_k"))


def _prepare(cfg: _Cfg, q, k, v):
  Tp = -(-cfg.T // max(cfg.bq, cfg.bk)) * max(cfg.bq, cfg.bk)  # blocks are powers of two: a multiple of both
  return _to_kernel(q, Tp), _to_kernel(k, Tp), _to_kernel(v, Tp)


def _forward_on(target: backend.Target, q, k, v, *, cfg: _Cfg):
  """(out [B, T, A, E], lse [B, A, T]): unpadded, so the same shapes on every platform (_backend.per_platform)."""
  cfg = _for_target(target, cfg)
  qp, kp, vp = _prepare(cfg, q, k, v)
  out, lse = _forward(target, cfg, qp, kp, vp)
  return _from_kernel(out, cfg.T, v.shape[-1], q.dtype), lse[:, :, :cfg.T, 0]


def _backward_on(target: backend.Target, q, k, v, out, lse, g, *, cfg: _Cfg):
  cfg = _for_target(target, cfg)
  qp, kp, vp = _prepare(cfg, q, k, v)
  Tp = qp.shape[2]
  lse_p = jnp.pad(lse, ((0, 0), (0, 0), (0, Tp - cfg.T)))[..., None]  # padded rows: zero q and dO, any lse
  dq, dk, dv = _backward(target, cfg, qp, kp, vp, _to_kernel(out, Tp), lse_p, _to_kernel(g.astype(q.dtype), Tp))
  return tuple(_from_kernel(d, cfg.T, x.shape[-1], x.dtype) for d, x in zip((dq, dk, dv), (q, k, v)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Cfg, q, k, v):
  return _flash_fwd(cfg, q, k, v)[0]


def _flash_fwd(cfg: _Cfg, q, k, v):
  out, lse = backend.dispatch(_forward_on, q, k, v, cfg=cfg)
  return out, (q, k, v, out, lse)


def _flash_bwd(cfg: _Cfg, res, g):
  return backend.dispatch(_backward_on, *res, g, cfg=cfg)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _block(requested: int | None, T: int, name: str) -> int:
  if requested is None:
    return 0  # the platform's default, chosen when lowered (_for_target)
  if requested < MIN_BLOCK or requested & (requested - 1):
    raise ValueError(f"{name}={requested} must be a power of two >= {MIN_BLOCK}")
  return min(requested, _pad_dim(T))  # short sequences need no block larger than themselves


def selective_flash_attention(q_BTHD, k_BTKD, v_BTKE, *, scale=None, protect_bos=True, allow_self_mask=False,
                              selection_head=0, selection_heads=0, block_q=None, block_k=None):
  """softmax_{j <= i}(L_h - F_{mask(h)}) v_{kv(h)} for every attending head h (see the module docstring).

  q [B, T, H, D]; k [B, T, K, D]; v [B, T, K, E] with H % K == 0 (GQA: q head h reads kv head h // (H / K));
  any T >= 1 and head dims (padded internally to a power of two >= 16); bf16, f32 or f64 with at least float32
  accumulation. selection_heads=0: one mask from head `selection_head`, which also attends; the output is
  [B, T, H, E]. selection_heads=m > 0 (needs K = H): heads 0..m-1 only select, one mask each, assigned to the
  other heads by dba_jax.ops.selective.mask_assignment; the output is [B, T, H - m, E] (selection_head is unused).
  The output is in q's dtype. Matches dba_jax.ops.selective.selective_attention (impl="reference", with k and v
  repeated to H heads under GQA). Differentiable in q, k and v (custom VJP, including the path through F into
  the source heads' q and k)."""
  B, T, H, D = q_BTHD.shape
  K = k_BTKD.shape[2] if k_BTKD.ndim == 4 else -1
  if (k_BTKD.shape != (B, T, K, D) or v_BTKE.ndim != 4 or v_BTKE.shape[:3] != (B, T, K) or K < 1 or H % K):
    raise ValueError(f"need q [B, T, H, D], k [B, T, K, D] and v [B, T, K, E] with equal B, T and H % K == 0; "
                     f"got {q_BTHD.shape}, {k_BTKD.shape}, {v_BTKE.shape}")
  if not (q_BTHD.dtype == k_BTKD.dtype == v_BTKE.dtype):
    raise TypeError(f"q, k, v dtypes differ: {q_BTHD.dtype}, {k_BTKD.dtype}, {v_BTKE.dtype}")
  if q_BTHD.dtype not in (jnp.bfloat16, jnp.float32, jnp.float64):
    raise TypeError(f"unsupported dtype {q_BTHD.dtype} (bf16, f32 or f64)")
  if not 0 <= selection_head < H:
    raise ValueError(f"selection_head={selection_head} is not a head index (H={H})")
  m = int(selection_heads)
  if not 0 <= m < H:
    raise ValueError(f"selection_heads={m} must leave at least one attending head (H={H})")
  if m and K != H:
    raise ValueError(f"selection_heads={m} needs as many kv heads as q heads (got K={K}, H={H}): GQA is "
                     f"supported only with the default single selection head")
  cfg = _Cfg(scale=float(D ** -0.5 if scale is None else scale), protect_bos=bool(protect_bos),
             allow_self_mask=bool(allow_self_mask), bq=_block(block_q, T, "block_q"), bk=_block(block_k, T, "block_k"),
             T=T, src=0 if m else int(selection_head), n_masks=max(m, 1), first=m, n_att=H - m, group=H // K)
  return _flash(cfg, q_BTHD, k_BTKD, v_BTKE)
