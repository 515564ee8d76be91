"""The continuum memory system (others.md B.2, B.4): residual MLP levels, fastest first, each updated in the
inner loop every `period` tokens by DeepMomentum on Σ_active ‖f(x) − sg(f(x) − δ)‖².

A level's parameters are a dict (torch layout names in comments):
  norm_scale, norm_bias [d]    LayerNorm (net.0)
  w1 [d, h], b1 [h]            net.1 (torch weight [h, d])
  w2 [h, d], b2 [d]            net.3 (torch weight [d, h])
f(x) = x + c(δ), δ = W2·GELU(W1·LN(x) + b1) + b2, c(δ) = δ / max(1, ‖δ‖) per token when `clip` (training mode; the
scale is a constant for gradients, as the original computes it under no_grad).

Fast state: each batch row (context) carries, per level, `delta` (fast params − meta params), DeepMomentum's `m`
(and `v` for the preconditioned variants), and the gradient and input sums of the tokens buffered since the
level's last update (`acc_g`, `acc_x`, `count`). Because a level's weights change only at its own updates, the
gradient over its buffered tokens at update time is the sum of the per-sub-chunk gradients taken as the tokens
arrive: summing them is exactly the original's buffer-then-pop (tests/test_hope.py checks it against a float64
reference of the buffered form).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

OPTIMIZERS = ("nl_l2_precond", "preconditioned", "dmgd", "muon", "muon_ns", "l2_objective")
# The axis of each parameter that holds d in torch's layout's *last* axis (nl_l2_precond projects it); None: skipped.
NL_AXIS = {"norm_scale": 0, "norm_bias": 0, "w1": 0, "b1": None, "w2": None, "b2": 0}
NS_COEFFS = (3.4445, -4.775, 2.0315)  # Muon's quintic Newton–Schulz iteration


def init_level(key, d: int, hidden_mult: int, std: float = 0.02, bias: bool = True, dtype=jnp.float32) -> dict:
  h = d * hidden_mult
  k1, k2 = jax.random.split(key)
  p = {"norm_scale": jnp.ones((d,), dtype), "norm_bias": jnp.zeros((d,), dtype),
       "w1": std * jax.random.normal(k1, (d, h), dtype), "w2": std * jax.random.normal(k2, (h, d), dtype)}
  if bias:
    p.update(b1=jnp.zeros((h,), dtype), b2=jnp.zeros((d,), dtype))
  return p


def lead(v, x):
  """v [F] shaped to broadcast against x [..., F] explicitly (rank promotion is an error in the tests)."""
  return v.reshape((1,) * (x.ndim - 1) + v.shape)


def layernorm(x, scale, bias, eps=1e-5):
  """torch LayerNorm: statistics in (at least) float32, cast back, then the affine (every HOPE norm)."""
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mu = xf.mean(-1, keepdims=True)
  var = ((xf - mu) ** 2).mean(-1, keepdims=True)
  y = ((xf - mu) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
  return y * lead(scale.astype(x.dtype), y) + lead(bias.astype(x.dtype), y)


def level_delta(p: dict, x_Td):
  """δ = W2·GELU(W1·LN(x) + b1) + b2 (exact GELU, as torch's nn.GELU)."""
  h = layernorm(x_Td, p["norm_scale"], p["norm_bias"]) @ p["w1"]
  if "b1" in p:
    h = h + lead(p["b1"], h)
  y = jax.nn.gelu(h, approximate=False) @ p["w2"]
  return y + lead(p["b2"], y) if "b2" in p else y


def level_apply(p: dict, x_Td, clip: bool = True):
  """f(x) = x + c(δ) for one context ([..., T, d])."""
  delta = level_delta(p, x_Td)
  if clip:
    scale = jax.lax.stop_gradient(jnp.maximum(1.0, jnp.linalg.norm(delta, axis=-1, keepdims=True)))
    delta = delta / scale
  return x_Td + delta


def level_grad(p: dict, x_Td, teach_Td, active_T, clip: bool = True) -> dict:
  """∇_p Σ_active ‖f(x) − sg(f(x) − δ)‖² = J_fᵀ (2 δ · mask): one vector-Jacobian product."""
  _, pull = jax.vjp(lambda q: level_apply(q, x_Td, clip), p)
  return pull(2.0 * teach_Td * active_T[..., None].astype(teach_Td.dtype))[0]


# ---------------------------------------------------------------------------------------- inner optimiser

def newton_schulz(g, steps: int = 5, eps: float = 1e-7):
  """Muon's orthogonalisation of a matrix (quintic iteration on the smaller Gram side)."""
  a, b, c = NS_COEFFS
  x = g / (jnp.linalg.norm(g) + eps)
  wide = x.shape[0] > x.shape[1]
  if wide:
    x = x.T
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if wide else x


def init_opt_state(p: dict, variant: str) -> dict:
  zeros = jax.tree.map(jnp.zeros_like, p)
  st = {"m": zeros}
  if variant in ("preconditioned", "muon"):
    st["v"] = jax.tree.map(jnp.zeros_like, p)
  return st


def deep_momentum(grads: dict, opt: dict, context_d, variant: str, beta: float = 0.9, beta2: float = 0.999,
                  eps: float = 1e-8) -> tuple[dict, dict]:
  """(the step direction m', new optimiser state) of DeepMomentum (the original's optim/deep.py): precondition or
  project, optional tanh, then the EMA m' = β m + (1 − β) u; the caller applies θ ← θ − lr·m'."""
  if variant not in OPTIMIZERS:
    raise ValueError(f"inner optimiser {variant!r} is not one of {OPTIMIZERS}")
  new = dict(opt)
  u = grads
  if variant in ("preconditioned", "muon"):
    v = jax.tree.map(lambda v_, g: beta2 * v_ + (1 - beta2) * g * g, opt["v"], grads)
    new["v"] = v
    u = jax.tree.map(lambda g, v_: g / (jnp.sqrt(v_) + eps), grads, v)
  if variant == "nl_l2_precond":
    norm = jnp.linalg.norm(context_d)
    unit = context_d / (norm + eps)

    def project(name, g):
      axis = NL_AXIS.get(name)
      if axis is None or g.shape[axis] != unit.shape[0]:
        return g
      gm = jnp.moveaxis(g, axis, -1)
      gm = gm - (gm @ unit)[..., None] * lead(unit, gm)
      return jnp.where(norm > 0, jnp.moveaxis(gm, -1, axis), g)

    u = {name: project(name, g) for name, g in grads.items()}
  if variant == "l2_objective":  # g + 0.1·mean over torch's last axis: the input axis, every leaf's first here
    u = jax.tree.map(lambda g: g + 0.1 * g.mean(axis=0, keepdims=True), grads)
  if variant in ("dmgd", "muon"):
    u = jax.tree.map(jnp.tanh, u)
  if variant == "muon_ns":  # a true Muon direction for matrices, the plain gradient for vectors
    u = {name: newton_schulz(g) * math.sqrt(max(1.0, g.shape[0] / g.shape[1])) if g.ndim == 2 else g
         for name, g in grads.items()}
  new["m"] = jax.tree.map(lambda m, x: beta * m + (1 - beta) * x, opt["m"], u)
  return new["m"], new


# ----------------------------------------------------------------------------------------- the online pass

def init_fast_state(levels_meta: list, variant: str) -> list:
  """One context's fast state (zeros) for a layer's CMS levels."""
  return [{"delta": jax.tree.map(jnp.zeros_like, p), **init_opt_state(p, variant),
           "acc_g": jax.tree.map(jnp.zeros_like, p), "acc_x": jnp.zeros(p["norm_scale"].shape, p["w1"].dtype),
           "count": jnp.zeros((), jnp.int32), "updates": jnp.zeros((), jnp.int32)} for p in levels_meta]


def apply_levels(levels_meta: list, fast: list | None, x_Td, clip: bool = True):
  """The CMS chain for one context with meta + fast deltas (fast None: meta only)."""
  for i, p in enumerate(levels_meta):
    if fast is not None:
      p = jax.tree.map(lambda a, b: a + jax.lax.stop_gradient(b), p, fast[i]["delta"])
    x_Td = level_apply(p, x_Td, clip)
  return x_Td


def online(levels_meta: list, fast: list, x_Td, teach_Td, valid_T, periods: tuple, lr: float, variant: str,
           gate=True, clip: bool = True, flush: bool = False, beta: float = 0.9):
  """The update pass for one context: the chunk runs through the chain in sub-chunks of min(periods) tokens
  (later sub-chunks read updated weights); level ℓ takes one DeepMomentum step whenever p_ℓ tokens have
  arrived since its last (`flush`: also for a partial tail at the end). Tokens whose teach signal is zero are
  inactive in the loss; `valid_T` marks real tokens (padding counts for nothing); `gate` False skips every update
  (the surprise gate). Returns (outputs [T, d], new fast state)."""
  c = min(periods)
  if any(p % c for p in periods):
    raise ValueError(f"CMS periods {periods} must be multiples of the smallest ({c})")
  T, d = x_Td.shape
  n = -(-T // c)
  pad = n * c - T
  x_NCd = jnp.pad(x_Td, ((0, pad), (0, 0))).reshape(n, c, d)
  t_NCd = jnp.pad(teach_Td, ((0, pad), (0, 0))).reshape(n, c, d)
  v_NC = jnp.pad(valid_T, (0, pad)).reshape(n, c)
  meta = [jax.lax.stop_gradient(p) for p in levels_meta]

  def update(st, p_meta, period, force=False):
    fire = (st["count"] >= period) | (force & (st["count"] > 0))
    fire = fire & gate
    ctx = st["acc_x"] / jnp.maximum(st["count"], 1).astype(st["acc_x"].dtype)
    step, opt = deep_momentum(st["acc_g"], {k: st[k] for k in ("m", "v") if k in st}, ctx, variant, beta)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(fire, a, b), new, old)
    out = dict(st)
    out["delta"] = keep(jax.tree.map(lambda dl, s: dl - lr * s, st["delta"], step), st["delta"])
    for k in opt:
      out[k] = keep(opt[k], st[k])
    taken = (st["count"] >= period) | (force & (st["count"] > 0))  # popped even when the gate skips the update
    out["acc_g"] = jax.tree.map(lambda a: jnp.where(taken, jnp.zeros_like(a), a), st["acc_g"])
    out["acc_x"] = jnp.where(taken, 0.0, st["acc_x"])
    out["count"] = jnp.where(taken, jnp.where(force, 0, st["count"] - period), st["count"])
    out["updates"] = st["updates"] + fire.astype(jnp.int32)
    return out

  def sub_chunk(state, xs):
    x, t, v = xs
    active = v & (jnp.abs(t).sum(-1) > 0)
    state = list(state)
    for i, p_meta in enumerate(meta):
      p = jax.tree.map(jnp.add, p_meta, state[i]["delta"])
      g = level_grad(p, x, t, active, clip)
      st = dict(state[i])
      st["acc_g"] = jax.tree.map(jnp.add, st["acc_g"], g)
      st["acc_x"] = st["acc_x"] + (x * v[:, None].astype(x.dtype)).sum(0)
      st["count"] = st["count"] + v.sum().astype(jnp.int32)
      x = level_apply(p, x, clip)
      state[i] = update(st, p_meta, periods[i])
    return state, x

  fast, y_NCd = jax.lax.scan(sub_chunk, list(fast), (x_NCd, t_NCd, v_NC))
  if flush:
    fast = [update(st, p_meta, periods[i], force=True) for i, (st, p_meta) in enumerate(zip(fast, meta))]
  return y_NCd.reshape(n * c, d)[:T], fast
