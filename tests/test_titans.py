"""The Titans memory's parallel chunked form (dba_jax/hope/titans.py) against the per-token recurrence, float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dba_jax.hope import titans


def _inputs(T=12, d=5, depth=2, seed=0):
  key = jax.random.key(seed)
  ks = jax.random.split(key, 6)
  W = titans.init_memory(ks[0], d, d, depth=depth, hidden=7, std=0.4, dtype=jnp.float64)
  S = jax.tree.map(lambda w: 0.01 * jnp.ones_like(w), W)
  k, v = jax.random.normal(ks[1], (T, d), jnp.float64), jax.random.normal(ks[2], (T, d), jnp.float64)
  eta = jax.random.uniform(ks[3], (T,), jnp.float64, 0.5, 0.95)
  theta = jax.random.uniform(ks[4], (T,), jnp.float64, 0.01, 0.1)
  alpha = jax.random.uniform(ks[5], (T,), jnp.float64, 0.0, 0.2)
  return W, S, k, v, eta, theta, alpha


def _close(a, b, tol=1e-12):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize("depth", [1, 2])
def test_chunks_of_one_token_are_the_recurrence(depth):
  with jax.enable_x64(True):
    W, S, k, v, eta, theta, alpha = _inputs(depth=depth)
    got_W, got_S, _ = titans.chunked_update(W, S, k, v, eta, theta, alpha, chunk=1)
    want_W, want_S = titans.recurrence(W, S, k, v, eta, theta, alpha)
    _close(got_W, want_W)
    _close(got_S, want_S)


def test_chunk_gradients_at_chunk_start_then_scanned_momentum_and_decay():
  """Chunks of 4: the same as a loop that takes each chunk's gradients at its start weights and then runs both
  recurrences token by token; and different from the per-token recurrence (the approximation is real)."""
  with jax.enable_x64(True):
    W, S, k, v, eta, theta, alpha = _inputs()
    got_W, got_S, starts = titans.chunked_update(W, S, k, v, eta, theta, alpha, chunk=4)
    Wl, Sl = W, S
    for c in range(3):
      sl = slice(4 * c, 4 * c + 4)
      _close(jax.tree.map(lambda x: x[c], starts), Wl)
      g = titans.token_grads(Wl, k[sl], v[sl])
      for j, t in enumerate(range(4 * c, 4 * c + 4)):
        Sl = jax.tree.map(lambda s, g_: eta[t] * s - theta[t] * g_[j], Sl, g)
        Wl = jax.tree.map(lambda w, s: (1 - alpha[t]) * w + s, Wl, Sl)
    _close(got_W, Wl)
    _close(got_S, Sl)
    exact = titans.recurrence(W, S, k, v, eta, theta, alpha)[0]
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got_W), jax.tree.leaves(exact))) > 1e-6


def test_linear_scan_equals_the_loop():
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    a, b, x0 = rng.uniform(0.3, 1.1, 9), rng.normal(size=(9, 2, 3)), rng.normal(size=(2, 3))
    got = titans.linear_scan(jnp.asarray(a), jnp.asarray(b), jnp.asarray(x0))
    x, want = x0, []
    for t in range(9):
      x = a[t] * x + b[t]
      want.append(x)
    np.testing.assert_allclose(np.asarray(got), np.stack(want), rtol=1e-12, atol=1e-12)
