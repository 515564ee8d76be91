"""dba-train's optimizer: clipping, Adam, the attention kind's own lr groups and muP's multipliers, decoupled weight
decay and the warm-up + cosine schedule (the addition trainer uses the same schedule)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dba_jax import attention, model as model_lib
from dba_jax.configlib import Config


def lr_schedule(o: Config, total_steps: int):
  """Linear warm-up (s+1)/warmup, then cosine from 1 to min_lr_ratio over the remaining steps (times o.lr)."""
  warmup = max(0, int(o.warmup_steps))
  decay_steps = max(1, total_steps - warmup)

  def fn(step):
    s = jnp.asarray(step, jnp.float32)
    warm = (s + 1.0) / max(warmup, 1)
    t = jnp.clip((s - warmup) / decay_steps, 0.0, 1.0)
    cos = o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    return o.lr * jnp.where(s < warmup, warm, cos)

  return fn


def _by_path(axes_tree, fn):
  """A tree like the params with fn(parameter name, logical axes) at each leaf."""
  is_axes = lambda x: isinstance(x, tuple)
  return jax.tree_util.tree_map_with_path(lambda path, ax: fn(str(path[-1].key), ax), axes_tree, is_leaf=is_axes)


def decay_mask(c: Config, axes_tree):
  """True where weight decay applies: every parameter, or those with >= 2 non-layer axes; never the attention
  kind's own lr groups."""
  own = attention.get(c.model).lr_groups(c.model)
  matrix = lambda ax: c.optim.decay == "all" or sum(a != "layers" for a in ax) >= 2
  return _by_path(axes_tree, lambda name, ax: name not in own and matrix(ax))


def lr_multipliers(m: Config, axes_tree):
  """Per-parameter multiplier of the Adam step: own groups' lr scale; under muP, 1/width_mult for matrix-like
  parameters (MuAdamW). Weight decay is applied after it, at the base lr: MuAdamW's wd x width_mult cancels
  its lr / width_mult on the decay term."""
  width_mult = m.d_model / m.mup_base_d_model
  own = attention.get(m).lr_groups(m)

  def fn(name, axes):
    if name in own:
      return float(own[name])
    return 1.0 / width_mult if m.mup and model_lib.mup_matrix_like(axes) else 1.0

  return _by_path(axes_tree, fn)


def make_optimizer(c: Config, axes_tree):
  """clip -> Adam -> per-group lr multipliers -> decoupled weight decay -> schedule (= optax.adamw without groups)."""
  o = c.optim
  parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
  parts.append(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps))
  scales = lr_multipliers(c.model, axes_tree)
  if any(s != 1.0 for s in jax.tree.leaves(scales)):
    parts.append(optax.GradientTransformation(
        lambda _: optax.EmptyState(), lambda u, st, p=None: (jax.tree.map(lambda g, k: g * k, u, scales), st)))
  parts.append(optax.add_decayed_weights(o.weight_decay, mask=decay_mask(c, axes_tree)))
  parts.append(optax.scale_by_learning_rate(lr_schedule(o, c.train.steps)))
  return optax.chain(*parts)
