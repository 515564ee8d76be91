"""Head surgery for continued pretraining (selective.md §4.2): add one attention head to every layer.

The new head goes first (index 0, which makes it the selection head) or last. The old heads' q/k/v columns
and out-projection rows are copied unchanged. The new head's weights are drawn from PyTorch's default Linear
init, uniform(±1/sqrt(fan_in)), where fan_in is d_model for q/k/v and the new attention width for the out
projection. New q/k/v biases are zero, and the out bias is kept. The `init` argument then zeroes or rescales
parts of the new head:

  normal: as drawn;  zero: Q=K=V=O=0;  k_zero: K=0;  ko_zero: K=0 and O=0;  o_zero: O=0;  o_rescaled: O/5.

With O = 0 the model's function is unchanged. With K = 0 the new head's logits are 0, so as a selection
head it masks nothing (S = ReLU(0) = 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

INITS = ("normal", "zero", "k_zero", "ko_zero", "o_zero", "o_rescaled")


def add_head(params: dict, head_dim: int, *, at: str = "start", init: str = "ko_zero", key=None) -> dict:
  """Params of a standard/selective model with one more head per layer (scanned or unrolled layers)."""
  if init not in INITS:
    raise ValueError(f"surgery init {init!r} is not one of {INITS}")
  if at not in ("start", "end"):
    raise ValueError(f"surgery position {at!r} is not 'start' or 'end'")
  key = jax.random.key(0) if key is None else key
  blocks = params["blocks"]
  if "attn" in blocks:  # scanned: every leaf has a leading layer axis
    new_blocks = {**blocks, "attn": _grow(blocks["attn"], head_dim, at, init, key)}
  else:
    new_blocks = {i: {**b, "attn": _grow(b["attn"], head_dim, at, init, jax.random.fold_in(key, int(i)))}
                  for i, b in blocks.items()}
  return {**params, "blocks": new_blocks}


def _grow(attn: dict, D: int, at: str, init: str, key) -> dict:
  if "q" not in attn:
    raise ValueError("head surgery needs standard or selective attention (q, k, v, out projections)")
  kq, kk, kv, ko = jax.random.split(key, 4)
  d_model = attn["q"]["kernel"].shape[-2]
  width = attn["out"]["kernel"].shape[-2] + D
  zero_q, zero_k = init == "zero", init in ("zero", "k_zero", "ko_zero")
  zero_v, zero_o = init == "zero", init in ("zero", "ko_zero", "o_zero")

  def new_cols(kernel, k, zero):  # [..., d_model, D]
    shape = kernel.shape[:-1] + (D,)
    bound = d_model ** -0.5
    return jnp.zeros(shape, kernel.dtype) if zero else jax.random.uniform(k, shape, kernel.dtype, -bound, bound)

  def put(old, new, axis):
    return jnp.concatenate([new, old] if at == "start" else [old, new], axis=axis)

  out = {}
  for name, k, zero in (("q", kq, zero_q), ("k", kk, zero_k), ("v", kv, zero_v)):
    proj = {"kernel": put(attn[name]["kernel"], new_cols(attn[name]["kernel"], k, zero), -1)}
    if "bias" in attn[name]:
      b = attn[name]["bias"]
      proj["bias"] = put(b, jnp.zeros(b.shape[:-1] + (D,), b.dtype), -1)
    out[name] = proj
  o = attn["out"]["kernel"]  # [..., width, d_model]
  shape = o.shape[:-2] + (D, o.shape[-1])
  bound = width ** -0.5
  rows = jnp.zeros(shape, o.dtype) if zero_o else jax.random.uniform(ko, shape, o.dtype, -bound, bound)
  if init == "o_rescaled":
    rows = rows / 5
  out["out"] = {**attn["out"], "kernel": put(o, rows, -2)}
  return {**attn, **out}
