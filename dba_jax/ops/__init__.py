"""Attention ops: every attention kind is one op, and the only place attention math lives.

  kind       module                 paths (impl=...)                                       Pallas kernel
  standard   dba_jax.ops.standard   reference | xla | pallas                                dba_kernels.flash_attention
  DBA        dba_jax.ops.dba        reference | xla | pallas (folded into standard)         (the flash kernel)
  selective  dba_jax.ops.selective  reference | xla | pallas_scan | pallas                  dba_kernels.selective_flash,
                                                                                            cumsum, protect_attack
  window     dba_jax.ops.window     reference | xla (blocked: no [T, T] array)             (none yet: xla)
Each module has a float64-capable `reference`, an `xla` path, the kernel path, and one api function that
resolves `impl` once through `base.dispatch` ('auto': pallas on GPU/TPU, xla on CPU; a kernel request the kernel
cannot serve runs on XLA and logs why once). Masks (`causal_mask`, `positions_mask`) and RoPE live in `base`.
"""
from dba_jax.ops.base import (ACT_HEADS, IMPLS, RopeScaling, _warned, apply_rope, causal_mask, causal_zero, fallback,
                              positions_mask, resolve_impl, rope_angles, rope_inv_freq)
from dba_jax.ops.dba import dba_attention
from dba_jax.ops.selective import SelectiveSpec, selective_attention
from dba_jax.ops.standard import attention
from dba_jax.ops.window import window_attention, window_mask

__all__ = ["ACT_HEADS", "IMPLS", "RopeScaling", "SelectiveSpec", "apply_rope", "attention", "causal_mask",
           "causal_zero", "dba_attention", "fallback", "positions_mask", "resolve_impl", "rope_angles", "rope_inv_freq",
           "selective_attention", "window_attention", "window_mask"]
