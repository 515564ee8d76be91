"""The shared base of every Pallas kernel test (flash attention, fused selective attention, the scans).

  inputs:      `normal` float64 arrays, `rounded` to the dtype under test (so the reference sees the kernel's values)
  reference:   `kernel_vs_reference` runs the kernel at the dtype under test and the reference in float64 on the
               same (rounded) inputs, both through one jitted `out_and_grads` (jax.vjp: output and input gradients)
  lowering:    `lowered_text` lowers a function for cuda (Pallas-Triton) or tpu (Mosaic) from this CPU host (the kernels
               pick their backend when lowered); `PLATFORMS` names each platform's kernel custom call.
"""
import jax
import jax.numpy as jnp
import numpy as np

# Interpret-mode kernels are large HLO; XLA's backend optimizations cost more time than they save here.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# (lowering platform, the kernel's custom call in the lowered text)
PLATFORMS = [("cuda", "@__gpu$xla.gpu.triton"), ("tpu", "@tpu_custom_call")]


def normal(shapes, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=s) * scale for s in shapes]


def rounded(arrays, dtype):
  """float64 numpy copies of `arrays`, rounded to `dtype` first."""
  if jnp.dtype(dtype) == jnp.float64:
    return [np.asarray(a, np.float64) for a in arrays]
  return [np.asarray(jnp.asarray(a, dtype).astype(jnp.float32), np.float64) for a in arrays]


def out_and_grads(fn, *args):
  """(out, d args...) of fn at args[:-1] with output cotangent args[-1], one jitted call compiled fast; as float64
  numpy (inputs of another dtype are checked to give outputs and gradients in that dtype)."""
  *xs, g = args

  def run(*a):
    out, pull = jax.vjp(fn, *a[:-1])
    return (out, *pull(a[-1]))

  got = jax.jit(run).lower(*xs, g).compile(FAST_COMPILE)(*xs, g)
  if xs[0].dtype != jnp.float64:
    assert all(x.dtype == xs[0].dtype for x in got), [x.dtype for x in got]
  return [np.asarray(jnp.asarray(x).astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, np.float64) for x in got]


def kernel_vs_reference(kernel, reference, arrays, dtype):
  """(kernel [out, grads...], float64 reference [out, grads...]); `arrays` = inputs + output cotangent (float64
  numpy), rounded to `dtype` for both."""
  arrays = rounded(arrays, dtype)
  if jnp.dtype(dtype) == jnp.float64:
    with jax.enable_x64(True):
      got = out_and_grads(kernel, *map(jnp.asarray, arrays))
  else:
    got = out_and_grads(kernel, *(jnp.asarray(a, dtype) for a in arrays))
  with jax.enable_x64(True):
    want = out_and_grads(reference, *map(jnp.asarray, arrays))
  return got, want


def lowered_text(fn, args, lowering: str) -> str:
  """StableHLO of jit(fn) lowered for `lowering` ('cuda' or 'tpu'): builds the Triton / Mosaic kernels (block
  shapes, ops), not a device compile."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(lowering,)).as_text()
