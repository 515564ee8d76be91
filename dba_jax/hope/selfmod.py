"""HOPE's blocks with a memory before the CMS (others.md B.2, B.4, B.5; hope_latentwire.md A), as Decoder blocks.

  hope_selfmod  self-modifying Titans → CMS levels, no softmax attention                       (SelfModBlock)
  hope_hybrid   post-norm attention → Titan level memory → CMS(a + M(a)); a SelfModifier MLP makes the Titan's
                inner target (kept mainly so the original's checkpoints convert and run)       (HybridBlock)
Both subclass HopeBlock and finish with its `cms()` (the levels, their update pass and the probe).

Self-modifying Titans, one context. A causal depthwise conv, then residual memories (no biases)
  M(x) = x + W1·GELU(W2·x)  for M_k, M_v, M_q, M_memory (d → d);  W1·GELU(W2·x) [+ W_skip·x]  for M_η, M_α (d → 1)
  read   q = W_q·x (fixed; or M_q(x) with selfmod_adaptive_q; unit-normalised with qk_l2_norm), o = M_memory(q);
         the block outputs CMS(o): there is no residual path from x.
  write  k = M_k(x) (unit with qk_l2_norm), v = M_v(x), η_t = softplus(M_η(x))·selfmod_lr,
         α_t = σ(M_α(x) + selfmod_alpha_init) or 1;
         per-token gradients G_t of ‖M(k_t) − sg(M(v_t))‖² (or −⟨M(k_t), sg(M(v_t))⟩) at the memory's chunk-start
         weights, applied one token at a time (G through a heavy-ball buffer b ← β b + G when selfmod_momentum):
           W2 ← W2(α_t I − η_t k_t k_tᵀ) − η_t G2   (W_skip the same; without selfmod_rank1: α_t W2 − η_t G2)
           W1 ← α_t W1 − η_t G1
         M_k, M_v, M_η (M_q, M_α when used) step every selfmod_chunk tokens, M_memory every selfmod_chunk_memory,
         both counted from the call's first token; a partial tail is applied at the end. Reads inside a chunk see the
         weights of its last boundary.
The memories learn in every forward (selfmod_learn "always": the read pass too, from the meta weights when there
is no state; "update_pass": only in the pass with a teach signal, as the original). With a state they start from
meta + its deltas and return the deltas after the last token. Meta-gradients are straight-through (reads use
meta + sg(fast − meta)): M_memory (M_q), W_q and the conv learn; with selfmod_alpha_grad (default) M_α learns
through the decay alone: a read after a boundary sees its weights as c·W0 + (the writes, constants), c = Π α_t since
the call's start weights W0 (exact when the writes are small, e.g. η → 0; O(1) extra memory, where differentiating
the token scan would keep every token's weights). selfmod_alpha_grad False: the original's frozen α (parity). With
selfmod_write_grad the whole write is differentiated and M_k, M_v, M_η, M_α all learn. selfmod_lr = 0 or
hope.memory False stops every write (the original's "self-mod off" changed nothing); each batch row has its own
memories (vmap). In the original a fresh M_α(x) ≈ 0 gives α ≈ σ(0) = 1/2: every memory's weights halve per token
(after 64 tokens nothing of W0 is left, so the decay's gradient vanishes too); selfmod_alpha_init b starts α at
σ(b) instead (4: 0.98).

Layout (dba_jax [in, out]): a memory is {"w2": [d, d] (torch w2.weight [hidden, in]ᵀ, applied first),
"w1": [d, out] (torch w1.weight ᵀ), "w_skip": [d, out]}; in it W2 ← W2(αI − η k kᵀ) reads w2 ← α w2 − η k (kᵀ w2).

Titan level (hybrid), on the attention output a:
  M(a) = LN(c(W2·GELU(W1 a + b1) + b2)), c(y) = y / max(1, ‖y‖) per token in training (a constant for gradients)
  target = SelfModifier([a; M(a); δ]) − δ, SelfModifier = Linear(3d, hd)·GELU·Linear(hd, hd)·GELU·Linear(hd, d)
  loss = Σ_active ‖M(a) − target‖² / N_active (active: δ ≠ 0, and ‖δ_t‖ ≥ surprise_threshold when one is set)
  one DeepMomentum step (model.hope.inner_opt, titan_lr) when the clock fires:
    titan_clock "tokens"  every titan_period tokens of the update pass (buffered like a CMS level; outputs after a
                          step read the new weights)
    titan_clock "calls"   the original: its clock ticks once per block call (read and update pass: 2 per chunk); the
                          update pass steps on the whole chunk when it never has or ≥ titan_period ticks have passed
  The step is a differentiable function of the SelfModifier's parameters (nothing inside the block stops that
  path); the original ran it under no_grad, so its SelfModifier never learned.

Fast state (LayerIO.state, leading batch axis), besides HopeBlock's "cms":
  "selfmod": {"delta": {memory: {w2, w1[, w_skip]}}[, "mom": same]}   the memories that learn (Rule.learned)
  "titan":   {"delta", "m"[, "v"], "acc_g", "acc_x", "acc_n", "count", "updates", "ticks"}
One-token decoding (dba_jax.hope.decode) adds "decode" (zeros at an online chunk's start): the hybrid's is its
attention's (blocks.py); hope_selfmod's holds "n" (tokens of the chunk read), the conv's tail and selfmod_write's
carry (boundary weights Wb, running weights Wr, momentum buffers), so each token costs one gradient and one step per
learned memory and reads exactly what the chunk's forward gives it.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dba_jax.hope import cms
from dba_jax.hope.blocks import CMSLevel, HopeBlock, cache_refused, causal_conv, conv_param, conv_step, conv_tail
from dba_jax.layers import ACT_EMBED, Hooks, LayerIO, NO_HOOKS, dense, normal_init
from dba_jax.mesh import constrain

sg = jax.lax.stop_gradient
MEMORIES = ("k", "v", "q", "memory", "eta", "alpha")


def _unit(x):
  """torch F.normalize(x, dim=-1, eps=1e-6)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _where(c, new, old):
  return jax.tree.map(lambda a, b: jnp.where(c, a, b), new, old)


# --------------------------------------------------------------------------------- self-modifying Titans


@dataclasses.dataclass(frozen=True)
class Rule:
  """The self-modifying write's settings (model.hope.selfmod_*)."""
  chunk: int = 8
  chunk_memory: int = 64
  lr: float = 1e-3
  objective: str = "l2"
  stopgrad_vhat: bool = True
  rank1: bool = True
  alpha: bool = True
  momentum: float = 0.0
  adaptive_q: bool = False
  qk_norm: bool = False
  alpha_grad: bool = True
  alpha_init: float = 0.0
  writes: bool = True  # False: η = 0, α still acts (the writes-off baseline)

  @classmethod
  def of(cls, h) -> "Rule":
    return cls(h.selfmod_chunk, h.selfmod_chunk_memory, h.selfmod_lr, h.selfmod_objective, h.selfmod_stopgrad_vhat,
               h.selfmod_rank1, h.selfmod_alpha, h.selfmod_momentum, h.selfmod_adaptive_q, h.qk_l2_norm,
               h.selfmod_alpha_grad, h.selfmod_alpha_init, h.writes)

  @property
  def others(self) -> tuple:
    """The memories that step every `chunk` tokens."""
    return ("k", "v", "eta") + ("q",) * self.adaptive_q + ("alpha",) * self.alpha

  @property
  def learned(self) -> tuple:
    return self.others + ("memory",)


def memory_apply(p: dict, x):
  """M(x) for x [..., d] (the module docstring)."""
  y = jax.nn.gelu(x @ p["w2"], approximate=False) @ p["w1"]
  if "w_skip" in p:
    return y + x @ p["w_skip"]
  return y + x if y.shape[-1] == x.shape[-1] else y


def token_grad(p: dict, k_d, v_d, rule: Rule) -> dict:
  """G = ∇_W of one token's inner objective ‖M(k) − M̂(v)‖² (l2) or −⟨M(k), M̂(v)⟩ (dot) at the weights p, where
  the target M̂(v) is a constant of the inner gradient with stopgrad_vhat (the original's sg). It stays a function
  of v and p for outer gradients (selfmod_write_grad), which a stop_gradient would cut."""
  def loss(q):
    pred, vhat = memory_apply(q, k_d), memory_apply(p if rule.stopgrad_vhat else q, v_d)
    return -(pred * vhat).sum() if rule.objective == "dot" else ((pred - vhat) ** 2).sum()
  return jax.grad(loss)(p)


def token_step(w: dict, buf: dict | None, g: dict, k_d, eta, alpha, rule: Rule):
  """One token's step of one memory: (weights, momentum buffer). W1 decays; W2 (and W_skip), whose input is k's
  space, take the rank-1 DGD preconditioner."""
  if rule.momentum > 0:
    buf = jax.tree.map(lambda b, g_: rule.momentum * b + g_, buf, g)
    g = buf

  def one(name, x):
    if rule.rank1 and name != "w1":
      return alpha * x - eta * jnp.outer(k_d, k_d @ x) - eta * g[name]
    return alpha * x - eta * g[name]

  return {name: one(name, x) for name, x in w.items()}, buf


def _reader(meta: dict, write_grad: bool):
  """read(name, W): memory `name`'s weights for an output: W itself (write_grad) or straight-through."""
  if write_grad:
    return lambda name, W: W[name]
  return lambda name, W: jax.tree.map(lambda mt, w: mt + sg(w - mt), meta[name], W[name])


def _read_and_step(base: dict, read, Wb: dict, Wr: dict, buf: dict, x, x_w, q, ok_T, rule: Rule):
  """Tokens x [T, d] that all read the boundary weights Wb (no boundary inside): (o [T, d], the running weights Wr
  and momentum buffers after their token steps at Wb's gradients). base: the memories that do not learn."""
  cur = lambda name: memory_apply(Wb[name] if name in Wb else base[name], x_w)
  k, v = cur("k"), cur("v")
  k = _unit(k) if rule.qk_norm else k
  eta = jax.nn.softplus(cur("eta")[:, 0]) * (rule.lr * rule.writes)
  alpha = jax.nn.sigmoid(cur("alpha")[:, 0] + rule.alpha_init) if rule.alpha else jnp.ones_like(eta)
  if rule.adaptive_q:
    q = memory_apply(read("q", Wb), x)
    q = _unit(q) if rule.qk_norm else q
  o = memory_apply(read("memory", Wb), q)
  grads = {name: jax.vmap(token_grad, (None, 0, 0, None))(Wb[name], k, v, rule) for name in rule.learned}

  def token(c, ts):
    Wr_, buf_ = c
    g_t, k_t, eta_t, alpha_t, ok_t = ts
    new = {name: token_step(Wr_[name], buf_.get(name), g_t[name], k_t, eta_t, alpha_t, rule) for name in Wr_}
    Wr_new = _where(ok_t, {name: w for name, (w, _) in new.items()}, Wr_)
    buf_new = _where(ok_t, {name: b for name, (_, b) in new.items() if b is not None}, buf_)
    return (Wr_new, buf_new), None

  (Wr, buf), _ = jax.lax.scan(token, (Wr, buf), (grads, k, eta, alpha, ok_T))
  return o, Wr, buf


def selfmod_write(meta: dict, W0: dict, buf0: dict, x_Td, q_Td, valid_T, rule: Rule, write_grad: bool = False):
  """One context's in-sequence learning (module docstring): (o [T, d], weights after the last token, momentum
  buffers). meta: every memory's meta params; W0 / buf0: the learned memories' start weights and buffers; q_Td: the
  fixed W_q·x (None with adaptive q); valid_T: real tokens (padding never steps). Without `write_grad` the write is
  a constant for gradients and reads are straight-through (meta + sg(W − meta)), except the decay with alpha_grad:
  a read at a boundary b sees c_b·sg(W0) + sg(W_b − c_b W0), c_b = Π α_t over the tokens stepped since W0.
  Tokens run in sub-chunks of gcd(chunk, chunk_memory). Each memory keeps its weights as of its last boundary (Wb:
  read, and where its gradients are taken) and a running copy (Wr) that takes the token steps as they come; at its
  boundary Wb ← Wr. That is the original's buffer-then-apply without a buffer."""
  T, _ = x_Td.shape
  g = math.gcd(rule.chunk, rule.chunk_memory)
  n = -(-T // g)
  split = lambda a: jnp.pad(a, ((0, n * g - T),) + ((0, 0),) * (a.ndim - 1)).reshape((n, g) + a.shape[1:])
  ends = (jnp.arange(n) + 1) * g
  bound = {"other": ends % rule.chunk == 0, "memory": ends % rule.chunk_memory == 0}
  base = meta if write_grad else sg(meta)
  xw = x_Td if write_grad else sg(x_Td)
  read = _reader(meta, write_grad)
  decay = rule.alpha and rule.alpha_grad and not write_grad

  def sub_chunk(carry, xs):
    Wb, Wr, buf, L = carry
    x, x_w, q, ok, other_b, memory_b = xs
    read_ = read
    if decay:  # α's only outer path: reads see c·sg(W0) + sg(rest), c = exp(L) = Π α since W0 (value unchanged)
      live = {k: jnp.exp(L[k]) - sg(jnp.exp(L[k])) for k in ("other", "memory")}
      read_ = lambda name, W: jax.tree.map(lambda r, w0: r + live["memory" if name == "memory" else "other"] * sg(w0),
                                           read(name, W), W0[name])
      z = memory_apply(read("alpha", Wb), x_w)[:, 0] + rule.alpha_init
      L = {**L, "run": L["run"] + jnp.where(ok, jax.nn.log_sigmoid(z), 0.0).sum()}
    o, Wr, buf = _read_and_step(base, read_, Wb, Wr, buf, x, x_w, q, ok, rule)
    Wb = {name: _where(memory_b if name == "memory" else other_b, Wr[name], Wb[name]) for name in Wb}
    L = {**L, "other": jnp.where(other_b, L["run"], L["other"]), "memory": jnp.where(memory_b, L["run"], L["memory"])}
    return (Wb, Wr, buf, L), o

  xs = (split(x_Td), split(xw), None if q_Td is None else split(q_Td), split(valid_T), bound["other"],
        bound["memory"])
  L0 = dict.fromkeys(("other", "memory", "run"), jnp.zeros((), x_Td.dtype))
  (_, W, buf, _), o = jax.lax.scan(sub_chunk, (W0, W0, buf0, L0), xs)
  return o.reshape((n * g,) + o.shape[2:])[:T], W, buf


def selfmod_context(meta: dict, st: dict, x_Td, q_Td, valid_T, rule: Rule, learn: bool, write_grad: bool = False):
  """One context through the self-modifying memories from its fast state: (o [T, d], the new fast state). The
  state's deltas are constants for gradients unless write_grad (then hope.step decides what is carried)."""
  W0 = {name: jax.tree.map(jnp.add, meta[name], st["delta"][name]) for name in st["delta"]}
  W0 = W0 if write_grad else sg(W0)
  if not learn:
    read = _reader(meta, write_grad)
    q = q_Td
    if rule.adaptive_q:
      q = memory_apply(read("q", W0), x_Td)
      q = _unit(q) if rule.qk_norm else q
    return memory_apply(read("memory", W0), q), st
  o, W, buf = selfmod_write(meta, W0, st.get("mom", {}), x_Td, q_Td, valid_T, rule, write_grad)
  base = meta if write_grad else sg(meta)
  new = {"delta": {name: jax.tree.map(jnp.subtract, W[name], base[name]) for name in W}}
  if "mom" in st:
    new["mom"] = buf
  return o, new


def selfmod_decode(meta: dict, st: dict, dec: dict, x_1d, q_1d, rule: Rule, learn: bool):
  """One token of selfmod_context's read for one context: (o [1, d], dec). st: the fast state as of the call's
  (online chunk's) start; dec: {"n": tokens of the call read before, "Wb", "Wr", "buf": selfmod_write's carry
  after them}, which starts (n = 0) from st. The same steps in the same order as selfmod_write: exact, O(1) per
  token (one token's gradient and step per learned memory)."""
  if not learn:
    return selfmod_context(meta, st, x_1d, q_1d, jnp.ones((1,), bool), rule, False)[0], dec
  W0 = sg({name: jax.tree.map(jnp.add, meta[name], st["delta"][name]) for name in st["delta"]})
  read = _reader(meta, False)
  first = dec["n"] == 0
  Wb, Wr = _where(first, W0, dec["Wb"]), _where(first, W0, dec["Wr"])
  buf = _where(first, st.get("mom", {}), dec["buf"])
  o, Wr, buf = _read_and_step(sg(meta), read, Wb, Wr, buf, x_1d, x_1d, q_1d, jnp.ones((1,), bool), rule)
  n = dec["n"] + 1
  Wb = {name: _where(n % (rule.chunk_memory if name == "memory" else rule.chunk) == 0, Wr[name], Wb[name])
        for name in Wb}
  return o, {**dec, "n": n, "Wb": Wb, "Wr": Wr, "buf": buf}


class ResidualMemory(nnx.Module):
  """One self-modifying memory's meta weights (layout in the module docstring)."""

  def __init__(self, d: int, out: int, skip: bool, std: float, rngs: nnx.Rngs):
    self.w2 = nnx.Param(normal_init(rngs, (d, d), std), axes=("embed", "mlp"))
    self.w1 = nnx.Param(normal_init(rngs, (d, out), std), axes=("mlp", "embed" if out == d else None))
    self.w_skip = nnx.Param(normal_init(rngs, (d, out), std), axes=("embed", None)) if skip and out != d else None

  def params(self) -> dict:
    return {n: getattr(self, n)[...] for n in ("w2", "w1", "w_skip") if getattr(self, n) is not None}


class SelfModBlock(HopeBlock):
  """hope_selfmod: causal conv → self-modifying Titans read (learning within the sequence) → CMS levels."""

  def __init__(self, m, rngs: nnx.Rngs):  # no attention: HopeBlock's own __init__ would build one
    h, d = m.hope, m.d_model
    self.m = m
    self.levels = nnx.List([CMSLevel(d, h.cms_hidden_mult * d, m.init_std, True, rngs) for _ in h.cms_periods])
    self.conv = conv_param(rngs, h.selfmod_conv, d)
    self.w_q = nnx.Param(normal_init(rngs, (d, d), m.init_std), axes=("embed", "mlp"))
    for name in MEMORIES:
      out = 1 if name in ("eta", "alpha") else d
      setattr(self, f"m_{name}", ResidualMemory(d, out, h.selfmod_skip, m.init_std, rngs))

  def memories(self) -> dict:
    return {name: getattr(self, f"m_{name}").params() for name in MEMORIES}

  def __call__(self, x, positions_T, rng=None, io: LayerIO = LayerIO(), hooks: Hooks = NO_HOOKS):
    cache_refused(hooks)
    h, state = self.m.hope, io.state
    rule = Rule.of(h)
    x = constrain(x, ACT_EMBED)
    dec = state.get("decode") if state is not None else None
    if self.conv is not None and dec is not None:
      x, tail = conv_step(x, dec["conv"], self.conv[...])
      dec = {**dec, "conv": tail}
    elif self.conv is not None:
      x = causal_conv(x, self.conv[...])
    q = None
    if not rule.adaptive_q:
      q = dense(x, self.w_q[...])
      q = _unit(q) if rule.qk_norm else q
    valid = jnp.ones(x.shape[1], bool) if hooks.valid_T is None else hooks.valid_T
    teach = state is not None and "teach" in state
    learn = bool(h.memory) and rule.lr > 0 and (h.selfmod_learn == "always" or teach)
    carried = state is not None and "selfmod" in state
    st = state["selfmod"] if carried else self._zero_state()
    meta = self.memories()
    if dec is not None:  # one token; the chunk-start state stays for the driver's update pass
      run = lambda st_, dec_, x_, q_: selfmod_decode(meta, st_, dec_, x_, q_, rule, learn)
      o, dec = jax.vmap(run, in_axes=(0 if carried else None, 0, 0, None if q is None else 0))(st, dec, x, q)
      state = {**state, "decode": dec}
    else:
      run = lambda st_, x_, q_: selfmod_context(meta, st_, x_, q_, valid, rule, learn, h.selfmod_write_grad)
      o, st = jax.vmap(run, in_axes=(0 if carried else None, 0, None if q is None else 0))(st, x, q)
      if carried:
        state = {**state, "selfmod": st}
    y, state = self.cms(o, state, hooks)
    return y, dataclasses.replace(io, state=state)

  def _zero_state(self) -> dict:
    rule, meta = Rule.of(self.m.hope), self.memories()
    zeros = {name: jax.tree.map(jnp.zeros_like, meta[name]) for name in rule.learned}
    return {"delta": zeros, **({"mom": zeros} if rule.momentum > 0 else {})}

  def fast_state(self) -> dict:
    return {**super().fast_state(), "selfmod": self._zero_state()}

  def decode_state(self, batch: int, max_len: int) -> dict:
    """Zeros (a chunk start; max_len, the online chunk, sizes nothing here): "n", the conv's tail and
    selfmod_write's carry ("Wb", "Wr", "buf"; taken from the fast state at n = 0)."""
    zero = self._zero_state()
    one = {"n": jnp.zeros((), jnp.int32), "Wb": zero["delta"], "Wr": zero["delta"], "buf": zero.get("mom", {})}
    return {**jax.tree.map(lambda a: jnp.zeros((batch,) + a.shape, a.dtype), one),
            **conv_tail(self.conv, batch, self.m.d_model, jnp.dtype(self.m.compute_dtype))}


# -------------------------------------------------------------------------------------- hybrid Titan level


@dataclasses.dataclass(frozen=True)
class TitanRule:
  """The Titan level's update settings (model.hope.titan_*, inner_opt, inner_beta, surprise_threshold)."""
  period: int = 8
  clock: str = "tokens"
  lr: float = 6e-4
  variant: str = "nl_l2_precond"
  beta: float = 0.9
  threshold: float = 0.0

  @classmethod
  def of(cls, h) -> "TitanRule":
    threshold = h.surprise_threshold if h.surprise_metric == "teach_norm" else 0.0  # per token only for l2
    return cls(h.titan_period, h.titan_clock, h.titan_lr, h.inner_opt, h.inner_beta, threshold)


def titan_apply(p: dict, a, clip: bool):
  """M(a) = LN(c(W2·GELU(W1 a + b1) + b2)) for a [..., d] (p: a CMS level's names, the norm applied last)."""
  hid = a @ p["w1"]
  y = jax.nn.gelu(hid + cms.lead(p["b1"], hid), approximate=False) @ p["w2"]
  y = y + cms.lead(p["b2"], y)
  if clip:
    y = y / sg(jnp.maximum(1.0, jnp.linalg.norm(y, axis=-1, keepdims=True)))
  return cms.layernorm(y, p["norm_scale"], p["norm_bias"])


def modifier_apply(p: dict, x):
  """SelfModifier: Linear(3d, hd) → GELU → Linear(hd, hd) → GELU → Linear(hd, d)."""
  for i in (1, 2, 3):
    x = x @ p[f"w{i}"]
    x = x + cms.lead(p[f"b{i}"], x)
    if i < 3:
      x = jax.nn.gelu(x, approximate=False)
  return x


def titan_init_state(meta: dict, variant: str) -> dict:
  zeros = jax.tree.map(jnp.zeros_like, meta)
  count = jnp.zeros((), jnp.int32)
  return {"delta": zeros, **cms.init_opt_state(meta, variant), "acc_g": jax.tree.map(jnp.zeros_like, meta),
          "acc_x": jnp.zeros(meta["b2"].shape, meta["w1"].dtype), "acc_n": count, "count": count, "updates": count,
          "ticks": count}


def titan_online(meta: dict, modifier: dict, st: dict, a_Td, teach_Td, valid_T, gate, rule: TitanRule, clip: bool):
  """The update pass of one context's Titan level (module docstring): (M(a) [T, d], new state). Tokens run in
  sub-chunks (gcd(period, T) with the token clock, the whole chunk with the call clock); each sub-chunk reads the
  current weights, adds Σ_active ∇‖M(a) − target‖² to the buffer, and the level steps when its clock fires and
  `gate` (the surprise gate and hope.memory) allows. The new delta is differentiable in `modifier`."""
  T, d = a_Td.shape
  c = math.gcd(rule.period, T) if rule.clock == "tokens" else T
  n = T // c
  split = lambda z: z.reshape((n, c) + z.shape[1:])
  meta_sg = sg(meta)

  def sub_chunk(st, xs):
    a, t, v = xs
    mem = titan_apply(jax.tree.map(jnp.add, meta, st["delta"]), a, clip)
    active = v & (jnp.abs(t).sum(-1) > 0)
    if rule.threshold > 0:
      active = active & (jnp.linalg.norm(t, axis=-1) >= rule.threshold)
    a_sg, mem_sg = sg(a), sg(mem)
    target = modifier_apply(modifier, jnp.concatenate([a_sg, mem_sg, t], axis=-1)) - t
    _, pull = jax.vjp(lambda p: titan_apply(p, a_sg, clip), jax.tree.map(jnp.add, meta_sg, sg(st["delta"])))
    grad = pull(2.0 * (mem_sg - target) * active[:, None].astype(t.dtype))[0]
    acc_g = jax.tree.map(jnp.add, st["acc_g"], grad)
    acc_n = st["acc_n"] + active.sum().astype(jnp.int32)
    acc_x = st["acc_x"] + (a_sg * v[:, None].astype(a.dtype)).sum(0)
    count = st["count"] + v.sum().astype(jnp.int32)
    if rule.clock == "tokens":
      due, taken = count >= rule.period, count >= rule.period
    else:  # the original's LevelClock: fires if it never has, or ≥ period ticks since (this chunk's read pass ticked)
      due, taken = (st["updates"] == 0) | (st["ticks"] + 1 >= rule.period), jnp.bool_(True)
    fire = due & gate
    grads = jax.tree.map(lambda x: x / jnp.maximum(acc_n, 1).astype(x.dtype), acc_g)
    ctx = acc_x / jnp.maximum(count, 1).astype(acc_x.dtype)
    step, opt = cms.deep_momentum(grads, {k: st[k] for k in ("m", "v") if k in st}, ctx, rule.variant, rule.beta)
    out = dict(st, **_where(fire, opt, {k: st[k] for k in opt}))
    out["delta"] = _where(fire, jax.tree.map(lambda dl, s: dl - rule.lr * s, st["delta"], step), st["delta"])
    out["acc_g"] = _where(taken, jax.tree.map(jnp.zeros_like, acc_g), acc_g)
    out["acc_x"] = jnp.where(taken, jnp.zeros_like(acc_x), acc_x)
    out["acc_n"] = jnp.where(taken, 0, acc_n)
    out["count"] = jnp.where(taken, count - rule.period if rule.clock == "tokens" else 0, count)
    out["updates"] = st["updates"] + fire.astype(jnp.int32)
    if rule.clock == "calls":  # after a step the update pass's own tick is the one since it; else both passes tick
      out["ticks"] = jnp.where(fire, 1, st["ticks"] + 2)
    return out, mem

  st, mem = jax.lax.scan(sub_chunk, st, (split(a_Td), split(teach_Td), split(valid_T)))
  return mem.reshape(T, d), st


class SelfModifier(nnx.Module):
  """The hybrid's SelfModifier MLP (3d → hidden → hidden → d, GELU, biases)."""

  def __init__(self, d: int, hidden: int, std: float, rngs: nnx.Rngs):
    dims = (3 * d, hidden, hidden, d)
    axes = ((None, "mlp"), ("mlp", None), ("mlp", "embed"))
    for i in (1, 2, 3):
      setattr(self, f"w{i}", nnx.Param(normal_init(rngs, dims[i - 1:i + 1], std), axes=axes[i - 1]))
      setattr(self, f"b{i}", nnx.Param(jnp.zeros((dims[i],), jnp.float32), axes=axes[i - 1][1:]))

  def params(self) -> dict:
    return {f"{n}{i}": getattr(self, f"{n}{i}")[...] for i in (1, 2, 3) for n in ("w", "b")}


class HybridBlock(HopeBlock):
  """hope_hybrid: post-norm attention a → Titan level M(a) → CMS(a + M(a)); the Titan steps in the update pass."""

  def __init__(self, m, rngs: nnx.Rngs):
    super().__init__(m, rngs)
    h, d = m.hope, m.d_model
    self.titan = CMSLevel(d, h.titan_hidden_mult * d, m.init_std, True, rngs)  # the same tensors, used by titan_apply
    self.modifier = SelfModifier(d, h.self_mod_hidden * d, m.init_std, rngs)

  def __call__(self, x, positions_T, rng=None, io: LayerIO = LayerIO(), hooks: Hooks = NO_HOOKS):
    cache_refused(hooks)
    h = self.m.hope
    a, probs, state = self.attend(x, io.state, hooks)
    meta, clip = self.titan.params(), hooks.training
    if state is None or "titan" not in state:
      mem = titan_apply(meta, a, clip)
    elif "teach" in state:
      valid = jnp.ones(a.shape[1], bool) if hooks.valid_T is None else hooks.valid_T
      gate = state["gate"] & h.memory & h.writes
      run = lambda st, a_, t_, g_: titan_online(meta, self.modifier.params(), st, a_, t_, valid, g_,
                                                TitanRule.of(h), clip)
      mem, titan = jax.vmap(run)(state["titan"], a, state["teach"].astype(a.dtype), gate)
      state = {**state, "titan": titan}
    else:  # meta + delta: the carried delta is a constant unless hope.step keeps it differentiable
      mem = jax.vmap(lambda st, a_: titan_apply(jax.tree.map(jnp.add, meta, st["delta"]), a_, clip))(state["titan"], a)
    y, state = self.cms(a + mem, state, hooks)
    return y, dataclasses.replace(io, state=state, probs=probs)

  def fast_state(self) -> dict:
    return {**super().fast_state(), "titan": titan_init_state(self.titan.params(), self.m.hope.inner_opt)}
