"""Attention math against float64 implementations written here from the formulas (dba.md §1)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dba_jax import model as model_lib, ops
from dba_jax.attention import dba
from dba_jax.config import validate
from helpers import tiny


def np_rope(x_THD, base=10000.0):
  """Rotate-half RoPE in float64 numpy, position t = row t."""
  T, _, D = x_THD.shape
  inv = base ** (-np.arange(0, D, 2) / D)
  ang = np.arange(T)[:, None] * inv[None, :]
  cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
  x1, x2 = x_THD[..., : D // 2], x_THD[..., D // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def np_softmax_attend(score_fn, v_TKE, T, H, K, n_null=0, null_score=None, null_v=None):
  """out[t, h] = sum_j softmax_j(score_fn(h, t, j)) v[j, h // (H/K)] over j <= t (plus always-visible nulls)."""
  out = np.zeros((T, H, v_TKE.shape[-1]))
  for h in range(H):
    kv = h // (H // K)
    for t in range(T):
      s = [score_fn(h, t, j) for j in range(t + 1)]
      vals = [v_TKE[j, kv] for j in range(t + 1)]
      if n_null:
        s, vals = [null_score(h, t)] + s, [null_v[kv]] + vals
      p = np.exp(np.array(s) - max(s))
      out[t, h] = (p / p.sum()) @ np.array(vals)
  return out


@pytest.mark.parametrize("H,K,n_prefix", [(4, 4, 0), (4, 2, 0), (4, 1, 1)])
def test_reference_attention_matches_loops(H, K, n_prefix):
  rng = np.random.default_rng(0)
  T, D, E = 6, 5, 3
  q, k, v = rng.normal(size=(1, T, H, D)), rng.normal(size=(1, T + n_prefix, K, D)), rng.normal(size=(1, T + n_prefix, K, E))
  with jax.enable_x64(True):
    got = np.asarray(ops.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), n_prefix=n_prefix,
                                   impl="reference"))
  assert got.dtype == np.float64
  kk, vv = k[0, n_prefix:], v[0, n_prefix:]
  score = lambda h, t, j: q[0, t, h] @ kk[j, h // (H // K)] / np.sqrt(D)
  null_score = (lambda h, t: q[0, t, h] @ k[0, 0, h // (H // K)] / np.sqrt(D)) if n_prefix else None
  want = np_softmax_attend(score, vv, T, H, K, n_prefix, null_score, v[0, 0] if n_prefix else None)
  np.testing.assert_allclose(got[0], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("H,K,n_prefix", [(4, 4, 0), (8, 2, 1)])
def test_xla_attention_fp32_matches_fp64_reference(H, K, n_prefix):
  rng = np.random.default_rng(1)
  B, T, D, E = 2, 33, 16, 12
  q, k, v = (rng.normal(size=s) for s in [(B, T, H, D), (B, T + n_prefix, K, D), (B, T + n_prefix, K, E)])
  got = ops.attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), n_prefix=n_prefix, impl="xla")
  with jax.enable_x64(True):
    want = ops.attention(*(jnp.asarray(a) for a in (q, k, v)), n_prefix=n_prefix, impl="reference")
  # fp32 logits over D=16 terms and a 34-way softmax: errors ~1e-6; 2e-5 leaves margin, not slack.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def _dba_module(dtype=jnp.float32, **model):
  c = validate(tiny("dba", **model))
  mod = dba.DBAAttention(c.model, 0.02, nnx.Rngs(0))
  if dtype != jnp.float32:
    graphdef, state = nnx.split(mod)
    mod = nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(dtype), state))
  return c.model, mod


def _np(mod, path):
  return np.asarray(getattr(mod, path).kernel[...], np.float64)


def dba_formula(mod, m, x_TD, gate_logit=None):
  """Decoupled attention from dba.md §1.2 in float64 numpy: separate semantic and geometric dot products."""
  H, K = m.n_heads, m.n_kv_heads or m.n_heads
  ds, dg, dv = m.dba.sem_dim // H, m.dba.geo_dim // H, m.attn_dim // H
  T = x_TD.shape[0]
  qs = (x_TD @ _np(mod, "q_sem")).reshape(T, H, ds)
  ks = (x_TD @ _np(mod, "q_sem" if m.dba.tie_qk else "k_sem")).reshape(T, K, ds)
  qg = np_rope((x_TD @ _np(mod, "q_geo")).reshape(T, H, dg))
  kg = np_rope((x_TD @ _np(mod, "k_geo")).reshape(T, K, dg))
  v = (x_TD @ _np(mod, "v")).reshape(T, K, dv)
  g = np.full(H, 0.5) if gate_logit is None else 1 / (1 + np.exp(-gate_logit))
  a, b = 2 * g, 2 - 2 * g
  G = H // K
  score = lambda h, t, j: a[h] * qs[t, h] @ ks[j, h // G] / np.sqrt(ds) + b[h] * qg[t, h] @ kg[j, h // G] / np.sqrt(dg)
  null_score = null_v = None
  if m.dba.null_attn:
    nks, nkg = (np.asarray(getattr(mod, n)[...], np.float64) for n in ("k_sem_null", "k_geo_null"))
    null_score = lambda h, t: a[h] * qs[t, h] @ nks[h // G] / np.sqrt(ds) + b[h] * qg[t, h] @ nkg[h // G] / np.sqrt(dg)
    null_v = np.asarray(mod.v_null[...], np.float64)
  o = np_softmax_attend(score, v, T, H, K, int(m.dba.null_attn), null_score, null_v)
  return o.reshape(T, H * dv) @ _np(mod, "out")


DBA_VARIANTS = [dict(), dict(gate=True), dict(null_attn=True), dict(n_kv_heads=2), dict(tie_qk=True),
                dict(gate=True, null_attn=True, n_kv_heads=2)]


@pytest.mark.parametrize("variant", DBA_VARIANTS, ids=lambda v: "-".join(v) or "plain")
def test_dba_equals_float64_formula(variant):
  rng = np.random.default_rng(2)
  T = 7
  x = rng.normal(size=(T, 32))
  with jax.enable_x64(True):
    m, mod = _dba_module(jnp.float64, attn_impl="reference", **variant)
    gate = None
    if m.dba.gate:  # a non-trivial gate, so a and b really differ per head
      gate = rng.normal(size=m.n_heads)
      mod.gate_logit[...] = jnp.asarray(gate)
    got = np.asarray(mod(jnp.asarray(x)[None], jnp.arange(T))[0])[0]
  np.testing.assert_allclose(got, dba_formula(mod, m, x, gate), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", DBA_VARIANTS[:3], ids=lambda v: "-".join(v) or "plain")
def test_dba_xla_fp32_close_to_float64_formula(variant):
  rng = np.random.default_rng(3)
  T = 9
  x = rng.normal(size=(T, 32))
  m, mod = _dba_module(attn_impl="xla", **variant)
  got = np.asarray(mod(jnp.asarray(x, jnp.float32)[None], jnp.arange(T))[0])[0]
  np.testing.assert_allclose(got, dba_formula(mod, m, x), rtol=1e-4, atol=1e-5)


def test_gate_at_init_equals_ungated():
  x = jax.random.normal(jax.random.key(0), (2, 8, 32))
  _, gated = _dba_module(gate=True, gate_dynamic=True)
  _, plain = _dba_module()
  pos = jnp.arange(8)
  np.testing.assert_array_equal(np.asarray(gated(x, pos)[0]), np.asarray(plain(x, pos)[0]))
  gated.gate_logit[...] = jnp.full((4,), 0.7)  # and it is live: moving the gate changes the output
  assert not np.allclose(np.asarray(gated(x, pos)[0]), np.asarray(plain(x, pos)[0]), atol=1e-4)


def test_rope_touches_only_geometric_path():
  x = jax.random.normal(jax.random.key(1), (1, 8, 32))
  _, mod = _dba_module()
  p0, p5 = jnp.arange(8), jnp.arange(8) + 5
  qs0, ks0, qg0, kg0, v0 = mod.streams(x, p0)
  qs5, ks5, qg5, kg5, v5 = mod.streams(x, p5)
  np.testing.assert_array_equal(np.asarray(qs0), np.asarray(qs5))
  np.testing.assert_array_equal(np.asarray(ks0), np.asarray(ks5))
  np.testing.assert_array_equal(np.asarray(v0), np.asarray(v5))
  np.testing.assert_array_equal(np.asarray(qs0).reshape(1, 8, -1), np.asarray(mod.q_sem(x)))  # unrotated
  assert not np.allclose(np.asarray(qg0), np.asarray(qg5))
  assert not np.allclose(np.asarray(kg0), np.asarray(kg5))
  _, rot = _dba_module(rope_semantic=True)  # the ablation flag does rotate the semantic path
  assert not np.allclose(np.asarray(rot.streams(x, p0)[0]), np.asarray(rot.streams(x, p5)[0]))


KINDS = [("standard", {}), ("gqa", {}), ("dba", dict(gate=True, null_attn=True)), ("gpt2", {}),
         ("standard", dict(attn_dim=16)), ("dba", dict(scan_layers=False))]


@pytest.mark.parametrize("kind,extra", KINDS, ids=[k + "-".join(e) for k, e in KINDS])
def test_causality(kind, extra):
  c = validate(tiny(kind, **extra))
  params = model_lib.init_params(c.model, jax.random.key(0))
  graphdef, _ = model_lib.abstract(c.model)
  model = model_lib.Model(c.model, graphdef, params)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 12), 0, 256))
  changed = tokens.copy()
  t = 6
  changed[:, t] = (changed[:, t] + 1) % 256
  a, b = np.asarray(model(tokens)), np.asarray(model(changed))
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert np.abs(a[:, t:] - b[:, t:]).max() > 1e-6  # the change is visible from t on


def _shapes(c):
  return jax.tree.map(lambda a: a.shape, model_lib.init_params(validate(c).model, jax.random.key(0)))


def test_gqa_and_bottleneck_shapes():
  d = 32
  gqa = _shapes(tiny("gqa"))["blocks"]["attn"]  # 4 query heads, 2 kv heads, head dim 8
  assert gqa["q"]["kernel"] == (2, d, 4 * 8) and gqa["k"]["kernel"] == gqa["v"]["kernel"] == (2, d, 2 * 8)
  assert gqa["out"]["kernel"] == (2, 32, d)
  bott = _shapes(tiny("standard", attn_dim=16))["blocks"]["attn"]  # head dim 4
  assert bott["q"]["kernel"] == bott["k"]["kernel"] == (2, d, 16) and bott["out"]["kernel"] == (2, 16, d)
  dba = _shapes(tiny("dba", n_kv_heads=2))["blocks"]["attn"]  # per head: sem 4, geo 8, v 12
  assert dba["q_sem"]["kernel"] == (2, d, 16) and dba["k_sem"]["kernel"] == (2, d, 8)
  assert dba["k_geo"]["kernel"] == (2, d, 16) and dba["v"]["kernel"] == (2, d, 24)
  assert dba["out"]["kernel"] == (2, 48, d)
  c = tiny("dba", attn_dim=0, n_kv_heads=3)
  with pytest.raises(ValueError, match="n_heads=4 is not a multiple of model.n_kv_heads=3"):
    validate(c)


def test_dba_op_reference_matches_loops_and_the_folded_paths():
  """ops.dba_attention: the float64 reference (two score paths, gate weights per query and head, null key, GQA)
  equals explicit loops; the folded xla path agrees in float32 (2e-5)."""
  rng = np.random.default_rng(3)
  B, T, H, K, ds, dg, E = 1, 6, 4, 2, 3, 5, 4
  qs, qg = rng.normal(size=(B, T, H, ds)), rng.normal(size=(B, T, H, dg))
  ks, kg, v = rng.normal(size=(B, T, K, ds)), rng.normal(size=(B, T, K, dg)), rng.normal(size=(B, T, K, E))
  a = rng.uniform(0.2, 1.8, size=(B, T, H, 1))
  null_k, null_v = rng.normal(size=(K, ds + dg)), rng.normal(size=(K, E))
  kw = dict(sem_scale=ds ** -0.5, geo_scale=dg ** -0.5)
  G = H // K

  def score(h, t, j):
    return a[0, t, h, 0] * qs[0, t, h] @ ks[0, j, h // G] * kw["sem_scale"] + \
        (2 - a[0, t, h, 0]) * qg[0, t, h] @ kg[0, j, h // G] * kw["geo_scale"]

  def null_score(h, t):
    return a[0, t, h, 0] * qs[0, t, h] @ null_k[h // G, :ds] * kw["sem_scale"] + \
        (2 - a[0, t, h, 0]) * qg[0, t, h] @ null_k[h // G, ds:] * kw["geo_scale"]

  want = np_softmax_attend(score, v[0], T, H, K, 1, null_score, null_v)
  args = lambda dt: [jnp.asarray(x, dt) for x in (qs, ks, qg, kg, v)]
  extra = lambda dt: dict(sem_weight=jnp.asarray(a, dt), geo_weight=jnp.asarray(2 - a, dt),
                          null=(jnp.asarray(null_k, dt), jnp.asarray(null_v, dt)), **kw)
  with jax.enable_x64(True):
    got = ops.dba_attention(*args(jnp.float64), **extra(jnp.float64), impl="reference")
  np.testing.assert_allclose(np.asarray(got[0]), want, rtol=1e-12, atol=1e-12)
  fast = ops.dba_attention(*args(jnp.float32), **extra(jnp.float32), impl="xla")
  np.testing.assert_allclose(np.asarray(fast[0]), want, atol=2e-5)


def test_explicit_mask_and_bias_match_the_reference():
  """The cached-decoding form of the standard op (key-position mask, additive bias) agrees across paths."""
  rng = np.random.default_rng(4)
  q, k, v = rng.normal(size=(2, 3, 4, 8)), rng.normal(size=(2, 7, 2, 8)), rng.normal(size=(2, 7, 2, 5))
  mask = ops.positions_mask(jnp.asarray([4, 5, 6]), jnp.asarray([[0, 1, 2, 3, 4, 5, 6], [0, -1, 2, 6, -1, 5, 4]]))
  bias = -np.abs(rng.normal(size=(2, 3, 7)))
  with jax.enable_x64(True):
    want, probs = ops.attention(*map(jnp.asarray, (q, k, v)), mask=mask, bias=jnp.asarray(bias), return_probs=True,
                                impl="reference")
  assert np.all(np.asarray(probs)[1, :, 0, [1, 4]] == 0) and np.all(np.asarray(probs)[1, :, 0, 3] == 0)  # empty / future
  got = ops.attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), mask=mask,
                      bias=jnp.asarray(bias, jnp.float32), impl="xla")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
