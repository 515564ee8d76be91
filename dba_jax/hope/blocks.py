"""HOPE's blocks (others.md B.2) as Decoder blocks (model.block = hope_attention | hope_transformer).

  attention  post-norm: LN(x + W_o·attn(x)); fused W_qkv [d, 3, d], no biases, causal, no positions; optional
             q/k L2 norm and a causal depthwise conv before W_qkv.
  hope_attention    attention → CMS levels (dba_jax.hope.cms), fast state per batch row (`HopeBlock.cms`, reused
                    by the blocks in dba_jax.hope.selfmod)
  hope_transformer  attention → x + W2·GELU(W1·LN(x)) (hidden 4d, no biases): the original's baseline

The fast state travels in LayerIO.state (the cache extension point of the one forward pass), per layer:
  {"cms": [per level, leading batch axis]}                    read with meta + fast deltas
  + {"teach": [B, T, d], "gate": [B]}                         the update pass: returns the updated "cms"
  + {"probe": [B, T, d]}                                      added to the block output (per-layer teach signal)
  + {"decode": `decode_state()`}                              one-token decoding (dba_jax.hope.decode): x is one token,
                                                              attention reads the keys of its online chunk so far
The decode state of a HOPE block is all zeros at a chunk start (the driver resets it there): "k", "v" [B, C, H, D]
the chunk's keys and values, "n" [B] the tokens of the chunk already read, "conv" [B, w - 1, d] the last inputs of
the causal conv. The fast state beside it stays as of the chunk start (the driver's update pass moves it).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dba_jax import ops
from dba_jax.hope import cms
from dba_jax.layers import ACT_HEADS, Hooks, LayerIO, NO_HOOKS, dense, normal_init
from dba_jax.mesh import constrain


def conv_param(rngs: nnx.Rngs, w: int, d: int):
  """A causal depthwise conv's kernel [w, d] (torch Conv1d(d, d, w, groups=d) init U(±1/sqrt(w))); None if w = 0."""
  return nnx.Param(jax.random.uniform(rngs.params(), (w, d), jnp.float32, -w ** -0.5, w ** -0.5),
                   axes=(None, "embed")) if w else None


def causal_conv(x_BTd, kern_wd):
  """Causal depthwise conv: output t sees inputs t - w + 1 .. t (torch's left-padded Conv1d, groups=d)."""
  w, T = kern_wd.shape[0], x_BTd.shape[1]
  padded = jnp.pad(x_BTd, ((0, 0), (w - 1, 0), (0, 0)))
  kern = kern_wd.astype(x_BTd.dtype)
  return sum(padded[:, i:i + T] * cms.lead(kern[i], x_BTd) for i in range(w))


def conv_step(x_B1d, tail_BWd, kern_wd):
  """causal_conv of one token after `tail` (the w - 1 inputs before it; zeros at a call's start), summed in the same
  order: (output [B, 1, d], the new tail)."""
  window = jnp.concatenate([tail_BWd.astype(x_B1d.dtype), x_B1d], axis=1)
  kern = kern_wd.astype(x_B1d.dtype)
  return sum(window[:, i:i + 1] * cms.lead(kern[i], x_B1d) for i in range(kern.shape[0])), window[:, 1:]


def conv_tail(kern, batch: int, d: int, dtype) -> dict:
  """{"conv": zeros [B, w - 1, d]} for a conv kernel, {} without one."""
  return {} if kern is None else {"conv": jnp.zeros((batch, kern.shape[0] - 1, d), dtype)}


def cache_refused(hooks: Hooks):
  if hooks.cache is not None:
    raise NotImplementedError("HOPE blocks take no KV-cache hook: decode them with dba_jax.hope.decode."
                              "MemoryGenerator (`dba-eval generate` picks it for memory blocks)")
  if hooks.keep_fn is not None:
    raise NotImplementedError("HOPE blocks take no key keep hook (it needs selective attention's F)")


class PostNormAttention(nnx.Module):
  def __init__(self, m, rngs: nnx.Rngs):
    d, H = m.d_model, m.n_heads
    self.m, self.H, self.D = m, H, d // H
    self.qkv = nnx.Param(normal_init(rngs, (d, 3, d), m.init_std), axes=("embed", None, "heads"))
    self.out = nnx.Param(normal_init(rngs, (d, d), m.init_std), axes=("heads", "embed"))
    self.norm_scale = nnx.Param(jnp.ones((d,), jnp.float32), axes=("embed",))
    self.norm_bias = nnx.Param(jnp.zeros((d,), jnp.float32), axes=("embed",))
    self.conv = conv_param(rngs, m.hope.local_conv, d)

  def _impl(self) -> str:
    """The per-layer teach signal is an autograd inside the loss, so the loss's gradient differentiates attention's
    backward: Pallas kernels have no derivative of their backward (found compiling for TPU), so auto runs XLA."""
    teach = self.m.hope.teach == "per_layer" and self.m.block != "hope_transformer"  # step.TWO_PASS_BLOCKS
    return "xla" if teach and self.m.attn_impl == "auto" else self.m.attn_impl

  def _qkv(self, h_BTd):
    B, T, _ = h_BTd.shape
    qkv = dense(h_BTd, self.qkv[...])
    q, k, v = (constrain(qkv[:, :, i].reshape(B, T, self.H, self.D), ACT_HEADS) for i in range(3))
    if self.m.hope.qk_l2_norm:  # torch F.normalize: x / max(‖x‖, eps)
      q, k = (t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-6) for t in (q, k))
    return q, k, v

  def _out(self, x_BTd, o_BTHD):
    y = dense(o_BTHD.reshape(x_BTd.shape), self.out[...].astype(x_BTd.dtype))
    return cms.layernorm(x_BTd + y, self.norm_scale[...], self.norm_bias[...], self.m.norm_eps)

  def __call__(self, x_BTd, hooks: Hooks = NO_HOOKS):
    h = x_BTd
    if self.conv is not None:
      h = causal_conv(h, self.conv[...])
    q, k, v = self._qkv(h)
    o = ops.attention(q, k, v, scale=self.D ** -0.5, return_probs=hooks.return_probs, impl=self._impl())
    probs = None
    if hooks.return_probs:
      o, probs = o
    return self._out(x_BTd, o), probs

  def decode_state(self, batch: int, chunk: int) -> dict:
    """Zeros: the keys and values of `chunk` tokens, the tokens read, the conv's tail (the module docstring)."""
    dtype = jnp.dtype(self.m.compute_dtype)
    kv = jnp.zeros((batch, chunk, self.H, self.D), dtype)
    return {"k": kv, "v": kv, "n": jnp.zeros((batch,), jnp.int32),
            **conv_tail(self.conv, batch, self.m.d_model, dtype)}

  def decode(self, x_B1d, st: dict):
    """One token: its key and value go to slot n of the chunk's cache and its query reads slots 0 .. n (what the
    chunk's causal attention gives that token). (output [B, 1, d], state)."""
    h, st = x_B1d, dict(st)
    if self.conv is not None:
      h, st["conv"] = conv_step(h, st["conv"], self.conv[...])
    q, k, v = self._qkv(h)
    slots_BC = jnp.arange(st["k"].shape[1])[None] == st["n"][:, None]
    put = lambda buf, new: jnp.where(slots_BC[:, :, None, None], new.astype(buf.dtype), buf)
    st["k"], st["v"] = put(st["k"], k), put(st["v"], v)
    visible_B1C = (jnp.arange(st["k"].shape[1])[None] <= st["n"][:, None])[:, None]
    o = ops.attention(q, st["k"].astype(q.dtype), st["v"].astype(v.dtype), scale=self.D ** -0.5, mask=visible_B1C,
                      impl="xla")  # one query row: nothing for a fused kernel to save
    st["n"] = st["n"] + 1
    return self._out(x_B1d, o), st


class CMSLevel(nnx.Module):
  """One CMS level's meta parameters (cms.py names them)."""

  def __init__(self, d: int, hidden: int, std: float, bias: bool, rngs: nnx.Rngs):
    self.norm_scale = nnx.Param(jnp.ones((d,), jnp.float32), axes=("embed",))
    self.norm_bias = nnx.Param(jnp.zeros((d,), jnp.float32), axes=("embed",))
    self.w1 = nnx.Param(normal_init(rngs, (d, hidden), std), axes=("embed", "mlp"))
    self.w2 = nnx.Param(normal_init(rngs, (hidden, d), std), axes=("mlp", "embed"))
    self.b1 = nnx.Param(jnp.zeros((hidden,), jnp.float32), axes=("mlp",)) if bias else None
    self.b2 = nnx.Param(jnp.zeros((d,), jnp.float32), axes=("embed",)) if bias else None

  def params(self) -> dict:
    names = ("norm_scale", "norm_bias", "w1", "b1", "w2", "b2")
    return {n: getattr(self, n)[...] for n in names if getattr(self, n) is not None}


class HopeBlock(nnx.Module):
  """Post-norm attention, then CMS levels (hope_attention) or one static MLP level (hope_transformer)."""

  def __init__(self, m, rngs: nnx.Rngs):
    h = m.hope
    self.m = m
    self.attn = PostNormAttention(m, rngs)
    hidden = h.cms_hidden_mult * m.d_model
    if m.block != "hope_transformer":
      self.levels = nnx.List([CMSLevel(m.d_model, hidden, m.init_std, True, rngs) for _ in h.cms_periods])
    else:
      self.levels = nnx.List([CMSLevel(m.d_model, hidden, m.init_std, False, rngs)])

  def __call__(self, x, positions_T, rng=None, io: LayerIO = LayerIO(), hooks: Hooks = NO_HOOKS):
    cache_refused(hooks)
    a, probs, state = self.attend(x, io.state, hooks)
    y, state = self.cms(a, state, hooks)
    return y, dataclasses.replace(io, state=state, probs=probs)

  def attend(self, x, state, hooks: Hooks):
    """(attention output, probs, state): the chunk's attention, or one token's when the state holds "decode"."""
    x = constrain(x, ("batch", "seq", "act_embed"))
    if state is not None and "decode" in state:
      a, dec = self.attn.decode(x, state["decode"])
      return a, None, {**state, "decode": dec}
    return *self.attn(x, hooks), state

  def decode_state(self, batch: int, max_len: int) -> dict:
    """One layer's one-token decoding state (zeros, the module docstring): max_len is the online chunk, the most
    keys attention ever sees (dba_jax.hope.decode passes it)."""
    return self.attn.decode_state(batch, max_len)

  def cms(self, a_BTd, state, hooks: Hooks):
    """The CMS chain on a block's mixer output: (y, state). The state's "cms" entry is read (meta + fast deltas),
    updated when the state carries "teach" (the update pass), and "probe" is added to the output (per-layer teach
    signal). Blocks that put other memories before the CMS (selfmod, hybrid) call this last."""
    h = self.m.hope
    meta = [lv.params() for lv in self.levels]
    # δ is norm-clipped in training mode only, as the original; the transformer baseline's MLP never clips.
    clip = self.m.block != "hope_transformer" and hooks.training
    if state is None or "cms" not in state:
      y = cms.apply_levels(meta, None, a_BTd, clip)
    elif "teach" in state:
      valid = jnp.ones(a_BTd.shape[1], bool) if hooks.valid_T is None else hooks.valid_T
      gate = state["gate"] & h.memory & h.writes  # model.hope.memory=False: the fast weights never move (the baseline)
      run = lambda fast, a_, t_, g_: cms.online(meta, fast, a_, t_, valid, tuple(h.cms_periods), h.inner_lr,
                                                h.inner_opt, g_, clip, h.flush_partial, h.inner_beta)
      y, fast = jax.vmap(run)(state["cms"], a_BTd, state["teach"], gate)
      state = {**state, "cms": fast}
    else:
      y = jax.vmap(lambda fast, a_: cms.apply_levels(meta, fast, a_, clip))(state["cms"], a_BTd)
    if state is not None and "probe" in state:
      y = y + state["probe"].astype(y.dtype)
    return y, state

  def fast_state(self) -> dict:
    """One layer's zero fast state for one context (unbatched leaves). A block with more memories adds its keys."""
    return {"cms": cms.init_fast_state([lv.params() for lv in self.levels], self.m.hope.inner_opt)}


def first_block(m, decoder):
  """Layer 0's block (merged out of the stacked parameters when the layers are scanned)."""
  if m.scan_layers:
    graphdef, stacked = nnx.split(decoder.blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked))
  return decoder.blocks[0]


def init_fast_state(m, decoder, batch: int) -> dict:
  """Zero fast state for every layer and batch row: each block's `fast_state()` with leading [L, B] axes. Every
  layer starts at zero (fast weights are stored as deltas from the meta weights), so layer 0's template serves."""
  one = jax.eval_shape(first_block(m, decoder).fast_state)
  return jax.tree.map(lambda a: jnp.zeros((m.n_layers, batch) + a.shape, a.dtype), one)


def init_decode_state(m, decoder, batch: int, max_len: int) -> dict:
  """Every layer's one-token decoding state [L, B, ...]: layer 0's `decode_state(batch, max_len)` repeated (a
  block keeps learned starting values as deltas, so layer 0's start is every layer's)."""
  one = first_block(m, decoder).decode_state(batch, max_len)
  return jax.tree.map(lambda a: jnp.broadcast_to(a[None], (m.n_layers,) + a.shape), one)
