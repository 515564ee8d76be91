"""The Pallas protect-and-attack kernel (dba_kernels.protect_attack) against the sequential recurrence of
selective.md §5.4 (float64 numpy), the XLA associative scan in dba_jax.ops.selective, and the §5.4 test vectors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dba_jax.ops import selective
from dba_kernels import _backend as backend
from dba_kernels import protect_attack as kpa
from kernel_base import out_and_grads


def sequential(a, p, dtype=np.float64):
  """§5.4 recurrence over axis -2, vectorised over the other axes: damage D (inclusive) and the flags d_t."""
  a, p = a.astype(dtype), p.astype(dtype)
  pool, h = np.zeros(a[..., 0, :].shape, dtype), np.zeros(a[..., 0, :].shape, dtype)
  out, hit = [], []
  for t in range(a.shape[-2]):
    took = pool - a[..., t, :] <= 0  # attack first; an exactly emptied pool counts as damage
    h = np.where(took, h - (a[..., t, :] - pool), h)
    pool = np.where(took, dtype(0), pool - a[..., t, :]) + p[..., t, :]  # then protection joins the pool
    out.append(-h)
    hit.append(took)
  return np.stack(out, -2), np.stack(hit, -2)


def closed_form_grads(hit, g):
  """dA_t = -R_{e(t)}, dP_t = R_{e(t+1)}, R_t = sum_{k >= t} dH_k with dH = -g, e(t) = first flagged k >= t."""
  r = np.flip(np.cumsum(np.flip(-g, -2), -2), -2)
  d_a, d_p = np.zeros_like(g), np.zeros_like(g)
  at_e = np.zeros_like(g[..., 0, :])  # R_{e(t+1)}, 0 while no flag has been seen
  for t in reversed(range(g.shape[-2])):
    d_p[..., t, :] = at_e
    at_e = np.where(hit[..., t, :], r[..., t, :], at_e)
    d_a[..., t, :] = -at_e
  return d_a, d_p


def sparse(rng, shape, density):
  return rng.exponential(size=shape) * (rng.random(shape) < density)


@pytest.mark.parametrize("a,p,h,da,dp", [
    ([1, 1, 10], [5, 0, 0], [-1, -1, -7], [-3, -1, -1], [1, 1, 0]),  # the original repository's test vectors
    ([0, 1], [1, 0], [0, 0], [-2, -1], [1, 0]),
    ([0.5, 2, 1, 3], [0, 0, 0, 0], [-0.5, -2.5, -3.5, -6.5], [-4, -3, -2, -1], [3, 2, 1, 0]),  # P = 0: cumsum
    ([0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [-4, 0, 0, 0], [0, 0, 0, 0]),  # A = 0: no damage ever
])
def test_repo_vectors(a, p, h, da, dp):
  # block_t = 2: every vector crosses a query-block boundary, so the carries are on the path
  with jax.enable_x64(True):
    f = lambda a_, p_: -kpa.protect_and_attack(a_[:, None], p_[:, None], block_t=2, block_s=8)[:, 0]  # H = -D
    got_h, vjp = jax.vjp(f, jnp.asarray(a, jnp.float64), jnp.asarray(p, jnp.float64))
    ga, gp = vjp(jnp.ones(len(a)))  # dH = 1
  np.testing.assert_array_equal(np.asarray(got_h), h)
  np.testing.assert_array_equal(np.asarray(ga), da)
  np.testing.assert_array_equal(np.asarray(gp), dp)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])  # tpu: the Mosaic tiling (a block per grid step), interpreted
@pytest.mark.parametrize("T,S,block_t,block_s", [(1, 7, 16, 32), (5, 33, 16, 32), (64, 40, 64, 64),
                                                 (130, 70, 16, 32)])
def test_equals_float64_sequential_recurrence(T, S, block_t, block_s, platform):
  rng = np.random.default_rng(T)
  a, p, g = sparse(rng, (2, T, S), 0.4), sparse(rng, (2, T, S), 0.3), rng.normal(size=(2, T, S))
  want_d, hit = sequential(a, p)
  want_da, want_dp = closed_form_grads(hit, g)
  with jax.enable_x64(True), backend.forced(backend.Target(platform, interpret=True)):
    fn = lambda a_, p_: kpa.protect_and_attack(a_, p_, block_t=block_t, block_s=block_s)
    grads = lambda a_, p_, g_: jax.vjp(fn, a_, p_)[1](g_)
    assert str(jax.make_jaxpr(grads)(a, p, g)).count("arbitrary") == (2 if platform == "tpu" else 0)
    d, da, dp = out_and_grads(fn, *map(jnp.asarray, (a, p, g)))
  assert d.dtype == jnp.float64
  for got, want in zip((d, da, dp), (want_d, want_da, want_dp)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-12)


def test_gradient_matches_central_differences():
  rng = np.random.default_rng(3)
  a, p = rng.exponential(size=(9, 3)) + 0.1, rng.exponential(size=(9, 3)) * 0.8  # generic point: no exact ties
  w = rng.normal(size=(9, 3))
  with jax.enable_x64(True):
    loss = jax.jit(lambda a_, p_: (kpa.protect_and_attack(a_, p_, block_t=4, block_s=8) * w).sum())
    ga, gp = map(np.asarray, jax.grad(loss, argnums=(0, 1))(jnp.asarray(a), jnp.asarray(p)))
    eps = 1e-7
    for x, grad, which in ((a, ga, 0), (p, gp, 1)):
      num = np.zeros_like(x)
      for idx in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[idx] = eps
        plus = (a + d, p) if which == 0 else (a, p + d)
        minus = (a - d, p) if which == 0 else (a, p - d)
        num[idx] = (float(loss(*plus)) - float(loss(*minus))) / (2 * eps)
      np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-6)


def test_float32_matches_xla_scan():
  rng = np.random.default_rng(5)
  a, p = (jnp.asarray(sparse(rng, (2, 70, 40), dens), jnp.float32) for dens in (0.4, 0.3))
  g = jnp.asarray(rng.normal(size=(2, 70, 40)), jnp.float32)
  got = out_and_grads(lambda a_, p_: kpa.protect_and_attack(a_, p_, block_t=16, block_s=16), a, p, g)
  want = out_and_grads(selective.protect_and_attack, a, p, g)  # (out_and_grads checks the float32 outputs)
  for x, y in zip(got, want):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-4)


def test_zero_protection_is_inclusive_cumsum_and_zero_attack_is_harmless():
  rng = np.random.default_rng(6)
  a = rng.exponential(size=(130, 20))
  with jax.enable_x64(True):
    fn = lambda a_, p_: kpa.protect_and_attack(a_, p_, block_t=16, block_s=16)
    ones = jnp.ones((130, 20))
    d, da, dp = out_and_grads(fn, jnp.asarray(a), jnp.zeros((130, 20)), -ones)  # dH = 1
    np.testing.assert_allclose(np.asarray(d), np.cumsum(a, 0), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(da), -np.arange(130, 0, -1)[:, None] * np.ones((1, 20)))
    np.testing.assert_array_equal(np.asarray(dp), np.arange(129, -1, -1)[:, None] * np.ones((1, 20)))
    d, da, dp = out_and_grads(fn, jnp.zeros((130, 20)), ones, -ones)
    np.testing.assert_array_equal(np.asarray(d), 0)
    np.testing.assert_array_equal(np.asarray(da)[0], -130)  # only turn 0 (empty pool) takes the "damage"
    np.testing.assert_array_equal(np.asarray(da)[1:], 0)
    np.testing.assert_array_equal(np.asarray(dp), 0)


def test_float32_long_damage_beats_a_sequential_sum():
  """Heavy-tailed attacks at T = 4096: a left-to-right fp32 damage sum drifts (selective.md §5.1); ours must not."""
  rng = np.random.default_rng(7)
  a = rng.pareto(1.5, size=(1, 4096, 64)) * 3.0
  p = sparse(rng, (1, 4096, 64), 0.05)
  want = sequential(a, p)[0]
  rel = lambda got: float(np.max(np.abs(np.asarray(got, np.float64) - want) / np.maximum(want, 1.0)))
  err_seq = rel(sequential(a, p, np.float32)[0])
  err_pallas = rel(kpa.protect_and_attack(jnp.asarray(a, jnp.float32), jnp.asarray(p, jnp.float32)))
  print(f"max relative damage error vs float64: sequential fp32 {err_seq:.2e}, pallas {err_pallas:.2e}")
  assert err_pallas < err_seq / 3
  assert err_pallas < 1e-5


def test_selective_attention_pallas_protection_matches_xla():
  rng = np.random.default_rng(8)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 20, 3, 8)), jnp.float32) for _ in range(3))
  w = jnp.asarray(rng.normal(size=(2, 20, 3, 8)), jnp.float32)

  def run(impl):
    def loss(q_, k_, v_):
      out, f = selective.selective_attention(q_, k_, v_, impl=impl, protection="head_two", return_mask=True)
      return (out * w).sum(), f
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)  # eager scans: slow

  (l_k, f_k), g_k = run("pallas")
  (l_x, f_x), g_x = run("xla")
  unprotected = jax.jit(lambda *x: selective.selective_attention(*x, impl="xla", return_mask=True)[1])(q, k, v)
  assert np.abs(np.asarray(f_x - unprotected)).max() > 1e-3  # protection is live here
  np.testing.assert_allclose(np.asarray(f_k), np.asarray(f_x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(l_k), float(l_x), rtol=1e-5)
  for x, y in zip(g_k, g_x):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
