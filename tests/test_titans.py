"""The Titans memory's parallel chunked form (dba_jax/hope/titans.py) against the per-token recurrence and a per-token
loop with chunk-start gradients, float64: final memory, surprise, every token's read, masked tokens."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dba_jax.hope import titans

# jitted once: eager per-token loops dominate these tests otherwise
recurrence, token_grads, memory_apply, linear_scan = map(jax.jit, (titans.recurrence, titans.token_grads,
                                                                   titans.memory_apply, titans.linear_scan))


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
    want_W, want_S = recurrence(W, S, k, v, eta, theta, alpha)
    _close(got_W, want_W)
    _close(got_S, want_S)


@pytest.mark.parametrize("masked", [False, True])
def test_chunk_gradients_at_chunk_start_then_scanned_momentum_and_decay(masked):
  """Chunks of 4: the same as a loop that takes each chunk's gradients at its start weights and then runs both
  recurrences token by token (masked tokens skipped), with every token's read of its own M_t (store first) and of
  its chunk-start memory (retrieve first); and different from the per-token recurrence (the approximation is real)."""
  with jax.enable_x64(True):
    W, S, k, v, eta, theta, alpha = _inputs()
    keep = jnp.asarray([t % 5 != 3 for t in range(12)]) if masked else None
    q = jnp.roll(k, 1, axis=0)
    got_W, got_S, starts = titans.chunked_update(W, S, k, v, eta, theta, alpha, chunk=4) if not masked else \
        titans.scan_chunks(W, S, k, v, eta, theta, alpha, 4, keep)[:3]
    reads = {sf: titans.scan_chunks(W, S, k, v, eta, theta, alpha, 4, keep, q, sf)[3] for sf in (True, False)}
    Wl, Sl, want = W, S, {True: [], False: []}
    for c in range(3):
      sl = slice(4 * c, 4 * c + 4)
      _close(jax.tree.map(lambda x: x[c], starts), Wl)
      W_start, g = Wl, token_grads(Wl, k[sl], v[sl])
      for j, t in enumerate(range(4 * c, 4 * c + 4)):
        if keep is None or keep[t]:
          Sl = jax.tree.map(lambda s, g_: eta[t] * s - theta[t] * g_[j], Sl, g)
          Wl = jax.tree.map(lambda w, s: (1 - alpha[t]) * w + s, Wl, Sl)
        want[True].append(memory_apply(Wl, q[t]))
        want[False].append(memory_apply(W_start, q[t]))
    _close(got_W, Wl)
    _close(got_S, Sl)
    for sf in (True, False):
      _close(reads[sf], jnp.stack(want[sf]))
    exact = recurrence(W, S, k, v, eta, theta, alpha)[0]
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got_W), jax.tree.leaves(exact))) > 1e-6


def test_linear_scan_equals_the_loop():
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    a, b, x0 = rng.uniform(0.3, 1.1, 9), rng.normal(size=(9, 2, 3)), rng.normal(size=(2, 3))
    got = linear_scan(jnp.asarray(a), jnp.asarray(b), jnp.asarray(x0))
    x, want = x0, []
    for t in range(9):
      x = a[t] * x + b[t]
      want.append(x)
    np.testing.assert_allclose(np.asarray(got), np.stack(want), rtol=1e-12, atol=1e-12)


def test_token_steps_at_chunk_start_gradients_are_the_chunked_form():
  """titans.token_step one token at a time with the gradient at the chunk-start memory (what one-token decoding
  runs), 10 tokens in chunks of 4 (the last partial): the memory, surprise and every read (store first: M_t;
  retrieve first: the chunk start's) equal scan_chunks'."""
  with jax.enable_x64(True):
    W, S, k, v, eta, theta, alpha = _inputs(T=10)
    q = jnp.roll(k, 1, axis=0)
    step = jax.jit(titans.token_step)
    Wt, St, W0, reads = W, S, W, {True: [], False: []}
    for t in range(10):
      W0 = Wt if t % 4 == 0 else W0  # the chunk-start memory
      Wt, St = step(Wt, St, W0, k[t], v[t], eta[t], theta[t], alpha[t])
      reads[True].append(memory_apply(Wt, q[t]))
      reads[False].append(memory_apply(W0, q[t]))
    for store_first in (True, False):
      want_W, want_S, _, want = titans.scan_chunks(W, S, k, v, eta, theta, alpha, 4, None, q, store_first)
      _close((Wt, St, jnp.stack(reads[store_first])), (want_W, want_S, want))
