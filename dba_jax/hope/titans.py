"""The Titans paper's neural memory (Behrouz et al.; hope_latentwire.md A, "Titans paper memory"), functional.

The memory M is a small MLP from keys to values (`init_memory`: depth 1 is a matrix). Per token t, with the loss
ℓ(M; k_t, v_t) = ‖M(k_t) − v_t‖²:
  S_t = η_t S_{t−1} − θ_t ∇ℓ(M_{t−1}; k_t, v_t)          (surprise with momentum η, step θ)
  M_t = (1 − α_t) M_{t−1} + S_t                           (forgetting α)
The chunked parallel form takes every gradient of a chunk at the chunk-start weights M_{t0} (one vmap over the
chunk's tokens), then both linear recurrences by associative scans over the chunk: x_t = a_t x_{t−1} + b_t composes
as (a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2). With chunks of one token it is exactly the per-token recurrence.
Reads inside a chunk use the memory as of the chunk start (as the original's self-modifying Titans do).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def init_memory(key, d_in: int, d_out: int, depth: int = 2, hidden: int | None = None, std: float = 0.02,
                dtype=jnp.float32) -> dict:
  """{"w0", ..., "w{depth-1}"}: M(k) = W_{L-1}ᵀ GELU(... GELU(W_0ᵀ k)) (depth 1: a linear map)."""
  hidden = hidden or d_in
  dims = [d_in] + [hidden] * (depth - 1) + [d_out]
  keys = jax.random.split(key, depth)
  return {f"w{i}": std * jax.random.normal(keys[i], (dims[i], dims[i + 1]), dtype) for i in range(depth)}


def memory_apply(W: dict, k_d):
  x = k_d
  for i in range(len(W)):
    x = x @ W[f"w{i}"]
    if i < len(W) - 1:
      x = jax.nn.gelu(x)
  return x


def token_loss(W: dict, k_d, v_d):
  return ((memory_apply(W, k_d) - v_d) ** 2).sum()


def token_grads(W: dict, k_Td, v_Td) -> dict:
  """∇ℓ at the same weights for every token: leaves [T, ...]."""
  return jax.vmap(jax.grad(token_loss), in_axes=(None, 0, 0))(W, k_Td, v_Td)


def linear_scan(a_T, b_T, x0):
  """x_t = a_t x_{t−1} + b_t for t = 1..T (a_T [T], b_T [T, ...]): every x_t, by an associative scan."""
  def combine(first, second):
    a1, b1 = first
    a2, b2 = second
    return a1 * a2, _bcast(a2, b1) * b1 + b2

  A, B = jax.lax.associative_scan(combine, (a_T, b_T))
  return _bcast(A, B) * x0[None] + B


def _bcast(a, like):
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def chunked_update(W0: dict, S0: dict, k_Td, v_Td, eta_T, theta_T, alpha_T, chunk: int):
  """(memory after the last token, surprise after it, the chunk-start memories [n_chunks, ...]) of the parallel
  form over T tokens (T a multiple of `chunk`)."""
  T = k_Td.shape[0]
  if T % chunk:
    raise ValueError(f"{T} tokens do not split into chunks of {chunk}")
  n = T // chunk
  split = lambda x: x.reshape((n, chunk) + x.shape[1:])

  def one_chunk(carry, xs):
    W, S = carry
    k, v, eta, theta, alpha = xs
    g = token_grads(W, k, v)
    S_all = jax.tree.map(lambda s0, g_: linear_scan(eta, -_bcast(theta, g_) * g_, s0), S, g)
    W_all = jax.tree.map(lambda w0, s: linear_scan(1.0 - alpha, s, w0), W, S_all)
    last = lambda tree: jax.tree.map(lambda x: x[-1], tree)
    return (last(W_all), last(S_all)), W

  (W, S), starts = jax.lax.scan(one_chunk, (W0, S0), tuple(map(split, (k_Td, v_Td, eta_T, theta_T, alpha_T))))
  return W, S, starts


def recurrence(W0: dict, S0: dict, k_Td, v_Td, eta_T, theta_T, alpha_T):
  """The per-token recurrence, one token at a time (the definition the parallel form is tested against)."""
  W, S = W0, S0
  for t in range(k_Td.shape[0]):
    g = jax.grad(token_loss)(W, k_Td[t], v_Td[t])
    S = jax.tree.map(lambda s, g_: eta_T[t] * s - theta_T[t] * g_, S, g)
    W = jax.tree.map(lambda w, s: (1.0 - alpha_T[t]) * w + s, W, S)
  return W, S
