"""The translator: K learned queries read a source LM's last hidden layer and become K soft tokens for a target LM.

Per block (Flamingo-style, as the original's GatedCrossAttentionBlock): ungated pre-LN self-attention over the
queries; cross-attention from LN_q(queries) to LN_src(source states), padding masked, added as tanh(g_x)·cross;
a GELU FFN b -> 4b -> b on its own LN, added as tanh(g_f)·FFN. Both gates start at 0, so at init the soft tokens do
not depend on the source (and cross-attention's weights get no gradient). Then LN -> Linear(b -> target width).
Every projection has a bias (torch's nn.MultiheadAttention and nn.Linear), which gives per block
14b² + 2bs + 17b + 2s + 2 parameters, plus Kb + tb + t + 2b at the top (`param_count`).

The source state is the source's last hidden layer after its final norm (`source_states`): what HF's
`hidden_states[-1]` is for Mistral/Llama, which the original read. Soft tokens are rescaled per token to the median
RMS of the target's embedding rows, the factor clamped to [0.25, 4] and computed from the detached RMS (`rms_match`).
Attention math is dba_jax.ops.attention; weights are float32 (the master copy) and so is the compute.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dba_jax import ops
from dba_jax.layers import normal_init
from dba_jax.model import Linear, Norm

LN_EPS = 1e-5  # torch nn.LayerNorm's default


def param_count(s: int, t: int, b: int, K: int, depth: int) -> int:
  """The original's translator size for source width s, target width t, bottleneck b, K queries, depth blocks."""
  return depth * (14 * b * b + 2 * b * s + 17 * b + 2 * s + 2) + K * b + t * b + t + 2 * b


def _linear(d_in, d_out, rngs, std=None):
  """Linear with bias; weights N(0, 1/(3 d_in)), the variance of torch's default uniform init, biases 0."""
  return Linear(d_in, d_out, (None, None), bias=True, std=(3 * d_in) ** -0.5 if std is None else std, rngs=rngs)


def _layernorm(d):
  return Norm(d, "layernorm", LN_EPS, True)


def _dropout(x, rate, key):
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head attention with separate q, k, v, out projections (k, v read width d_kv); no causal mask."""

  def __init__(self, b: int, d_kv: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    std = (2 * b) ** -0.5  # torch's xavier-uniform in_proj variance
    self.q, self.k, self.v = _linear(b, b, rngs, std), _linear(d_kv, b, rngs, std), _linear(d_kv, b, rngs, std)
    self.o_proj = _linear(b, b, rngs)

  def __call__(self, x_BKb, kv_BSd, mask_BS=None):
    B, K, b = x_BKb.shape
    S, H = kv_BSd.shape[1], self.heads
    q = self.q(x_BKb).reshape(B, K, H, b // H)
    k, v = self.k(kv_BSd).reshape(B, S, H, b // H), self.v(kv_BSd).reshape(B, S, H, b // H)
    mask = None if mask_BS is None else jnp.broadcast_to(mask_BS[:, None, :], (B, K, S))
    return self.o_proj(ops.attention(q, k, v, causal=False, mask=mask, impl="xla").reshape(B, K, b))


class CrossBlock(nnx.Module):
  def __init__(self, b: int, s: int, heads: int, ffn_mult: int, dropout: float, rngs: nnx.Rngs):
    self.dropout = dropout
    self.q_norm, self.src_norm, self.ffn_norm = _layernorm(b), _layernorm(s), _layernorm(b)
    self.self_attn = Attention(b, b, heads, rngs)
    self.cross_attn = Attention(b, s, heads, rngs)
    self.cross_gate = nnx.Param(jnp.zeros((1,), jnp.float32), axes=(None,))
    self.ffn_in, self.ffn_out = _linear(b, ffn_mult * b, rngs), _linear(ffn_mult * b, b, rngs)
    self.ffn_gate = nnx.Param(jnp.zeros((1,), jnp.float32), axes=(None,))

  def __call__(self, q_BKb, src_BSs, mask_BS, rng=None):
    keys = jax.random.split(rng, 2) if rng is not None else (None, None)
    qn = self.q_norm(q_BKb)
    q_BKb = q_BKb + self.self_attn(qn, qn)
    cross = self.cross_attn(self.q_norm(q_BKb), self.src_norm(src_BSs), mask_BS)  # q_norm reused, as the original
    q_BKb = q_BKb + jnp.tanh(self.cross_gate[...][0]) * _dropout(cross, self.dropout, keys[0])
    h = _dropout(jax.nn.gelu(self.ffn_in(self.ffn_norm(q_BKb)), approximate=False), self.dropout, keys[1])
    return q_BKb + jnp.tanh(self.ffn_gate[...][0]) * self.ffn_out(h)


class Translator(nnx.Module):
  """src [B, S, s] (+ mask [B, S]) -> soft tokens [B, K, t] (before RMS matching)."""

  def __init__(self, s: int, t: int, b: int, K: int, depth: int, heads: int, ffn_mult: int = 4,
               dropout: float = 0.0, *, rngs: nnx.Rngs):
    if b % heads:
      raise ValueError(f"bridge width b={b} is not divisible by heads={heads}")
    self.query_tokens = nnx.Param(normal_init(rngs, (K, b), 1.0 / math.sqrt(b)), axes=(None, None))
    self.blocks = nnx.List([CrossBlock(b, s, heads, ffn_mult, dropout, rngs) for _ in range(depth)])
    self.output_norm = _layernorm(b)
    self.output_proj = _linear(b, t, rngs)

  def __call__(self, src_BSs, mask_BS=None, rng=None):
    B = src_BSs.shape[0]
    q = jnp.broadcast_to(self.query_tokens[...][None], (B,) + self.query_tokens.shape)
    keys = jax.random.split(rng, len(self.blocks)) if rng is not None else [None] * len(self.blocks)
    for blk, key in zip(self.blocks, keys):
      q = blk(q, src_BSs, mask_BS, key)
    return self.output_proj(self.output_norm(q))


def rms(x, eps: float = 1e-8):
  """Per-row RMS over the last axis, [..., 1]."""
  return jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(x), -1, keepdims=True)), eps)


def rms_match(soft_BKt, target_rms, clamp=(0.25, 4.0)):
  """Each token times clip(target_rms / rms(token), *clamp), the token's RMS detached (direction kept)."""
  scale = jnp.clip(target_rms / jax.lax.stop_gradient(rms(soft_BKt)), clamp[0], clamp[1])
  return soft_BKt * scale


def target_rms(embed_Vd, vocab: int) -> float:
  """The median RMS of the target's embedding rows (its real vocabulary, not the padding rows). Abstract rows
  (dba-aot compiles without values) give 1.0: the RMS is a constant of the step, not part of its shape."""
  if isinstance(embed_Vd, jax.ShapeDtypeStruct):
    return 1.0
  return float(jnp.median(rms(embed_Vd[:vocab].astype(jnp.float32))[:, 0]))


def source_states(decoder, tokens_BS, where: str = "final_norm"):
  """The source's last hidden layer [B, S, s]: after its final norm (HF hidden_states[-1]) or before it."""
  h = decoder.forward(tokens_BS).hidden
  return decoder.final_norm(h) if where == "final_norm" else h
