"""The Titans paper's neural memory (Behrouz et al.; hope_latentwire.md A, "Titans paper memory"), functional.

The memory M is a small MLP from keys to values (`init_memory`: depth 1 is a matrix). Per token t, with the loss
ℓ(M; k_t, v_t) = ‖M(k_t) − v_t‖²:
  S_t = η_t S_{t−1} − θ_t ∇ℓ(M_{t−1}; k_t, v_t)          (surprise with momentum η, step θ)
  M_t = (1 − α_t) M_{t−1} + S_t                           (forgetting α)
The chunked parallel form takes every gradient of a chunk at the chunk-start weights M_{t0} (one backward pass over
the chunk's tokens), then both linear recurrences, unrolled over the chunk by associative scans (x_t = a_t x_{t−1} +
b_t composes as (a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2)) into [C, C] coefficients, so that every update and
per-token read is a matmul over the chunk's outer products a ⊗ δ: no per-token weight copy is materialised
(`token_grads` does that, for tests). With chunks of one token it is exactly the per-token recurrence.
Reads (`chunk_step`'s q) use the memory as of the chunk start (retrieve before store, as the original's
self-modifying Titans do) or each token's own M_t (store then retrieve). `scan_chunks` runs any length (the tail
padded with masked tokens that write nothing); `token_step` is the same form one token at a time (decoding: the
gradient at the chunk-start memory, both recurrences stepped); dba_jax/hope/titans_blocks.py builds the MAC / MAG /
MAL / LMM blocks on them.
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
  return _layers(W, k_d)[0]


def _layers(W: dict, x, offsets=None):
  """(M(x), each layer's input); offsets[i] is added to layer i's pre-activation (zeros: ∂ℓ/∂offset = δ_i)."""
  inputs = []
  for i in range(len(W)):
    inputs.append(x)
    x = x @ W[f"w{i}"] + (0 if offsets is None else offsets[i])
    if i < len(W) - 1:
      x = jax.nn.gelu(x)
  return x, inputs


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


def token_errors(W: dict, k_Cd, v_Cd):
  """(each layer's input a_i [C, d_i], its error δ_i = ∂ℓ_t/∂(a_i W_i) [C, d_{i+1}]) for every token at the same
  weights: token t's gradient for W_i is the outer product a_i[t] ⊗ δ_i[t] (never materialised per token)."""
  def loss(offsets):
    out, inputs = _layers(W, k_Cd, offsets)
    return ((out - v_Cd) ** 2).sum(), inputs

  zeros = [jnp.zeros((k_Cd.shape[0], W[f"w{i}"].shape[1]), k_Cd.dtype) for i in range(len(W))]
  _, vjp, inputs = jax.vjp(loss, zeros, has_aux=True)
  return inputs, vjp(jnp.ones((), k_Cd.dtype))[0]


def unrolled(a_C):
  """The recurrence x_t = a_t x_{t−1} + b_t unrolled over a chunk, by an associative scan: [C, C + 1] whose column
  i < C is the weight Π_{l=i+1..t} a_l of b_i in x_t (0 for i > t) and whose last column is Π_{l<=t} a_l (x_0's)."""
  C = a_C.shape[0]
  b = jnp.concatenate([jnp.eye(C, dtype=a_C.dtype), jnp.zeros((C, 1), a_C.dtype)], axis=1)
  return linear_scan(a_C, b, jnp.zeros((C + 1,), a_C.dtype).at[C].set(1))


def chunk_step(W: dict, S: dict, k_Cd, v_Cd, eta_C, theta_C, alpha_C, keep_C=None, q_Cd=None,
               store_first: bool = False):
  """One chunk of the parallel form from (W, S): (W and S after its last token, reads of q_Cd [C, d_out] or None).

  Every token's gradient ∇_i is taken at the chunk-start M (`token_errors`) and both recurrences are linear in
  them: with H = unrolled(η) and D = unrolled(1 − α) (by associative scans),
    S_t = H[t, C] S_0 − Σ_i H[t, i] θ_i ∇_i,    M_t = D[t, C] M_0 + Σ_j D[t, j] S_j
        = D[t, C] M_0 + (DH)[t, C] S_0 − Σ_i (DH)[t, i] θ_i ∇_i,
  and a sum over tokens of outer products a_i ⊗ δ_i is one matmul. keep_C [C] bool masks tokens out: a masked token
  has θ = 0, η = 1, α = 0 and adds nothing to M, so it leaves M and S as they were (padding, the memory switched
  off). Reads take the memory as of the chunk start (retrieve before store) or, with store_first, token t's own
  M_t (its write included), per layer z M_t = D[t, C] z M + (DH)[t, C] z S − Σ_{i<=t} (DH)[t, i] θ_i (z·a_i) δ_i."""
  C = k_Cd.shape[0]
  if keep_C is not None:
    eta_C, theta_C, alpha_C = (jnp.where(keep_C, a, fill) for a, fill in ((eta_C, 1), (theta_C, 0), (alpha_C, 0)))
  inputs, errors = token_errors(W, k_Cd, v_Cd)
  H, D = unrolled(eta_C), unrolled(1.0 - alpha_C)
  if keep_C is not None:
    D = D * jnp.concatenate([keep_C, jnp.ones((1,), bool)]).astype(D.dtype)[None]
  DH = D[:, :C] @ H  # [C, C + 1]: M_t's weight of −θ_i ∇_i (columns < C) and of S_0 (last)
  coef = DH[:, :C] * theta_C[None]
  s0, gamma = DH[:, C], D[:, C]
  grads = lambda c: {f"w{i}": jnp.einsum("ca,cb->ab", inputs[i] * c[:, None], errors[i]) for i in range(len(W))}
  dW, dS = grads(coef[-1]), grads(H[-1, :C] * theta_C)
  W_next = {n: gamma[-1] * W[n] + s0[-1] * S[n] - dW[n] for n in W}
  S_next = {n: H[-1, C] * S[n] - dS[n] for n in S}
  reads = None
  if q_Cd is not None and not store_first:
    reads = memory_apply(W, q_Cd)
  elif q_Cd is not None:
    x = q_Cd
    for i in range(len(W)):
      n = f"w{i}"
      x = gamma[:, None] * (x @ W[n]) + s0[:, None] * (x @ S[n]) - ((x @ inputs[i].T) * coef) @ errors[i]
      x = jax.nn.gelu(x) if i < len(W) - 1 else x
    reads = x
  return W_next, S_next, reads


def scan_chunks(W0: dict, S0: dict, k_Td, v_Td, eta_T, theta_T, alpha_T, chunk: int, keep_T=None, q_Td=None,
                store_first: bool = False):
  """The parallel form over T tokens, one `chunk_step` per chunk in a lax.scan (T is padded up to a multiple of
  `chunk` with masked tokens): (W, S after the last token, the chunk-start memories [n_chunks, ...], reads of
  q_Td [T, d_out] or None)."""
  T = k_Td.shape[0]
  pad = -T % chunk
  n = (T + pad) // chunk
  if pad:
    keep_T = jnp.ones((T,), bool) if keep_T is None else keep_T

  def split(x):
    if x is None:
      return None
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape((n, chunk) + x.shape[1:])

  def one_chunk(carry, xs):
    W, S = carry
    W_next, S_next, reads = chunk_step(W, S, *xs, store_first=store_first)
    return (W_next, S_next), (W, reads)

  xs = tuple(map(split, (k_Td, v_Td, eta_T, theta_T, alpha_T, keep_T, q_Td)))
  (W, S), (starts, reads) = jax.lax.scan(one_chunk, (W0, S0), xs)
  return W, S, starts, None if reads is None else reads.reshape((n * chunk,) + reads.shape[2:])[:T]


def chunked_update(W0: dict, S0: dict, k_Td, v_Td, eta_T, theta_T, alpha_T, chunk: int):
  """(memory after the last token, surprise after it, the chunk-start memories [n_chunks, ...]) of the parallel
  form over T tokens (T a multiple of `chunk`)."""
  T = k_Td.shape[0]
  if T % chunk:
    raise ValueError(f"{T} tokens do not split into chunks of {chunk}")
  return scan_chunks(W0, S0, k_Td, v_Td, eta_T, theta_T, alpha_T, chunk)[:3]


def token_step(W: dict, S: dict, W_grad: dict, k_d, v_d, eta, theta, alpha):
  """One token of the recurrence with its gradient taken at W_grad: (W, S) after it. With W_grad the memory at the
  token's chunk start this is `chunk_step`'s exact per-token form (one-token decoding); W_grad = W is `recurrence`."""
  g = jax.grad(token_loss)(W_grad, k_d, v_d)
  S = {n: eta * S[n] - theta * g[n] for n in S}
  return {n: (1.0 - alpha) * W[n] + S[n] for n in W}, S


def recurrence(W0: dict, S0: dict, k_Td, v_Td, eta_T, theta_T, alpha_T):
  """The per-token recurrence, one token at a time (the definition the parallel form is tested against)."""
  W, S = W0, S0
  for t in range(k_Td.shape[0]):
    W, S = token_step(W, S, W, k_Td[t], v_Td[t], eta_T[t], theta_T[t], alpha_T[t])
  return W, S
