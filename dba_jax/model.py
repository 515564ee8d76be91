"""The decoder: one Flax NNX module tree whose parts are chosen by config.

Parameters carry logical axis names in their `axes` metadata (mapped to mesh axes by `mesh.LOGICAL_RULES`).
Training is pure-functional: `graphdef, params = split(model)` once, then `nnx.merge(graphdef, params)` inside
the jitted step, with `params` a plain nested dict of arrays. `Decoder.forward` is the only forward pass: decoding,
pruning, attention probes and memory blocks reach into it through the extension points of dba_jax/layers.py
(Hooks, LayerIO).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dba_jax import ops
from dba_jax.hope.blocks import HopeBlock
from dba_jax.hope.selfmod import HybridBlock, SelfModBlock
from dba_jax.hope import titans_blocks
from dba_jax.layers import ACT_EMBED, Hooks, LayerIO, NO_HOOKS, dense, normal_init
from dba_jax.ops import selective
from dba_jax.mesh import constrain
from dba_jax.config import Config, attn_dim, kv_heads, padded_vocab

ACT_HEADS = ops.ACT_HEADS
NO_AUX = jnp.zeros((2,), jnp.float32)  # a layer's (paper, repo) memory penalties when none is computed
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


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


def stream_names(m: Config) -> tuple[str, ...]:
  """The per-token streams a cache stores for this model (after RoPE), in this order."""
  return ("k_sem", "k_geo", "v") if m.attn_kind == "dba" else ("k", "v")


def check_cacheable(m: Config):
  """Cached decoding (and slot eviction) supports plain, DBA and head-selection selective attention."""
  if m.attn_kind == "selective":
    extras = {"sel_mask_heads": m.sel_mask_heads, "sel_combo": m.sel_combo != "none",
              "sel_latent_masks": m.sel_latent_masks, "sel_residual_masks": m.sel_residual_masks,
              "sel_protection": m.sel_protection != "none"}
    bad = [k for k, v in extras.items() if v]
    if bad:
      raise NotImplementedError(f"cached decoding supports the default head selection only; not {', '.join(bad)}")


def _through_cache(hooks: Hooks, io: LayerIO, new: dict, positions_T):
  """(streams to attend over, (key positions [B, S], visibility [B, T, S]) or None, io with the new state)."""
  if hooks.cache is None:
    return new, None, io
  state, streams, k_pos_BS = hooks.cache.update(io.state, new, positions_T, hooks.valid_T)
  return streams, (k_pos_BS, ops.positions_mask(positions_T, k_pos_BS)), dataclasses.replace(io, state=state)


def _unroll(m: Config):
  """lax.scan's unroll for the layer scan: model.scan_unroll layers per loop iteration (0: all of them)."""
  u = int(m.get("scan_unroll", 1))
  return True if u == 0 or u >= m.n_layers else u


def _aux(io: LayerIO):
  return NO_AUX if io.aux is None else io.aux


def _no_keep_hook(hooks: Hooks, kind: str):
  if hooks.keep_fn is not None:
    raise NotImplementedError(f"the key keep hook needs selective attention's F; {kind} attention has none")


class StandardAttention(nnx.Module):
  """MHA / GQA / bottleneck (attn_dim < d_model). q, k, v are separate kernels so tensor parallelism splits
  whole heads; PyTorch's fused [q | k | v] weight is split on conversion."""

  def __init__(self, m: Config, out_std: float, rngs: nnx.Rngs, extra_heads: int = 0):
    self.m = m
    self.H, self.K = m.n_heads, kv_heads(m)
    self.D = attn_dim(m) // self.H
    # Selective attention's dedicated selection heads add q/k/v heads whose outputs never reach `out`.
    self.Hp, self.Kp = self.H + extra_heads, self.K + extra_heads
    lin = lambda n, axes: Linear(m.d_model, n * self.D, axes, bias=m.bias, std=m.init_std, rngs=rngs)
    self.q, self.k, self.v = lin(self.Hp, ("embed", "heads")), lin(self.Kp, ("embed", "kv_heads")), \
        lin(self.Kp, ("embed", "kv_heads"))
    self.out = Linear(self.H * self.D, m.d_model, ("heads", "embed"), bias=m.bias, std=out_std, rngs=rngs)
    self.scale = 1.0 / self.D if m.mup else self.D ** -0.5  # muP: attn_mult 1/d_head

  def __call__(self, x_BTd, positions_T, io: LayerIO = LayerIO(), hooks: Hooks = NO_HOOKS):
    """(output [B, T, d], io with this layer's aux, residual logits, cache state and probabilities)."""
    B, T, _ = x_BTd.shape
    q_BTHD, k_BTKD, v_BTKD = self.project(x_BTd, positions_T)
    tap("q", q_BTHD), tap("k", k_BTKD), tap("v", v_BTKD)
    if _TAPS is not None and self.Hp == self.Kp:  # the logits are only materialised for the coordinate check
      tap("attn_score", jnp.einsum("bthd,bshd->bhts", q_BTHD, k_BTKD) * self.scale)
    kv, keys, io = _through_cache(hooks, io, {"k": k_BTKD, "v": v_BTKD}, positions_T)
    o_BTHD, io = self.attend(q_BTHD, kv["k"], kv["v"], positions_T, keys, io, hooks)
    return self.out(o_BTHD.reshape(B, T, self.H * self.D)), io

  def project(self, x_BTd, positions_T):
    """q [B, T, Hp, D], k, v [B, T, Kp, D], RoPE applied."""
    B, T, _ = x_BTd.shape
    H, K, D = self.Hp, self.Kp, self.D
    q_BTHD = constrain(self.q(x_BTd).reshape(B, T, H, D), ACT_HEADS)
    k_BTKD = constrain(self.k(x_BTd).reshape(B, T, K, D), ACT_HEADS)
    v_BTKD = constrain(self.v(x_BTd).reshape(B, T, K, D), ACT_HEADS)
    if self.m.positions == "rope":
      q_BTHD = ops.apply_rope(q_BTHD, positions_T, self.m.rope_base)
      k_BTKD = ops.apply_rope(k_BTKD, positions_T, self.m.rope_base)
    return q_BTHD, k_BTKD, v_BTKD

  def attend(self, q_BTHD, k_BSKD, v_BSKD, positions_T, keys, io: LayerIO, hooks: Hooks):
    _no_keep_hook(hooks, "standard")
    o = ops.attention(q_BTHD, k_BSKD, v_BSKD, scale=self.scale, mask=None if keys is None else keys[1],
                      return_probs=hooks.return_probs, impl=self.m.attn_impl)
    if hooks.return_probs:
      o, probs = o
      io = dataclasses.replace(io, probs=probs)
    return o, io


class SelectiveAttention(StandardAttention):
  """Standard attention whose logits lose the selection mask F (dba_jax.ops.selective); `aux` is the layer's
  memory penalty when one is configured. Like the original, its out projection keeps the plain init std."""

  def __init__(self, m: Config, out_std: float, rngs: nnx.Rngs):
    super().__init__(m, m.init_std, rngs, extra_heads=m.sel_mask_heads)
    self.spec = selective.SelectiveSpec.from_config(m)
    H = self.Hp
    # "with_head_zero": Linear(heads -> 1) over all heads' logits, one-hot on head 0 (= the default at init);
    # "_and_bias" adds a bias with PyTorch's default-uniform init, as the original's early return left it.
    combo = m.sel_combo != "none"
    bias = jax.random.uniform(rngs.params(), (), jnp.float32, -H ** -0.5, H ** -0.5) \
        if m.sel_combo == "with_head_zero_and_bias" else jnp.zeros((), jnp.float32)
    self.sel_combo_w = nnx.Param(jnp.zeros((H,), jnp.float32).at[0].set(1.0), axes=(None,)) if combo else None
    self.sel_combo_b = nnx.Param(bias, axes=()) if combo else None
    combo_w = combo_b = None
    if m.sel_protection == "linear_combo":  # Linear(heads -> 1): N(0, 0.02) weights, zero bias
      combo_w, combo_b = normal_init(rngs, (H,), 0.02), jnp.zeros((), jnp.float32)
    elif m.sel_protection == "linear_combo_head_two":  # one-hot on head 1; PyTorch's default-uniform bias
      combo_w = jnp.zeros((H,), jnp.float32).at[1].set(1.0)
      combo_b = jax.random.uniform(rngs.params(), (), jnp.float32, -H ** -0.5, H ** -0.5)
    self.protect_w = nnx.Param(combo_w, axes=(None,)) if combo_w is not None else None
    self.protect_b = nnx.Param(combo_b, axes=()) if combo_b is not None else None
    # "n_latent_masks": Linear(n latents -> attending heads) with bias, in the selection-head lr group.
    n, A = m.sel_latent_masks, m.n_heads
    if n:
      w = {"normal": lambda: normal_init(rngs, (n, A), 0.02), "identity": lambda: jnp.ones((n, A), jnp.float32),
           "inverse": lambda: jnp.full((n, A), 1.0 / n, jnp.float32)}[m.sel_latent_init]()
    self.sel_latent_w = nnx.Param(w, axes=(None, None)) if n else None
    self.sel_latent_b = nnx.Param(jnp.zeros((A,), jnp.float32), axes=(None,)) if n else None
    # "residual_attention_masks": Linear(heads -> heads), no bias, over the previous layer's logits.
    self.res_mix = nnx.Param(normal_init(rngs, (H, H), 0.02), axes=(None, None)) if m.sel_residual_masks else None

  def weights(self) -> selective.Weights:
    pair = lambda w, b: None if w is None else (w[...], b[...])
    return selective.Weights(pair(self.sel_combo_w, self.sel_combo_b), pair(self.protect_w, self.protect_b),
                             pair(self.sel_latent_w, self.sel_latent_b))

  def attend(self, q_BTHD, k_BSKD, v_BSKD, positions_T, keys, io: LayerIO, hooks: Hooks):
    m = self.m
    if keys is not None:  # cached decoding: F rows from the carried column sums
      _no_keep_hook(hooks, "cached selective")
      valid_T = jnp.ones(positions_T.shape, bool) if hooks.valid_T is None else hooks.valid_T
      o, f, colsum = selective.cached_attention(
          q_BTHD, k_BSKD, v_BSKD, self.spec, scale=self.scale, mask_BTS=keys[1], q_pos_T=positions_T,
          k_pos_BS=keys[0], valid_T=valid_T, colsum_BS=io.state["colsum"], return_probs=hooks.return_probs)
      probs = None
      if hooks.return_probs:
        o, probs = o
      return o, dataclasses.replace(io, state={**io.state, "colsum": colsum}, probs=probs)
    residual = None
    if self.res_mix is not None:
      residual = jnp.einsum("bgts,gh->bhts", io.res, self.res_mix[...].astype(io.res.dtype))
    r = selective.apply(q_BTHD, k_BSKD, v_BSKD, self.spec, scale=self.scale, weights=self.weights(),
                        residual_BHTS=residual, keep_fn=hooks.keep_fn, return_mask=m.memory_penalty != "none",
                        return_probs=hooks.return_probs, impl=m.attn_impl)
    aux = None
    if m.memory_penalty != "none":
      aux = jnp.stack([selective.memory_penalty_paper(r.f, m.memory_tau),
                       selective.memory_penalty_repo(r.f, m.memory_tau)]).astype(jnp.float32)
    res = r.residual if self.res_mix is not None else io.res
    return r.out, dataclasses.replace(io, aux=aux, res=res, probs=r.probs if hooks.return_probs else None)


class DBAAttention(nnx.Module):
  """Decoupled bottleneck attention (dba.md §1.2–1.8; the math is dba_jax.ops.dba).

  score = a_h <q_sem, k_sem>/sqrt(d_sem) + b_h <RoPE q_geo, RoPE k_geo>/sqrt(d_geo); a = 2 sigmoid(gate), b = 2 - a
  (a = b = 1 ungated). A KV cache holds unscaled k_sem, RoPE'd k_geo and v.
  """

  def __init__(self, m: Config, out_std: float, rngs: nnx.Rngs):
    self.m = m
    H, K = m.n_heads, kv_heads(m)
    self.H, self.K = H, K
    self.ds, self.dg, self.dv = m.sem_dim // H, m.geo_dim // H, attn_dim(m) // H
    lin = lambda d_out, axes, std=m.init_std: Linear(m.d_model, d_out, axes, bias=m.bias, std=std, rngs=rngs)
    self.q_sem = lin(H * self.ds, ("embed", "heads"))
    self.k_sem = None if m.tie_qk else lin(K * self.ds, ("embed", "kv_heads"))
    self.q_geo = lin(H * self.dg, ("embed", "heads"))
    self.k_geo = lin(K * self.dg, ("embed", "kv_heads"))
    self.v = lin(K * self.dv, ("embed", "kv_heads"))
    self.out = Linear(H * self.dv, m.d_model, ("heads", "embed"), bias=m.bias, std=out_std, rngs=rngs)
    self.gate_logit = nnx.Param(jnp.zeros((H,), jnp.float32), axes=("heads",)) if m.dba_gate else None
    self.gate_proj = lin(H, ("embed", "heads"), std=0.0) if m.dba_gate_dynamic else None
    if m.null_attn:
      self.k_sem_null = nnx.Param(normal_init(rngs, (K, self.ds), m.init_std), axes=("kv_heads", None))
      self.k_geo_null = nnx.Param(normal_init(rngs, (K, self.dg), m.init_std), axes=("kv_heads", None))
      self.v_null = nnx.Param(normal_init(rngs, (K, self.dv), m.init_std), axes=("kv_heads", None))

  def streams(self, x_BTd, positions_T):
    """q_sem, k_sem, q_geo, k_geo (RoPE'd), v per head, before any scaling."""
    B, T, _ = x_BTd.shape
    H, K = self.H, self.K
    qs = self.q_sem(x_BTd).reshape(B, T, H, self.ds)
    if self.m.tie_qk:  # only valid with H == K; checked by shape on reshape
      ks = self.q_sem(x_BTd).reshape(B, T, K, self.ds)
    else:
      ks = self.k_sem(x_BTd).reshape(B, T, K, self.ds)
    qg = self.q_geo(x_BTd).reshape(B, T, H, self.dg)
    kg = self.k_geo(x_BTd).reshape(B, T, K, self.dg)
    v = self.v(x_BTd).reshape(B, T, K, self.dv)
    qs, ks, qg, kg, v = (constrain(t, ACT_HEADS) for t in (qs, ks, qg, kg, v))
    if self.m.positions == "rope":
      rope = lambda t: ops.apply_rope(t, positions_T, self.m.rope_base)
      qg, kg = rope(qg), rope(kg)
      if self.m.rope_semantic:
        qs, ks = rope(qs), rope(ks)
    return qs, ks, qg, kg, v

  def path_weights(self, x_BTd):
    """(a, b) per query and head, [B, T, H, 1] or scalars: the semantic and geometric score weights."""
    if self.gate_logit is None:
      return 1.0, 1.0
    ft = jnp.promote_types(x_BTd.dtype, jnp.float32)  # the gate is computed in (at least) float32
    logit = self.gate_logit[...].astype(ft)[None, None, :]  # [1, 1, H]
    if self.gate_proj is not None:
      logit = logit + self.gate_proj(x_BTd).astype(ft)
    a = 2.0 * jax.nn.sigmoid(logit)
    return a.astype(x_BTd.dtype)[..., None], (2.0 - a).astype(x_BTd.dtype)[..., None]

  def null_kv(self, dtype):
    """(k [K, d_sem + d_geo], v [K, d_v]) of the always-visible null token, or None without null_attn."""
    if not self.m.null_attn:
      return None
    null_k = jnp.concatenate([self.k_sem_null[...], self.k_geo_null[...]], axis=-1).astype(dtype)
    return null_k, self.v_null[...].astype(dtype)

  def __call__(self, x_BTd, positions_T, io: LayerIO = LayerIO(), hooks: Hooks = NO_HOOKS):
    _no_keep_hook(hooks, "DBA")
    B, T, _ = x_BTd.shape
    qs, ks, qg, kg, v = self.streams(x_BTd, positions_T)
    kv, keys, io = _through_cache(hooks, io, {"k_sem": ks, "k_geo": kg, "v": v}, positions_T)
    a, b = self.path_weights(x_BTd)
    p = -1.0 if self.m.mup else -0.5  # muP: attn_mult 1/d per path
    o = ops.dba_attention(qs, kv["k_sem"], qg, kv["k_geo"], kv["v"], sem_scale=self.ds ** p, geo_scale=self.dg ** p,
                          sem_weight=a, geo_weight=b, null=self.null_kv(ks.dtype),
                          mask=None if keys is None else keys[1], return_probs=hooks.return_probs,
                          impl=self.m.attn_impl)
    if hooks.return_probs:
      o, probs = o
      io = dataclasses.replace(io, probs=probs)
    return self.out(o.reshape(B, T, self.H * self.dv)), io


ATTENTION_KINDS = {"standard": StandardAttention, "dba": DBAAttention, "selective": SelectiveAttention}


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). The only place the block math lives."""

  def __init__(self, m: Config, rngs: nnx.Rngs):
    out_std = m.init_std / math.sqrt(2 * m.n_layers) if m.scale_residual_init else m.init_std
    self.dropout = m.dropout
    self.attn_norm = Norm(m.d_model, m.norm, m.norm_eps, m.bias)
    self.attn = ATTENTION_KINDS[m.attn_kind](m, out_std, rngs)
    self.mlp_norm = Norm(m.d_model, m.norm, m.norm_eps, m.bias)
    self.mlp = MLP(m, out_std, rngs)

  def __call__(self, x, positions_T, rng=None, io: LayerIO = LayerIO(), hooks: Hooks = NO_HOOKS):
    """(x, io): io.aux the layer's memory penalties [paper, repo] (zeros unless one is configured), io.res the
    logits residual_attention_masks hands to the next layer, io.state this layer's updated cache state."""
    keys = jax.random.split(rng, 2) if rng is not None else (None, None)
    x = constrain(x, ACT_EMBED)
    y, io = self.attn(self.attn_norm(x), positions_T, io, hooks)
    x = x + _dropout(tap("attn", y), self.dropout, keys[0])
    return x + _dropout(tap("mlp", self.mlp(self.mlp_norm(x))), self.dropout, keys[1]), io


BLOCKS = {"pre_norm": Block, "hope_attention": HopeBlock, "hope_transformer": HopeBlock,
          "hope_selfmod": SelfModBlock, "hope_hybrid": HybridBlock,
          # the Titans blocks build on this module's layers, handed in (dba_jax.hope never imports the model)
          **titans_blocks.registry(Norm, MLP, Linear, lambda x, rate, key: _dropout(x, rate, key))}


# Logical axes that grow with model width (muP's "infinite" dimensions); head_dim stays fixed.
WIDTH_AXES = ("embed", "heads", "kv_heads", "mlp")


def mup_matrix_like(axes: tuple) -> bool:
  """muP's matrix-like parameters: two width-growing dims (hidden weights). The rest are vector-like."""
  return sum(a in WIDTH_AXES for a in axes) >= 2


def _mup_init(decoder, m):
  """Matrix-like weights drawn with std / sqrt(width_mult) (scaling a normal draw is the same thing);
  `mup_zero_query` zeroes the query projections."""
  width_mult = m.d_model / m.mup_base_d_model
  for path, var in nnx.to_flat_state(nnx.state(decoder, nnx.Param)):
    axes = tuple(var.get_metadata()["axes"])
    if m.mup_zero_query and len(path) > 1 and path[-2] in ("q", "q_sem", "q_geo") and path[-1] == "kernel":
      var.set_value(jnp.zeros_like(var.get_value()))
    elif mup_matrix_like(axes):
      var.set_value(var.get_value() * width_mult ** -0.5)


# Coordinate-check taps: mean |activation| per named site, recorded only inside `record_taps()` (unrolled layers).
_TAPS: list | None = None


def tap(name: str, x):
  if _TAPS is not None:
    _TAPS.append((name, jnp.abs(x.astype(jnp.float32)).mean()))
  return x


class record_taps:
  """with record_taps() as taps: model(tokens) -> taps = [(name, mean |x|), ...] in call order."""

  def __enter__(self):
    global _TAPS
    _TAPS = []
    return _TAPS

  def __exit__(self, *exc):
    global _TAPS
    _TAPS = None


def _dropout(x, rate, key):
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Output(NamedTuple):
  logits: jax.Array
  aux: dict
  cache_state: Any = None
  probs: Any = None
  hidden: Any = None  # the last block's output (the final norm's input) [B, T, d]


class Decoder(nnx.Module):
  """Token embedding -> [positions] -> blocks (scanned or unrolled) -> norm -> head. Returns padded-vocab logits."""

  def __init__(self, m: Config, rngs: nnx.Rngs):
    m = ml_collections.FrozenConfigDict(m)  # hashable, so it can live in the (static) graphdef
    self.m = m
    V = padded_vocab(m)
    self.embed = nnx.Param(normal_init(rngs, (V, m.d_model), m.init_std), axes=("vocab", "embed"))
    learned = m.positions == "learned"
    self.pos_embed = nnx.Param(normal_init(rngs, (m.max_seq_len, m.d_model), m.init_std), axes=(None, "embed")) \
        if learned else None
    if m.scan_layers:
      # Build one Block per key under vmap: every parameter gets a leading "layers" axis.
      keys = jax.random.split(rngs.params(), m.n_layers)
      block = BLOCKS[m.block]
      graphdef = nnx.graphdef(nnx.eval_shape(lambda: block(m, nnx.Rngs(0))))
      stacked = jax.vmap(lambda k: nnx.state(block(m, nnx.Rngs(k))))(keys)
      self.blocks = nnx.merge(graphdef, stacked)
    else:
      self.blocks = nnx.List([BLOCKS[m.block](m, rngs) for _ in range(m.n_layers)])
    self.final_norm = Norm(m.d_model, m.norm, m.norm_eps, m.bias)
    self.head = None if m.tie_embeddings else Linear(m.d_model, V, ("embed", "vocab"), bias=False,
                                                     std=m.init_std, rngs=rngs)
    if m.mup:
      _mup_init(self, m)

  def __call__(self, tokens_BT, rng=None):
    return self.forward(tokens_BT, rng).logits

  def forward(self, tokens_BT, rng=None, *, positions_T=None, hooks: Hooks = NO_HOOKS, cache_state=None,
              logits_at=None, embeds_BPd=None) -> "Output":
    """The forward pass, the one every caller runs (training, evaluation, decoding, pruning, probes).

    positions_T: absolute positions of the tokens (default 0..T-1; a decoding chunk starts later).
    hooks, cache_state: the extension points above; cache_state is every layer's state stacked [L, ...].
    logits_at: read out only this position (a traced index): logits [B, padded vocab].
    embeds_BPd: input embeddings placed before the tokens' (LatentWire's soft tokens); positions_T, logits and
    hidden then cover P + T positions.
    Returns Output(logits, aux, cache_state, probs [L, B, H, T, S] with hooks.return_probs); aux holds both
    memory-penalty forms, {"memory_paper": mean over layers, "memory_repo": sum over layers} (zeros unless
    model.memory_penalty is set)."""
    m = self.m
    dtype = DTYPES[m.compute_dtype]
    T = tokens_BT.shape[1] + (0 if embeds_BPd is None else embeds_BPd.shape[1])
    positions_T = jnp.arange(T) if positions_T is None else positions_T
    x = self.embed_tokens(tokens_BT, positions_T, embeds_BPd)
    use_rng = rng is not None and m.dropout > 0
    if use_rng:
      rng, k = jax.random.split(rng)
      x = _dropout(x, m.dropout, k)
    layer_keys = jax.random.split(rng, m.n_layers) if use_rng else None
    tap("embed", x)
    res = None
    if m.attn_kind == "selective" and m.sel_residual_masks:  # layer 0 mixes zeros
      res = jnp.zeros((x.shape[0], m.n_heads + m.sel_mask_heads, T, T), jnp.promote_types(dtype, jnp.float32))
    if m.scan_layers:
      graphdef, stacked = nnx.split(self.blocks)

      def body(carry, xs):
        (h, r), (params, key, state) = carry, xs
        h, io = nnx.merge(graphdef, params)(h, positions_T, key, LayerIO(res=r, state=state), hooks)
        return (h, io.res), (_aux(io), io.state, io.probs)

      # scan_unroll: the same stacked parameters, the loop unrolled in the program (XLA CPU runs a rolled
      # loop's backward far slower: issue 16)
      (x, _), (aux_L, cache_state, probs) = jax.lax.scan(body, (x, res), (stacked, layer_keys, cache_state),
                                                         unroll=_unroll(m))
      aux = aux_L.sum(0)
    else:
      aux, states, probs = NO_AUX, [], []
      for i, block in enumerate(self.blocks):
        state = None if cache_state is None else jax.tree.map(lambda a, i=i: a[i], cache_state)
        x, io = block(x, positions_T, None if layer_keys is None else layer_keys[i], LayerIO(res=res, state=state),
                      hooks)
        aux, res = aux + _aux(io), io.res
        states.append(io.state)
        probs.append(io.probs)
      stack = lambda xs: None if xs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *xs)
      cache_state, probs = stack(states), stack(probs)
    # The paper's penalty is averaged over layers; the original code summed its own form (selective.md §3.8).
    aux = {"memory_paper": aux[0] / m.n_layers, "memory_repo": aux[1]}
    if logits_at is not None:
      return Output(self.readout(jax.lax.dynamic_slice_in_dim(x, logits_at, 1, axis=1))[:, 0], aux, cache_state,
                    probs, x)
    logits = self.readout(constrain(x, ACT_EMBED))
    return Output(constrain(tap("logits", logits), ("batch", "seq", "act_vocab")), aux, cache_state, probs, x)

  def embed_tokens(self, tokens_BT, positions_T, embeds_BPd=None):
    """Token (+ learned position) embeddings in the compute dtype, after `embeds_BPd` if given; positions_T are
    absolute positions."""
    dtype = DTYPES[self.m.compute_dtype]
    x = jnp.take(self.embed[...], tokens_BT, axis=0).astype(dtype)
    if embeds_BPd is not None:
      x = jnp.concatenate([embeds_BPd.astype(dtype), x], axis=1)
    if self.pos_embed is not None:
      x = x + jnp.take(self.pos_embed[...], positions_T, axis=0)[None].astype(dtype)
    return x

  def readout(self, x_BTd):
    """Final norm and head: padded-vocab logits."""
    m = self.m
    x = self.final_norm(x_BTd)
    if self.head is None:
      logits = dense(x, self.embed[...], transpose_w=True)
    else:
      logits = self.head(x)
    if m.mup:  # MuReadout: output / width_mult
      logits = logits * (m.mup_base_d_model / m.d_model)
    return logits


# ----------------------------------------------------------------------------------------------- functional API

def abstract(m: Config):
  """(graphdef, abstract param State) without allocating anything."""
  return nnx.split(nnx.eval_shape(lambda: Decoder(m, nnx.Rngs(0))))


def init_params(m: Config, key) -> dict:
  """Parameters as a plain nested dict of float32 arrays (jit this with out_shardings to place them)."""
  return nnx.to_pure_dict(nnx.state(Decoder(m, nnx.Rngs(key))))


def param_axes(m: Config, state=None) -> dict:
  """Logical axis names per parameter, as a nested dict mirroring the params. Scanned blocks get "layers" first."""
  state = abstract(m)[1] if state is None else state

  def axes(path, var):
    names = tuple(var.get_metadata()["axes"])
    if m.scan_layers and path[0] == "blocks":
      names = ("layers",) + names
    if len(names) != var.get_value().ndim:
      raise ValueError(f"parameter {'/'.join(map(str, path))}: axes {names} do not match shape {var.get_value().shape}")
    return names

  flat = {path: axes(path, var) for path, var in nnx.to_flat_state(state)}
  return _unflatten(flat)


def _unflatten(flat: dict) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return out


def count_params(m: Config) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract(m)[1]))


def kv_elems_per_token(m: Config) -> int:
  """K+V cache elements per token over all layers (DBA caches k_sem, k_geo, v; null tokens excluded)."""
  K, H = kv_heads(m), m.n_heads
  if m.attn_kind == "dba":
    per_layer = K * (m.sem_dim // H + m.geo_dim // H + attn_dim(m) // H)
  else:
    per_layer = 2 * K * (attn_dim(m) // H)
  return m.n_layers * per_layer


class Model:
  """A loaded model for users and notebooks: `model(tokens_BT) -> logits [B, T, padded vocab]`."""

  def __init__(self, config: Config, graphdef, params: dict):
    self.config, self.graphdef, self.params = config, graphdef, params
    self._apply = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))

  def __call__(self, tokens_BT):
    return self._apply(self.params, jnp.asarray(tokens_BT, jnp.int32))

  @property
  def module(self) -> Decoder:
    return nnx.merge(self.graphdef, self.params)
