"""Blocked protect-and-attack scan down the query axis (selective.md §5.4), with a closed-form custom VJP (Pallas).

Per key column, scanning queries t: the attack a_t first spends the protection pool R (damage is what the pool
cannot absorb; the turn is flagged d_t = 1 when the pool ends empty, equality included), then the pool gains p_t.
The output is the accumulated damage D_t >= 0, inclusive of turn t (H = -D in selective.md).

Forward: per (row, key block), the query blocks in order and, inside a block, the rows one at a time (a
fori_loop), vectorised over the block's key columns. Carried across blocks: the pool R and the damage at the
block's start. Damage within a block is summed from 0 and the start carry is added once per row, so fp32
rounding error grows with the block size plus the number of blocks, not with T (a sequential fp32 running sum
over T was the original project's bug, selective.md §5.1). The kernel also writes the flag d_t (int8; int32 on
TPU), the only residual the backward needs.

Backward (closed form): with R_t = sum_{k >= t} dH_k (dH = -dD) and e(t) the first k >= t with d_k = 1,
dA_t = -R_{e(t)} and dP_t = R_{e(t+1)} (0 where no such k). The same grid walks the query blocks in reverse and
the rows of each block in reverse by index, carrying the suffix sum (again per block, plus a block carry) and the
value of R at the most recent flagged turn seen from the right. No reverse-scan or flip inside the kernel.

Grids. GPU / CPU: one program per (row, key block), grid (R, Sp/block_s), walking its [Tp, block_s] column in
a loop. TPU (Mosaic copies every block into VMEM, so a column cannot be one block): grid
(R, Sp/block_s, Tp/block_t) with the query-block axis last and "arbitrary", one [block_t, block_s] block per
step, the two [1, block_s] carries in VMEM scratch (zeroed at the first step); the backward's index maps walk
the query blocks in reverse (block nt - 1 - i at step i). The per-block code (_forward_block, _backward_block)
is shared. VMEM per TPU program, 32-bit blocks (int32 flags) double-buffered: 4 * (8 * block_t * block_s +
16 * block_s) bytes (two inputs, two outputs, two carries of a full sublane tile), about 0.26 MiB at the
default 64 x 128, whatever T.

T and S are padded to block multiples outside the kernel: padded rows come after every real row and have zero
attack, protection and cotangent, so they change no real output. Accumulation is in at least float32 (float64
for float64 inputs).

Backends (dba_kernels._backend): interpret mode on CPU, Pallas-Triton on GPU, Mosaic on TPU. Every load and store
is one query row at a traced row index: a pointer offset for Triton, and for Mosaic a single-sublane access,
which needs no tile alignment for 32-bit types (hence int32 flags on TPU: int8 rows sit packed in (32, 128)
tiles, and 16-bit a and p are widened to float32 first). block_s (and on TPU block_t) is rounded up per backend
(`_layout`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import _backend as backend

BLOCK_T = 64
BLOCK_S = 64


class _Layout(NamedTuple):
  block_t: int
  block_s: int
  flag: object  # dtype of the flags d_t


def _layout(platform: str, block_t: int, block_s: int) -> _Layout:
  """The requested blocks rounded up to what the backend tiles (columns are independent: results do not
  change). GPU: a power-of-two row width (Triton tiles). TPU: whole 128-lane vregs (a Mosaic block's last dim
  is a multiple of 128 unless it is the array's full width), block_t a multiple of 8 sublanes (one
  [block_t, block_s] block per grid step) and int32 flags (see the module docstring)."""
  if platform == "gpu":
    return _Layout(block_t, backend.triton_block(block_s), jnp.int8)
  if platform == "tpu":
    return _Layout(backend.round_up(block_t, backend.SUBLANES), backend.round_up(block_s, backend.LANES), jnp.int32)
  return _Layout(block_t, block_s, jnp.int8)


def _forward_block(a_ref, p_ref, d_ref, hit_ref, row0, block_t: int, pool_1S, start_1S):
  """Rows row0 .. row0 + block_t of the refs, in order, from pool R and damage `start` before them: (R, damage)
  after them."""
  acc = d_ref.dtype

  def row(i, state):
    pool_1S, part_1S = state
    t = row0 + i
    left_1S = pool_1S - a_ref[pl.ds(t, 1), :].astype(acc)
    hit_1S = left_1S <= 0  # the pool cannot absorb the attack: the rest is damage
    part_1S = part_1S + jnp.where(hit_1S, -left_1S, 0)
    d_ref[pl.ds(t, 1), :] = start_1S + part_1S
    hit_ref[pl.ds(t, 1), :] = hit_1S.astype(hit_ref.dtype)
    pool_1S = jnp.where(hit_1S, 0, left_1S) + p_ref[pl.ds(t, 1), :].astype(acc)  # protect after the attack
    return pool_1S, part_1S

  pool_1S, part_1S = jax.lax.fori_loop(0, block_t, row, (pool_1S, jnp.zeros_like(start_1S)))
  return pool_1S, start_1S + part_1S


def _backward_block(hit_ref, g_ref, da_ref, dp_ref, row0, block_t: int, suffix_1S, last_1S):
  """Rows row0 + block_t - 1 .. row0 of the refs, in reverse, from R just after them (`suffix`) and R at the
  nearest flagged turn to their right (`last`, 0: none): (suffix, last) before them."""
  acc = da_ref.dtype

  def row(k, state):
    part_1S, last_1S = state
    t = row0 + (block_t - 1 - k)
    part_1S = part_1S - g_ref[pl.ds(t, 1), :].astype(acc)  # dH = -dD
    r_1S = suffix_1S + part_1S
    dp_ref[pl.ds(t, 1), :] = last_1S  # R_{e(t+1)}: read before turn t can become the nearest flag
    last_1S = jnp.where(hit_ref[pl.ds(t, 1), :] != 0, r_1S, last_1S)
    da_ref[pl.ds(t, 1), :] = -last_1S
    return part_1S, last_1S

  part_1S, last_1S = jax.lax.fori_loop(0, block_t, row, (jnp.zeros_like(suffix_1S), last_1S))
  return suffix_1S + part_1S, last_1S


def _forward_kernel(a_ref, p_ref, d_ref, hit_ref, *, block_t: int, n_blocks: int):
  """GPU / CPU: one program per (row, key block), walking every query block of its [Tp, block_s] column."""
  zero_1S = jnp.zeros((1, a_ref.shape[-1]), d_ref.dtype)
  block = lambda b, carry: _forward_block(a_ref, p_ref, d_ref, hit_ref, b * block_t, block_t, *carry)
  jax.lax.fori_loop(0, n_blocks, block, (zero_1S, zero_1S))


def _backward_kernel(hit_ref, g_ref, da_ref, dp_ref, *, block_t: int, n_blocks: int):
  zero_1S = jnp.zeros((1, g_ref.shape[-1]), da_ref.dtype)
  block = lambda i, carry: _backward_block(hit_ref, g_ref, da_ref, dp_ref, (n_blocks - 1 - i) * block_t, block_t,
                                           *carry)
  jax.lax.fori_loop(0, n_blocks, block, (zero_1S, zero_1S))


def _tpu_kernel(step):
  """TPU: one [block_t, block_s] block per grid step (the query-block axis is last, "arbitrary"); the two [1, S]
  carries wait in VMEM scratch between steps."""
  def kernel(in0_ref, in1_ref, out0_ref, out1_ref, c0_ref, c1_ref):
    @pl.when(pl.program_id(2) == 0)
    def _():
      c0_ref[...] = jnp.zeros(c0_ref.shape, c0_ref.dtype)
      c1_ref[...] = jnp.zeros(c1_ref.shape, c1_ref.dtype)

    c0_ref[...], c1_ref[...] = step(in0_ref, in1_ref, out0_ref, out1_ref, 0, in0_ref.shape[0], c0_ref[...],
                                    c1_ref[...])
  return kernel


def _call(kernel, inputs, out_dtypes, layout: _Layout, target: backend.Target, *, tpu_step, reverse: bool):
  """Runs `kernel` on padded [R, Tp, Sp] inputs, one program per (row, key block); on TPU, `tpu_step` over
  one block per grid step, the query blocks walked in reverse if `reverse`."""
  R, Tp, Sp = inputs[0].shape
  out_shape = [jax.ShapeDtypeStruct((R, Tp, Sp), dt) for dt in out_dtypes]
  if target.platform == "tpu":
    nt = Tp // layout.block_t
    block = (lambda i: nt - 1 - i) if reverse else (lambda i: i)
    spec = pl.BlockSpec((None, layout.block_t, layout.block_s), lambda r, j, i: (r, block(i), j))
    return backend.pallas_call(
        _tpu_kernel(tpu_step), target=target, grid=(R, Sp // layout.block_s, nt),
        semantics=("parallel", "parallel", "arbitrary"),
        in_specs=[spec] * len(inputs), out_specs=[spec] * len(out_dtypes), out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((1, layout.block_s), out_dtypes[0])] * 2,
    )(*inputs)
  spec = pl.BlockSpec((None, Tp, layout.block_s), lambda r, j: (r, 0, j))
  return backend.pallas_call(
      functools.partial(kernel, block_t=layout.block_t, n_blocks=Tp // layout.block_t),
      target=target,
      grid=(R, Sp // layout.block_s),
      in_specs=[spec] * len(inputs),
      out_specs=[spec] * len(out_dtypes),
      out_shape=out_shape,
  )(*inputs)


def _pad3(x, layout: _Layout):
  *lead, T, S = x.shape
  Tp, Sp = backend.round_up(T, layout.block_t), backend.round_up(S, layout.block_s)
  return jnp.pad(x.reshape(-1, T, S), ((0, 0), (0, Tp - T), (0, Sp - S)))


def _forward(target: backend.Target, a, p, *, block_t: int, block_s: int):
  """(damage, flags d_t as int8 [..., T, S]): the same shapes on every platform (see _backend.per_platform)."""
  layout = _layout(target.platform, block_t, block_s)
  *lead, T, S = a.shape
  acc = jnp.promote_types(jnp.promote_types(a.dtype, p.dtype), jnp.float32)
  a, p = (_pad3(x.astype(acc) if target.platform == "tpu" else x, layout) for x in (a, p))  # TPU: 32-bit rows
  damage, hit = _call(_forward_kernel, [a, p], [acc, layout.flag], layout, target, tpu_step=_forward_block,
                      reverse=False)
  unpad = lambda x: x[:, :T, :S].reshape(*lead, T, S)
  return unpad(damage), unpad(hit).astype(jnp.int8)


def _backward(target: backend.Target, hit, g, *, block_t: int, block_s: int):
  layout = _layout(target.platform, block_t, block_s)
  *lead, T, S = g.shape
  d_a, d_p = _call(_backward_kernel, [_pad3(hit.astype(layout.flag), layout), _pad3(g, layout)],
                   [g.dtype, g.dtype], layout, target, tpu_step=_backward_block, reverse=True)
  unpad = lambda x: x[:, :T, :S].reshape(*lead, T, S)
  return unpad(d_a), unpad(d_p)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _protect_and_attack(a, p, block_t, block_s):
  return _fwd(a, p, block_t, block_s)[0]


def _fwd(a, p, block_t, block_s):
  damage, hit = backend.dispatch(_forward, a, p, block_t=block_t, block_s=block_s)
  # residual: the flags and the input dtypes (empty arrays)
  return damage, (hit, jnp.zeros((0,), a.dtype), jnp.zeros((0,), p.dtype))


def _bwd(block_t, block_s, res, g):
  hit, a_like, p_like = res
  d_a, d_p = backend.dispatch(_backward, hit, g, block_t=block_t, block_s=block_s)
  return d_a.astype(a_like.dtype), d_p.astype(p_like.dtype)


_protect_and_attack.defvjp(_fwd, _bwd)


def protect_and_attack(a, p, block_t: int = BLOCK_T, block_s: int = BLOCK_S):
  """Accumulated damage D[..., t, j] >= 0 (inclusive of turn t) for attacks a >= 0 and protections p >= 0 along
  axis -2, accumulated in at least float32; same semantics as dba_jax.ops.selective.protect_and_attack."""
  shape = jnp.broadcast_shapes(a.shape, p.shape)
  return _protect_and_attack(jnp.broadcast_to(a, shape), jnp.broadcast_to(p, shape), block_t, block_s)
