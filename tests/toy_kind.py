"""A toy attention kind that lives only in the tests: standard attention minus a linear distance penalty
F[t, s] = slope * (t - s) (ALiBi-like), with F as its per-key eviction score. It is one module and one config
section; registering it must be all it takes to train, decode with a KV cache, prune and probe it."""
import dataclasses

import jax
import jax.numpy as jnp

from dba_jax import attention
from dba_jax.attention.base import Kind
from dba_jax.attention.standard import StandardAttention
from dba_jax.configlib import Field, Section, need

SECTION = Section("toy distance-penalised attention", slope=Field(0.25, "penalty per token of distance", ge=0.0))


class ToyAttention(StandardAttention):

  def attend(self, q_BTHD, k_BSKD, v_BSKD, positions_T, keys, io, hooks):
    B, S = k_BSKD.shape[:2]
    if keys is None:  # a full chunk: keys are the chunk itself
      k_pos_BS = jnp.broadcast_to(positions_T[None], (B, S))
      visible_BTS = (positions_T[None, :, None] >= k_pos_BS[:, None, :]) & jnp.ones((B, 1, 1), bool)
    else:
      k_pos_BS, visible_BTS = keys
    f_BTS = self.m.toy.slope * jnp.maximum(positions_T[None, :, None] - k_pos_BS[:, None, :], 0).astype(jnp.float32)
    if hooks.keep_fn is not None:
      visible_BTS = visible_BTS & hooks.keep_fn(f_BTS[:, None])[:, 0]
    logits = jnp.einsum("bthd,bshd->bhts", q_BTHD, k_BSKD).astype(jnp.float32) * self.scale - f_BTS[:, None]
    probs = jax.nn.softmax(jnp.where(visible_BTS[:, None], logits, -jnp.inf), axis=-1)
    o = jnp.einsum("bhts,bshd->bthd", probs.astype(v_BSKD.dtype), v_BSKD)
    if keys is not None:  # the eviction score the next query will use: its distance to every cached key
      age_BS = self.m.toy.slope * jnp.maximum(positions_T[-1] - k_pos_BS, 0).astype(jnp.float32)
      io = dataclasses.replace(io, state={**io.state, "age": jnp.where(k_pos_BS >= 0, age_BS, 0.0)})
    return o, dataclasses.replace(io, probs=probs if hooks.return_probs else None)


def validate(m):
  need(m.n_kv_heads in (0, m.n_heads), "model.attn_kind='toy' needs n_kv_heads == n_heads")


KIND = Kind("toy", ToyAttention, SECTION, validate, key_state=lambda m: {"age": jnp.float32}, evict_by="age")


def register():
  attention.register(KIND)


def unregister():
  attention.KINDS.pop(KIND.name, None)
