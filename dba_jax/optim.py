"""dba-train's optimizer: clipping, Adam (or Muon / M3 on the matrices: optim.name), the attention kind's own lr
groups and muP's multipliers, decoupled weight decay and the warm-up + cosine schedule (the addition trainer uses
the same schedule)."""
from __future__ import annotations

import math
from typing import NamedTuple

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
  """clip -> direction (Adam; or Muon / M3 on matrices, Adam on the rest) -> per-group lr multipliers -> decoupled
  weight decay -> schedule (optim.name = adamw is optax.adamw without groups)."""
  o = c.optim
  parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
  decay = decay_mask(c, axes_tree)
  if o.name == "muon":
    parts.append(scale_by_muon(axes_tree, o.momentum, o.b1, o.b2, o.eps, o.ns_steps or 5))
  elif o.name == "m3":
    parts.append(scale_by_m3(axes_tree, decay, o.weight_decay, o.b1, o.b2, o.m3_beta3, o.m3_alpha, o.eps,
                             o.m3_slow_chunk, o.ns_steps or 3))
    # M3 adds its decay to the gradient (coupled, as the original's M3): the decoupled decay is the AdamW leaves'
    decay = jax.tree.map(lambda d, mat: d and not mat, decay, matrix_mask(axes_tree))
  else:
    parts.append(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps))
  scales = lr_multipliers(c.model, axes_tree)
  if any(s != 1.0 for s in jax.tree.leaves(scales)):
    parts.append(optax.GradientTransformation(
        lambda _: optax.EmptyState(), lambda u, st, p=None: (jax.tree.map(lambda g, k: g * k, u, scales), st)))
  parts.append(optax.add_decayed_weights(o.weight_decay, mask=decay))
  parts.append(optax.scale_by_learning_rate(lr_schedule(o, c.train.steps)))
  return optax.chain(*parts)


# ---------------------------------------------------------------------- Muon and M3 (the HOPE original's optimisers)
# The original (nested_learning's training.py) steps every parameter with >= 2 dims whose name holds neither "norm"
# nor "embed" with torch.optim.Muon (or its M3), the rest with AdamW at the same lr and weight decay. Here a leaf
# [layers..., in, out...] is a stack of matrices [in, prod(out)] (torch's weight [out, in] transposed; both
# Newton–Schulz iterations commute with the transpose); every matrix is orthogonalised on its own.

NS_QUINTIC = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's coefficients
ADAMW_NAMES = ("norm", "embed", "conv", "persistent")


class MuonState(NamedTuple):
  count: jax.Array
  mu: optax.Updates  # matrices: Muon's momentum buffer; the rest: Adam's first moment
  nu: optax.Updates  # Adam's second moment (zero on matrices: the state is AdamW's size)


class M3State(NamedTuple):
  count: jax.Array
  mu: optax.Updates    # matrices: M1 (Σ β1·g, never decays); the rest: Adam's first moment
  nu: optax.Updates    # matrices: V (Σ β2·g²); the rest: Adam's second moment
  m2: optax.Updates    # matrices: the slow momentum M2 (Σ β3 · chunk sums)
  slow: optax.Updates  # matrices: the gradient sum of the current slow chunk
  o2: optax.Updates    # matrices: NS(M2) as of the last chunk end


def matrix_mask(axes_tree):
  """True at the leaves Muon / M3 step: >= 2 dims besides "layers" and no "norm" or "embed" in the path (the
  original's rule). Also AdamW's here: leaves with a "vocab" axis (the head, like the tied embedding), depthwise
  conv kernels (torch Conv1d [d, 1, w], which torch's Muon refuses) and Titans' persistent tokens."""
  def fn(path, ax):
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path).lower()
    return sum(a != "layers" for a in ax) >= 2 and "vocab" not in ax and not any(s in name for s in ADAMW_NAMES)

  return jax.tree_util.tree_map_with_path(fn, axes_tree, is_leaf=_is_axes)


def _is_axes(x):
  return isinstance(x, tuple)


def newton_schulz5(g, steps: int = 5, eps: float = 1e-7):
  """torch.optim.Muon's orthogonalisation: X = G / max(‖G‖_F, eps), then X ← aX + (bA + cA²)X with A = XXᵀ on the
  wide orientation (float32 here; torch runs it in bfloat16)."""
  a, b, c = NS_QUINTIC
  tall = g.shape[0] > g.shape[1]
  x = g.T if tall else g
  x = x / jnp.maximum(jnp.linalg.norm(x), eps)
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if tall else x


def newton_schulz3(g, steps: int = 3, eps: float = 1e-8):
  """M3's cubic iteration: X = G / (‖G‖_F + eps), then X ← X(3I − XᵀX) / 2 (the Gram matrix on the small side)."""
  x = g / (jnp.linalg.norm(g) + eps)
  for _ in range(steps):
    x = 1.5 * x - 0.5 * (x @ (x.T @ x) if x.shape[0] >= x.shape[1] else (x @ x.T) @ x)
  return x


def per_matrix(fn, x, axes: tuple):
  """fn on each matrix of a leaf: leading "layers" axes stack matrices (vmapped), the next axis is the fan-in,
  the rest the fan-out. fn gets [in, out] and returns that shape."""
  lead = next(i for i, a in enumerate(axes) if a != "layers")
  if "layers" in axes[lead:]:
    raise ValueError(f"logical axes {axes}: 'layers' must lead")
  mats = x.reshape((-1, x.shape[lead], math.prod(x.shape[lead + 1:])))
  return jax.vmap(fn)(mats).reshape(x.shape)


def _leafwise(axes_tree, fn, updates, *trees):
  """fn(matrix?, logical axes, leaves...) -> tuple of new leaves, over the params' leaves; unzipped into trees."""
  leaves, treedef = jax.tree.flatten(updates)
  masks = jax.tree.leaves(matrix_mask(axes_tree))
  axes = jax.tree.leaves(axes_tree, is_leaf=_is_axes)
  if len(axes) != len(leaves):
    raise ValueError(f"the logical axes tree has {len(axes)} leaves, the gradients {len(leaves)}")
  rest = [treedef.flatten_up_to(t) for t in trees]
  out = [fn(mk, ax, *xs) for mk, ax, *xs in zip(masks, axes, leaves, *rest)]
  return tuple(treedef.unflatten(col) for col in zip(*out))


def _adam(g, mu, nu, count, b1, b2, eps):
  """AdamW's direction (bias-corrected, as torch and optax): (m̂ / (√v̂ + eps), m, v). 1 − βᵗ as −expm1(t·log β):
  float32 0.999 is 1.3e-5 off in 1 − β (optax's error at step 1), log β in float64 is not."""
  mu = b1 * mu + (1 - b1) * g
  nu = b2 * nu + (1 - b2) * g * g
  t = count.astype(jnp.float32)
  correct = lambda b: -jnp.expm1(t * math.log(b)) if b > 0 else 1.0
  return (mu / correct(b1)) / (jnp.sqrt(nu / correct(b2)) + eps), mu, nu


def scale_by_muon(axes_tree, momentum: float = 0.95, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                  ns_steps: int = 5) -> optax.GradientTransformation:
  """torch.optim.Muon (2.13: nesterov, eps 1e-7, lr × sqrt(max(1, out/in))) on matrix_mask's leaves, Adam on the
  rest; the chain's decoupled decay and lr then give torch's θ(1 − lr·wd) − lr·step for both."""
  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return MuonState(jnp.zeros([], jnp.int32), zeros(), zeros())

  def muon(m):
    return newton_schulz5(m, ns_steps) * math.sqrt(max(1.0, m.shape[1] / m.shape[0]))

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)

    def leaf(matrix, axes, g, mu, nu):
      if not matrix:
        return _adam(g, mu, nu, count, b1, b2, eps)
      buf = momentum * mu + (1 - momentum) * g  # torch: buf.lerp_(g, 1 − μ); nesterov: g.lerp(buf, μ)
      return per_matrix(muon, (1 - momentum) * g + momentum * buf, axes), buf, nu

    u, mu, nu = _leafwise(axes_tree, leaf, updates, state.mu, state.nu)
    return u, MuonState(count, mu, nu)

  return optax.GradientTransformation(init, update)


def scale_by_m3(axes_tree, decay_tree, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                b3: float = 0.9, alpha: float = 1.0, eps: float = 1e-8, slow_chunk: int = 100,
                ns_steps: int = 3) -> optax.GradientTransformation:
  """The Nested Learning paper's M3 as its optim/m3.py computes it, on matrix_mask's leaves (Adam on the rest):
  g += wd·θ (where decay_tree says so); M1 += β1 g; V += β2 g²; step (NS(M1) + α·O2) / (√V + eps); every
  slow_chunk steps, after the step, M2 += β3 Σ_chunk g and O2 = NS(M2). Needs the params (the coupled decay)."""
  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return M3State(jnp.zeros([], jnp.int32), zeros(), zeros(), zeros(), zeros(), zeros())

  ns = lambda m: newton_schulz3(m, ns_steps, eps)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("m3 needs the params (its weight decay is added to the gradient)")
    count = optax.safe_increment(state.count)
    fire = (count % slow_chunk == 0) if slow_chunk > 0 else jnp.bool_(False)

    def leaf(matrix, axes, g, decays, p, mu, nu, m2, slow, o2):
      if not matrix:
        return _adam(g, mu, nu, count, b1, b2, eps) + (m2, slow, o2)
      if decays and weight_decay:
        g = g + weight_decay * p
      mu, nu, slow = mu + b1 * g, nu + b2 * g * g, slow + g
      u = (per_matrix(ns, mu, axes) + alpha * o2) / (jnp.sqrt(nu) + eps)
      m2 = jnp.where(fire, m2 + b3 * slow, m2)
      o2 = jax.lax.cond(fire, lambda: per_matrix(ns, m2, axes), lambda: o2)
      return u, mu, nu, m2, jnp.where(fire, jnp.zeros_like(slow), slow), o2

    u, *rest = _leafwise(axes_tree, leaf, updates, decay_tree, params, *state[1:])
    return u, M3State(count, *rest)

  return optax.GradientTransformation(init, update)
