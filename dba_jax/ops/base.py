"""What every attention op shares: impl names and the one dispatch, masks, RoPE, shape checks.

Shape letters: B batch, T query positions, S key positions, H query heads, K key/value heads, G = H // K,
D q/k head dim, E value head dim.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLS = ("reference", "xla", "pallas", "auto")
ACT_HEADS = ("batch", "seq", "act_heads", None)  # logical axes of [B, T, H, D] activations
log = logging.getLogger("dba_jax")
_warned: set = set()


def fallback(what: str, reason: str):
  """Log once per (op, reason) that a kernel request runs on XLA instead."""
  if (what, reason) not in _warned:
    _warned.add((what, reason))
    log.warning("%s: using the XLA path: %s", what, reason)


def resolve_impl(impl: str, allowed: tuple = IMPLS) -> str:
  """A checked impl name ('auto' stays 'auto': it is resolved when lowered, see `dispatch`)."""
  if impl not in allowed:
    raise ValueError(f"impl={impl!r} is not one of {allowed}")
  return impl


def _out_only(x):
  """A result tuple reduced to its first field (the output), the others at their defaults (None)."""
  return type(x)(x[0]) if isinstance(x, tuple) and hasattr(x, "_fields") else x


def _by_platform(cpu_path, accel_path, project=lambda x: x):
  """A path running `cpu_path` when lowered for CPU and `accel_path` for GPU/TPU (interpret-mode kernels are for
  tests, not speed). Chosen at lowering, so a step traced on a CPU host and compiled for TPU runs the kernels.
  Both versions must return the same structure: `project` trims them to it."""
  def run(*args, **kw):
    branch = lambda path: lambda: project(path(*args, **kw))
    return jax.lax.platform_dependent(cpu=branch(cpu_path), default=branch(accel_path))
  return run


def dispatch(op: str, impl: str, paths: dict, unsupported: dict | None = None, fallback_to: str = "xla"):
  """The one place an op's impl is resolved: the path function for `impl`. 'auto' is 'xla' on CPU and 'pallas'
  on GPU/TPU, decided when lowered. A 'pallas' request the kernel cannot serve (any true entry of `unsupported`,
  {reason: bool}) runs on `fallback_to` and says why once (auto: silently, on accelerators only)."""
  impl = resolve_impl(impl, tuple(paths) + ("auto",))
  reasons = [k for k, bad in (unsupported or {}).items() if bad]
  if impl == "auto":
    if reasons:
      return paths["xla"] if fallback_to == "xla" else _by_platform(paths["xla"], paths[fallback_to])
    # Nothing beyond the output was asked for (else `reasons`), so both versions return only that.
    return _by_platform(paths["xla"], paths["pallas"], _out_only)
  if impl == "pallas" and reasons:
    fallback(op, "the fused kernel does not support " + ", ".join(reasons))
    impl = fallback_to
  return paths[impl]


# --------------------------------------------------------------------------------------------------- masks

def causal_mask(T: int, S: int | None = None, n_prefix: int = 0) -> jax.Array:
  """[T, S] bool, S = T + n_prefix by default: query i sees the n_prefix always-visible leading columns (DBA's
  null token) and the real keys j <= i. The one causal mask of the package (training and probes)."""
  S = T + n_prefix if S is None else S
  return positions_mask(jnp.arange(T), jnp.arange(S) - n_prefix) | (jnp.arange(S) < n_prefix)[None, :]


def positions_mask(q_pos_T, k_pos_S, window: int = 0) -> jax.Array:
  """[..., T, S] bool from absolute positions: key position p is visible to query position t iff 0 <= p <= t
  (key positions < 0 are empty cache slots) and, with a sliding `window` W > 0, t - p < W (the W most recent
  positions, the query's own included: Mistral's window). k_pos may carry leading batch dims [..., S]."""
  k = jnp.expand_dims(k_pos_S, -2)
  q = q_pos_T.reshape((1,) * (k.ndim - 2) + (-1, 1))
  visible = (k >= 0) & (k <= q)
  return visible & (k > q - window) if window > 0 else visible


def causal_zero(x_TS, fill=0):
  """x with every future entry (key after query, by index) replaced by `fill`, over the last two axes."""
  T, S = x_TS.shape[-2:]
  return jnp.where(causal_mask(T, S), x_TS, fill)


# ---------------------------------------------------------------------------------------------------- RoPE

class RopeScaling(NamedTuple):
  """RoPE frequencies stretched for contexts beyond the pretraining length, as Hugging Face's `rope_scaling`:
  "none"; "linear" (every frequency / factor: positions interpolated); "llama3" (Llama 3.1: wavelengths longer
  than original_max_positions / low_freq_factor are divided by factor, those shorter than
  original_max_positions / high_freq_factor kept, a linear ramp in 1 / wavelength between)."""
  kind: str = "none"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_positions: int = 8192


def rope_inv_freq(dim: int, base: float, dtype, scaling: RopeScaling | None = None) -> jax.Array:
  """[dim/2] inverse frequencies base^(-2i/dim), scaled; in at least float32 (float64 under float64 inputs)."""
  ft = jnp.promote_types(dtype, jnp.float32)
  inv_freq = base ** (-jnp.arange(0, dim, 2, dtype=ft) / dim)
  s = scaling or RopeScaling()
  if s.kind == "none":
    return inv_freq
  if s.kind == "linear":
    return inv_freq / s.factor
  if s.kind != "llama3":
    raise ValueError(f"RoPE scaling kind {s.kind!r} is not one of none, linear, llama3")
  wavelen = 2 * jnp.pi / inv_freq
  ramp = (s.original_max_positions / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  between = (1 - ramp) * inv_freq / s.factor + ramp * inv_freq
  return jnp.where(wavelen > s.original_max_positions / s.low_freq_factor, inv_freq / s.factor,
                   jnp.where(wavelen < s.original_max_positions / s.high_freq_factor, inv_freq, between))


def rope_angles(positions_T: jax.Array, dim: int, base: float, dtype,
                scaling: RopeScaling | None = None) -> tuple[jax.Array, jax.Array]:
  """cos/sin [T, dim/2] for rotate-half RoPE; angles in at least float32 (float64 under float64 inputs)."""
  inv_freq = rope_inv_freq(dim, base, dtype, scaling)
  angle_TF = positions_T.astype(inv_freq.dtype)[:, None] * inv_freq[None, :]
  # Tables are cast to the activation dtype before use, as in the PyTorch original.
  return jnp.cos(angle_TF).astype(dtype), jnp.sin(angle_TF).astype(dtype)


def apply_rope(x_BTHD: jax.Array, positions_T: jax.Array, base: float, scaling: RopeScaling | None = None) -> jax.Array:
  """Half-split ("rotate_half", NeoX/Llama) RoPE over the full head dim."""
  D = x_BTHD.shape[-1]
  cos_TF, sin_TF = rope_angles(positions_T, D, base, x_BTHD.dtype, scaling)
  cos, sin = cos_TF[None, :, None, :], sin_TF[None, :, None, :]
  x1, x2 = x_BTHD[..., : D // 2], x_BTHD[..., D // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def check_shapes(q_BTHD, k_BSKD, v_BSKE):
  B, T, H, D = q_BTHD.shape
  Bk, S, K, Dk = k_BSKD.shape
  if (Bk, S, K) != v_BSKE.shape[:3] or Bk != B or Dk != D or H % K:
    raise ValueError(f"attention shapes do not fit: q {q_BTHD.shape}, k {k_BSKD.shape}, v {v_BSKE.shape} "
                     "(need equal batch, k/v equal length and heads, q/k equal head dim, heads % kv_heads == 0)")
