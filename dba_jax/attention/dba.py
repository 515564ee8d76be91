"""Decoupled bottleneck attention (dba.md §1.2–1.8): a semantic and a geometric (RoPE'd) score path, each with its
own narrow q/k width, over one value stream. Op: dba_jax.ops.dba. Config: model.dba."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dba_jax import ops
from dba_jax.attention.base import Kind, no_keep_hook, through_cache, with_probs
from dba_jax.configlib import Config, Field, Section, attn_dim, kv_heads, need
from dba_jax.layers import Hooks, LayerIO, Linear, NO_HOOKS, normal_init
from dba_jax.mesh import constrain

SECTION = Section(
    "DBA (model.attn_kind='dba')",
    sem_dim=Field(0, "semantic q/k width (all heads)", ge=0),
    geo_dim=Field(0, "geometric q/k width (all heads), RoPE'd", ge=0),
    gate=Field(False, "static per-head gate logit, init 0 (= ungated at init)"),
    gate_dynamic=Field(False, "zero-initialised Linear(d_model -> heads) added to the gate logit"),
    null_attn=Field(False, "learned per-head null key/value, always visible"),
    tie_qk=Field(False, "k_sem shares q_sem's weight"),
    rope_semantic=Field(False, "ablation: also rotate the semantic path"),
)


class DBAAttention(nnx.Module):
  """score = a_h <q_sem, k_sem>/sqrt(d_sem) + b_h <RoPE q_geo, RoPE k_geo>/sqrt(d_geo); a = 2 sigmoid(gate),
  b = 2 - a (a = b = 1 ungated). A KV cache holds unscaled k_sem, RoPE'd k_geo and v."""

  def __init__(self, m: Config, out_std: float, rngs: nnx.Rngs):
    self.m, s = m, m.dba
    H, K = m.n_heads, kv_heads(m)
    self.H, self.K = H, K
    self.ds, self.dg, self.dv = s.sem_dim // H, s.geo_dim // H, attn_dim(m) // H
    lin = lambda d_out, axes, std=m.init_std: Linear(m.d_model, d_out, axes, bias=m.bias, std=std, rngs=rngs)
    self.q_sem = lin(H * self.ds, ("embed", "heads"))
    self.k_sem = None if s.tie_qk else lin(K * self.ds, ("embed", "kv_heads"))
    self.q_geo = lin(H * self.dg, ("embed", "heads"))
    self.k_geo = lin(K * self.dg, ("embed", "kv_heads"))
    self.v = lin(K * self.dv, ("embed", "kv_heads"))
    self.out = Linear(H * self.dv, m.d_model, ("heads", "embed"), bias=m.bias, std=out_std, rngs=rngs)
    self.gate_logit = nnx.Param(jnp.zeros((H,), jnp.float32), axes=("heads",)) if s.gate else None
    self.gate_proj = lin(H, ("embed", "heads"), std=0.0) if s.gate_dynamic else None
    if s.null_attn:
      self.k_sem_null = nnx.Param(normal_init(rngs, (K, self.ds), m.init_std), axes=("kv_heads", None))
      self.k_geo_null = nnx.Param(normal_init(rngs, (K, self.dg), m.init_std), axes=("kv_heads", None))
      self.v_null = nnx.Param(normal_init(rngs, (K, self.dv), m.init_std), axes=("kv_heads", None))

  def streams(self, x_BTd, positions_T):
    """q_sem, k_sem, q_geo, k_geo (RoPE'd), v per head, before any scaling."""
    B, T, _ = x_BTd.shape
    H, K = self.H, self.K
    qs = self.q_sem(x_BTd).reshape(B, T, H, self.ds)
    if self.m.dba.tie_qk:  # only valid with H == K; checked by shape on reshape
      ks = self.q_sem(x_BTd).reshape(B, T, K, self.ds)
    else:
      ks = self.k_sem(x_BTd).reshape(B, T, K, self.ds)
    qg = self.q_geo(x_BTd).reshape(B, T, H, self.dg)
    kg = self.k_geo(x_BTd).reshape(B, T, K, self.dg)
    v = self.v(x_BTd).reshape(B, T, K, self.dv)
    qs, ks, qg, kg, v = (constrain(t, ops.ACT_HEADS) for t in (qs, ks, qg, kg, v))
    if self.m.positions == "rope":
      rope = lambda t: ops.apply_rope(t, positions_T, self.m.rope_base)
      qg, kg = rope(qg), rope(kg)
      if self.m.dba.rope_semantic:
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
    if not self.m.dba.null_attn:
      return None
    null_k = jnp.concatenate([self.k_sem_null[...], self.k_geo_null[...]], axis=-1).astype(dtype)
    return null_k, self.v_null[...].astype(dtype)

  def __call__(self, x_BTd, positions_T, io: LayerIO = LayerIO(), hooks: Hooks = NO_HOOKS):
    no_keep_hook(hooks, "DBA")
    B, T, _ = x_BTd.shape
    qs, ks, qg, kg, v = self.streams(x_BTd, positions_T)
    kv, keys, io = through_cache(hooks, io, {"k_sem": ks, "k_geo": kg, "v": v}, positions_T)
    a, b = self.path_weights(x_BTd)
    p = -1.0 if self.m.mup else -0.5  # muP: attn_mult 1/d per path
    o = ops.dba_attention(qs, kv["k_sem"], qg, kv["k_geo"], kv["v"], sem_scale=self.ds ** p, geo_scale=self.dg ** p,
                          sem_weight=a, geo_weight=b, null=self.null_kv(ks.dtype),
                          mask=None if keys is None else keys[1], return_probs=hooks.return_probs,
                          impl=self.m.attn_impl)
    o, io = with_probs(o, io, hooks)
    return self.out(o.reshape(B, T, self.H * self.dv)), io


def validate(m: Config):
  s, H = m.dba, m.n_heads
  for key in ("sem_dim", "geo_dim"):
    need(s[key] > 0, f"model.dba.{key}={s[key]} must be positive for attn_kind='dba'")
    need(s[key] % H == 0, f"model.dba.{key}={s[key]} is not divisible by model.n_heads={H}")
  if m.positions == "rope":
    need((s.geo_dim // H) % 2 == 0,
         f"RoPE needs an even geometric head dim; model.dba.geo_dim/n_heads = {s.geo_dim // H}")
    need(not s.rope_semantic or (s.sem_dim // H) % 2 == 0,
         f"model.dba.rope_semantic needs an even semantic head dim; got {s.sem_dim // H}")
  need(not s.gate_dynamic or s.gate, "model.dba.gate_dynamic needs model.dba.gate=True")
  need(not s.tie_qk or kv_heads(m) == H, f"model.dba.tie_qk needs n_kv_heads == n_heads; got {kv_heads(m)} and {H}")


KIND = Kind("dba", DBAAttention, SECTION, validate,
            head_dims=lambda m: {"k_sem": m.dba.sem_dim // m.n_heads, "k_geo": m.dba.geo_dim // m.n_heads,
                                 "v": attn_dim(m) // m.n_heads},
            score_dims=lambda m: (m.dba.sem_dim + m.dba.geo_dim, attn_dim(m)))
