"""Blocked exclusive cumulative sum down the query axis, F[..., i, j] = sum_{k < i} x[..., k, j] (Pallas).

Within a block, the exclusive prefix is a strictly-lower-triangular ones matrix times the block: a matmul, which
tensor cores and the MXU run, and no cumsum primitive (Mosaic TPU has none, and Triton has no reverse one).
Across blocks, a carry of column sums holds the running total. Accumulation is in the output dtype (float32, or
float64 for checks). Rounding error grows with the block size plus the number of blocks, not with T as in a
sequential sum.

GPU / CPU: one program per (row, key block), grid (R, Sp/block_s); it walks the query blocks of its
[Tp, block_s] column in a loop (a pointer range on GPU).
TPU: Mosaic copies every block into VMEM, so the column is not one block: grid (R, Sp/block_s, Tp/block_t)
with the query-block axis last and "arbitrary", one [block_t, block_s] block per step, the [1, block_s] carry
in VMEM scratch (zeroed at the first query block). VMEM per program, in and out double-buffered, fp32:
4 * (4 * block_t * block_s + block_t**2 + 8 * block_s) bytes (the carry takes a full sublane tile), about
0.15 MiB at the default 64 x 128, whatever T.

The backward is the same kernel on the reversed gradient: dx[k] = sum_{i > k} dF[i]. The flip happens in XLA
outside the kernel, so no reverse-scan primitive is needed.

Backends (dba_kernels._backend): interpret mode on CPU, Pallas-Triton on GPU, Mosaic on TPU. The block sizes
are tuning knobs (columns are independent; block_t only moves rounding), so each backend rounds them up to
what it tiles: GPU to powers of two >= 16 (Triton tiles are powers of two and its dots need sides >= 16), TPU
block_t to a multiple of 8 sublanes and block_s to a multiple of 128 lanes (a Mosaic block's last dim must be
a multiple of 128 unless it is the array's full width). S is padded to whole key blocks. On TPU 16-bit inputs
are widened to the accumulation dtype first (their blocks would need 16 rows).

`exclusive_cumsum_reference` is the dtype-generic ground truth.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import _backend as backend

BLOCK_T = 64
BLOCK_S = 64


def exclusive_cumsum_reference(x):
  inclusive = jnp.cumsum(x, axis=-2)
  return jnp.concatenate([jnp.zeros_like(inclusive[..., :1, :]), inclusive[..., :-1, :]], axis=-2)


def _strict_lower(n: int, acc):
  rows = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return (cols < rows).astype(acc)


def _block_step(x_TS, carry_1S, strict_lower):
  """(exclusive prefix of one [block_t, S] block, given the column sums before it; the sums after it)."""
  acc = strict_lower.dtype
  blk_TS = x_TS.astype(acc)
  prefix_TS = jnp.dot(strict_lower, blk_TS, precision=jax.lax.Precision.HIGHEST, preferred_element_type=acc)
  return carry_1S + prefix_TS, carry_1S + blk_TS.sum(axis=0, keepdims=True)  # a [1, S] row: no rank-1 vectors


def _kernel(x_ref, o_ref, *, block_t: int, n_blocks: int):
  """GPU / CPU: one program per (row, key block), walking every query block of its [Tp, block_s] column."""
  strict_lower = _strict_lower(block_t, o_ref.dtype)

  def body(i, carry_1S):
    blk = pl.ds(pl.multiple_of(i * block_t, block_t), block_t)  # a tile-aligned start, which Mosaic needs
    o_ref[blk, :], carry_1S = _block_step(x_ref[blk, :], carry_1S, strict_lower)
    return carry_1S

  jax.lax.fori_loop(0, n_blocks, body, jnp.zeros((1, x_ref.shape[-1]), o_ref.dtype))


def _kernel_tpu(x_ref, o_ref, carry_ref):
  """TPU: one [block_t, block_s] block per grid step; the query-block axis is last ("arbitrary") and the column
  sums so far wait in VMEM scratch."""
  @pl.when(pl.program_id(2) == 0)
  def _():
    carry_ref[...] = jnp.zeros(carry_ref.shape, carry_ref.dtype)

  strict_lower = _strict_lower(x_ref.shape[0], o_ref.dtype)
  o_ref[...], carry_ref[...] = _block_step(x_ref[...], carry_ref[...], strict_lower)


def _blocks(platform: str, block_t: int, block_s: int):
  """The block sizes the backend can tile, rounded up from the requested ones (see the module docstring)."""
  if platform == "gpu":
    return backend.triton_block(block_t), backend.triton_block(block_s)
  if platform == "tpu":
    return backend.round_up(block_t, backend.SUBLANES), backend.round_up(block_s, backend.LANES)
  return block_t, block_s


def _forward(x, block_t: int, block_s: int):
  return backend.dispatch(_forward_on, x, block_t=block_t, block_s=block_s)


def _forward_on(target: backend.Target, x, *, block_t: int, block_s: int):
  block_t, block_s = _blocks(target.platform, block_t, block_s)
  *lead, T, S = x.shape
  acc = jnp.promote_types(x.dtype, jnp.float32)
  R = 1
  for n in lead:
    R *= n
  Tp, Sp = backend.round_up(T, block_t), backend.round_up(S, block_s)
  x3 = jnp.pad(x.reshape(R, T, S), ((0, 0), (0, Tp - T), (0, Sp - S)))
  out_shape = jax.ShapeDtypeStruct((R, Tp, Sp), acc)
  if target.platform == "tpu":
    # 16-bit inputs would need 16-row blocks (packed sublanes); the kernel reads them as `acc` anyway.
    spec = pl.BlockSpec((None, block_t, block_s), lambda r, j, i: (r, i, j))
    out = backend.pallas_call(
        _kernel_tpu, target=target, grid=(R, Sp // block_s, Tp // block_t),
        semantics=("parallel", "parallel", "arbitrary"),
        in_specs=[spec], out_specs=spec, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((1, block_s), acc)],
    )(x3.astype(acc))
  else:
    out = backend.pallas_call(
        functools.partial(_kernel, block_t=block_t, n_blocks=Tp // block_t),
        target=target,
        grid=(R, Sp // block_s),
        in_specs=[pl.BlockSpec((None, Tp, block_s), lambda r, j: (r, 0, j))],
        out_specs=pl.BlockSpec((None, Tp, block_s), lambda r, j: (r, 0, j)),
        out_shape=out_shape,
    )(x3)
  return out[:, :T, :S].reshape(*lead, T, S)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def exclusive_cumsum(x, block_t: int = BLOCK_T, block_s: int = BLOCK_S):
  """F[..., i, j] = sum_{k < i} x[..., k, j] over axis -2, accumulated in at least float32."""
  return _forward(x, block_t, block_s)


def _fwd(x, block_t, block_s):
  return _forward(x, block_t, block_s), jnp.zeros((0,), x.dtype)  # residual: only the input dtype


def _bwd(block_t, block_s, like, g):
  rev = jnp.flip(_forward(jnp.flip(g, axis=-2), block_t, block_s), axis=-2)
  return (rev.astype(like.dtype),)


exclusive_cumsum.defvjp(_fwd, _bwd)
