"""Blocked exclusive cumulative sum down the query axis, F[..., i, j] = sum_{k < i} x[..., k, j] (Pallas).

One program per (row, key block). It walks the query blocks in order. Within a block, the exclusive prefix is
a strictly-lower-triangular ones matrix times the block: a matmul, which tensor cores and the MXU run, and no
cumsum primitive (Mosaic TPU has none, and Triton has no reverse one). Across blocks, a carry of column sums
holds the running total. Accumulation is in the output dtype (float32, or float64 for checks). Rounding error
grows with the block size plus the number of blocks, not with T as in a sequential sum.

The backward is the same kernel on the reversed gradient: dx[k] = sum_{i > k} dF[i]. The flip happens in XLA
outside the kernel, so no reverse-scan primitive is needed.

Backends (dba_kernels._backend): interpret mode on CPU, Pallas-Triton on GPU, Mosaic on TPU. The block sizes
are tuning knobs (columns are independent; block_t only moves rounding), so each backend rounds them up to
what it tiles: GPU to powers of two >= 16 (Triton tiles are powers of two and its dots need sides >= 16), TPU
block_t to a multiple of 8 sublanes and block_s to a multiple of 128 lanes (a Mosaic block's last dim must be
a multiple of 128 unless it is the array's full width). S is padded to whole key blocks. Each TPU program
holds a [Tp, block_s] input and output block in VMEM (double-buffered), which bounds T there.

`exclusive_cumsum_reference` is the dtype-generic ground truth.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _backend as backend

BLOCK_T = 64
BLOCK_S = 64


def exclusive_cumsum_reference(x):
  inclusive = jnp.cumsum(x, axis=-2)
  return jnp.concatenate([jnp.zeros_like(inclusive[..., :1, :]), inclusive[..., :-1, :]], axis=-2)


def _kernel(x_ref, o_ref, *, block_t: int, n_blocks: int):
  acc = o_ref.dtype
  rows = jax.lax.broadcasted_iota(jnp.int32, (block_t, block_t), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (block_t, block_t), 1)
  strict_lower = (cols < rows).astype(acc)

  def body(i, carry_1S):
    blk = pl.ds(pl.multiple_of(i * block_t, block_t), block_t)  # a tile-aligned start, which Mosaic needs
    blk_TS = x_ref[blk, :].astype(acc)
    prefix_TS = jnp.dot(strict_lower, blk_TS, precision=jax.lax.Precision.HIGHEST, preferred_element_type=acc)
    o_ref[blk, :] = carry_1S + prefix_TS
    return carry_1S + blk_TS.sum(axis=0, keepdims=True)  # a [1, S] row: no rank-1 vectors for Mosaic

  jax.lax.fori_loop(0, n_blocks, body, jnp.zeros((1, x_ref.shape[-1]), acc))


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
  out = backend.pallas_call(
      functools.partial(_kernel, block_t=block_t, n_blocks=Tp // block_t),
      target=target,
      grid=(R, Sp // block_s),
      in_specs=[pl.BlockSpec((None, Tp, block_s), lambda r, j: (r, 0, j))],
      out_specs=pl.BlockSpec((None, Tp, block_s), lambda r, j: (r, 0, j)),
      out_shape=jax.ShapeDtypeStruct((R, Tp, Sp), acc),
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
