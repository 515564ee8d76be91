"""Flash attention (Pallas) for DBA: q/k head dim D != v head dim E, GQA, causal with always-visible prefix keys.

Semantics are those of `dba_jax.ops.standard.reference`: query t (0-based) sees key column c iff
c - n_prefix <= t or c < n_prefix. Because t >= 0, that is just c <= t + n_prefix: the null-token prefix is an
offset of the causal diagonal, not a second mask. S = T + n_prefix in DBA, but any S >= 1 works.

Layout. The wrapper moves heads in front ([B, H, T, D]) and zero-pads T and S to whole blocks, and D and E to
powers of two >= 16 (Triton needs power-of-two tiles) or, on TPU, to multiples of 128 lanes. Zero columns add
nothing to q.k or to p@v. Padded keys are masked where a real query could see them; padded queries are sliced
away, and their dO and delta are zero, so they add nothing to dK/dV. GQA: query head h reads kv head h // G
(G = H // K) through the BlockSpec index_map, so K/V are never repeated in HBM.

GPU / CPU kernels (grid order (B, heads, blocks); every program is independent, so all axes are parallel):
  forward: grid (B, H, Tp/bq). One query block; a loop over key blocks with an online softmax, fp32 (fp64 for
    float64 checks) accumulators. Causal: the loop stops at the last key block the query block can see, and
    only the blocks on the diagonal pay for the mask. Writes O and the log-sum-exp per row.
  dK/dV:   grid (B, K, Sp/bk). One key block of one kv head; walks the G query heads of its group and, for each,
    the query blocks from the diagonal on. Queries of the group are contiguous rows of q reshaped [B, K, G*Tp, D].
  dQ:      grid (B, H, Tp/bq). Same key walk as the forward, recomputing p from the saved log-sum-exp.
The whole-sequence K/V (forward, dQ) and whole-group Q/dO/lse/delta (dK/dV) blocks are pointer ranges on GPU.

TPU kernels (Mosaic copies every block into VMEM, so no block may span the sequence): one [bq, bk] tile per
grid step, bq = max(block_q, 128), bk = max(block_k, 128) (TPU_BLOCK). The grid's last axis walks the tiles
being reduced over and is "arbitrary"; the other axes are "parallel" (a two-TensorCore chip splits them). The
running statistics and accumulators live in VMEM scratch: zeroed at the first step of the walk, written out
at the last. Mosaic pipelines the (bq or bk, width) tile DMAs.
  forward: grid (B, H, Tp/bq, Sp/bk); scratch m, l [bq, 1], o [bq, Ep].
  dQ:      grid (B, H, Tp/bq, Sp/bk); scratch dq [bq, Dp].
  dK/dV:   grid (B, K, Sp/bk, G*Tp/bq): step r reads query block r % nq of head kv*G + r // nq, so one key
    block sums over its whole group; scratch dk [bk, Dp], dv [bk, Ep].
Causal tiles no query sees are skipped with pl.when, and their index maps are clamped (jnp.minimum /
jnp.maximum) to the last / first tile that is seen, so the pipeline does not re-fetch anything for them. Only
tiles the diagonal cuts (or, forward and dQ, holding padded keys) pay for the mask. VMEM per program, with
i = input bytes per element, f = 4 (fp32 accumulators) and a [.., bq, 1] column taking bq x 128 lanes,
inputs and outputs double-buffered:
  forward: 2i(bq + bk)(Dp + Ep) + 2f*128bq (lse) + f(256bq + bq*Ep) (scratch) + ~3f*bq*bk (scores, p)
  dQ:      2i(2bq*Dp + bk*Dp + bq*Ep + bk*Ep) + 4f*128bq (lse, delta) + f*bq*Dp + ~4f*bq*bk
  dK/dV:   2i(bq + 2bk)(Dp + Ep) + 4f*128bq + f*bk(Dp + Ep) + ~4f*bq*bk
so about 1-2 MiB at 128 x 128 tiles and D = E = 128 in float32, whatever T, S and G (issue 24).

delta = rowsum(dO * O) is one fused XLA reduction before the backward kernels.

Per-row statistics (lse, delta) are [.., T, 1] columns: a (block, 1) tile lowers for both Mosaic (its last dim
equals the array's) and Triton, while Mosaic rejects a squeezed (1, block) row tile.

Dtypes: matmul inputs stay in the input dtype (bf16 feeds the tensor cores / MXU), products accumulate in at
least float32. float32 inputs use Precision.HIGHEST by default (IEEE on Triton, not TF32), so the kernel
matches the float32 reference; pass precision=jax.lax.Precision.DEFAULT to trade that for speed.

Backends: interpret mode on CPU; Pallas-Triton on GPU (selected through its CompilerParams: JAX's default GPU
backend is Mosaic GPU, which this kernel does not target); Mosaic on TPU. The tile math (_scores,
_softmax_step, _dq_tile, _dkdv_tile) is shared: the GPU kernels loop over tiles inside a program, the TPU
kernels take one tile per grid step.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import _backend as backend

BLOCK_Q = 64
BLOCK_K = 64
TPU_BLOCK = 128  # smallest TPU tile side: one MXU pass, (8, 128)-aligned blocks for 32- and 16-bit types
_REDUCE_LAST = ("parallel", "parallel", "parallel", "arbitrary")  # TPU grids: the last axis is a reduction
MIN_BLOCK = 16  # smallest tile side; Triton and bf16 sublane packing both want >= 16
_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp(_MASK - m) is 0 without inf - inf NaNs
_NT = (((1,), (1,)), ((), ()))  # a @ b.T with no explicit transpose


class _Cfg(NamedTuple):
  """Static settings shared by the three kernels (hashable: a custom_vjp nondiff argument)."""
  scale: float
  causal: bool
  n_prefix: int
  block_q: int
  block_k: int
  precision: object


def _width(n: int) -> int:
  return max(MIN_BLOCK, pl.next_power_of_2(n))


def _call(kernel, target: backend.Target, width: int, **kwargs):
  # Wider head dims get more Triton warps (register pressure of the [block, width] accumulators).
  return backend.pallas_call(kernel, target=target, num_warps=4 if width <= 64 else 8, num_stages=2, **kwargs)


def _visible(row0, col0, bq: int, bk: int, causal: bool, n_prefix: int, S: int):
  """[bq, bk] bool for query rows row0.. and key columns col0..: causal-with-prefix and inside the real S keys."""
  cols = col0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  inside = cols < S
  if not causal:
    return inside
  rows = row0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  return inside & (cols <= rows + n_prefix)


def _idiv(a, b: int):
  """Floor division of a non-negative traced index; lax.div (not //) is what Triton lowers for int32."""
  return lax.div(a, jnp.asarray(b, a.dtype))


def _irem(a, b: int):
  return lax.rem(a, jnp.asarray(b, a.dtype))


def _key_bounds(row0, bq: int, bk: int, nk: int, causal: bool, n_prefix: int, S: int):
  """(n_full, n_hi): key blocks [0, n_full) need no mask for this query block, [n_full, n_hi) need one."""
  if not causal:
    return min(S // bk, nk), nk
  # The last row sees columns <= row0 + bq - 1 + n_prefix; the first row sees all of [0, row0 + n_prefix].
  n_hi = jnp.minimum(nk, _idiv(row0 + bq + n_prefix + bk - 1, bk))
  n_full = jnp.minimum(jnp.minimum(n_hi, _idiv(row0 + n_prefix + 1, bk)), S // bk)
  return n_full, n_hi


def _dot_nt(a, b, cfg: _Cfg, acc):
  return lax.dot_general(a, b, _NT, precision=cfg.precision, preferred_element_type=acc)


def _dot(a, b, cfg: _Cfg, acc):
  return jnp.dot(a, b, precision=cfg.precision, preferred_element_type=acc)


# --------------------------------------------------------------------------------------------------- tile math
# One [bq, bk] tile of each kernel, shared by the GPU/CPU kernels (which loop over tiles inside a program) and
# the TPU kernels (one tile per grid step, carries in VMEM scratch).

def _tile_masks(row0, col0, bq: int, bk: int, cfg: _Cfg, S: int):
  """(seen, straddles, ragged) for the tile of query rows row0.. and key columns col0..: some row sees some
  column; the causal diagonal cuts through it; it holds padded key columns."""
  if cfg.causal:
    seen = col0 <= row0 + bq - 1 + cfg.n_prefix  # the last row sees up to row0 + bq - 1 + n_prefix
    straddles = col0 + bk - 1 > row0 + cfg.n_prefix  # the first row does not see the last column
  else:
    seen, straddles = True, False
  return seen, straddles, col0 + bk > S


def _scores(q, k, row0, col0, cfg: _Cfg, S: int, acc, masked: bool):
  """Scaled scores q @ k.T [bq, bk]; where `masked`, invisible and padded columns get _MASK."""
  s = _dot_nt(q, k, cfg, acc)
  if cfg.scale != 1.0:
    s = s * cfg.scale
  if masked:
    s = jnp.where(_visible(row0, col0, q.shape[0], k.shape[0], cfg.causal, cfg.n_prefix, S), s, _MASK)
  return s


def _softmax_step(m, l, o, s, v, cfg: _Cfg):
  """The online softmax: running max m, sum l [bq, 1] and output o [bq, E] after one more tile of scores."""
  m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
  alpha = jnp.exp(m - m_new)  # rescales what was summed under the old running max
  p = jnp.exp(s - m_new)
  o = alpha * o + _dot(p.astype(v.dtype), v, cfg, o.dtype)
  return m_new, alpha * l + p.sum(axis=1, keepdims=True), o


def _dq_tile(s, k, v, do, lse, delta, cfg: _Cfg):
  """This tile's part of dQ / scale: dS @ K with dS = P * (dO @ V.T - delta), P recomputed from lse."""
  p = jnp.exp(s - lse)
  ds = p * (_dot_nt(do, v, cfg, s.dtype) - delta)
  return _dot(ds.astype(k.dtype), k, cfg, s.dtype)


def _dkdv_tile(s, q, v, do, lse, delta, cfg: _Cfg):
  """This tile's parts of (dK / scale, dV): dS.T @ Q and P.T @ dO."""
  p = jnp.exp(s - lse)
  dv = _dot(p.T.astype(do.dtype), do, cfg, s.dtype)
  ds = p * (_dot_nt(do, v, cfg, s.dtype) - delta)
  return _dot(ds.T.astype(q.dtype), q, cfg, s.dtype), dv


# ------------------------------------------------------------------------------------------ GPU / CPU kernels
# One program per query block (forward, dQ) or key block (dK/dV), looping over the other axis inside: the whole
# K/V (or the group's Q/dO) is one block, a pointer range on GPU.

def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: _Cfg, S: int):
  bq, bk = cfg.block_q, cfg.block_k
  acc = lse_ref.dtype
  row0 = pl.program_id(2) * bq
  q = q_ref[...]

  def step(j, carry, masked):
    col0 = pl.multiple_of(j * bk, bk)
    s = _scores(q, k_ref[pl.ds(col0, bk), :], row0, col0, cfg, S, acc, masked)
    return _softmax_step(*carry, s, v_ref[pl.ds(col0, bk), :], cfg)

  n_full, n_hi = _key_bounds(row0, bq, bk, k_ref.shape[0] // bk, cfg.causal, cfg.n_prefix, S)
  carry = (jnp.full((bq, 1), -jnp.inf, acc), jnp.zeros((bq, 1), acc), jnp.zeros((bq, v_ref.shape[1]), acc))
  carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
  # Key column 0 is visible to every row and lies in the first block, so l >= 1 and m is finite here.
  m, l, o = lax.fori_loop(n_full, n_hi, functools.partial(step, masked=True), carry)
  o_ref[...] = (o / l).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: _Cfg, S: int):
  bq, bk = cfg.block_q, cfg.block_k
  acc = lse_ref.dtype
  row0 = pl.program_id(2) * bq
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def step(j, dq, masked):
    col0 = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(col0, bk), :]
    s = _scores(q, k, row0, col0, cfg, S, acc, masked)
    return dq + _dq_tile(s, k, v_ref[pl.ds(col0, bk), :], do, lse, delta, cfg)

  n_full, n_hi = _key_bounds(row0, bq, bk, k_ref.shape[0] // bk, cfg.causal, cfg.n_prefix, S)
  dq = jnp.zeros(q.shape, acc)
  dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), dq)
  dq = lax.fori_loop(n_full, n_hi, functools.partial(step, masked=True), dq)
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)  # d s / d(q.k) = scale, applied once


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: _Cfg, S: int, Tp: int,
                 G: int):
  bq, bk = cfg.block_q, cfg.block_k
  acc = lse_ref.dtype
  nq = Tp // bq
  col0 = pl.program_id(2) * bk
  k, v = k_ref[...], v_ref[...]
  # Padded key columns need no mask here: a column's dK/dV uses only its own scores, and padded columns are
  # sliced away. Only causality masks, in the query blocks [lo, mid) that straddle the diagonal.
  if cfg.causal:
    # Rows t < col0 - n_prefix see none of these keys; rows t >= col0 + bk - 1 - n_prefix see all of them.
    lo = _idiv(jnp.maximum(col0 - cfg.n_prefix, 0), bq)
    mid = jnp.clip(_idiv(jnp.maximum(col0 + bk - 1 - cfg.n_prefix, 0) + bq - 1, bq), lo, nq)
  else:
    lo = mid = 0

  def step(i, carry, g, masked):
    dk, dv = carry
    r0 = pl.multiple_of(g * Tp + i * bq, bq)  # row of query block i of head g in the group's [G*Tp] rows
    q = q_ref[pl.ds(r0, bq), :]
    s = _scores(q, k, i * bq, col0, cfg, S, acc, masked)
    dk_part, dv_part = _dkdv_tile(s, q, v, do_ref[pl.ds(r0, bq), :], lse_ref[pl.ds(r0, bq), :],
                                  delta_ref[pl.ds(r0, bq), :], cfg)
    return dk + dk_part, dv + dv_part

  def head(g, carry):
    carry = lax.fori_loop(lo, mid, functools.partial(step, g=g, masked=True), carry)
    return lax.fori_loop(mid, nq, functools.partial(step, g=g, masked=False), carry)

  dk, dv = lax.fori_loop(0, G, head, (jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc)))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------------ TPU kernels
# One [bq, bk] tile per grid step; the grid's last axis walks the tiles being reduced over ("arbitrary"), the
# carries live in VMEM scratch. Tiles nobody sees are skipped with pl.when, and the index maps repeat the last
# fetched block for them (see _last_key_block / _first_query_block), so they cost no DMA either.

def _on_tiles(seen, straddles, ragged, step):
  """step(masked) where the tile is seen: unmasked unless the diagonal cuts it or it holds padded keys."""
  needs_mask = jnp.logical_or(straddles, ragged)
  pl.when(jnp.logical_and(seen, jnp.logical_not(needs_mask)))(lambda: step(False))
  pl.when(jnp.logical_and(seen, needs_mask))(lambda: step(True))


def _fwd_kernel_tpu(q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, o_scr, *, cfg: _Cfg, S: int):
  bq, bk = cfg.block_q, cfg.block_k
  i, j = pl.program_id(2), pl.program_id(3)
  row0, col0 = i * bq, j * bk

  @pl.when(j == 0)
  def _():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, m_scr.dtype)
    l_scr[...] = jnp.zeros(l_scr.shape, l_scr.dtype)
    o_scr[...] = jnp.zeros(o_scr.shape, o_scr.dtype)

  def step(masked):
    s = _scores(q_ref[...], k_ref[...], row0, col0, cfg, S, o_scr.dtype, masked)
    m_scr[...], l_scr[...], o_scr[...] = _softmax_step(m_scr[...], l_scr[...], o_scr[...], s, v_ref[...], cfg)

  _on_tiles(*_tile_masks(row0, col0, bq, bk, cfg, S), step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():  # key block 0 is seen by every row (column 0 always is), so l >= 1 and m is finite
    o_ref[...] = (o_scr[...] / l_scr[...]).astype(o_ref.dtype)
    lse_ref[...] = m_scr[...] + jnp.log(l_scr[...])


def _dq_kernel_tpu(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr, *, cfg: _Cfg, S: int):
  bq, bk = cfg.block_q, cfg.block_k
  i, j = pl.program_id(2), pl.program_id(3)
  row0, col0 = i * bq, j * bk

  @pl.when(j == 0)
  def _():
    dq_scr[...] = jnp.zeros(dq_scr.shape, dq_scr.dtype)

  def step(masked):
    k = k_ref[...]
    s = _scores(q_ref[...], k, row0, col0, cfg, S, dq_scr.dtype, masked)
    dq_scr[...] += _dq_tile(s, k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], cfg)

  _on_tiles(*_tile_masks(row0, col0, bq, bk, cfg, S), step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel_tpu(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr, *,
                     cfg: _Cfg, S: int, nq: int):
  bq, bk = cfg.block_q, cfg.block_k
  j, r = pl.program_id(2), pl.program_id(3)  # r walks the group's heads, then their query blocks
  row0, col0 = _irem(r, nq) * bq, j * bk

  @pl.when(r == 0)
  def _():
    dk_scr[...] = jnp.zeros(dk_scr.shape, dk_scr.dtype)
    dv_scr[...] = jnp.zeros(dv_scr.shape, dv_scr.dtype)

  def step(masked):
    q = q_ref[...]
    s = _scores(q, k_ref[...], row0, col0, cfg, S, dk_scr.dtype, masked)
    dk_part, dv_part = _dkdv_tile(s, q, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], cfg)
    dk_scr[...] += dk_part
    dv_scr[...] += dv_part

  # As on GPU, padded key columns need no mask here (their dK/dV rows are sliced away): only the diagonal.
  seen, straddles, _ = _tile_masks(row0, col0, bq, bk, cfg, S)
  _on_tiles(seen, straddles, False, step)

  @pl.when(r == pl.num_programs(3) - 1)
  def _():
    dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _last_key_block(i, cfg: _Cfg):
  """The last key block query block i sees (causal), for clamping index maps: later steps re-use it, no DMA."""
  return _idiv(i * cfg.block_q + cfg.block_q - 1 + cfg.n_prefix, cfg.block_k)


def _first_query_block(j, cfg: _Cfg):
  """The first query block that sees key block j (causal; may be past the last one when S > T + n_prefix)."""
  return _idiv(jnp.maximum(j * cfg.block_k - cfg.n_prefix, 0), cfg.block_q)


def _query_grid_tiles(cfg: _Cfg, G: int):
  """BlockSpec makers (q_tile(width), kv_tile(width)) for the TPU forward and dQ grids (B, H, nq, nk). Causal:
  key blocks past the diagonal repeat the last one seen (no DMA; the kernel skips them)."""
  kv_block = (lambda i, j: jnp.minimum(j, _last_key_block(i, cfg))) if cfg.causal else (lambda i, j: j)
  q_tile = lambda w: pl.BlockSpec((None, None, cfg.block_q, w), lambda b, h, i, j: (b, h, i, 0))
  kv_tile = lambda w: pl.BlockSpec((None, None, cfg.block_k, w),
                                   lambda b, h, i, j: (b, _idiv(h, G), kv_block(i, j), 0))
  return q_tile, kv_tile


# ----------------------------------------------------------------------------------------------------- wrappers

def _heads_first(x_BTHD, rows: int, width: int):
  """[B, T, H, D] -> [B, H, rows, width], zero-padded."""
  x = jnp.swapaxes(x_BTHD, 1, 2)
  return jnp.pad(x, ((0, 0), (0, 0), (0, rows - x.shape[2]), (0, width - x.shape[3])))


def _seq_first(x_BHTD, T: int, D: int):
  return jnp.swapaxes(x_BHTD[:, :, :T, :D], 1, 2)


def _tiling(target: backend.Target, cfg: _Cfg, T: int, S: int, D: int, E: int):
  """(cfg with the platform's blocks, Tp, Sp, Dp, Ep). TPU: blocks of at least TPU_BLOCK rows (whole MXU
  passes, (8, 128)-aligned tiles for every dtype) and head dims padded to whole 128-lane vregs. Elsewhere: the
  requested blocks and power-of-two head dims (Triton tiles)."""
  if target.platform == "tpu":
    cfg = cfg._replace(block_q=max(cfg.block_q, TPU_BLOCK), block_k=max(cfg.block_k, TPU_BLOCK))
    Dp, Ep = backend.round_up(D, backend.LANES), backend.round_up(E, backend.LANES)
  else:
    Dp, Ep = _width(D), _width(E)
  return cfg, backend.round_up(T, cfg.block_q), backend.round_up(S, cfg.block_k), Dp, Ep


def _forward(target: backend.Target, q_BTHD, k_BSKD, v_BSKE, *, cfg: _Cfg):
  """(out [B, T, H, E], lse [B, H, T]): unpadded, so the same shapes on every platform."""
  B, T, H, D = q_BTHD.shape
  S, K, E = k_BSKD.shape[1], k_BSKD.shape[2], v_BSKE.shape[3]
  cfg, Tp, Sp, Dp, Ep = _tiling(target, cfg, T, S, D, E)
  G, bq, bk = H // K, cfg.block_q, cfg.block_k
  acc = jnp.promote_types(q_BTHD.dtype, jnp.float32)
  q = _heads_first(q_BTHD, Tp, Dp)
  k, v = _heads_first(k_BSKD, Sp, Dp), _heads_first(v_BSKE, Sp, Ep)
  out_shape = [jax.ShapeDtypeStruct((B, H, Tp, Ep), v_BSKE.dtype), jax.ShapeDtypeStruct((B, H, Tp, 1), acc)]
  if target.platform == "tpu":
    q_tile, kv_tile = _query_grid_tiles(cfg, G)
    o_BHTE, lse_BHT1 = _call(
        functools.partial(_fwd_kernel_tpu, cfg=cfg, S=S), target, max(Dp, Ep),
        grid=(B, H, Tp // bq, Sp // bk), semantics=_REDUCE_LAST,
        in_specs=[q_tile(Dp), kv_tile(Dp), kv_tile(Ep)], out_specs=[q_tile(Ep), q_tile(1)], out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((bq, 1), acc), pltpu.VMEM((bq, 1), acc), pltpu.VMEM((bq, Ep), acc)],
    )(q, k, v)
    return _seq_first(o_BHTE, T, E), lse_BHT1[:, :, :T, 0]
  o_BHTE, lse_BHT1 = _call(
      functools.partial(_fwd_kernel, cfg=cfg, S=S), target, max(Dp, Ep),
      grid=(B, H, Tp // bq),
      in_specs=[pl.BlockSpec((None, None, bq, Dp), lambda b, h, i: (b, h, i, 0)),
                pl.BlockSpec((None, None, Sp, Dp), lambda b, h, i: (b, _idiv(h, G), 0, 0)),
                pl.BlockSpec((None, None, Sp, Ep), lambda b, h, i: (b, _idiv(h, G), 0, 0))],
      out_specs=[pl.BlockSpec((None, None, bq, Ep), lambda b, h, i: (b, h, i, 0)),
                 pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))],
      out_shape=out_shape,
  )(q, k, v)
  return _seq_first(o_BHTE, T, E), lse_BHT1[:, :, :T, 0]


def _backward(target: backend.Target, q_BTHD, k_BSKD, v_BSKE, o_BTHE, lse_BHT, do_BTHE, *, cfg: _Cfg):
  B, T, H, D = q_BTHD.shape
  S, K, E = k_BSKD.shape[1], k_BSKD.shape[2], v_BSKE.shape[3]
  cfg, Tp, Sp, Dp, Ep = _tiling(target, cfg, T, S, D, E)
  G, bq, bk = H // K, cfg.block_q, cfg.block_k
  acc = lse_BHT.dtype
  do_BTHE = do_BTHE.astype(v_BSKE.dtype)
  delta_BTH = jnp.sum(do_BTHE.astype(acc) * o_BTHE.astype(acc), axis=-1)
  rows = lambda x_BHT: jnp.pad(x_BHT, ((0, 0), (0, 0), (0, Tp - T)))[..., None]  # [B, H, Tp, 1] columns
  lse_BHT1, delta_BHT1 = rows(lse_BHT), rows(jnp.swapaxes(delta_BTH, 1, 2))
  q, do = _heads_first(q_BTHD, Tp, Dp), _heads_first(do_BTHE, Tp, Ep)
  k, v = _heads_first(k_BSKD, Sp, Dp), _heads_first(v_BSKE, Sp, Ep)
  width = max(Dp, Ep)
  dq_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
  dkdv_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  if target.platform == "tpu":
    nq = Tp // bq
    q_tile, kv_tile = _query_grid_tiles(cfg, G)
    dq_BHTD = _call(
        functools.partial(_dq_kernel_tpu, cfg=cfg, S=S), target, width,
        grid=(B, H, nq, Sp // bk), semantics=_REDUCE_LAST,
        in_specs=[q_tile(Dp), kv_tile(Dp), kv_tile(Ep), q_tile(Ep), q_tile(1), q_tile(1)],
        out_specs=q_tile(Dp), out_shape=dq_shape, scratch_shapes=[pltpu.VMEM((bq, Dp), acc)],
    )(q, k, v, do, lse_BHT1, delta_BHT1)

    # The last axis r walks query block r % nq of head kv*G + r // nq. Causal: query blocks before the first
    # that sees key block j repeat that one (no DMA; the kernel skips them).
    def q_block(j, r):
      i = _irem(r, nq)
      return jnp.minimum(jnp.maximum(i, _first_query_block(j, cfg)), nq - 1) if cfg.causal else i
    grp_tile = lambda w: pl.BlockSpec((None, None, bq, w),
                                      lambda b, kv, j, r: (b, kv * G + _idiv(r, nq), q_block(j, r), 0))
    key_tile = lambda w: pl.BlockSpec((None, None, bk, w), lambda b, kv, j, r: (b, kv, j, 0))
    dk_BKSD, dv_BKSE = _call(
        functools.partial(_dkdv_kernel_tpu, cfg=cfg, S=S, nq=nq), target, width,
        grid=(B, K, Sp // bk, G * nq), semantics=_REDUCE_LAST,
        in_specs=[grp_tile(Dp), key_tile(Dp), key_tile(Ep), grp_tile(Ep), grp_tile(1), grp_tile(1)],
        out_specs=[key_tile(Dp), key_tile(Ep)], out_shape=dkdv_shape,
        scratch_shapes=[pltpu.VMEM((bk, Dp), acc), pltpu.VMEM((bk, Ep), acc)],
    )(q, k, v, do, lse_BHT1, delta_BHT1)
    return _seq_first(dq_BHTD, T, D), _seq_first(dk_BKSD, S, D), _seq_first(dv_BKSE, S, E)

  row = lambda w: pl.BlockSpec((None, None, bq, w), lambda b, h, i: (b, h, i, 0))
  kv_all = lambda w: pl.BlockSpec((None, None, Sp, w), lambda b, h, i: (b, _idiv(h, G), 0, 0))
  dq_BHTD = _call(
      functools.partial(_dq_kernel, cfg=cfg, S=S), target, width,
      grid=(B, H, Tp // bq),
      in_specs=[row(Dp), kv_all(Dp), kv_all(Ep), row(Ep), row(1), row(1)],
      out_specs=row(Dp),
      out_shape=dq_shape,
  )(q, k, v, do, lse_BHT1, delta_BHT1)

  # Heads h = kv*G + g are adjacent, so a kv head's group is a contiguous [G*Tp] run of rows: a free reshape.
  group = lambda x: x.reshape(B, K, G * Tp, x.shape[-1])
  grp = lambda w: pl.BlockSpec((None, None, G * Tp, w), lambda b, kv, j: (b, kv, 0, 0))
  key = lambda w: pl.BlockSpec((None, None, bk, w), lambda b, kv, j: (b, kv, j, 0))
  dk_BKSD, dv_BKSE = _call(
      functools.partial(_dkdv_kernel, cfg=cfg, S=S, Tp=Tp, G=G), target, width,
      grid=(B, K, Sp // bk),
      in_specs=[grp(Dp), key(Dp), key(Ep), grp(Ep), grp(1), grp(1)],
      out_specs=[key(Dp), key(Ep)],
      out_shape=dkdv_shape,
  )(group(q), k, v, group(do), group(lse_BHT1), group(delta_BHT1))
  return _seq_first(dq_BHTD, T, D), _seq_first(dk_BKSD, S, D), _seq_first(dv_BKSE, S, E)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q_BTHD, k_BSKD, v_BSKE, cfg: _Cfg):
  return _flash_fwd(q_BTHD, k_BSKD, v_BSKE, cfg)[0]


def _flash_fwd(q_BTHD, k_BSKD, v_BSKE, cfg: _Cfg):
  o_BTHE, lse_BHT = backend.dispatch(_forward, q_BTHD, k_BSKD, v_BSKE, cfg=cfg)
  return o_BTHE, (q_BTHD, k_BSKD, v_BSKE, o_BTHE, lse_BHT)


def _flash_bwd(cfg: _Cfg, res, do_BTHE):
  return backend.dispatch(_backward, *res, do_BTHE, cfg=cfg)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check(q_BTHD, k_BSKD, v_BSKE):
  """The shape contract of dba_jax.ops.attention (restated: dba_kernels does not import dba_jax)."""
  B, T, H, D = q_BTHD.shape
  if k_BSKD.shape[:3] != v_BSKE.shape[:3] or k_BSKD.shape[0] != B or k_BSKD.shape[3] != D or H % k_BSKD.shape[2]:
    raise ValueError(f"attention shapes do not fit: q {q_BTHD.shape}, k {k_BSKD.shape}, v {v_BSKE.shape}")


def _block(requested: int, n: int, name: str) -> int:
  if requested < MIN_BLOCK or requested & (requested - 1):
    raise ValueError(f"{name}={requested} must be a power of two >= {MIN_BLOCK}")
  return min(requested, _width(n))  # short sequences get a smaller tile, not a mostly-padding one


def flash_attention(q_BTHD, k_BSKD, v_BSKE, *, scale=None, causal=True, n_prefix=0, block_q=BLOCK_Q,
                    block_k=BLOCK_K, precision=None):
  """Softmax attention as `dba_jax.ops.standard.reference`, differentiable, without the [T, S] score matrix.

  q [B, T, H, D], k [B, S, K, D], v [B, S, K, E] (one dtype) -> [B, T, H, E]. H % K == 0; query head h uses kv
  head h // (H // K). `scale` defaults to D**-0.5. Causal: query t sees keys c <= t + n_prefix (the first
  n_prefix key columns are always visible). `precision` defaults to HIGHEST for float32/float64 inputs and
  DEFAULT for 16-bit ones; accumulation is always at least float32.
  """
  _check(q_BTHD, k_BSKD, v_BSKE)
  if not q_BTHD.dtype == k_BSKD.dtype == v_BSKE.dtype:
    raise ValueError(f"q/k/v dtypes differ: {q_BTHD.dtype}, {k_BSKD.dtype}, {v_BSKE.dtype}")
  T, S, D = q_BTHD.shape[1], k_BSKD.shape[1], q_BTHD.shape[3]
  if T == 0 or S == 0:
    raise ValueError("flash_attention needs at least one query and one key")
  if n_prefix < 0:
    raise ValueError(f"n_prefix={n_prefix} must be >= 0")
  if precision is None:
    precision = lax.Precision.HIGHEST if jnp.finfo(q_BTHD.dtype).bits >= 32 else lax.Precision.DEFAULT
  cfg = _Cfg(scale=float(D ** -0.5 if scale is None else scale), causal=bool(causal), n_prefix=int(n_prefix),
             block_q=_block(block_q, T, "block_q"), block_k=_block(block_k, S, "block_k"), precision=precision)
  return _flash(q_BTHD, k_BSKD, v_BSKE, cfg)


def padded_dot_product_attention(q_BTHD, k_BSKD, v_BSKE, *, scale, n_prefix=0, causal=True, implementation=None):
  """The no-kernel baseline: zero-pad q/k/v head dims to one width, run jax.nn.dot_product_attention, slice E.

  Zero columns change neither q.k nor the first E output columns. The width is rounded up to a multiple of 8,
  which cuDNN wants. n_prefix > 0 (or S != T) needs an explicit boolean mask instead of is_causal.
  """
  _check(q_BTHD, k_BSKD, v_BSKE)
  T, S = q_BTHD.shape[1], k_BSKD.shape[1]
  D, E = q_BTHD.shape[3], v_BSKE.shape[3]
  W = -(-max(D, E) // 8) * 8
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, W - x.shape[3])))
  mask, is_causal = None, False
  if causal and n_prefix == 0 and S == T:
    is_causal = True
  elif causal:
    # dba_jax.ops.visible_mask: key column c is visible to query t iff c - n_prefix <= t (prefix always)
    mask = (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + n_prefix)[None, None]
  out_BTHW = jax.nn.dot_product_attention(pad(q_BTHD), pad(k_BSKD), pad(v_BSKE), scale=scale, mask=mask,
                                          is_causal=is_causal, implementation=implementation)
  return out_BTHW[..., :E]
