"""hope_selfmod and hope_hybrid (issue 14, dba_jax/hope/selfmod.py): the self-modifying write and the Titan level's
inner loop against float64 loops written here from others.md B.4 / B.5 (in torch's [out, in] weight layout), the
original's parameter counts, per-row state, the memory switches, meta-gradients and a few training steps."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dba_jax import model as model_lib, train
from dba_jax.config import validate
from dba_jax.conversion import ConversionError
from dba_jax.formats import hope as hope_format
from dba_jax.hope import selfmod
from helpers import load_preset

sg = jax.lax.stop_gradient
gelu = lambda x: jax.nn.gelu(x, approximate=False)


def hope_config(block, periods=(2, 4), vocab=97, d=32, layers=2, **hope):
  c = load_preset("hope.py", "cpu")
  m = c.model
  m.block, m.vocab_size, m.pad_vocab_to, m.d_model, m.n_layers, m.n_heads = block, vocab, 1, d, layers, 4
  m.scan_layers = layers > 1
  c.model.hope.cms_periods, c.model.hope.online_chunk = periods, 0
  for k, v in hope.items():
    c.model.hope[k] = v
  c.data.seq_len, c.train.batch_size = 16, 4
  return validate(c)


@pytest.mark.parametrize("block,periods,vocab,d,hope,want", [
    ("hope_selfmod", (4, 16, 64), 256, 128, {}, 1_186_816),
    ("hope_hybrid", (4, 16, 64), 256, 128, {}, 2_271_232),
    # measured with the package (its default use_skip=True: M_η and M_α carry W_skip [1, d])
    ("hope_selfmod", (1, 4), 97, 32, {"selfmod_skip": True}, 59_872),
    ("hope_hybrid", (1, 4), 97, 32, {"titan_period": 4}, 128_096),
])
def test_parameter_counts_match_the_original(block, periods, vocab, d, hope, want):
  assert model_lib.count_params(hope_config(block, periods, vocab, d, **hope).model) == want


# ------------------------------------------------------------------------- self-modifying write, float64

def _normal(seed, shape, scale=1.0, dtype=np.float64):
  """Test data from numpy (eager jax.random would compile a kernel per shape)."""
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(dtype)


def _memories(seed, d, skip, scale=0.4, dtype=np.float64):
  """Every memory's params (dba_jax layout), big enough that the write moves the outputs."""
  out = {}
  for i, name in enumerate(selfmod.MEMORIES):
    o = 1 if name in ("eta", "alpha") else d
    p = {"w2": _normal((seed, i, 0), (d, d), scale, dtype), "w1": _normal((seed, i, 1), (d, o), scale, dtype)}
    if skip and o != d:
      p["w_skip"] = _normal((seed, i, 2), (d, o), scale, dtype)
    out[name] = p
  return out


def _torch_layout(p):
  return {n: np.asarray(w).T.copy() for n, w in p.items()}


@jax.jit
def _ref_apply(W, x):
  """M(x) in torch's layout: x + W1 GELU(W2 x) | W1 GELU(W2 x) + W_skip x | W1 GELU(W2 x)."""
  y = W["w1"] @ gelu(W["w2"] @ x)
  if "w_skip" in W:
    return y + W["w_skip"] @ x
  return y + x if y.shape == x.shape else y


@functools.partial(jax.jit, static_argnums=3)
def _ref_grad(W, k, v, rule):
  """∇_W of one token's ‖M(k) − sg(M(v))‖² (or −⟨M(k), sg(M(v))⟩, or without the sg)."""
  def loss(W_):
    pred, vhat = _ref_apply(W_, k), _ref_apply(W_, v)
    vhat = sg(vhat) if rule.stopgrad_vhat else vhat
    return -(pred * vhat).sum() if rule.objective == "dot" else ((pred - vhat) ** 2).sum()
  return jax.grad(loss)(W)


def _reference_write(meta, x, q, rule):
  """others.md B.5 as the original loops: tokens up to the next boundary of either chunk size are read (outputs
  with the memories as they are), buffered, and at a boundary each memory's per-token gradients are taken at its
  boundary weights and applied token by token: W2 ← W2(αI − η k kᵀ) − η G2, W1 ← α W1 − η G1."""
  meta_t = {n: _torch_layout(p) for n, p in meta.items()}
  W = {n: dict(meta_t[n]) for n in rule.learned}
  buf = {n: {k: np.zeros_like(v) for k, v in W[n].items()} for n in rule.learned}
  cur = lambda n: W.get(n, meta_t[n])
  T, d = x.shape
  outs, pending = [], {"other": [], "memory": []}

  def apply(names, tokens):
    start = {n: {k: v.copy() for k, v in W[n].items()} for n in names}
    grads = {n: [_ref_grad(start[n], k, v, rule) for k, v, _, _ in tokens] for n in names}
    for t, (k, _, eta, alpha) in enumerate(tokens):
      P = alpha * np.eye(d) - eta * np.outer(k, k)
      for n in names:
        for name, w in W[n].items():
          g = np.asarray(grads[n][t][name])
          if rule.momentum > 0:
            buf[n][name] = rule.momentum * buf[n][name] + g
            g = buf[n][name]
          if name == "w1" or not rule.rank1:
            W[n][name] = alpha * w - eta * g
          else:
            W[n][name] = w @ P - eta * g

  idx, c_o, c_m = 0, rule.chunk, rule.chunk_memory
  while idx < T:
    next_o, next_m = min((idx // c_o + 1) * c_o, T), min((idx // c_m + 1) * c_m, T)
    end = min(next_o, next_m)
    for t in range(idx, end):
      k, v = np.asarray(_ref_apply(cur("k"), x[t])), np.asarray(_ref_apply(cur("v"), x[t]))
      k = k / max(np.linalg.norm(k), 1e-6) if rule.qk_norm else k
      eta = float(jax.nn.softplus(_ref_apply(cur("eta"), x[t])[0])) * rule.lr
      alpha = float(jax.nn.sigmoid(_ref_apply(cur("alpha"), x[t])[0] + rule.alpha_init)) if rule.alpha else 1.0
      q_t = q[t]
      if rule.adaptive_q:
        q_t = np.asarray(_ref_apply(cur("q"), x[t]))
        q_t = q_t / max(np.linalg.norm(q_t), 1e-6) if rule.qk_norm else q_t
      outs.append(np.asarray(_ref_apply(cur("memory"), q_t)))
      for part in pending.values():
        part.append((k, v, eta, alpha))
    idx = end
    if idx == next_o:
      apply(rule.others, pending["other"])
      pending["other"] = []
    if idx == next_m:
      apply(("memory",), pending["memory"])
      pending["memory"] = []
  return np.stack(outs), W, buf


RULES = {  # lr 0.1 (0.003 for the unbounded dot objective without forgetting): the weights move by O(1)
    "per_token": selfmod.Rule(chunk=1, chunk_memory=1, lr=0.1),
    "chunk_8_16": selfmod.Rule(chunk=8, chunk_memory=16, lr=0.1),
    "momentum_skip_adaptive_q_alpha_init": selfmod.Rule(chunk=8, chunk_memory=16, lr=0.1, momentum=0.5,
                                                        adaptive_q=True, qk_norm=True, alpha_init=3.0),
    "no_rank1_no_alpha_dot": selfmod.Rule(chunk=4, chunk_memory=8, lr=0.003, rank1=False, alpha=False,
                                          objective="dot", stopgrad_vhat=False),
}
SLOW_RULES = ("chunk_8_16",)  # the switches' variant takes the same chunks


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_RULES else n for n in RULES])
def test_selfmod_write_equals_the_float64_reference(name):
  """Chunk 1: the per-token rule; chunks 8 / 16 over 20 tokens (a partial tail): per-token gradients at the chunk
  start applied sequentially; and the switches (momentum, W_skip, adaptive q, q/k norm, α offset, no rank-1, no α,
  dot)."""
  rule, T, d = RULES[name], 20, 6
  skip = name == "momentum_skip_adaptive_q_alpha_init"
  with jax.enable_x64(True):
    meta, x, q = _memories(0, d, skip), _normal(1, (T, d)), _normal(2, (T, d))
    W0 = {n: meta[n] for n in rule.learned}
    buf0 = jax.tree.map(jnp.zeros_like, W0) if rule.momentum > 0 else {}
    o, W, buf = jax.jit(lambda m, x_, q_: selfmod.selfmod_write(m, W0, buf0, x_, q_, jnp.ones(T, bool), rule))(
        meta, x, None if rule.adaptive_q else q)
    want_o, want_W, want_buf = _reference_write(meta, np.asarray(x), np.asarray(q), rule)
    np.testing.assert_allclose(np.asarray(o), want_o, rtol=0, atol=1e-10)
    assert np.abs(np.asarray(W["memory"]["w1"]) - np.asarray(meta["memory"]["w1"])).max() > 0.1  # it learned
    for n in rule.learned:
      for k in W[n]:
        np.testing.assert_allclose(np.asarray(W[n][k]).T, want_W[n][k], rtol=0, atol=1e-10, err_msg=f"{n} {k}")
        if rule.momentum > 0:
          np.testing.assert_allclose(np.asarray(buf[n][k]).T, want_buf[n][k], rtol=0, atol=1e-10)


def test_padding_tokens_never_step():
  rule, T, d = RULES["chunk_8_16"], 12, 6
  with jax.enable_x64(True):
    meta, x = _memories(0, d, False), _normal(1, (T, d))
    W0 = {n: meta[n] for n in rule.learned}
    valid = jnp.arange(T) < 9
    W = jax.jit(lambda x_: selfmod.selfmod_write(meta, W0, {}, x_, x_, valid, rule)[1])(x)
    _, want, _ = _reference_write(meta, np.asarray(x[:9]), np.asarray(x[:9]), rule)
    for n in rule.learned:
      for k in W[n]:
        np.testing.assert_allclose(np.asarray(W[n][k]).T, want[n][k], rtol=0, atol=1e-10, err_msg=f"{n} {k}")


# ------------------------------------------------------------------------------ hybrid Titan level, float64

def _titan_level(seed, d, hidden, dtype=np.float64):
  n = lambda i, shape, s: _normal((seed, i), shape, s, dtype)
  return {"norm_scale": 1 + n(0, (d,), 0.1), "norm_bias": n(1, (d,), 0.1), "w1": n(2, (d, hidden), 0.4),
          "b1": n(3, (hidden,), 0.1), "w2": n(4, (hidden, d), 0.4), "b2": n(5, (d,), 0.1)}


def _modifier(seed, d, hidden, dtype=np.float64):
  dims = (3 * d, hidden, hidden, d)
  p = {}
  for i in (1, 2, 3):
    p[f"w{i}"] = _normal((seed, i, 0), dims[i - 1:i + 1], 0.3, dtype)
    p[f"b{i}"] = _normal((seed, i, 1), (dims[i],), 0.1, dtype)
  return p


def _ref_titan(P, a, clip):
  """M(a) = LN(c(W2 GELU(W1 a + b1) + b2)) in torch's layout (W1 [h, d], W2 [d, h]), one token."""
  y = P["w2"] @ gelu(P["w1"] @ a + P["b1"]) + P["b2"]
  if clip:
    y = y / sg(jnp.maximum(1.0, jnp.linalg.norm(y)))
  mu, var = y.mean(), ((y - y.mean()) ** 2).mean()
  return (y - mu) / jnp.sqrt(var + 1e-5) * P["norm_scale"] + P["norm_bias"]


_ref_titan_all = jax.jit(jax.vmap(_ref_titan, (None, 0, None)), static_argnums=2)


@functools.partial(jax.jit, static_argnums=4)
def _ref_titan_grad(P, A, target, active, clip):
  """∇_P Σ_active ‖M(a) − target‖² (the caller divides by N_active)."""
  loss = lambda Q: (((jax.vmap(_ref_titan, (None, 0, None))(Q, A, clip) - target) ** 2).sum(-1) * active).sum()
  return jax.grad(loss)(P)


@jax.jit
@functools.partial(jax.vmap, in_axes=(None, 0))
def _ref_modifier(M, z):
  h = gelu(M["w1"] @ z + M["b1"])
  h = gelu(M["w2"] @ h + M["b2"])
  return M["w3"] @ h + M["b3"]


def _reference_titan(meta, modifier, a, teach, period, lr, variant, clip, beta=0.9, beta2=0.999, eps=1e-8):
  """Every `period` tokens: target = SelfModifier([a; M(a); δ]) − δ, loss Σ_active ‖M(a) − target‖² / N_active,
  one DeepMomentum step (nl_l2_precond projects a torch tensor's last axis of size d off the unit mean input;
  preconditioned divides by √EMA(g²)); m ← β m + (1 − β) u, θ ← θ − lr m."""
  P = {k: np.asarray(v).T.copy() if k in ("w1", "w2") else np.asarray(v) for k, v in meta.items()}
  M = {k: np.asarray(v).T.copy() if k.startswith("w") else np.asarray(v) for k, v in modifier.items()}
  mom = {k: np.zeros_like(v) for k, v in P.items()}
  sq = {k: np.zeros_like(v) for k, v in P.items()}
  outs = []
  d = a.shape[1]
  for s in range(0, a.shape[0], period):
    A, D = a[s:s + period], teach[s:s + period]
    mem = np.asarray(_ref_titan_all(P, A, clip))
    outs.append(mem)
    target = np.asarray(_ref_modifier(M, np.concatenate([A, mem, D], axis=1))) - D
    active = np.abs(D).sum(-1) > 0
    g = jax.tree.map(lambda x: x / max(active.sum(), 1), _ref_titan_grad(P, A, target, active, clip))
    ctx = A.mean(0)
    unit = ctx / (np.linalg.norm(ctx) + eps)
    for k in P:
      gk = np.asarray(g[k])
      if variant == "nl_l2_precond":
        u = gk - np.multiply.outer(gk @ unit, unit) if gk.shape[-1] == d else gk
      else:
        sq[k] = beta2 * sq[k] + (1 - beta2) * gk * gk
        u = gk / (np.sqrt(sq[k]) + eps)
      mom[k] = beta * mom[k] + (1 - beta) * u
      P[k] = P[k] - lr * mom[k]
  back = lambda t: {k: v.T if k in ("w1", "w2") else v for k, v in t.items()}
  return back(P), back(mom), np.concatenate(outs)


@pytest.mark.parametrize("variant", ["nl_l2_precond", pytest.param("preconditioned", marks=pytest.mark.slow)])
def test_titan_inner_loop_trajectory_equals_the_float64_reference(variant):
  """Params, momenta and outputs after one update pass (12 tokens, period 4, one inactive token) equal the
  buffered form written from the spec; the new weights depend on the SelfModifier (a nonzero gradient)."""
  T, d, hidden, lr = 12, 5, 7, 0.2
  rule = selfmod.TitanRule(period=4, clock="tokens", lr=lr, variant=variant)
  with jax.enable_x64(True):
    meta, modifier, a, teach = _titan_level(0, d, hidden), _modifier(1, d, 9), _normal(2, (T, d)), _normal(3, (T, d))
    teach[5] = 0.0
    st = selfmod.titan_init_state(meta, variant)
    run = lambda mod: selfmod.titan_online(meta, mod, st, a, teach, jnp.ones(T, bool), jnp.bool_(True), rule, True)
    size = lambda mod: (lambda out: (sum(jnp.sum(x ** 2) for x in jax.tree.leaves(out[1]["delta"])), out))(run(mod))
    (_, (mem, new)), g = jax.jit(jax.value_and_grad(size, has_aux=True))(modifier)
    want_p, want_m, want_mem = _reference_titan(meta, modifier, np.asarray(a), np.asarray(teach), 4, lr, variant,
                                                True)
    np.testing.assert_allclose(np.asarray(mem), want_mem, rtol=0, atol=1e-10)
    for k in meta:
      np.testing.assert_allclose(meta[k] + np.asarray(new["delta"][k]), want_p[k], rtol=0, atol=1e-10, err_msg=k)
      np.testing.assert_allclose(np.asarray(new["m"][k]), want_m[k], rtol=0, atol=1e-10, err_msg=k)
    assert int(new["updates"]) == 3 and int(new["count"]) == 0
    assert all(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(g))


def test_titan_clocks():
  """Token clock: 6 tokens per call, period 4 → steps after tokens 4, 8, 12 (2 of 2 calls carry the buffer). The
  original's call clock (period 4, read + update pass tick): steps in calls 0, 2, 4 of 5, on the whole call."""
  d, hidden = 4, 6
  f32 = np.float32
  meta, modifier = _titan_level(0, d, hidden, f32), _modifier(1, d, 5, f32)
  a, teach = _normal(2, (6, d), dtype=f32), _normal(3, (6, d), dtype=f32)
  for clock, calls, want in (("tokens", 2, [1, 3]), ("calls", 5, [1, 1, 2, 2, 3])):
    rule = selfmod.TitanRule(period=4, clock=clock, lr=0.1)
    call = jax.jit(lambda st_, gate: selfmod.titan_online(meta, modifier, st_, a, teach, jnp.ones(6, bool), gate,
                                                          rule, False)[1])
    st, got = selfmod.titan_init_state(meta, rule.variant), []
    for _ in range(calls):
      st = call(st, jnp.bool_(True))
      got.append(int(st["updates"]))
    assert got == want, clock
  st = call(selfmod.titan_init_state(meta, rule.variant), jnp.bool_(False))  # the gate skips the step
  assert int(st["updates"]) == 0 and all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(st["delta"]))


# ------------------------------------------------------------------------------------------ blocks in a model
# (one layer, one CMS level: these tests compile the whole update pass)

SMALL = dict(periods=(2,), layers=1, selfmod_chunk=2, selfmod_chunk_memory=4, selfmod_lr=0.5, titan_period=2,
             titan_lr=0.05)


@pytest.fixture(scope="module", params=["hope_selfmod", "hope_hybrid"])
def tiny(request):
  """(config, decoder, tokens [2, 8], jitted update pass tokens -> (logits, state))."""
  c = hope_config(request.param, teach_scale=1.0, inner_lr=0.05, **SMALL)
  decoder = model_lib.Decoder(c.model, nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, 97, (2, 8)).astype(np.int32)
  return c, decoder, tokens, jax.jit(lambda t: _update_pass(decoder, t, c.model)[:2])


def _update_pass(decoder, tokens, m, teach_scale=0.05):
  """One update pass from the zero state with a fixed teach signal: (logits, new state)."""
  from dba_jax.hope import blocks
  state = blocks.init_fast_state(m, decoder, tokens.shape[0])
  teach = _normal(7, (m.n_layers,) + tokens.shape + (m.d_model,), teach_scale, np.float32)
  gate = jnp.ones((m.n_layers, tokens.shape[0]), bool)
  out = decoder.forward(jnp.asarray(tokens), cache_state={**state, "teach": teach, "gate": gate})
  return out.logits, {k: out.cache_state[k] for k in state}, state


def test_rows_keep_their_own_memory(tiny):
  c, decoder, tokens, fwd = tiny
  other = tokens.copy()
  other[1] = (other[1] + 3) % 97
  (la, sa), (lb, sb) = fwd(tokens), fwd(other)
  np.testing.assert_array_equal(np.asarray(la[0]), np.asarray(lb[0]))
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x)[:, 0], np.asarray(y)[:, 0]), sa, sb)
  key = "selfmod" if c.model.block == "hope_selfmod" else "titan"
  assert max(float(np.abs(np.asarray(x)[:, 1] - np.asarray(y)[:, 1]).max())
             for x, y in zip(jax.tree.leaves(sa[key]["delta"]), jax.tree.leaves(sb[key]["delta"]))) > 0


def _deltas(state):
  """Every fast weight of a state (the CMS levels', the self-modifying memories', the Titan level's)."""
  return [lv["delta"] for lv in state["cms"]] + [state[k]["delta"] for k in ("selfmod", "titan") if k in state]


def test_memory_off_moves_no_fast_weight(tiny):
  c, decoder, tokens, fwd = tiny
  _, moved = fwd(tokens)
  off = _with(decoder, c, memory=False)
  _, still = jax.jit(lambda t: _update_pass(off, t, c.model)[:2])(tokens)
  for x in jax.tree.leaves(_deltas(still)):
    assert not np.asarray(x).any()
  key = "selfmod" if c.model.block == "hope_selfmod" else "titan"
  assert max(float(np.abs(x).max()) for x in jax.tree.leaves(moved[key]["delta"])) > 0


def _with(decoder, c, **hope):
  """The decoder's parameters under other hope settings."""
  m = c.model.copy_and_resolve_references()
  for k, v in hope.items():
    m.hope[k] = v
  return nnx.merge(nnx.graphdef(model_lib.Decoder(m, nnx.Rngs(0))), nnx.state(decoder))


def test_selfmod_lr_zero_is_memory_off_and_learning_changes_the_output():
  c = hope_config("hope_selfmod", **SMALL)
  decoder = model_lib.Decoder(c.model, nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 8)).astype(np.int32))
  learn = np.asarray(decoder(tokens))
  zero = np.asarray(_with(decoder, c, selfmod_lr=0.0)(tokens))
  off = np.asarray(_with(decoder, c, memory=False)(tokens))
  np.testing.assert_array_equal(zero, off)
  assert np.abs(learn - off).max() > 1e-6
  np.testing.assert_array_equal(learn[:, :4], off[:, :4])  # M_memory's first chunk reads its meta weights either way


def test_selfmod_meta_weights_get_gradients():
  """Straight-through: M_memory learns; M_α through the decay (selfmod_alpha_grad, the default), exactly nothing with
  the original's frozen α; M_k, M_v, M_η (which only drive the write, a constant then) never; with
  selfmod_write_grad every memory does. The outputs are the same either way."""
  T, d = 8, 6
  meta, x = _memories(0, d, False, 0.3, np.float32), _normal(1, (T, d), dtype=np.float32)
  outs = []
  for write_grad, alpha_grad in ((False, True), (False, False), (True, False)):
    rule = selfmod.Rule(chunk=2, chunk_memory=4, lr=0.3, alpha_grad=alpha_grad)
    st = {"delta": {n: jax.tree.map(jnp.zeros_like, meta[n]) for n in rule.learned}}
    o = lambda m: selfmod.selfmod_context(m, st, x, x, jnp.ones(T, bool), rule, True, write_grad)[0]
    (_, out), g = jax.jit(jax.value_and_grad(lambda m: (jnp.mean(o(m) ** 2), o(m)), has_aux=True))(meta)
    outs.append(np.asarray(out))
    assert float(jnp.abs(g["memory"]["w1"]).max()) > 0
    for n in ("k", "v", "eta", "alpha"):
      want = write_grad or (alpha_grad and n == "alpha")
      assert (max(float(jnp.abs(x_).max()) for x_ in jax.tree.leaves(g[n])) > 0) == want, (n, write_grad, alpha_grad)
  np.testing.assert_array_equal(outs[0], outs[1])


def test_alpha_grad_is_the_decay_gradient():
  """With η = 0 the write is the decay alone (W_b = Π α · W0), so the α gradient of selfmod_alpha_grad equals
  autograd through the whole write (selfmod_write_grad), 1e-10 in float64 (measured 1e-17); M_α's own weights stay
  put (chunk 16 > T), so both read the same α, here with the offset b = 2 (α ≈ 0.88; at b = 0 the gradient is 1e-5,
  the memory being ½^t of itself)."""
  T, d = 12, 5
  with jax.enable_x64(True):
    meta, x = _memories(3, d, True, 0.4), _normal(4, (T, d))
    rule = selfmod.Rule(chunk=16, chunk_memory=4, lr=0.0, alpha_init=2.0)
    st = {"delta": {n: jax.tree.map(jnp.zeros_like, meta[n]) for n in rule.learned}}

    def grad_alpha(write_grad):
      run = lambda m: selfmod.selfmod_context(m, st, x, x, jnp.ones(T, bool), rule, True, write_grad)[0]
      return jax.jit(jax.grad(lambda m: jnp.sum(jnp.sin(run(m)))))(meta)["alpha"]

    got, want = grad_alpha(False), grad_alpha(True)
    assert float(jnp.abs(want["w1"]).max()) > 1e-2
    for k in want:
      np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=0, atol=1e-10, err_msg=k)


def _grads(decoder, loss):
  graphdef, params = nnx.split(decoder)
  return jax.grad(lambda p: loss(nnx.merge(graphdef, p)))(params)


@pytest.mark.slow
def test_block_meta_gradients():
  """In the model: the selfmod read path's M_memory, W_q and conv get gradients, M_α through the decay; the hybrid's
  Titan update is a differentiable function of the SelfModifier, so a loss read with the updated (not stop-gradient)
  state reaches it: what a differentiable carried state in hope.step needs."""
  tokens = np.random.default_rng(0).integers(0, 97, (2, 8)).astype(np.int32)
  c = hope_config("hope_selfmod", **SMALL)
  g = _grads(model_lib.Decoder(c.model, nnx.Rngs(0)), lambda d_: jnp.mean(d_(jnp.asarray(tokens)) ** 2))
  for name in ("m_memory", "w_q", "conv", "m_alpha"):
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g.blocks[0][name])) > 0, name
  c = hope_config("hope_hybrid", **SMALL)

  def loss(d_):
    _, state, _ = _update_pass(d_, tokens, c.model)
    return jnp.mean(d_.forward(jnp.asarray(tokens), cache_state=state).logits ** 2)

  g = _grads(model_lib.Decoder(c.model, nnx.Rngs(0)), loss)
  assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g.blocks[0]["modifier"]))


@pytest.mark.slow
@pytest.mark.parametrize("block", ["hope_selfmod", "hope_hybrid"])
def test_three_training_steps(tmp_path, block):
  c = hope_config(block, vocab=256, online_chunk=8, selfmod_chunk=4, selfmod_chunk_memory=8, titan_period=4)
  t = c.train
  t.steps, t.log_every, t.eval_every, t.ckpt_every, t.eval_batches, t.batch_size = 3, 1, 3, 3, 1, 8
  summary = train.train(c, str(tmp_path / block), quiet=True)
  assert summary["steps"] == 3 and np.isfinite(summary["eval_loss"])


def test_export_to_the_original_refuses_an_alpha_offset():
  """The original's M_α has no bias to carry selfmod_alpha_init: --to-torch would change the function."""
  with pytest.raises(ConversionError, match="selfmod_alpha_init=4.0"):
    hope_format.from_params({}, hope_config("hope_selfmod", selfmod_alpha_init=4.0))


def test_config_errors_name_the_key():
  for block, key, bad in (("hope_selfmod", "selfmod_chunk", 0), ("hope_selfmod", "selfmod_objective", "l1"),
                          ("hope_selfmod", "selfmod_learn", "never"), ("hope_hybrid", "titan_clock", "steps")):
    with pytest.raises(ValueError, match=f"model.hope.{key}"):
      hope_config(block, **{key: bad})


def test_rule_reads_the_config():
  h = hope_config("hope_selfmod", selfmod_adaptive_q=True, selfmod_alpha=False).model.hope
  rule = selfmod.Rule.of(h)
  assert rule.learned == ("k", "v", "eta", "q", "memory")
  assert (rule.alpha_grad, rule.alpha_init) == (True, h.selfmod_alpha_init)
  assert not selfmod.Rule.of(hope_config("hope_selfmod", selfmod_alpha_grad=False).model.hope).alpha_grad
  assert dataclasses.replace(rule, alpha=True).learned == ("k", "v", "eta", "q", "alpha", "memory")


@pytest.mark.slow  # ~45 s
def test_grad_through_write_trains_the_self_modifier_in_the_two_pass_loss():
  """The original never trained the hybrid's SelfModifier (it ran only in the no-grad update pass). With
  hope.grad_through_write the two-pass loss reaches it through the carried Titan state; without, it gets nothing."""
  from dba_jax.hope import step as hope_step
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 17)).astype(np.int32))
  for through in (False, True):
    c = hope_config("hope_hybrid", layers=1, titan_period=2, online_chunk=8, grad_through_write=through)
    c.data.seq_len = 16
    decoder = model_lib.Decoder(c.model, nnx.Rngs(0))
    graphdef, params = nnx.split(decoder)
    loss = lambda p: hope_step.memory_forward(nnx.merge(graphdef, p), tokens, 0, c.model.hope, 97).ce
    g = jax.grad(loss)(params)
    biggest = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g["blocks"][0]["modifier"]))
    assert (biggest > 0) == through, (through, biggest)
