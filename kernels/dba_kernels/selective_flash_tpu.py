"""The TPU (Mosaic) version of dba_kernels.selective_flash's six kernels and their pallas calls: one tile per grid
step, the walked axis last and "arbitrary", running state in VMEM scratch (see selective_flash's docstring for the
design and the VMEM per step). selective_flash dispatches here when the step is lowered for TPU."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import _backend as backend
from ._selective_tiles import (_Cfg, _kv, _mask_of, _head_slots, _mask_head, _dot, _strict_lower, _strict_upper,
                              _tile_masks, _scores, _dz, _f_tile, _softmax_step, _sel_grad, _kv_grads, _n_key_blocks,
                              _first_query_block, _acc, MASK_VALUE)


# ----------------------------------------------------------------------------------------------- TPU kernels
# One program step per tile: the grid's last axes walk the reduced-over blocks ("arbitrary"), with carries and
# accumulators in VMEM scratch; index maps clamp skipped (fully future) tiles to the last block fetched.

def _carry_kernel_tpu(qs_ref, ks_ref, c_ref, carry_sc, *, cfg: _Cfg, acc):
  kb, qb = pl.program_id(2), pl.program_id(3)

  @pl.when(qb == 0)
  def _():
    carry_sc[...] = jnp.zeros(carry_sc.shape, acc)

  c_ref[...] = carry_sc[...]  # exclusive: rows of blocks before qb only

  @pl.when(qb >= _first_query_block(cfg, kb))
  def _():
    _, keep_QK = _tile_masks(cfg, qb, kb)
    _, s_QK = _scores(cfg, qs_ref[...], ks_ref[...], keep_QK, acc)
    carry_sc[...] += s_QK.sum(axis=0, keepdims=True)


def _fwd_kernel_tpu(qs_ref, ks_ref, c_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, o_sc, m_sc, l_sc, *, cfg: _Cfg,
                    acc):
  qi, kb = pl.program_id(2), pl.program_id(3)

  @pl.when(kb == 0)
  def _():
    o_sc[...] = jnp.zeros(o_sc.shape, acc)
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, acc)
    l_sc[...] = jnp.zeros(l_sc.shape, acc)

  @pl.when(kb < _n_key_blocks(cfg, qi))
  def _():
    causal_QK, _, _, f_QK = _f_tile(cfg, qi, kb, qs_ref[...], ks_ref[...], c_ref[...], _strict_lower(cfg.bq, acc),
                                    acc)
    state = _softmax_step(cfg, q_ref[...], k_ref[...], v_ref[...], f_QK, causal_QK,
                          (o_sc[...], m_sc[...], l_sc[...]), acc)
    o_sc[...], m_sc[...], l_sc[...] = state

  @pl.when(kb == pl.num_programs(3) - 1)
  def _():
    o_ref[...] = (o_sc[...] / l_sc[...]).astype(o_ref.dtype)
    lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])


def _sel_tile_tpu(cfg: _Cfg, qb, kb, j, active, qs_ref, ks_ref, c_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                  delta_ref, f_sc, lsel_sc, df_sc, acc):
  """sel_kv / sel_q head-slot step: at slot 0 the mask's F and selection logits for tile (qb, kb) go to scratch;
  each valid slot subtracts its head's dZ from the dF_n tile (F_n enters each such head's logits negated)."""
  @pl.when(active & (j == 0))
  def _():
    _, _, lsel_sc[...], f_sc[...] = _f_tile(cfg, qb, kb, qs_ref[...], ks_ref[...], c_ref[...],
                                            _strict_lower(cfg.bq, acc), acc)
    df_sc[...] = jnp.zeros(df_sc.shape, acc)

  @pl.when(active & _mask_head(cfg, pl.program_id(1), j)[1])
  def _():
    causal_QK, _ = _tile_masks(cfg, qb, kb)
    _, dz_QK = _dz(cfg, q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], f_sc[...],
                   causal_QK, acc)
    df_sc[...] -= dz_QK


def _sel_kv_kernel_tpu(qs_ref, ks_ref, c_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, r_ref, dks_ref,
                       carry_sc, f_sc, lsel_sc, df_sc, dks_sc, *, cfg: _Cfg, acc):
  kb, t, j = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  qb = pl.num_programs(3) - 1 - t  # reverse order: the carry is the dF column sum over later query blocks
  last_j = j == pl.num_programs(4) - 1
  active = qb >= _first_query_block(cfg, kb)

  @pl.when((t == 0) & (j == 0))
  def _():
    carry_sc[...] = jnp.zeros(carry_sc.shape, acc)
    dks_sc[...] = jnp.zeros(dks_sc.shape, acc)

  _sel_tile_tpu(cfg, qb, kb, j, active, qs_ref, ks_ref, c_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                f_sc, lsel_sc, df_sc, acc)

  @pl.when(last_j)
  def _():
    r_ref[...] = carry_sc[...]  # tiles above the diagonal: dF is 0 there, the carry is final

  @pl.when(active & last_j)
  def _():
    _, keep_QK = _tile_masks(cfg, qb, kb)
    df_QK = df_sc[...]
    ds_QK = carry_sc[...] + _dot(_strict_upper(cfg.bq, acc), df_QK, acc)  # dS[k] = sum_{i > k} dF[i]
    qs_QD = qs_ref[...]
    dks_sc[...] += _dot(_sel_grad(keep_QK, lsel_sc[...], ds_QK).T.astype(qs_QD.dtype), qs_QD, acc)
    carry_sc[...] += df_QK.sum(axis=0, keepdims=True)

  @pl.when((t == pl.num_programs(3) - 1) & last_j)
  def _():
    dks_ref[...] = (dks_sc[...] * cfg.scale).astype(dks_ref.dtype)


def _sel_q_kernel_tpu(qs_ref, ks_ref, c_ref, r_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dqs_ref,
                      f_sc, lsel_sc, df_sc, dqs_sc, *, cfg: _Cfg, acc):
  qi, kb, j = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  last_j = j == pl.num_programs(4) - 1
  active = kb < _n_key_blocks(cfg, qi)

  @pl.when((kb == 0) & (j == 0))
  def _():
    dqs_sc[...] = jnp.zeros(dqs_sc.shape, acc)

  _sel_tile_tpu(cfg, qi, kb, j, active, qs_ref, ks_ref, c_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                f_sc, lsel_sc, df_sc, acc)

  @pl.when(active & last_j)
  def _():
    _, keep_QK = _tile_masks(cfg, qi, kb)
    ds_QK = r_ref[...] + _dot(_strict_upper(cfg.bq, acc), df_sc[...], acc)
    ks_KD = ks_ref[...]
    dqs_sc[...] += _dot(_sel_grad(keep_QK, lsel_sc[...], ds_QK).astype(ks_KD.dtype), ks_KD, acc)

  @pl.when((kb == pl.num_programs(3) - 1) & last_j)
  def _():
    dqs_ref[...] = (dqs_sc[...] * cfg.scale).astype(dqs_ref.dtype)


def _dkdv_kernel_tpu(qs_ref, ks_ref, c_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc,
                     dv_sc, *, cfg: _Cfg, acc):
  kb, qb = pl.program_id(2), pl.program_id(3)

  @pl.when(qb == 0)
  def _():
    dk_sc[...] = jnp.zeros(dk_sc.shape, acc)
    dv_sc[...] = jnp.zeros(dv_sc.shape, acc)

  @pl.when(qb >= _first_query_block(cfg, kb))
  def _():
    causal_QK, _, _, f_QK = _f_tile(cfg, qb, kb, qs_ref[...], ks_ref[...], c_ref[...], _strict_lower(cfg.bq, acc),
                                    acc)
    q_QD, do_QE = q_ref[...], do_ref[...]
    p_QK, dz_QK = _dz(cfg, q_QD, k_ref[...], v_ref[...], do_QE, lse_ref[...], delta_ref[...], f_QK, causal_QK, acc)
    ddv_KE, ddk_KD = _kv_grads(p_QK, dz_QK, q_QD, do_QE, acc)
    dk_sc[...] += ddk_KD
    dv_sc[...] += ddv_KE

  @pl.when(qb == pl.num_programs(3) - 1)
  def _():
    dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel_tpu(qs_ref, ks_ref, c_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *,
                   cfg: _Cfg, acc):
  qi, kb = pl.program_id(2), pl.program_id(3)

  @pl.when(kb == 0)
  def _():
    dq_sc[...] = jnp.zeros(dq_sc.shape, acc)

  @pl.when(kb < _n_key_blocks(cfg, qi))
  def _():
    causal_QK, _, _, f_QK = _f_tile(cfg, qi, kb, qs_ref[...], ks_ref[...], c_ref[...], _strict_lower(cfg.bq, acc),
                                    acc)
    k_KD = k_ref[...]
    _, dz_QK = _dz(cfg, q_ref[...], k_KD, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], f_QK, causal_QK,
                   acc)
    dq_sc[...] += _dot(dz_QK.astype(k_KD.dtype), k_KD, acc)

  @pl.when(kb == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


# -------------------------------------------------------------------------------------------- TPU pallas calls
# Every TPU kernel reads the mask's side (source q and k tiles, the (1, Bk) rows of C / R) and the attending
# head's side (q, k, v, dO, lse, delta tiles). Index maps name one tile per grid step as (b, mask or head, query
# block, key block); the walked block is clamped to the causal range (jnp.minimum / maximum), so a skipped
# tile's step asks for the blocks already in VMEM and nothing is fetched.

def _call_tpu(target: backend.Target, kernel, grid, n_arbitrary, **kw):
  semantics = ("parallel",) * (len(grid) - n_arbitrary) + ("arbitrary",) * n_arbitrary
  return backend.pallas_call(kernel, target=target, grid=grid, semantics=semantics, **kw)


def _spec(shape, at, pick):
  """BlockSpec whose block index is pick(*at(*grid indices))."""
  return pl.BlockSpec(shape, lambda *g: pick(*at(*g)))


def _row_spec(cfg: _Cfg, at):
  """(1, Bk) row of C or R [B, M, nk, nq, 1, Bk] (unit row axis: the block's last two dims are the array's)."""
  return _spec((None, None, None, None, 1, cfg.bk), at, lambda b, n, i, j: (b, n, j, i, 0, 0))


def _sel_specs(cfg: _Cfg, D, at, n_rows):
  """Source q, k tiles of mask n and n_rows carry rows (C, then R) at at(*grid) = (b, n, query block, key block)."""
  src = lambda n: cfg.src + n
  return [_spec((None, None, cfg.bq, D), at, lambda b, n, i, j: (b, src(n), i, 0)),
          _spec((None, None, cfg.bk, D), at, lambda b, n, i, j: (b, _kv(cfg, src(n)), j, 0))] + \
      [_row_spec(cfg, at)] * n_rows


def _head_specs(cfg: _Cfg, D, E, at, grads=True):
  """q, k, v tiles of attending head a (and with grads its dO, lse, delta) at at(*grid) = (b, a, qb, kb)."""
  hq = lambda a: cfg.first + a
  specs = [_spec((None, None, cfg.bq, D), at, lambda b, a, i, j: (b, hq(a), i, 0)),
           _spec((None, None, cfg.bk, D), at, lambda b, a, i, j: (b, _kv(cfg, hq(a)), j, 0)),
           _spec((None, None, cfg.bk, E), at, lambda b, a, i, j: (b, _kv(cfg, hq(a)), j, 0))]
  if grads:
    specs += [_spec((None, None, cfg.bq, w), at, lambda b, a, i, j: (b, a, i, 0)) for w in (E, 1, 1)]
  return specs


def _carries_tpu(target: backend.Target, cfg: _Cfg, q, k):
  """C [B, M, nk, nq, 1, Bk] (_carries with a unit row axis): grid (B, M, nk, nq), the query blocks walked in
  order with the column sum in scratch."""
  B, _, Tp, D = q.shape
  nq, nk, acc = Tp // cfg.bq, Tp // cfg.bk, _acc(q.dtype)
  at = lambda b, n, j, i: (b, n, jnp.maximum(i, _first_query_block(cfg, j)), j)  # earlier: future keys only
  return _call_tpu(
      target, functools.partial(_carry_kernel_tpu, cfg=cfg, acc=acc), (B, cfg.n_masks, nk, nq), 1,
      in_specs=_sel_specs(cfg, D, at, 0),
      out_specs=_row_spec(cfg, lambda b, n, j, i: (b, n, i, j)),
      out_shape=jax.ShapeDtypeStruct((B, cfg.n_masks, nk, nq, 1, cfg.bk), acc),
      scratch_shapes=[pltpu.VMEM((1, cfg.bk), acc)],
  )(q, k)


def _walk_keys(cfg: _Cfg):
  """Tile maps for grids (B, A, nq, nk): (mask side, head side), key blocks past the diagonal clamped."""
  kc = lambda i, j: jnp.minimum(j, _n_key_blocks(cfg, i) - 1)
  return (lambda b, a, i, j: (b, _mask_of(cfg, a), i, kc(i, j))), (lambda b, a, i, j: (b, a, i, kc(i, j)))


def _walk_queries(cfg: _Cfg):
  """Tile maps for grids (B, A, nk, nq): (mask side, head side), query blocks before the diagonal clamped."""
  qc = lambda j, i: jnp.maximum(i, _first_query_block(cfg, j))
  return (lambda b, a, j, i: (b, _mask_of(cfg, a), qc(j, i), j)), (lambda b, a, j, i: (b, a, qc(j, i), j))


def _forward_tpu(target: backend.Target, cfg: _Cfg, q, k, v):
  """_forward on TPU: grid (B, A, nq, nk), the key blocks walked with the online softmax state in scratch."""
  B, H, Tp, D = q.shape
  E, A, bq = v.shape[-1], cfg.n_att, cfg.bq
  nq, nk, acc = Tp // cfg.bq, Tp // cfg.bk, _acc(q.dtype)
  c = _carries_tpu(target, cfg, q, k)
  at_mask, at_head = _walk_keys(cfg)
  return _call_tpu(
      target, functools.partial(_fwd_kernel_tpu, cfg=cfg, acc=acc), (B, A, nq, nk), 1,
      in_specs=_sel_specs(cfg, D, at_mask, 1) + _head_specs(cfg, D, E, at_head, grads=False),
      out_specs=[pl.BlockSpec((None, None, bq, E), lambda b, a, i, j: (b, a, i, 0)),
                 pl.BlockSpec((None, None, bq, 1), lambda b, a, i, j: (b, a, i, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, A, Tp, E), q.dtype), jax.ShapeDtypeStruct((B, A, Tp, 1), acc)],
      scratch_shapes=[pltpu.VMEM((bq, E), acc), pltpu.VMEM((bq, 1), acc), pltpu.VMEM((bq, 1), acc)],
  )(q, k, c, q, k, v)


def _backward_kernels_tpu(target: backend.Target, cfg: _Cfg, q, k, v, do, lse, delta):
  """_backward_kernels on TPU. sel_kv and sel_q walk the heads using mask n on the innermost grid axis (slot g of
  _head_slots) and sum their dZ tiles into a dF scratch tile, so no step holds more than one head's tiles."""
  B, H, Tp, D = q.shape
  E, A, M, G = v.shape[-1], cfg.n_att, cfg.n_masks, _head_slots(cfg)
  nq, nk, acc, bq, bk = Tp // cfg.bq, Tp // cfg.bk, _acc(q.dtype), cfg.bq, cfg.bk
  c = _carries_tpu(target, cfg, q, k)
  heads = (q, k, v, do, lse, delta)
  tile = pltpu.VMEM((bq, bk), acc)  # F, selection logits, dF of one tile

  def slot(n, g, active):  # past the diagonal: the last slot, whose tiles the last active step fetched
    return _mask_head(cfg, n, jnp.where(active, g, G - 1))[0]

  # sel_kv: grid (B, M, nk, nq, G), query blocks in reverse (qb = nq - 1 - t), so the blocks above the diagonal
  # come last and map to query block qb0.
  def kv_tiles(b, n, j, t, g):
    qb, qb0 = nq - 1 - t, _first_query_block(cfg, j)
    i = jnp.maximum(qb, qb0)
    return (b, n, i, j), (b, slot(n, g, qb >= qb0), i, j)

  r, dks = _call_tpu(
      target, functools.partial(_sel_kv_kernel_tpu, cfg=cfg, acc=acc), (B, M, nk, nq, G), 2,
      in_specs=_sel_specs(cfg, D, lambda *g: kv_tiles(*g)[0], 1) + _head_specs(cfg, D, E, lambda *g: kv_tiles(*g)[1]),
      out_specs=[_row_spec(cfg, lambda b, n, j, t, g: (b, n, nq - 1 - t, j)),
                 pl.BlockSpec((None, None, bk, D), lambda b, n, j, t, g: (b, n, j, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, M, nk, nq, 1, bk), acc), jax.ShapeDtypeStruct((B, M, Tp, D), acc)],
      scratch_shapes=[pltpu.VMEM((1, bk), acc), tile, tile, tile, pltpu.VMEM((bk, D), acc)],
  )(q, k, c, *heads)

  # sel_q: grid (B, M, nq, nk, G), key blocks past the diagonal map to the last causal one.
  def q_tiles(b, n, i, j, g):
    last = _n_key_blocks(cfg, i) - 1
    kb = jnp.minimum(j, last)
    return (b, n, i, kb), (b, slot(n, g, j <= last), i, kb)

  dqs = _call_tpu(
      target, functools.partial(_sel_q_kernel_tpu, cfg=cfg, acc=acc), (B, M, nq, nk, G), 2,
      in_specs=_sel_specs(cfg, D, lambda *g: q_tiles(*g)[0], 2) + _head_specs(cfg, D, E, lambda *g: q_tiles(*g)[1]),
      out_specs=pl.BlockSpec((None, None, bq, D), lambda b, n, i, j, g: (b, n, i, 0)),
      out_shape=jax.ShapeDtypeStruct((B, M, Tp, D), acc),
      scratch_shapes=[tile, tile, tile, pltpu.VMEM((bq, D), acc)],
  )(q, k, c, r, *heads)

  at_mask, at_head = _walk_queries(cfg)
  dk, dv = _call_tpu(
      target, functools.partial(_dkdv_kernel_tpu, cfg=cfg, acc=acc), (B, A, nk, nq), 1,
      in_specs=_sel_specs(cfg, D, at_mask, 1) + _head_specs(cfg, D, E, at_head),
      out_specs=[pl.BlockSpec((None, None, bk, D), lambda b, a, j, i: (b, a, j, 0)),
                 pl.BlockSpec((None, None, bk, E), lambda b, a, j, i: (b, a, j, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, A, Tp, D), acc), jax.ShapeDtypeStruct((B, A, Tp, E), acc)],
      scratch_shapes=[pltpu.VMEM((bk, D), acc), pltpu.VMEM((bk, E), acc)],
  )(q, k, c, *heads)

  at_mask, at_head = _walk_keys(cfg)
  dq = _call_tpu(
      target, functools.partial(_dq_kernel_tpu, cfg=cfg, acc=acc), (B, A, nq, nk), 1,
      in_specs=_sel_specs(cfg, D, at_mask, 1) + _head_specs(cfg, D, E, at_head),
      out_specs=pl.BlockSpec((None, None, bq, D), lambda b, a, i, j: (b, a, i, 0)),
      out_shape=jax.ShapeDtypeStruct((B, A, Tp, D), acc),
      scratch_shapes=[pltpu.VMEM((bq, D), acc)],
  )(q, k, c, *heads)
  return dq, dk, dv, dqs, dks
