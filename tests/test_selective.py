"""Selective attention against a float64 loop transcription of the paper's math (selective.md §1.2, §12)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dba_jax import model as model_lib, ops
from dba_jax.ops import selective
from dba_jax.config import validate
from dba_kernels import cumsum as kcumsum
from kernel_base import kernel_vs_reference
from helpers import tiny


def loop_selective(q, k, v, protect_bos=True, allow_self_mask=False, head=0):
  """One batch element, float64 numpy, written from the formula with explicit loops over queries."""
  T, H, D = q.shape
  L = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)
  S = np.zeros((T, T))
  for i in range(T):
    for j in range(i + 1):
      S[i, j] = max(L[head, i, j], 0.0)
  if protect_bos:
    S[:, 0] = 0
  if not allow_self_mask:
    S[np.arange(T), np.arange(T)] = 0
  F = np.zeros((T, T))
  for i in range(1, T):
    F[i] = F[i - 1] + S[i - 1]  # F[i, j] = sum_{k < i} S[k, j]
  out = np.zeros((T, H, v.shape[-1]))
  for h in range(H):
    for i in range(T):
      z = L[h, i, : i + 1] - F[i, : i + 1]
      p = np.exp(z - z.max())
      out[i, h] = (p / p.sum()) @ v[: i + 1, h]
  return out, F


def rand_qkv(T, H=3, D=8, B=2, seed=0, dtype=np.float64):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(B, T, H, D)).astype(dtype) * 1.5 for _ in range(3)]


@pytest.mark.parametrize("T", [1, 2, 3, 7, 64, 257])
def test_reference_matches_float64_loops(T):
  q, k, v = rand_qkv(T)
  with jax.enable_x64(True):
    out, f = ops.selective_attention(*map(jnp.asarray, (q, k, v)), impl="reference", return_mask=True)
  assert out.dtype == jnp.float64
  for b in range(2):
    want, want_f = loop_selective(q[b], k[b], v[b])
    np.testing.assert_allclose(np.asarray(out[b]), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.asarray(f[b]), want_f, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("variant", [{}, dict(protect_bos=False), dict(allow_self_mask=True), dict(selection_head=2)])
def test_fp32_impls_close_to_float64(impl, variant):
  q, k, v = rand_qkv(70, seed=1)
  got = ops.selective_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), impl=impl, **variant)
  with jax.enable_x64(True):
    want = ops.selective_attention(*map(jnp.asarray, (q, k, v)), impl="reference", **variant)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=2e-5)


def test_zero_selection_is_plain_causal_attention():
  q, k, v = rand_qkv(20, seed=2)
  q[:, :, 0] = 0  # head 0's logits are 0 everywhere, so S = ReLU(0) = 0 and F = 0
  with jax.enable_x64(True):
    a = ops.selective_attention(*map(jnp.asarray, (q, k, v)), impl="reference")
    b = ops.attention(*map(jnp.asarray, (q, k, v)), impl="reference")
    c = ops.selective_attention(*map(jnp.asarray, rand_qkv(20, seed=3)), impl="reference", disable_selection=True)
    d = ops.attention(*map(jnp.asarray, rand_qkv(20, seed=3)), impl="reference")
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(np.asarray(c), np.asarray(d), rtol=1e-12, atol=1e-14)
  q, k, v = rand_qkv(20, seed=2)  # and with a live selection head the two differ
  with jax.enable_x64(True):
    live = ops.selective_attention(*map(jnp.asarray, (q, k, v)), impl="reference")
    plain = ops.attention(*map(jnp.asarray, (q, k, v)), impl="reference")
  assert np.abs(np.asarray(live) - np.asarray(plain)).max() > 1e-3


def test_causality_and_mask_structure():
  q, k, v = (jnp.asarray(a, jnp.float32) for a in rand_qkv(16, seed=4))
  out, f = ops.selective_attention(q, k, v, return_mask=True)
  t = 9
  q2, k2, v2 = (a.at[:, t].add(1.0) for a in (q, k, v))
  out2, f2 = ops.selective_attention(q2, k2, v2, return_mask=True)
  np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(out2[:, :t]))
  np.testing.assert_array_equal(np.asarray(f[:, : t + 1]), np.asarray(f2[:, : t + 1]))  # row i uses rows < i
  assert np.abs(np.asarray(out[:, t:] - out2[:, t:])).max() > 0
  f = np.asarray(f)
  assert (f >= 0).all() and (np.diff(f, axis=1) >= 0).all()  # F grows down the query axis
  assert (f[:, :, 0] == 0).all() and (f[:, 0] == 0).all()  # BOS column and row 0


def test_leaky_relu_variant_zeroes_the_future_first():
  q, k, v = (jnp.asarray(a, jnp.float32) for a in rand_qkv(12, seed=5))
  leaky = ops.selective_attention(q, k, v, relu_leak=0.1)
  after = ops.selective_attention(q, k, v, relu_leak=1.0, relu_after_cumsum=True)
  plain = ops.selective_attention(q, k, v)
  assert np.isfinite(np.asarray(leaky)).all() and np.isfinite(np.asarray(after)).all()
  assert np.abs(np.asarray(leaky - plain)).max() > 1e-4  # a live variant, not the original's accidental no-op
  _, f = ops.selective_attention(q, k, v, relu_leak=1.0, relu_after_cumsum=True, return_mask=True)
  assert np.asarray(f).max() > 0


SCAN_LENGTHS = list(range(1, 10)) + [63, 64, 65, 127, 128, 129, 1000, 2047, 2048, 2049]


@pytest.mark.parametrize("n", SCAN_LENGTHS)
def test_blocked_scan_equals_cumsum_float64(n):
  """The blocked kernel's output and gradient against the float64 reference scan (kernel_base), and the output
  against numpy's cumsum."""
  rng = np.random.default_rng(n)
  x, g = rng.exponential(size=(1, n, 5)), rng.normal(size=(1, n, 5))
  with jax.enable_x64(True):
    got, want = kernel_vs_reference(kcumsum.exclusive_cumsum,
                                    lambda x_: selective.exclusive_cumsum(x_, impl="reference"), (x, g), jnp.float64)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(got[0], np.concatenate([np.zeros((1, 1, 5)), np.cumsum(x, axis=1)[:, :-1]], axis=1),
                             rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_blocked_scan_every_length_to_2049():
  with jax.enable_x64(True):
    for n in range(1, 2050):
      x = np.random.default_rng(n).exponential(size=(1, n, 3))
      want = np.concatenate([np.zeros((1, 1, 3)), np.cumsum(x, axis=1)[:, :-1]], axis=1)
      np.testing.assert_allclose(np.asarray(kcumsum.exclusive_cumsum(jnp.asarray(x))), want, rtol=1e-12, atol=1e-12)


def test_fp32_long_scan_beats_a_sequential_sum():
  """Heavy-tailed S at T = 4096: a left-to-right fp32 running sum drifts (selective.md §5.1); ours must not."""
  x64 = np.random.default_rng(0).pareto(1.5, size=(1, 4096, 64)) * 3.0
  want = np.concatenate([np.zeros((1, 1, 64)), np.cumsum(x64, axis=1)[:, :-1]], axis=1)
  x32 = jnp.asarray(x64, jnp.float32)

  def sequential(x):
    def step(acc, row):
      return acc + row, acc
    return jax.lax.scan(step, jnp.zeros(x.shape[-1], jnp.float32), jnp.swapaxes(x[0], 0, 0))[1][None]

  rel = lambda got: float(np.max(np.abs(np.asarray(got, np.float64) - want) / np.maximum(want, 1.0)))
  err_seq = rel(jax.jit(sequential)(x32))
  err_pallas = rel(kcumsum.exclusive_cumsum(x32))
  err_xla = rel(selective.exclusive_cumsum(x32, impl="xla"))
  print(f"max relative error vs float64: sequential fp32 {err_seq:.2e}, pallas {err_pallas:.2e}, xla {err_xla:.2e}")
  assert err_pallas < err_seq / 3 and err_xla < err_seq / 3
  assert err_pallas < 1e-5


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_gradients_match_reference_vjp(impl):
  q, k, v = rand_qkv(10, seed=6)
  w = np.random.default_rng(7).normal(size=(2, 10, 3, 8))
  loss = lambda impl_, dt: lambda q_, k_, v_: (ops.selective_attention(q_, k_, v_, impl=impl_) * w.astype(dt)).sum()
  got = jax.grad(loss(impl, np.float32), argnums=(0, 1, 2))(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
  with jax.enable_x64(True):
    want = jax.grad(loss("reference", np.float64), argnums=(0, 1, 2))(*map(jnp.asarray, (q, k, v)))
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-3, atol=1e-4)


def test_reference_gradient_matches_central_differences():
  q, k, v = rand_qkv(6, H=2, D=4, B=1, seed=8)
  w = np.random.default_rng(9).normal(size=(1, 6, 2, 4))
  with jax.enable_x64(True):
    f = lambda q_: float((ops.selective_attention(jnp.asarray(q_), jnp.asarray(k), jnp.asarray(v),
                                                  impl="reference") * w).sum())
    g = np.asarray(jax.grad(lambda q_: (ops.selective_attention(q_, jnp.asarray(k), jnp.asarray(v),
                                                               impl="reference") * w).sum())(jnp.asarray(q)))
    eps, num = 1e-6, np.zeros_like(q)
    for idx in np.ndindex(q.shape):
      d = np.zeros_like(q)
      d[idx] = eps
      num[idx] = (f(q + d) - f(q - d)) / (2 * eps)
  np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8)


def test_scan_gradient_is_reverse_exclusive_cumsum():
  g = np.random.default_rng(10).normal(size=(2, 37, 9))
  with jax.enable_x64(True):
    _, vjp = jax.vjp(kcumsum.exclusive_cumsum, jnp.zeros((2, 37, 9)))
    got = np.asarray(vjp(jnp.asarray(g))[0])
  want = np.flip(np.cumsum(np.flip(g, 1), 1), 1) - g  # dx[k] = sum_{i > k} g[i]
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_memory_penalties_on_a_hand_built_mask():
  # T = 3; query row i sees keys j <= i. Saturation at tau = 1.
  F = np.array([[[0.0, 0, 0], [0.5, 0, 0], [2.0, 1.0, 0]]])
  # paper: M_i = i - sum_{j<=i} min(F, 1): M = [0, 0.5, 0]; max 0.5, divided by T = 3.
  assert float(selective.memory_penalty_paper(jnp.asarray(F))) == pytest.approx(0.5 / 3)
  # repo: FF_sum = [0, 0.5, 2]; mean((T-1) - FF_sum) / T = mean([2, 1.5, 0]) / 3.
  assert float(selective.memory_penalty_repo(jnp.asarray(F))) == pytest.approx((3.5 / 3) / 3)


def test_selective_model_with_memory_penalty_trains_a_step(tmp_path):
  from dba_jax import train
  c = tiny("standard", attn_kind="selective", memory_penalty="repo", scan_layers=False)
  c.train.steps = 2
  train.train(validate(c), str(tmp_path), quiet=True)
  import json
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert all(r["loss"] == pytest.approx(r["ce"] + 0.1 * r["memory_repo"], rel=1e-5) for r in rows)
  assert all(0 < r["memory_repo"] < 2 for r in rows)  # two layers of (T-1 - saturated)/T each
  assert all(0 < r["memory_paper"] < 1 for r in rows)  # the other form is logged too (mean of max_i M_i / T)


def test_selective_model_is_causal_and_selection_is_live():
  c = validate(tiny("standard", attn_kind="selective"))
  params = model_lib.init_params(c.model, jax.random.key(0))
  graphdef, _ = model_lib.abstract(c.model)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 12), 0, 256))
  a = np.asarray(model_lib.Model(c.model, graphdef, params)(tokens))
  changed = tokens.copy()
  changed[:, 6] = (changed[:, 6] + 1) % 256
  b = np.asarray(model_lib.Model(c.model, graphdef, params)(changed))
  np.testing.assert_array_equal(a[:, :6], b[:, :6])
  c.model.selective.disable_selection = True
  graphdef, _ = model_lib.abstract(c.model)
  off = np.asarray(model_lib.Model(c.model, graphdef, params)(tokens))
  assert np.abs(a - off).max() > 0  # the mask changes the logits


# ----------------------------------------------------------------------------------------- protect and attack

def sequential_protect_attack(a, p):
  """The recurrence of selective.md §5.4, one column: attack first, then protection joins the pool."""
  h, pool, out = 0.0, 0.0, []
  for t in range(len(a)):
    if pool - a[t] <= 0:
      h, pool = h - (a[t] - pool), 0.0
    else:
      pool -= a[t]
    out.append(h)
    pool += p[t]
  return np.array(out)


def pa_grads(a, p):
  """H = -damage; gradients of sum(H) (dH = 1) with respect to a and p."""
  f = lambda a_, p_: -selective.protect_and_attack(a_, p_).sum()
  return jax.grad(f, argnums=(0, 1))(jnp.asarray(a, jnp.float64)[:, None], jnp.asarray(p, jnp.float64)[:, None])


@pytest.mark.parametrize("a,p,h,da,dp", [
    ([1, 1, 10], [5, 0, 0], [-1, -1, -7], [-3, -1, -1], [1, 1, 0]),  # the original repository's test vectors
    ([0, 1], [1, 0], [0, 0], [-2, -1], [1, 0]),
    ([0.5, 2, 1, 3], [0, 0, 0, 0], [-0.5, -2.5, -3.5, -6.5], [-4, -3, -2, -1], [3, 2, 1, 0]),  # P = 0: cumsum
    ([0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [-4, 0, 0, 0], [0, 0, 0, 0]),  # A = 0: no damage ever
])
def test_protect_and_attack_vectors(a, p, h, da, dp):
  with jax.enable_x64(True):
    got_h = -np.asarray(selective.protect_and_attack(jnp.asarray(a, jnp.float64)[:, None],
                                                     jnp.asarray(p, jnp.float64)[:, None]))[:, 0]
    ga, gp = pa_grads(a, p)
  np.testing.assert_array_equal(got_h, h)
  np.testing.assert_array_equal(np.asarray(ga)[:, 0], da)
  np.testing.assert_array_equal(np.asarray(gp)[:, 0], dp)


def test_protect_and_attack_scan_equals_recurrence():
  rng = np.random.default_rng(11)
  a = rng.exponential(size=(40, 1000)) * (rng.random((40, 1000)) < 0.4)
  p = rng.exponential(size=(40, 1000)) * (rng.random((40, 1000)) < 0.3)
  with jax.enable_x64(True):
    got = -np.asarray(selective.protect_and_attack(jnp.asarray(a), jnp.asarray(p)))
  want = np.stack([sequential_protect_attack(a[:, j], p[:, j]) for j in range(1000)], axis=1)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_protect_and_attack_gradient_matches_central_differences():
  rng = np.random.default_rng(12)
  a, p = rng.exponential(size=8) + 0.1, rng.exponential(size=8) * 0.8  # generic point: no exact ties
  w = rng.normal(size=8)
  with jax.enable_x64(True):
    f = lambda a_, p_: float((selective.protect_and_attack(jnp.asarray(a_)[:, None], jnp.asarray(p_)[:, None])[:, 0]
                              * w).sum())
    ga, gp = jax.grad(lambda a_, p_: (selective.protect_and_attack(a_[:, None], p_[:, None])[:, 0] * w).sum(),
                      argnums=(0, 1))(jnp.asarray(a), jnp.asarray(p))
    eps = 1e-7
    for x, g, which in ((a, ga, 0), (p, gp, 1)):
      num = np.zeros(8)
      for i in range(8):
        d = np.zeros(8)
        d[i] = eps
        args_plus = (a + d, p) if which == 0 else (a, p + d)
        args_minus = (a - d, p) if which == 0 else (a, p - d)
        num[i] = (f(*args_plus) - f(*args_minus)) / (2 * eps)
      np.testing.assert_allclose(np.asarray(g), num, rtol=1e-6, atol=1e-6)


def test_protection_kinds_in_the_op():
  q, k, v = rand_qkv(24, seed=13)
  with jax.enable_x64(True):
    args = lambda: map(jnp.asarray, (q, k, v))
    none, f_none = ops.selective_attention(*args(), impl="reference", return_mask=True)
    zero, f_zero = ops.selective_attention(*args(), impl="reference", protection="zero", return_mask=True)
    _, f_big = ops.selective_attention(*args(), impl="reference", protection="big_constant", return_mask=True)
    _, f_two = ops.selective_attention(*args(), impl="reference", protection="head_two", return_mask=True)
  np.testing.assert_allclose(np.asarray(zero), np.asarray(none), rtol=1e-12, atol=1e-14)  # P = 0 is the cumsum
  np.testing.assert_allclose(np.asarray(f_zero), np.asarray(f_none), rtol=1e-12, atol=1e-12)
  assert np.asarray(f_big).max() == 0  # protection 50 outlasts every attack here: nothing is masked
  f_two, f_none = np.asarray(f_two), np.asarray(f_none)
  assert (f_two <= f_none + 1e-12).all() and (f_two < f_none - 1e-6).any()  # protection only ever shields


@pytest.mark.parametrize("kind", ["linear_combo", "linear_combo_head_two", "head_two", "leaky_relu"])
def test_protected_selective_model_trains(tmp_path, kind):
  from dba_jax import train
  c = tiny("standard", attn_kind="selective", protection=kind, leaky_alpha=0.5, leaky_bias=0.1)
  c.train.steps = 2
  train.train(validate(c), str(tmp_path), quiet=True)
  rows = [__import__("json").loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in rows)


def test_scan_dtype_float64_requires_x64():
  with pytest.raises(ValueError, match="JAX_ENABLE_X64"):
    selective.exclusive_cumsum(jnp.ones((4, 4)), dtype="float64")
  with jax.enable_x64(True):
    assert selective.exclusive_cumsum(jnp.ones((4, 4), jnp.float32), dtype="float64").dtype == jnp.float64


# ----------------------------------------------------------------------------------------- selection sources

def test_mask_assignment_blocks_and_wraps():
  assert selective.mask_assignment(2, 5) == [0, 0, 1, 1, 0]  # two_masks with an odd head count
  assert selective.mask_assignment(1, 4) == [0, 0, 0, 0]
  assert selective.mask_assignment(4, 4) == [0, 1, 2, 3]  # one mask per head
  assert selective.mask_assignment(3, 7) == [0, 0, 1, 1, 2, 2, 0]


@pytest.mark.parametrize("m", [1, 2, 3])
def test_dedicated_selection_heads_match_loops(m):
  """m selection-only heads: attending head m+i uses mask assignment[i]; selection heads' values are dropped."""
  H = 5
  q, k, v = rand_qkv(9, H=H, seed=14)
  with jax.enable_x64(True):
    got = np.asarray(ops.selective_attention(*map(jnp.asarray, (q, k, v)), impl="reference", selection_heads=m))
  assert got.shape == (2, 9, H - m, 8)
  assign = selective.mask_assignment(m, H - m)
  for b in range(2):
    for i, mask in enumerate(assign):
      want = loop_selective(q[b], k[b], v[b], head=mask)[0][:, m + i]
      np.testing.assert_allclose(got[b, :, i], want, rtol=1e-10, atol=1e-12)


def test_with_head_zero_combo_at_init_is_the_default_mode():
  q, k, v = rand_qkv(11, seed=15)
  w = jnp.zeros(3).at[0].set(1.0)
  with jax.enable_x64(True):
    a = ops.selective_attention(*map(jnp.asarray, (q, k, v)), impl="reference", combo=(w.astype(jnp.float64), 0.0))
    b = ops.selective_attention(*map(jnp.asarray, (q, k, v)), impl="reference")
    c = ops.selective_attention(*map(jnp.asarray, (q, k, v)), impl="reference",
                                combo=(jnp.asarray([0.5, 0.3, 0.2]), 0.1))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
  assert np.abs(np.asarray(c) - np.asarray(b)).max() > 1e-4


def test_selection_head_params_and_own_lr_group():
  from dba_jax import mesh as mesh_lib, train
  c = validate(tiny("standard", attn_kind="selective", selection_heads=2))
  shapes = jax.tree.map(lambda a: a.shape, model_lib.init_params(c.model, jax.random.key(0)))["blocks"]["attn"]
  assert shapes["q"]["kernel"] == (2, 32, 6 * 8) and shapes["out"]["kernel"] == (2, 4 * 8, 32)  # 4 + 2 heads
  c = validate(tiny("standard", attn_kind="selective", combo="with_head_zero_and_bias", combo_lr_scale=0.0))
  c.optim.weight_decay = 0.5
  trainer = train.Trainer(c, mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]))
  state = trainer.init_state(0)
  before = jax.device_get(state["params"])
  batch = np.asarray(jax.random.randint(jax.random.key(2), (1, 8, c.data.seq_len + 1), 0, 256))
  state, _ = trainer.train_step(state, mesh_lib.global_batch(batch, trainer.accum_sharding, 1))
  after = jax.device_get(state["params"])["blocks"]["attn"]
  np.testing.assert_array_equal(after["sel_combo_w"], before["blocks"]["attn"]["sel_combo_w"])  # lr x 0, no decay
  np.testing.assert_array_equal(after["sel_combo_b"], before["blocks"]["attn"]["sel_combo_b"])
  assert not np.array_equal(after["q"]["kernel"], before["blocks"]["attn"]["q"]["kernel"])


def test_sliced_masks():
  """n_sliced_masks: the selection head's slices give one mask each; s = 1 is the no-head mode, and the
  slices' logits sum to the full head's logits."""
  q, k, v = rand_qkv(10, H=5, seed=16)
  with jax.enable_x64(True):
    args = lambda: map(jnp.asarray, (q, k, v))
    one = ops.selective_attention(*args(), impl="reference", selection_heads=1, selection_slices=1)
    nohead = ops.selective_attention(*args(), impl="reference", selection_heads=1)
    got, f = ops.selective_attention(*args(), impl="reference", selection_heads=1, selection_slices=2,
                                     return_mask=True)
  np.testing.assert_array_equal(np.asarray(one), np.asarray(nohead))
  assert f.shape == (2, 2, 10, 10)
  # Mask i comes from dims [4i, 4i + 4) of head 0 at the full-head scale 1/sqrt(8).
  for i in range(2):
    L = np.einsum("btd,bsd->bts", q[:, :, 0, 4 * i:4 * i + 4], k[:, :, 0, 4 * i:4 * i + 4]) / np.sqrt(8)
    S = np.where(np.tril(np.ones((10, 10)), -1) > 0, np.maximum(L, 0), 0)
    S[:, :, 0] = 0
    want = np.concatenate([np.zeros((2, 1, 10)), np.cumsum(S, 1)[:, :-1]], 1)
    np.testing.assert_allclose(np.asarray(f[:, i]), want, rtol=1e-12, atol=1e-12)
  assert np.abs(np.asarray(got) - np.asarray(nohead)).max() > 1e-6  # two different masks are in use
  with pytest.raises(ValueError, match="selection_slices=3"):
    ops.selective_attention(*map(jnp.asarray, (q, k, v)), selection_heads=1, selection_slices=3)


def test_sliced_masks_model_runs_and_validates():
  c = validate(tiny("standard", attn_kind="selective", selection_heads=1, selection_slices=2))
  params = model_lib.init_params(c.model, jax.random.key(0))
  graphdef, _ = model_lib.abstract(c.model)
  logits = np.asarray(model_lib.Model(c.model, graphdef, params)(np.zeros((1, 6), np.int32)))
  assert logits.shape == (1, 6, 256) and np.isfinite(logits).all()
  with pytest.raises(ValueError, match="selection_slices=3 needs model.selective.selection_heads=1"):
    validate(tiny("standard", attn_kind="selective", selection_heads=1, selection_slices=3))


def test_latent_masks_identity_init_is_the_no_head_mode_and_mixes_per_head():
  """n_latent_masks: identity weights, zero bias, multiplier 1 sum the slices back to the full head = the
  dedicated-head mode; a general mix gives head a the mask c * (sum_n w_na latent_n + b_a)."""
  H, n = 5, 2
  q, k, v = rand_qkv(10, H=H, seed=21)
  args = lambda: map(jnp.asarray, (q, k, v))
  with jax.enable_x64(True):
    nohead = ops.selective_attention(*args(), impl="reference", selection_heads=1)
    ident = ops.selective_attention(*args(), impl="reference", selection_heads=1, selection_slices=n,
                                    latent=(jnp.ones((n, H - 1)), jnp.zeros(H - 1)))
    w = jnp.asarray(np.random.default_rng(3).normal(size=(n, H - 1)))
    b = jnp.asarray([0.3, -0.2, 0.0, 0.1])
    _, f = ops.selective_attention(*args(), impl="reference", selection_heads=1, selection_slices=n,
                                   latent=(w, b), latent_multiplier=0.5, return_mask=True)
  np.testing.assert_allclose(np.asarray(ident), np.asarray(nohead), rtol=1e-10, atol=1e-12)
  assert f.shape == (2, H - 1, 10, 10)
  tril = np.tril(np.ones((10, 10)))
  lat = np.stack([np.einsum("btd,bsd->bts", q[:, :, 0, 4 * i:4 * i + 4], k[:, :, 0, 4 * i:4 * i + 4]) / np.sqrt(8)
                  for i in range(n)], 1) * tril
  for a in range(H - 1):
    pre = 0.5 * (np.einsum("bnts,n->bts", lat, np.asarray(w)[:, a]) + float(b[a]))
    S = np.where(np.tril(np.ones((10, 10)), -1) > 0, np.maximum(pre, 0), 0)
    S[:, :, 0] = 0
    want = np.concatenate([np.zeros((2, 1, 10)), np.cumsum(S, 1)[:, :-1]], 1)
    np.testing.assert_allclose(np.asarray(f[:, a]), want, rtol=1e-10, atol=1e-12)


def test_latent_masks_model_equals_no_head_model_at_identity_init():
  base = dict(attn_kind="selective", selection_heads=1)
  lat = dict(base, selection_slices=2, latent_masks=2, latent_init="identity")
  c0, c1 = validate(tiny("standard", **base)), validate(tiny("standard", **lat))
  p1 = model_lib.init_params(c1.model, jax.random.key(0))
  p0 = model_lib.init_params(c0.model, jax.random.key(0))
  for name in ("q", "k", "v", "out"):  # same projections in both (the latent Linear draws nothing)
    p1["blocks"]["attn"][name] = p0["blocks"]["attn"][name]
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 12), 0, 256))
  run = lambda c, p: np.asarray(model_lib.Model(c.model, model_lib.abstract(c.model)[0], p)(tokens))
  a, b = run(c0, p0), run(c1, {**p0, "blocks": {**p0["blocks"], "attn": p1["blocks"]["attn"]}})
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="latent_masks=2 slices one head"):
    validate(tiny("standard", attn_kind="selective", selection_heads=1, latent_masks=2))


def test_residual_attention_masks_mix_the_previous_layers_logits():
  """Layer 2's selection reads its own logits plus W . layer 1's summed logits (future zeroed)."""
  q1, k1, v1 = rand_qkv(9, H=3, seed=31)
  q2, k2, v2 = rand_qkv(9, H=3, seed=32)
  W = np.random.default_rng(5).normal(size=(3, 3))
  with jax.enable_x64(True):
    zeros = jnp.zeros((2, 3, 9, 9))
    out1, res1 = ops.selective_attention(*map(jnp.asarray, (q1, k1, v1)), impl="reference", residual_BHTS=zeros)
    plain1 = ops.selective_attention(*map(jnp.asarray, (q1, k1, v1)), impl="reference")
    mixed = jnp.einsum("bgts,gh->bhts", res1, jnp.asarray(W))
    out2, res2 = ops.selective_attention(*map(jnp.asarray, (q2, k2, v2)), impl="reference", residual_BHTS=mixed)
  np.testing.assert_allclose(np.asarray(out1), np.asarray(plain1), rtol=1e-12, atol=1e-14)
  tril = np.tril(np.ones((9, 9)))
  L1 = np.einsum("bthd,bshd->bhts", q1, k1) / np.sqrt(8) * tril
  np.testing.assert_allclose(np.asarray(res1), L1, rtol=1e-10, atol=1e-12)
  L2 = np.einsum("bthd,bshd->bhts", q2, k2) / np.sqrt(8) * tril + np.einsum("bgts,gh->bhts", L1, W) * tril
  np.testing.assert_allclose(np.asarray(res2), L2, rtol=1e-10, atol=1e-12)
  # The attention itself uses the residual logits: loop version with head 0 of L2 selecting.
  S = np.where(np.tril(np.ones((9, 9)), -1) > 0, np.maximum(L2[:, 0], 0), 0)
  S[:, :, 0] = 0
  F = np.concatenate([np.zeros((2, 1, 9)), np.cumsum(S, 1)[:, :-1]], 1)
  logits = np.where(tril > 0, L2 - F[:, None], -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(out2), np.einsum("bhts,bshe->bthe", p, v2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scan", [True, False])
def test_residual_masks_model_trains_and_stays_causal(scan):
  c = validate(tiny("standard", attn_kind="selective", residual_masks=True, scan_layers=scan))
  params = model_lib.init_params(c.model, jax.random.key(0))
  blocks = params["blocks"] if scan else params["blocks"][0]
  assert blocks["attn"]["res_mix"].shape[-2:] == (4, 4)
  model = model_lib.Model(c.model, model_lib.abstract(c.model)[0], params)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (1, 12), 0, 256))
  a = np.asarray(model(tokens))
  tokens2 = tokens.copy()
  tokens2[0, 7] = (tokens2[0, 7] + 1) % 256
  b = np.asarray(model(tokens2))
  np.testing.assert_array_equal(a[0, :7], b[0, :7])
  assert np.abs(a[0, 7:] - b[0, 7:]).max() > 0
