"""The Titans paper's neural long-term memory as Decoder blocks (model.block = titans_mac | titans_mag | titans_mal |
titans_lmm).

Behrouz, Zhong, Mirrokni 2024 (hope_latentwire.md A, "Titans paper memory"); the memory's math is titans.py. Every
block is pre-norm and residual; its attention (MAC: ops.attention with a segment mask; MAG / MAL: ops.window_attention,
no [T, T] array) sees `titans_persistent` learnable, input-independent tokens (through W_K, W_V, no rotary position) as
always-visible leading keys; its memory runs inside the forward over the whole sequence: chunks of `titans_chunk`
tokens in a lax.scan (the parallel form inside a chunk), one memory per batch row (vmap), starting from the learned
M_0. Nothing is stop-gradiented: the plain next-token loss trains W_Q, W_K, W_V, the gates, M_0 and the persistent
tokens through the memory's trajectory.

  MAC  per segment s of `titans_window` tokens: h = M_{s−1}(q) (the memory as of the previous segment's end),
       y = Attn([persistent ; norm(h) ; segment]) (causal inside the segment), the memory stores y,
       x + gate(y, M(y)). Everything else is segment-local (convs included): the memory is the only way across.
  MAG  x + gate(SWA([persistent ; u]), M(u)), u = norm(x): sliding-window attention and the memory side by side.
  MAL  x + W_o M(norm x), then x + SWA([persistent ; norm x]): the memory as a layer before the attention.
  LMM  x + W_o M(norm x): the memory alone (the paper's LMM), no attention.
All end with x + MLP(norm x). gate(y, r) = W_o (norm(y) ⊗ σ(norm(r))): the paper's normalised output gate.

Memory streams per token: q, k = L2(SiLU(conv(x W))), v = SiLU(conv(x W_V)) (causal depthwise conv of
`titans_conv` taps), η = σ(·), θ = titans_lr·σ(·), α = σ(·) (linear maps of the same input). Reads store first
(`titans_store_first`: token t reads M_t, which includes its own write; MAC's o_t = y_t ⊗ M_t(y_t)) or retrieve
first (the memory as of the token's chunk start). model.hope.memory=False: θ = α = 0, every read uses M_0; model.hope.writes=False: θ = 0 (M_0 decays by α).
The persistent tokens do not pass through the memory (their write would only be an input-independent change of the
learned M_0). model.py hands in its Norm / MLP / Linear (`registry`): dba_jax.hope never imports the model.

Decoding (dba_jax.hope.decode): when LayerIO.state holds "decode" (`decode_state`: one layer's, leading batch axis) a
block takes one token x [B, 1, d] at positions_T [1] and returns the state moved by it; the logits equal the forward
over the whole text. The state holds the tokens read so far "n" [B] (segments, windows and memory chunks count from
the call's first token), the memory (`NeuralMemory.step`: M − M_0, S, the chunk-start M − M_0, the conv tails) and
the attention's keys: MAG / MAL a ring of the last titans_window rotated keys and values; MAC the current segment's
keys of h and u (the segment-start memory beside them). titans_mac's "titans" carried memory, when present, is the
memory the token steps.
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
                                                                     ("titans_mal", MAL), ("titans_lmm", LMM))}


def _norm(m, parts: Parts):
  return parts.norm(m.d_model, m.norm, m.norm_eps, m.bias)


def _l2(x):
  """x / ‖x‖ over the last axis, 0 at 0 (with a finite gradient there: padding rows are zeros)."""
  return x * jax.lax.rsqrt(jnp.maximum((x * x).sum(-1, keepdims=True), 1e-12))


def _rows(flag_B, like):
  """flag [B] shaped to broadcast against like [B, ...]."""
  return flag_B.reshape(flag_B.shape + (1,) * (like.ndim - 1))


def _pick(flag_B, a: dict, b: dict) -> dict:
  """a where the row's flag is set, else b (leaves [B, ...])."""
  return {k: jnp.where(_rows(flag_B, a[k]), a[k], b[k]) for k in a}


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

  def qkv(self, x_BTd, which: slice = slice(0, 3), tail=None):
    """{"q", "k", "v"}[which] of x, each [B, T, d] in (at least) float32. With `tail` [B, w − 1, n, d] (the conv's
    inputs before x: one-token decoding) also the new tail."""
    x = x_BTd.astype(jnp.promote_types(x_BTd.dtype, jnp.float32))
    s = dense(x, self.w[...][:, which])
    if self.conv is not None:
      T = s.shape[1]
      if tail is not None:  # the conv over [tail ; x], summed in the forward's order; its last T outputs are x's
        s = jnp.concatenate([tail, s], axis=1)
        tail = s[:, T:]
      B, L, n, F = s.shape
      kern = self.conv[...][:, which]
      s = causal_conv(s.reshape(B, L, n * F), kern.reshape(kern.shape[0], n * F)).reshape(B, L, n, F)[:, L - T:]
    s = jax.nn.silu(s)
    names = ("q", "k", "v")[which]
    out = {n: s[:, :, i] if n == "v" else _l2(s[:, :, i]) for i, n in enumerate(names)}
    return out if tail is None else (out, tail)

  def conv_tail(self, B: int, n: int, dtype) -> jax.Array | None:
    """Zeros [B, w − 1, n, d]: the conv inputs before a call's first token (None without a conv)."""
    return None if self.conv is None else jnp.zeros((B, self.conv.shape[0] - 1, n, self.conv.shape[2]), dtype)

  def rates(self, x_BTd):
    """(η, θ, α) per token [B, T] in (at least) float32; θ = 0 with the writes off (M_0 still decays by α)."""
    g = jax.nn.sigmoid(self.gates(x_BTd.astype(jnp.promote_types(x_BTd.dtype, jnp.float32))))
    return g[..., 0], (self.lr * self.writes) * g[..., 1], g[..., 2]

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
    keep = keep_T & self.on

    def row(W, S, k, v, q, e, th, a):
      W, S, _, reads = titans.scan_chunks(W, S, k, v, e, th, a, self.chunk, keep, q, self.store_first)
      return reads, W, S

    return jax.vmap(row)(W_B, S_B, s["k"], s["v"], s["q"], eta, theta, alpha)

  def __call__(self, x_BTd, keep_T):
    """Reads of x's queries while storing x, from M_0 (MAG / MAL / LMM)."""
    W, S = self.initial(x_BTd.shape[0], jnp.promote_types(x_BTd.dtype, jnp.float32))
    return self.write(W, S, x_BTd, keep_T)[0].astype(x_BTd.dtype)

  def weights(self, dW_B: dict) -> dict:
    """M_0 + deltas (leaves [B, ...], in the deltas' dtype)."""
    return {k: self.m0[int(k[1:])][...].astype(d.dtype)[None] + d for k, d in dW_B.items()}

  def deltas(self, W_B: dict) -> dict:
    return {k: w - self.m0[int(k[1:])][...].astype(w.dtype)[None] for k, w in W_B.items()}

  def decode_state(self, B: int, dtype) -> dict:
    """Zeros: M − M_0 ("dW"), the surprise "S", M − M_0 at the current chunk's start ("dW0"), the conv's tail."""
    z = {f"w{i}": jnp.zeros((B,) + p.shape, dtype) for i, p in enumerate(self.m0)}
    st = {"dW": z, "S": dict(z), "dW0": dict(z)}
    if self.conv is not None:
      st["conv"] = self.conv_tail(B, 3, dtype)
    return st

  def step(self, st: dict, x_B1d, n_B, reset_B=None):
    """Store one token x and read its q: (read [B, 1, d] float32, state). The chunked form token by token: a token
    at a chunk start (n_B % titans_chunk == 0, n the tokens stored before it) makes the current memory the chunk-start
    one its gradient is taken at (titans.token_step). reset_B [B] bool: the conv restarts (MAC's segments)."""
    tail = st.get("conv")
    if tail is not None and reset_B is not None:
      tail = jnp.where(_rows(reset_B, tail), 0, tail)
    s = self.qkv(x_B1d, tail=tail)
    if tail is not None:
      s, tail = s
    eta, theta, alpha = self.rates(x_B1d)
    W = self.weights(st["dW"])
    W0 = _pick(n_B % self.chunk == 0, W, self.weights(st["dW0"]))
    S = st["S"]
    if self.on:
      W, S = jax.vmap(titans.token_step)(W, S, W0, s["k"][:, 0], s["v"][:, 0], eta[:, 0], theta[:, 0], alpha[:, 0])
    read = self.read(W if self.store_first else W0, s["q"])
    st = {**st, "dW": self.deltas(W), "S": S, "dW0": self.deltas(W0)}
    if tail is not None:
      st["conv"] = tail
    return read, st


class PrefixAttention(nnx.Module):
  """Softmax attention of x's queries over [persistent ; sources...]: the persistent tokens go through W_K, W_V and
  take no rotary position. Visibility: an explicit mask (MAC's segments) or a sliding window over x's own tokens
  (ops.window_attention, MAG / MAL)."""

  def __init__(self, m, parts: Parts, out_std: float, rngs: nnx.Rngs):
    self.m, self.H, self.K = m, m.n_heads, kv_heads(m)
    self.D = attn_dim(m) // m.n_heads
    lin = lambda n, axes: parts.linear(m.d_model, n * self.D, axes, bias=m.bias, std=m.init_std, rngs=rngs)
    self.wq, self.wk, self.wv = lin(self.H, ("embed", "heads")), lin(self.K, ("embed", "kv_heads")), \
        lin(self.K, ("embed", "kv_heads"))
    self.wo = parts.linear(self.H * self.D, m.d_model, ("heads", "embed"), bias=m.bias, std=out_std, rngs=rngs)
    self.P = m.hope.titans_persistent  # N(0, 1): the scale of the normed tokens they sit beside
    self.persistent = nnx.Param(jax.random.normal(rngs.params(), (self.P, m.d_model), jnp.float32),
                                axes=(None, "embed")) if self.P else None

  def _heads(self, lin, x_BTd, n: int, positions_T):
    B, T, _ = x_BTd.shape
    y = constrain(lin(x_BTd).reshape(B, T, n, self.D), ACT_HEADS)
    if positions_T is not None and self.m.positions == "rope":
      y = ops.apply_rope(y, positions_T, self.m.rope_base)
    return y

  def heads(self, x_BTd, positions_T):
    """(q, k, v) heads of x, q and k rotated to positions_T."""
    return (self._heads(self.wq, x_BTd, self.H, positions_T), self._heads(self.wk, x_BTd, self.K, positions_T),
            self._heads(self.wv, x_BTd, self.K, None))

  def _with_prefix(self, k_BSKD, v_BSKD):
    """[persistent ; k], [persistent ; v]."""
    if self.persistent is None:
      return k_BSKD, v_BSKD
    B = k_BSKD.shape[0]
    p = jnp.broadcast_to(self.persistent[...].astype(k_BSKD.dtype)[None], (B,) + self.persistent.shape)
    return (jnp.concatenate([self._heads(self.wk, p, self.K, None), k_BSKD], 1),
            jnp.concatenate([self._heads(self.wv, p, self.K, None), v_BSKD], 1))

  def __call__(self, x_BTd, positions_T, sources, hooks: Hooks, visible=None, window: int = 0):
    """(output [B, T, d], probabilities [B, H, T, P + S] or None). sources: ((x_BSd, positions_S), ...), keys in
    that order after the persistent ones, visible [1, T, P + S] bool; or window > 0: sources = ((x, positions_T),)
    seen through a sliding window."""
    ks = [self._heads(self.wk, s, self.K, p) for s, p in sources]
    vs = [self._heads(self.wv, s, self.K, None) for s, _ in sources]
    k, v = self._with_prefix(jnp.concatenate(ks, 1), jnp.concatenate(vs, 1))
    q = self._heads(self.wq, x_BTd, self.H, positions_T)
    kw = dict(scale=self.D ** -0.5, return_probs=hooks.return_probs, impl=self.m.attn_impl)
    o = ops.window_attention(q, k, v, window=window, n_prefix=self.P, **kw) if window else \
        ops.attention(q, k, v, mask=visible, **kw)
    o, probs = o if hooks.return_probs else (o, None)
    return self.wo(o.reshape(x_BTd.shape[0], -1, self.H * self.D)), probs

  def cached(self, q_B1HD, k_BSKD, v_BSKD, visible_BS):
    """One query over [persistent ; cached keys] (decoding): visible_BS [B, S] marks the cache slots it sees."""
    B, S = visible_BS.shape
    k, v = self._with_prefix(k_BSKD.astype(q_B1HD.dtype), v_BSKD.astype(q_B1HD.dtype))
    visible = jnp.concatenate([jnp.ones((B, self.P), bool), visible_BS], 1)[:, None]
    o = ops.attention(q_B1HD, k, v, scale=self.D ** -0.5, mask=visible, impl=self.m.attn_impl)
    return self.wo(o.reshape(B, 1, self.H * self.D))


def _put(buf_BSKD, new_B1KD, slot_B):
  """buf with row b's slot slot_B[b] replaced by new."""
  at = jnp.arange(buf_BSKD.shape[1])[None] == slot_B[:, None]
  return jnp.where(at[:, :, None, None], new_B1KD.astype(buf_BSKD.dtype), buf_BSKD)


class OutputGate(nnx.Module):
  """W_o (norm(y) ⊗ σ(norm(r))): the branch y gated by the memory read r, both normalised with learned scales."""

  def __init__(self, m, parts: Parts, out_std: float, rngs: nnx.Rngs):
    self.norm_y = _norm(m, parts)
    self.norm_r = _norm(m, parts)
    self.wo = parts.linear(m.d_model, m.d_model, ("heads", "embed"), bias=m.bias, std=out_std, rngs=rngs)

  def __call__(self, y_BTd, r_BTd):
    return self.wo(self.norm_y(y_BTd) * jax.nn.sigmoid(self.norm_r(r_BTd.astype(y_BTd.dtype))))


class TitansBlock(nnx.Module):
  """What the blocks share: the memory, the closing MLP sublayer, the attention (all but LMM), the hooks they refuse,
  the decoding plumbing. Subclasses give `mix` (the forward's mixing sublayers) and `mix_token` (one token's)."""
  has_attention = True

  def __init__(self, m, rngs: nnx.Rngs, parts: Parts):
    self.m, self.drop = m, parts.dropout
    self.out_std = m.init_std / math.sqrt(2 * m.n_layers) if m.scale_residual_init else m.init_std
    if self.has_attention:
      self.norm_attn = _norm(m, parts)
    self.norm_ffn = _norm(m, parts)
    if self.has_attention:
      self.attn = PrefixAttention(m, parts, self.out_std, rngs)
    self.memory = NeuralMemory(m, parts, rngs)
    self.ffn = parts.feedforward(m, self.out_std, rngs)

  def __call__(self, x, positions_T, rng=None, io: LayerIO = LayerIO(), hooks: Hooks = NO_HOOKS):
    """(x, io): io.probs the attention probabilities with hooks.return_probs (keys [persistent ; ...], see mix);
    io.state holding "decode": one token (the module docstring)."""
    if hooks.cache is not None:
      raise NotImplementedError(f"model.block={self.m.block!r} takes no KV-cache hook: decode it with "
                                "dba_jax.hope.decode.MemoryGenerator (`dba-eval generate` picks it for memory blocks)")
    if hooks.keep_fn is not None:
      raise NotImplementedError(f"model.block={self.m.block!r} takes no key keep hook (it needs selective "
                                "attention's F)")
    keys = jax.random.split(rng, 3) if rng is not None else (None,) * 3
    x = constrain(x, ACT_EMBED)
    state, probs = io.state, None
    if state is not None and "decode" in state:
      x, state = self.decode(x, positions_T, state)
    else:
      if state is not None and not isinstance(self, MAC):
        raise NotImplementedError(f"model.block={self.m.block!r} carries no memory state from one forward to the "
                                  "next (its sliding-window attention and convs would need the previous call's "
                                  "tokens); titans_mac does (everything but its memory is segment-local)")
      keep_T = jnp.ones(x.shape[1:2], bool) if hooks.valid_T is None else hooks.valid_T
      x, probs, state = self.mix(x, positions_T, keep_T, hooks, keys[:2], state)
    x = x + self.drop(self.ffn(self.norm_ffn(x)), self.m.dropout, keys[2])
    return x, dataclasses.replace(io, probs=probs, state=state)

  def fast_state(self) -> dict:
    """One context's carried memory state (titans_mac; dba_jax.hope.memstate saves and loads it)."""
    return {"titans": self.memory.fast_state()}

  def decode_state(self, batch: int, max_len: int) -> dict:
    """One layer's decoding state, zeros (valid for every layer: memories are deltas from M_0): the tokens read "n",
    the memory's; MAG / MAL also a ring "k", "v" [B, min(titans_window, max_len), K, D] of the last keys."""
    dtype = jnp.dtype(self.m.compute_dtype)
    st = {"n": jnp.zeros((batch,), jnp.int32),
          "memory": self.memory.decode_state(batch, jnp.promote_types(dtype, jnp.float32))}
    if self.has_attention:
      a = self.attn
      kv = jnp.zeros((batch, min(self.m.hope.titans_window, max_len), a.K, a.D), dtype)
      st["k"], st["v"] = kv, kv
    return st

  def decode(self, x_B1d, positions_T, state: dict):
    """One token through the mixing sublayers: (x, state with "decode" moved by one token). A carried "titans"
    memory (titans_mac continuing a memstate) is the memory the token reads and stores into."""
    dec = dict(state["decode"])
    if "titans" in state:
      dec["memory"] = {**dec["memory"], **state["titans"]}
    x, dec = self.mix_token(x_B1d, positions_T, dec)
    state = {**state, "decode": {**dec, "n": dec["n"] + 1}}
    if "titans" in state:
      state["titans"] = {k: dec["memory"][k] for k in state["titans"]}
    return x, state

  def window_attention(self, u_BTd, positions_T, hooks):
    """Sliding-window attention of the normed u over [persistent ; u] (MAG, MAL)."""
    return self.attn(u_BTd, positions_T, ((u_BTd, positions_T),), hooks, window=self.m.hope.titans_window)

  def window_token(self, u_B1d, positions_T, dec: dict):
    """One token's sliding-window attention: its key and value go to ring slot n mod R, and it sees every slot
    written so far (the last R = min(titans_window, max_len) tokens, its own included). (y, dec)."""
    q, k, v = self.attn.heads(u_B1d, positions_T)
    n, R = dec["n"], dec["k"].shape[1]
    dec = {**dec, "k": _put(dec["k"], k, n % R), "v": _put(dec["v"], v, n % R)}
    visible = (jnp.arange(R)[None] <= n[:, None]) | (n[:, None] >= R)
    return self.attn.cached(q, dec["k"], dec["v"], visible), dec


class MAG(TitansBlock):
  """Memory as a gate: sliding-window attention and the memory on the same normed input, probs [B, H, T, P + T]."""

  def __init__(self, m, rngs: nnx.Rngs, parts: Parts):
    super().__init__(m, rngs, parts)
    self.gate = OutputGate(m, parts, self.out_std, rngs)

  def mix(self, x, positions_T, keep_T, hooks, keys, state=None):
    u = self.norm_attn(x)
    y, probs = self.window_attention(u, positions_T, hooks)
    return x + self.drop(self.gate(y, self.memory(u, keep_T)), self.m.dropout, keys[0]), probs, None

  def mix_token(self, x, positions_T, dec):
    u = self.norm_attn(x)
    y, dec = self.window_token(u, positions_T, dec)
    r, dec["memory"] = self.memory.step(dec["memory"], u, dec["n"])
    return x + self.gate(y, r.astype(u.dtype)), dec


class LMM(TitansBlock):
  """The memory alone (the paper's LMM): x + W_o M(norm x), then the MLP sublayer; no attention, no probs. With the
  memory off every read is M_0's of the conv's q: each position sees only its titans_conv − 1 previous tokens per
  layer (titans_conv = 0: a per-token MLP stack)."""
  has_attention = False

  def __init__(self, m, rngs: nnx.Rngs, parts: Parts):
    super().__init__(m, rngs, parts)
    self.norm_mem = _norm(m, parts)
    self.wo_mem = parts.linear(m.d_model, m.d_model, ("heads", "embed"), bias=m.bias, std=self.out_std, rngs=rngs)

  def memory_layer(self, x, keep_T, key):
    return x + self.drop(self.wo_mem(self.memory(self.norm_mem(x), keep_T)), self.m.dropout, key)

  def memory_token(self, x, dec):
    r, dec["memory"] = self.memory.step(dec["memory"], self.norm_mem(x), dec["n"])
    return x + self.wo_mem(r.astype(x.dtype)), dec

  def mix(self, x, positions_T, keep_T, hooks, keys, state=None):
    return self.memory_layer(x, keep_T, keys[0]), None, None

  def mix_token(self, x, positions_T, dec):
    return self.memory_token(x, dec)


class MAL(LMM):
  """Memory as a layer: x + W_o M(norm x), then sliding-window attention, probs [B, H, T, P + T]."""
  has_attention = True

  def mix(self, x, positions_T, keep_T, hooks, keys, state=None):
    x = self.memory_layer(x, keep_T, keys[0])
    y, probs = self.window_attention(self.norm_attn(x), positions_T, hooks)
    return x + self.drop(y, self.m.dropout, keys[1]), probs, None

  def mix_token(self, x, positions_T, dec):
    x, dec = self.memory_token(x, dec)
    y, dec = self.window_token(self.norm_attn(x), positions_T, dec)
    return x + y, dec


class MAC(TitansBlock):
  """Memory as context, segment by segment (a lax.scan): retrieve with the memory as of the previous segment's end,
  attend over [persistent ; norm(h) ; segment], store the attention output, gate it with the memory's read of it.
  probs [B, H, T, P + 2·titans_window]: each query's row over its own segment's keys."""

  def __init__(self, m, rngs: nnx.Rngs, parts: Parts):
    super().__init__(m, rngs, parts)
    self.norm_h = _norm(m, parts)
    self.gate = OutputGate(m, parts, self.out_std, rngs)

  def _positions(self, offset, positions_T):
    """Rotary positions of segment offsets: the offsets themselves (titans_positions = segment) or positions_T."""
    return offset if self.m.hope.titans_positions == "segment" else positions_T

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
    pos_NW = self._positions(jnp.broadcast_to(jnp.arange(Ws), (n, Ws)),
                             jnp.concatenate([positions_T, positions_T[-1] + 1 + jnp.arange(pad)]).reshape(n, Ws))
    keep_NW = jnp.pad(keep_T, (0, pad)).reshape(n, Ws)
    causal = jnp.tril(jnp.ones((Ws, Ws), bool))
    visible = jnp.concatenate([jnp.ones((Ws, P), bool), causal, causal], axis=1)[None]

    def segment(carry, xs):
      W, S = carry
      u_s, q_s, pos_s, keep_s = xs
      h = self.norm_h(self.memory.read(W, q_s).astype(u_s.dtype))
      y, probs = self.attn(u_s, pos_s, ((h, pos_s), (u_s, pos_s)), hooks, visible=visible)
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

  def decode_state(self, batch: int, max_len: int) -> dict:
    """The shared state (no ring) plus the segment's: keys and values of h and u ("kh", "vh", "ku", "vu"
    [B, min(titans_window, max_len), K, D]), M − M_0 at the segment start ("dWs"), the tail of u's q conv."""
    st = {k: v for k, v in super().decode_state(batch, max_len).items() if k not in ("k", "v")}
    a, dtype = self.attn, jnp.dtype(self.m.compute_dtype)
    kv = jnp.zeros((batch, min(self.m.hope.titans_window, max_len), a.K, a.D), dtype)
    st.update(kh=kv, vh=kv, ku=kv, vu=kv, dWs=dict(st["memory"]["dW"]))
    tail = self.memory.conv_tail(batch, 1, st["memory"]["S"]["w0"].dtype)
    return st if tail is None else {**st, "conv_q": tail}

  def mix_token(self, x, positions_T, dec):
    """One token at segment offset o = n mod titans_window: a segment's first token restarts the convs and freezes
    the memory it retrieves with; keys go to slot o and the query sees slots 0 .. o."""
    n = dec["n"]
    o = n % self.m.hope.titans_window
    start = o == 0
    u = self.norm_attn(x)
    q = self.memory.qkv(u, slice(0, 1), None if "conv_q" not in dec else
                        jnp.where(_rows(start, dec["conv_q"]), 0, dec["conv_q"]))
    if "conv_q" in dec:
      q, dec["conv_q"] = q
    mem = dec["memory"]
    dec["dWs"] = _pick(start, mem["dW"], dec["dWs"])
    h = self.norm_h(self.memory.read(self.memory.weights(dec["dWs"]), q["q"]).astype(u.dtype))
    pos = self._positions(o[:1], positions_T)  # rows read in step: row 0's offset is every row's
    a = self.attn
    q_a, k_u, v_u = a.heads(u, pos)
    k_h, v_h = a._heads(a.wk, h, a.K, pos), a._heads(a.wv, h, a.K, None)
    for name, new in (("kh", k_h), ("vh", v_h), ("ku", k_u), ("vu", v_u)):
      dec[name] = _put(dec[name], new, o)
    seen = jnp.arange(dec["ku"].shape[1])[None] <= o[:, None]
    y = a.cached(q_a, jnp.concatenate([dec["kh"], dec["ku"]], 1), jnp.concatenate([dec["vh"], dec["vu"]], 1),
                 jnp.concatenate([seen, seen], 1))
    r, dec["memory"] = self.memory.step(mem, y, n, reset_B=start)
    return x + self.gate(y, r), dec
