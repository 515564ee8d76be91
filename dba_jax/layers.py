"""What every block shares: the extension-point types of the one forward pass, the activation axes, the init.

Kept apart from model.py so that blocks defined elsewhere (dba_jax/hope/) build on them without importing the model.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dba_jax import mesh as mesh_lib
from dba_jax.ops import ACT_HEADS

__all__ = ["ACT_EMBED", "ACT_HEADS", "Hooks", "LayerIO", "NO_HOOKS", "dense", "normal_init"]

ACT_EMBED = ("batch", "seq", "act_embed")


def normal_init(rngs: nnx.Rngs, shape, std: float):
  return std * jax.random.normal(rngs.params(), shape, jnp.float32)


def dense(x_Nd, w_dF, transpose_w: bool = False):
  """x [..., d] contracted with w [d, *F] (or w [F, d] with transpose_w): [..., *F], in x's dtype.

  On CPU the leading axes of x are flattened first, so each projection is one 2-D GEMM: with [B, T, d] operands
  XLA:CPU forms the weight gradient (a contraction over two axes) through a transposed copy fused into the
  elementwise producer, 3.5x slower than the 2-D form (BUILD_NOTES, issue 16). For GPU and TPU (also when traced
  on a CPU host for their meshes, mesh.target_platform) the einsum keeps the batch and seq axes visible to
  sharding and layout passes."""
  w = w_dF.astype(x_Nd.dtype)
  F = w.shape[:-1] if transpose_w else w.shape[1:]
  letters = "fghij"[:len(F)]
  spec = f"...d,{letters}d->...{letters}" if transpose_w else f"...d,d{letters}->...{letters}"
  if mesh_lib.target_platform() != "cpu":
    return jnp.einsum(spec, x_Nd, w)
  return jnp.einsum(spec, x_Nd.reshape(-1, x_Nd.shape[-1]), w).reshape(x_Nd.shape[:-1] + F)


# ------------------------------------------------------------------------------------------ extension points
#
# Every caller runs the model's own forward; what differs is passed in, never re-implemented:
#   Hooks.cache     a cache implementation (generate.KVCache, pruning.SlotCache, ...) with
#                   update(state, new, q_pos_T, valid_T) -> (state, streams, k_pos_BS): it stores the chunk's
#                   streams `new` ({name: [B, T, K, D]}, what model.stream_names(m) lists) in this layer's `state`
#                   and returns every stream it holds [B, S, K, D] with their absolute positions (-1: empty slot).
#                   Selective layers keep their F carry in state["colsum"] [B, S].
#   Hooks.valid_T   [T] bool: real rows of a padded chunk (padding rows add nothing to carried state).
#   Hooks.keep_fn   key keep hook (context pruning): F_heads [B, A|1, T, S] -> bool keep mask.
#   Hooks.return_probs  every layer also returns its attention probabilities [B, H, T, S] (probes).
#   Hooks.training  training-mode behaviour where a block has one (HOPE's CMS clips δ only in training).
# Per-layer values travel in a LayerIO: the residual logits of selective residual masks, the layer's state (a
# cache's, or a memory block's fast weights), its memory-penalty aux and its probabilities.


@dataclasses.dataclass(frozen=True)
class Hooks:
  cache: Any = None
  valid_T: Any = None
  keep_fn: Callable | None = None
  return_probs: bool = False
  training: bool = False


NO_HOOKS = Hooks()


@dataclasses.dataclass(frozen=True)
class LayerIO:
  res: Any = None
  state: Any = None
  aux: Any = None  # [paper, repo] memory penalties; None: not computed
  probs: Any = None
