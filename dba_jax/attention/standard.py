"""Standard softmax attention: MHA, GQA and the bottleneck baseline (attn_dim < d_model), with what the Hugging Face
families add: biases on q/k/v only (model.qkv_bias), scaled RoPE (model.rope_scaling) and a sliding window
(model.sliding_window). Op: dba_jax.ops.standard."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from dba_jax import ops
from dba_jax.attention.base import Kind, even_rope, no_keep_hook, through_cache, with_probs
from dba_jax.configlib import Config, attn_dim, kv_heads
from dba_jax.layers import Hooks, LayerIO, Linear, NO_HOOKS, tap, tapping
from dba_jax.mesh import constrain


class StandardAttention(nnx.Module):
  """q, k, v are separate kernels so tensor parallelism splits whole heads; PyTorch's fused [q | k | v] weight is
  split on conversion. `extra_heads`: q/k/v heads whose outputs never reach `out` (selective's selection heads)."""

  def __init__(self, m: Config, out_std: float, rngs: nnx.Rngs, extra_heads: int = 0):
    self.m = m
    self.H, self.K = m.n_heads, kv_heads(m)
    self.D = attn_dim(m) // self.H
    self.Hp, self.Kp = self.H + extra_heads, self.K + extra_heads
    qkv_bias = m.bias or m.get("qkv_bias", False)
    lin = lambda n, axes: Linear(m.d_model, n * self.D, axes, bias=qkv_bias, std=m.init_std, rngs=rngs)
    self.q, self.k, self.v = lin(self.Hp, ("embed", "heads")), lin(self.Kp, ("embed", "kv_heads")), \
        lin(self.Kp, ("embed", "kv_heads"))
    self.out = Linear(self.H * self.D, m.d_model, ("heads", "embed"), bias=m.bias, std=out_std, rngs=rngs)
    self.scale = 1.0 / self.D if m.mup else self.D ** -0.5  # muP: attn_mult 1/d_head

  def __call__(self, x_BTd, positions_T, io: LayerIO = LayerIO(), hooks: Hooks = NO_HOOKS):
    """(output [B, T, d], io with this layer's aux, residual logits, cache state and probabilities)."""
    B, T, _ = x_BTd.shape
    q_BTHD, k_BTKD, v_BTKD = self.project(x_BTd, positions_T)
    tap("q", q_BTHD), tap("k", k_BTKD), tap("v", v_BTKD)
    if tapping() and self.Hp == self.Kp:  # the logits are only materialised for the coordinate check
      tap("attn_score", jnp.einsum("bthd,bshd->bhts", q_BTHD, k_BTKD) * self.scale)
    kv, keys, io = through_cache(hooks, io, {"k": k_BTKD, "v": v_BTKD}, positions_T)
    o_BTHD, io = self.attend(q_BTHD, kv["k"], kv["v"], positions_T, keys, io, hooks)
    return self.out(o_BTHD.reshape(B, T, self.H * self.D)), io

  def project(self, x_BTd, positions_T):
    """q [B, T, Hp, D], k, v [B, T, Kp, D], RoPE applied."""
    B, T, _ = x_BTd.shape
    H, K, D = self.Hp, self.Kp, self.D
    q_BTHD = constrain(self.q(x_BTd).reshape(B, T, H, D), ops.ACT_HEADS)
    k_BTKD = constrain(self.k(x_BTd).reshape(B, T, K, D), ops.ACT_HEADS)
    v_BTKD = constrain(self.v(x_BTd).reshape(B, T, K, D), ops.ACT_HEADS)
    if self.m.positions == "rope":
      scaling = ops.RopeScaling(**self.m.rope_scaling) if "rope_scaling" in self.m else None
      q_BTHD = ops.apply_rope(q_BTHD, positions_T, self.m.rope_base, scaling)
      k_BTKD = ops.apply_rope(k_BTKD, positions_T, self.m.rope_base, scaling)
    return q_BTHD, k_BTKD, v_BTKD

  def attend(self, q_BTHD, k_BSKD, v_BSKD, positions_T, keys, io: LayerIO, hooks: Hooks):
    """keys: (key positions, visibility) from a cache, or None (causal over the chunk)."""
    no_keep_hook(hooks, "standard")
    mask = None if keys is None else keys[1]
    window = self.m.get("sliding_window", 0)
    if window:  # an explicit mask: the flash kernel serves causal masks only, so this runs on the xla path
      k_pos = positions_T[None] if keys is None else keys[0]
      mask = ops.positions_mask(positions_T, k_pos, window)
    o = ops.attention(q_BTHD, k_BSKD, v_BSKD, scale=self.scale, mask=mask, return_probs=hooks.return_probs,
                      impl=self.m.attn_impl)
    return with_probs(o, io, hooks)


def validate(m: Config):
  even_rope(m, attn_dim(m) // m.n_heads, "attn_dim/n_heads")


KIND = Kind("standard", StandardAttention, validate=validate)
