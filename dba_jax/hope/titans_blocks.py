"""The Titans paper's neural long-term memory as Decoder blocks (model.block = titans_mac | titans_mag | titans_mal).

Behrouz, Zhong, Mirrokni 2024 (hope_latentwire.md A, "Titans paper memory"); the memory's math is titans.py. Every
block is pre-norm and residual; its attention (ops.attention with an explicit mask) sees `titans_persistent`
learnable, input-independent tokens (through W_K, W_V, no rotary position) as always-visible leading keys; its memory
runs inside the forward over the whole sequence: chunks of `titans_chunk` tokens in a lax.scan (the parallel form
inside a chunk), one memory per batch row (vmap), starting from the learned M_0. Nothing is stop-gradiented: the
plain next-token loss trains W_Q, W_K, W_V, the gates, M_0 and the persistent tokens through the memory's trajectory.

  MAC  per segment s of `titans_window` tokens: h = M_{s−1}(q) (the memory as of the previous segment's end),
       y = Attn([persistent ; norm(h) ; segment]) (causal inside the segment), the memory stores y,
       x + gate(y, M(y)). Everything else is segment-local (convs included): the memory is the only way across.
  MAG  x + gate(SWA([persistent ; u]), M(u)), u = norm(x): sliding-window attention and the memory side by side.
  MAL  x + W_o M(norm x), then x + SWA([persistent ; norm x]): the memory as a layer before the attention.
All three end with x + MLP(norm x). gate(y, r) = W_o (norm(y) ⊗ σ(norm(r))): the paper's normalised output gate.

Memory streams per token: q, k = L2(SiLU(conv(x W))), v = SiLU(conv(x W_V)) (causal depthwise conv of
`titans_conv` taps), η = σ(·), θ = titans_lr·σ(·), α = σ(·) (linear maps of the same input). Reads store first
(`titans_store_first`: token t reads M_t, which includes its own write; MAC's o_t = y_t ⊗ M_t(y_t)) or retrieve
first (the memory as of the token's chunk start). model.hope.memory=False: θ = α = 0, every read uses M_0; model.hope.writes=False: θ = 0 (M_0 decays by α).
The persistent tokens do not pass through the memory (their write would only be an input-independent change of the
learned M_0). model.py hands in its Norm / MLP / Linear (`registry`): dba_jax.hope never imports the model.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dba_jax import ops
from dba_jax.configlib import attn_dim, kv_heads
from dba_jax.hope import titans
from dba_jax.hope.blocks import causal_conv
from dba_jax.layers import ACT_EMBED, ACT_HEADS, Hooks, LayerIO, NO_HOOKS, dense, normal_init
from dba_jax.mesh import constrain

GATE_BIAS = (0.0, 0.0, -5.0)  # η = σ(0) = 0.5, θ = titans_lr·σ(0), α = σ(−5) ≈ 0.007 at init


class Parts(NamedTuple):
  """model.py's layers (Norm, MLP, Linear, dropout), handed in by `registry`."""
  norm: type
  feedforward: type
  linear: type
  dropout: Callable


def registry(norm, feedforward, linear, dropout) -> dict:
  """model.BLOCKS entries built on the model's own layers."""
  parts = Parts(norm, feedforward, linear, dropout)
  return {name: functools.partial(cls, parts=parts) for name, cls in (("titans_mac", MAC), ("titans_mag", MAG),
                                                                     ("titans_mal", MAL))}


def _norm(m, parts: Parts):
  return parts.norm(m.d_model, m.norm, m.norm_eps, m.bias)


def _l2(x):
  """x / ‖x‖ over the last axis, 0 at 0 (with a finite gradient there: padding rows are zeros)."""
  return x * jax.lax.rsqrt(jnp.maximum((x * x).sum(-1, keepdims=True), 1e-12))


def window_mask(T: int, window: int, n_persistent: int):
  """[1, T, P + T] bool: the persistent columns, then keys j with i − window < j <= i."""
  i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
  return jnp.concatenate([jnp.ones((T, n_persistent), bool), (j <= i) & (j > i - window)], axis=1)[None]


class NeuralMemory(nnx.Module):
  """The memory's meta parameters (W_Q, W_K, W_V fused [d, 3, d], the conv, the η/θ/α gates, M_0) and its passes."""

  def __init__(self, m, parts: Parts, rngs: nnx.Rngs):
    d, h = m.d_model, m.hope
    self.chunk, self.lr, self.on, self.store_first = h.titans_chunk, h.titans_lr, h.memory, h.titans_store_first
    self.writes = h.writes
    self.w = nnx.Param(normal_init(rngs, (d, 3, d), m.init_std), axes=("embed", None, "heads"))
    w = h.titans_conv  # torch Conv1d(groups=d) init, as HOPE's conv: U(−1/√w, 1/√w)
    self.conv = nnx.Param(jax.random.uniform(rngs.params(), (w, 3, d), jnp.float32, -w ** -0.5, w ** -0.5),
                          axes=(None, None, "heads")) if w else None
    self.gates = parts.linear(d, 3, ("embed", None), bias=True, std=m.init_std, rngs=rngs)
    self.gates.bias = nnx.Param(jnp.asarray(GATE_BIAS, jnp.float32), axes=(None,))
    M0 = titans.init_memory(rngs.params(), d, d, h.titans_memory_depth, std=d ** -0.5)
    self.m0 = nnx.List([nnx.Param(M0[f"w{i}"], axes=(None, None)) for i in range(len(M0))])

  def qkv(self, x_BTd, which: slice = slice(0, 3)) -> dict:
    """{"q", "k", "v"}[which] of x, each [B, T, d] in (at least) float32."""
    x = x_BTd.astype(jnp.promote_types(x_BTd.dtype, jnp.float32))
    s = dense(x, self.w[...][:, which])
    if self.conv is not None:
      B, T, n, F = s.shape
      kern = self.conv[...][:, which]
      s = causal_conv(s.reshape(B, T, n * F), kern.reshape(kern.shape[0], n * F)).reshape(B, T, n, F)
    s = jax.nn.silu(s)
    names = ("q", "k", "v")[which]
    return {n: s[:, :, i] if n == "v" else _l2(s[:, :, i]) for i, n in enumerate(names)}

  def rates(self, x_BTd):
    """(η, θ, α) per token [B, T] in (at least) float32."""
    g = jax.nn.sigmoid(self.gates(x_BTd.astype(jnp.promote_types(x_BTd.dtype, jnp.float32))))
    return g[..., 0], self.lr * g[..., 1], g[..., 2]

  def initial(self, B: int, dtype) -> tuple[dict, dict]:
    """(M_0 per row, zero surprise): leaves [B, ...]."""
    W = {f"w{i}": jnp.broadcast_to(p[...].astype(dtype)[None], (B,) + p.shape) for i, p in enumerate(self.m0)}
    return W, jax.tree.map(jnp.zeros_like, W)

  def fast_state(self) -> dict:
    """One context's carried state at the start, unbatched: (M − M_0, S) = zeros (blocks.init_fast_state stacks
    it over layers and rows; deltas, so that every layer's zero is its own M_0)."""
    z = {f"w{i}": jnp.zeros(p.shape, jnp.float32) for i, p in enumerate(self.m0)}
    return {"dW": z, "S": dict(z)}

  def resume(self, state: dict, dtype) -> tuple[dict, dict]:
    """(W, S) per row from a carried state (leaves [B, ...])."""
    W = {k: (self.m0[int(k[1:])][...][None] + d).astype(dtype) for k, d in state["dW"].items()}
    return W, jax.tree.map(lambda a: a.astype(dtype), state["S"])

  def carried(self, W_B: dict, S_B: dict) -> dict:
    return {"dW": {k: (w - self.m0[int(k[1:])][...][None]).astype(jnp.float32) for k, w in W_B.items()},
            "S": jax.tree.map(lambda a: a.astype(jnp.float32), S_B)}

  def read(self, W_B: dict, q_BTd):
    """M(q) per row, no update."""
    return jax.vmap(titans.memory_apply)(W_B, q_BTd)

  def write(self, W_B: dict, S_B: dict, x_BTd, keep_T):
    """Store x's tokens from (W_B, S_B), reading each token's q of x as it goes: (reads [B, T, d], W_B, S_B).
    keep_T [T] bool: real tokens (masked ones, and every token with the memory off, write nothing)."""
    s = self.qkv(x_BTd)
    eta, theta, alpha = self.rates(x_BTd)
    theta = theta * self.writes  # writes off: nothing stored, M_0 still decays by α
    keep = keep_T & self.on

    def row(W, S, k, v, q, e, th, a):
      W, S, _, reads = titans.scan_chunks(W, S, k, v, e, th, a, self.chunk, keep, q, self.store_first)
      return reads, W, S

    return jax.vmap(row)(W_B, S_B, s["k"], s["v"], s["q"], eta, theta, alpha)

  def __call__(self, x_BTd, keep_T):
    """Reads of x's queries while storing x, from M_0 (MAG / MAL)."""
    W, S = self.initial(x_BTd.shape[0], jnp.promote_types(x_BTd.dtype, jnp.float32))
    return self.write(W, S, x_BTd, keep_T)[0].astype(x_BTd.dtype)


class PrefixAttention(nnx.Module):
  """Softmax attention (ops.attention, visibility from an explicit mask) of x's queries over
  [persistent ; sources...]: the persistent tokens go through W_K, W_V and take no rotary position."""

  def __init__(self, m, parts: Parts, out_std: float, rngs: nnx.Rngs):
    self.m, self.H, self.K = m, m.n_heads, kv_heads(m)
    self.D = attn_dim(m) // m.n_heads
    lin = lambda n, axes: parts.linear(m.d_model, n * self.D, axes, bias=m.bias, std=m.init_std, rngs=rngs)
    self.wq, self.wk, self.wv = lin(self.H, ("embed", "heads")), lin(self.K, ("embed", "kv_heads")), \
        lin(self.K, ("embed", "kv_heads"))
    self.wo = parts.linear(self.H * self.D, m.d_model, ("heads", "embed"), bias=m.bias, std=out_std, rngs=rngs)
    P = m.hope.titans_persistent  # N(0, 1): the scale of the normed tokens they sit beside
    self.persistent = nnx.Param(jax.random.normal(rngs.params(), (P, m.d_model), jnp.float32),
                                axes=(None, "embed")) if P else None

  def _heads(self, lin, x_BTd, n: int, positions_T):
    B, T, _ = x_BTd.shape
    y = constrain(lin(x_BTd).reshape(B, T, n, self.D), ACT_HEADS)
    if positions_T is not None and self.m.positions == "rope":
      y = ops.apply_rope(y, positions_T, self.m.rope_base)
    return y

  def __call__(self, x_BTd, positions_T, visible, sources, hooks: Hooks):
    """(output [B, T, d], probabilities [B, H, T, P + S] or None). sources: ((x_BSd, positions_S), ...), keys in
    that order after the persistent ones; visible [1, T, P + S] bool."""
    B = x_BTd.shape[0]
    ks = [self._heads(self.wk, s, self.K, p) for s, p in sources]
    vs = [self._heads(self.wv, s, self.K, None) for s, _ in sources]
    if self.persistent is not None:
      p = jnp.broadcast_to(self.persistent[...].astype(x_BTd.dtype)[None], (B,) + self.persistent.shape)
      ks, vs = [self._heads(self.wk, p, self.K, None)] + ks, [self._heads(self.wv, p, self.K, None)] + vs
    o = ops.attention(self._heads(self.wq, x_BTd, self.H, positions_T), jnp.concatenate(ks, 1), jnp.concatenate(vs, 1),
                      scale=self.D ** -0.5, mask=visible, return_probs=hooks.return_probs, impl=self.m.attn_impl)
    o, probs = o if hooks.return_probs else (o, None)
    return self.wo(o.reshape(B, -1, self.H * self.D)), probs


class OutputGate(nnx.Module):
  """W_o (norm(y) ⊗ σ(norm(r))): the branch y gated by the memory read r, both normalised with learned scales."""

  def __init__(self, m, parts: Parts, out_std: float, rngs: nnx.Rngs):
    self.norm_y = _norm(m, parts)
    self.norm_r = _norm(m, parts)
    self.wo = parts.linear(m.d_model, m.d_model, ("heads", "embed"), bias=m.bias, std=out_std, rngs=rngs)

  def __call__(self, y_BTd, r_BTd):
    return self.wo(self.norm_y(y_BTd) * jax.nn.sigmoid(self.norm_r(r_BTd.astype(y_BTd.dtype))))


class TitansBlock(nnx.Module):
  """What the three share: the attention, the memory, the closing MLP sublayer, the hooks they refuse."""

  def __init__(self, m, rngs: nnx.Rngs, parts: Parts):
    self.m, self.drop = m, parts.dropout
    self.out_std = m.init_std / math.sqrt(2 * m.n_layers) if m.scale_residual_init else m.init_std
    self.norm_attn, self.norm_ffn = _norm(m, parts), _norm(m, parts)
    self.attn = PrefixAttention(m, parts, self.out_std, rngs)
    self.memory = NeuralMemory(m, parts, rngs)
    self.ffn = parts.feedforward(m, self.out_std, rngs)

  def __call__(self, x, positions_T, rng=None, io: LayerIO = LayerIO(), hooks: Hooks = NO_HOOKS):
    """(x, io): io.probs the attention probabilities with hooks.return_probs (keys [persistent ; ...], see mix)."""
    if hooks.cache is not None:
      raise NotImplementedError(f"model.block={self.m.block!r} has no KV-cache decoding (its memory is rebuilt by "
                                "each forward); run the forward on the whole sequence")
    if hooks.keep_fn is not None:
      raise NotImplementedError(f"model.block={self.m.block!r} takes no key keep hook (it needs selective "
                                "attention's F)")
    keys = jax.random.split(rng, 3) if rng is not None else (None,) * 3
    x = constrain(x, ACT_EMBED)
    if io.state is not None and not isinstance(self, MAC):
      raise NotImplementedError(f"model.block={self.m.block!r} carries no memory state from one forward to the next "
                                "(its sliding-window attention and convs would need the previous call's tokens); "
                                "titans_mac does (everything but its memory is segment-local)")
    keep_T = jnp.ones(x.shape[1:2], bool) if hooks.valid_T is None else hooks.valid_T
    x, probs, state = self.mix(x, positions_T, keep_T, hooks, keys[:2], io.state)
    x = x + self.drop(self.ffn(self.norm_ffn(x)), self.m.dropout, keys[2])
    return x, dataclasses.replace(io, probs=probs, state=state)

  def fast_state(self) -> dict:
    """One context's carried memory state (titans_mac; dba_jax.hope.memstate saves and loads it)."""
    return {"titans": self.memory.fast_state()}

  def window_attention(self, u_BTd, positions_T, hooks):
    """Sliding-window attention of the normed u over [persistent ; u] (MAG, MAL)."""
    visible = window_mask(u_BTd.shape[1], self.m.hope.titans_window, self.m.hope.titans_persistent)
    return self.attn(u_BTd, positions_T, visible, ((u_BTd, positions_T),), hooks)


class MAG(TitansBlock):
  """Memory as a gate: sliding-window attention and the memory on the same normed input, probs [B, H, T, P + T]."""

  def __init__(self, m, rngs: nnx.Rngs, parts: Parts):
    super().__init__(m, rngs, parts)
    self.gate = OutputGate(m, parts, self.out_std, rngs)

  def mix(self, x, positions_T, keep_T, hooks, keys, state=None):
    u = self.norm_attn(x)
    y, probs = self.window_attention(u, positions_T, hooks)
    return x + self.drop(self.gate(y, self.memory(u, keep_T)), self.m.dropout, keys[0]), probs, None


class MAL(TitansBlock):
  """Memory as a layer: x + W_o M(norm x), then sliding-window attention, probs [B, H, T, P + T]."""

  def __init__(self, m, rngs: nnx.Rngs, parts: Parts):
    super().__init__(m, rngs, parts)
    self.norm_mem = _norm(m, parts)
    self.wo_mem = parts.linear(m.d_model, m.d_model, ("heads", "embed"), bias=m.bias, std=self.out_std, rngs=rngs)

  def mix(self, x, positions_T, keep_T, hooks, keys, state=None):
    x = x + self.drop(self.wo_mem(self.memory(self.norm_mem(x), keep_T)), self.m.dropout, keys[0])
    y, probs = self.window_attention(self.norm_attn(x), positions_T, hooks)
    return x + self.drop(y, self.m.dropout, keys[1]), probs, None


class MAC(TitansBlock):
  """Memory as context, segment by segment (a lax.scan): retrieve with the memory as of the previous segment's end,
  attend over [persistent ; norm(h) ; segment], store the attention output, gate it with the memory's read of it.
  probs [B, H, T, P + 2·titans_window]: each query's row over its own segment's keys."""

  def __init__(self, m, rngs: nnx.Rngs, parts: Parts):
    super().__init__(m, rngs, parts)
    self.norm_h = _norm(m, parts)
    self.gate = OutputGate(m, parts, self.out_std, rngs)

  def mix(self, x, positions_T, keep_T, hooks, keys, state=None):
    """state: {"titans": carried memory} to continue from (and return) instead of starting at M_0; one call then
    continues another exactly when the earlier call's length is a whole number of segments."""
    B, T, d = x.shape
    Ws, P = self.m.hope.titans_window, self.m.hope.titans_persistent
    n = -(-T // Ws)
    pad = n * Ws - T
    u = self.norm_attn(x)
    # Segments lead: [n, B, Ws, ...]; the padded tail is masked out of the memory and never visible to a real query.
    u_NBWd = jnp.pad(u, ((0, 0), (0, pad), (0, 0))).reshape(B, n, Ws, d).swapaxes(0, 1)
    q_NBWd = self.memory.qkv(u_NBWd.reshape(n * B, Ws, d), slice(0, 1))["q"].reshape(n, B, Ws, d)
    if self.m.hope.titans_positions == "segment":
      pos_NW = jnp.broadcast_to(jnp.arange(Ws), (n, Ws))
    else:
      pos_NW = jnp.concatenate([positions_T, positions_T[-1] + 1 + jnp.arange(pad)]).reshape(n, Ws)
    keep_NW = jnp.pad(keep_T, (0, pad)).reshape(n, Ws)
    causal = jnp.tril(jnp.ones((Ws, Ws), bool))
    visible = jnp.concatenate([jnp.ones((Ws, P), bool), causal, causal], axis=1)[None]

    def segment(carry, xs):
      W, S = carry
      u_s, q_s, pos_s, keep_s = xs
      h = self.norm_h(self.memory.read(W, q_s).astype(u_s.dtype))
      y, probs = self.attn(u_s, pos_s, visible, ((h, pos_s), (u_s, pos_s)), hooks)
      r, W, S = self.memory.write(W, S, y, keep_s)
      return (W, S), (self.gate(y, r), probs)

    dtype = jnp.promote_types(x.dtype, jnp.float32)
    carry = self.memory.initial(B, dtype) if state is None else self.memory.resume(state["titans"], dtype)
    carry, (o_NBWd, probs) = jax.lax.scan(segment, carry, (u_NBWd, q_NBWd, pos_NW, keep_NW))
    if state is not None:
      state = {**state, "titans": self.memory.carried(*carry)}
    o = o_NBWd.swapaxes(0, 1).reshape(B, n * Ws, d)[:, :T]
    if probs is not None:
      probs = probs.transpose(1, 2, 0, 3, 4).reshape(B, self.m.n_heads, n * Ws, -1)[:, :, :T]
    return x + self.drop(o, self.m.dropout, keys[0]), probs, state
