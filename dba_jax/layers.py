"""What every block shares: the extension-point types of the one forward pass, the activation axes, the init, and
the layers (Linear, Norm, MLP, dropout, coordinate-check taps).

Kept apart from model.py so that attention kinds (dba_jax/attention/) and blocks defined elsewhere (dba_jax/hope/)
build on them without importing the model.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dba_jax import mesh as mesh_lib
from dba_jax.configlib import Config
from dba_jax.mesh import constrain
from dba_jax.ops import ACT_HEADS

__all__ = ["ACT_EMBED", "ACT_HEADS", "Hooks", "LayerIO", "Linear", "MLP", "NO_HOOKS", "Norm", "dense", "dropout",
           "normal_init", "record_taps", "tap"]

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


# ------------------------------------------------------------------------------------------------------ layers

def _lead(v, x):
  """v [F] shaped to broadcast against x [..., F] explicitly (rank promotion is an error in the tests)."""
  return v.reshape((1,) * (x.ndim - 1) + v.shape).astype(x.dtype)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel stored [in, out] (PyTorch weights transpose on conversion)."""

  def __init__(self, d_in: int, d_out: int, axes: tuple, *, bias: bool, std: float, rngs: nnx.Rngs):
    self.kernel = nnx.Param(normal_init(rngs, (d_in, d_out), std), axes=axes)
    self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32), axes=axes[1:]) if bias else None

  def __call__(self, x):
    y = dense(x, self.kernel[...])
    return y if self.bias is None else y + _lead(self.bias[...], y)


class Norm(nnx.Module):
  """RMSNorm or LayerNorm; normalisation in float32, cast back, then the learned scale (as the originals do)."""

  def __init__(self, d: int, kind: str, eps: float, bias: bool):
    self.kind, self.eps = kind, eps
    self.scale = nnx.Param(jnp.ones((d,), jnp.float32), axes=("embed",))
    use_bias = kind == "layernorm" and bias
    self.bias = nnx.Param(jnp.zeros((d,), jnp.float32), axes=("embed",)) if use_bias else None

  def __call__(self, x):
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if self.kind == "layernorm":
      xf = xf - xf.mean(-1, keepdims=True)
    y = (xf * jax.lax.rsqrt((xf * xf).mean(-1, keepdims=True) + self.eps)).astype(x.dtype)
    y = y * _lead(self.scale[...], y)
    return y if self.bias is None else y + _lead(self.bias[...], y)


class MLP(nnx.Module):
  """SwiGLU with one fused [gate | up] kernel stored [d, 2, d_ff] (so tensor parallelism splits d_ff, never
  gate from up), or a GELU MLP."""

  def __init__(self, m: Config, out_std: float, rngs: nnx.Rngs):
    self.kind = m.mlp
    if m.mlp == "swiglu":
      self.w_in = nnx.Param(normal_init(rngs, (m.d_model, 2, m.d_ff), m.init_std), axes=("embed", None, "mlp"))
      self.b_in = nnx.Param(jnp.zeros((2, m.d_ff), jnp.float32), axes=(None, "mlp")) if m.bias else None
    else:
      self.w_in = Linear(m.d_model, m.d_ff, ("embed", "mlp"), bias=m.bias, std=m.init_std, rngs=rngs)
    self.w_out = Linear(m.d_ff, m.d_model, ("mlp", "embed"), bias=m.bias, std=out_std, rngs=rngs)

  def __call__(self, x):
    if self.kind == "swiglu":
      h = dense(x, self.w_in[...])
      if self.b_in is not None:
        h = h + self.b_in[...].astype(x.dtype).reshape((1,) * (h.ndim - 2) + h.shape[-2:])
      h = constrain(h, ("batch", "seq", None, "act_mlp"))
      h = jax.nn.silu(h[..., 0, :]) * h[..., 1, :]
    else:
      h = jax.nn.gelu(constrain(self.w_in(x), ("batch", "seq", "act_mlp")), approximate=True)
    return self.w_out(h)


def dropout(x, rate, key):
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


# Coordinate-check taps: mean |activation| per named site, recorded only inside `record_taps()` (unrolled layers).
_TAPS: list | None = None


def tap(name: str, x):
  if _TAPS is not None:
    _TAPS.append((name, jnp.abs(x.astype(jnp.float32)).mean()))
  return x


def tapping() -> bool:
  return _TAPS is not None


class record_taps:
  """with record_taps() as taps: model(tokens) -> taps = [(name, mean |x|), ...] in call order."""

  def __enter__(self):
    global _TAPS
    _TAPS = []
    return _TAPS

  def __exit__(self, *exc):
    global _TAPS
    _TAPS = None
