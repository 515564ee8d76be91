"""The scan kernels (dba_kernels.cumsum, dba_kernels.protect_attack) lower for GPU (Pallas-Triton) and TPU (Mosaic)
from this CPU host, forward and backward, with no patching (the backend is chosen when lowered); their GPU/TPU
tilings compute the same numbers in interpret mode; and the shared backend plumbing (dba_kernels._backend) picks
the compiler params each backend needs.

Lowering builds the Triton / Mosaic kernels (block shapes, ops) but does not compile them for a device."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dba_kernels import _backend as backend
from dba_kernels import cumsum as kcumsum
from dba_kernels import protect_attack as kpa
from kernel_base import PLATFORMS, lowered_text

KERNELS = {
    "cumsum": (kcumsum, kcumsum.exclusive_cumsum, 1),
    "protect_attack": (kpa, kpa.protect_and_attack, 2),
}


def _fwd_bwd(kernel, n_in, block_kw):
  """(inputs..., cotangent) -> (output, input gradients) through jax.vjp, i.e. the forward and backward kernels."""
  def fn(x, y, g):
    out, vjp = jax.vjp(functools.partial(kernel, **block_kw), *(x, y)[:n_in])
    return out, vjp(g)
  return fn


@pytest.mark.parametrize("lowering,call", PLATFORMS)
@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("shape,block_kw", [
    ((2, 3, 150, 150), {}),  # defaults; ragged T and S, leading dims folded into the grid
    ((1, 5, 7), {}),  # one block, mostly padding
    ((2, 100, 77), {"block_t": 24, "block_s": 40}),  # blocks each backend must round up
])
def test_forward_and_backward_lower(name, lowering, call, shape, block_kw):
  module, kernel, n_in = KERNELS[name]
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  fn = _fwd_bwd(kernel, n_in, block_kw)
  text = lowered_text(fn, (x, x, x), lowering)
  assert text.count(f"custom_call {call}") == 2  # the forward kernel and the backward kernel
  assert "mosaic_gpu" not in text  # on GPU, Triton: not JAX's default Mosaic GPU backend


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("block_t", [16, 64])
def test_backend_tiling_gives_the_same_numbers(name, platform, block_t):
  """In interpret mode, the GPU or TPU tiling (rounded key blocks; for protect_attack on TPU, int32 flags) gives
  the same values and gradients: block_t is one every backend keeps, and neither the key block width nor the flag
  dtype touches protect_attack's arithmetic (bit-identical)."""
  module, kernel, n_in = KERNELS[name]
  rng = np.random.default_rng(3)
  shape = (2, 150, 77)
  x = jnp.asarray(rng.exponential(size=shape) * (rng.random(shape) < 0.4), jnp.float32)
  y = jnp.asarray(rng.exponential(size=shape) * (rng.random(shape) < 0.4), jnp.float32)
  g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  fn = _fwd_bwd(kernel, n_in, {"block_t": block_t, "block_s": 40})
  with backend.forced(backend.CPU):  # the jaxpr otherwise holds every platform's version
    assert ",128]" not in str(jax.make_jaxpr(fn)(x, y, g))
  want = jax.jit(fn)(x, y, g)

  # A new function: a fresh trace under the forced tiling. S = 77 pads to 128 key columns (blocks of 64 on GPU,
  # 128 on TPU) instead of the 80 of the requested 40-wide blocks.
  with backend.forced(backend.Target(platform, interpret=True)):
    assert ",128]" in str(jax.make_jaxpr(lambda *a: fn(*a))(x, y, g))
    got = jax.jit(lambda *a: fn(*a))(x, y, g)
  for w, o in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    if name == "cumsum":  # XLA's CPU dot may order a wider triangular matmul's sums differently: a few ulp
      np.testing.assert_allclose(np.asarray(o), np.asarray(w), rtol=1e-6, atol=1e-5)
    else:
      np.testing.assert_array_equal(np.asarray(o), np.asarray(w))


@pytest.mark.parametrize("block_t,block_s,want", [
    (64, 64, {"gpu": (64, 64), "tpu": (64, 128), "cpu": (64, 64)}),
    (24, 40, {"gpu": (32, 64), "tpu": (24, 128), "cpu": (24, 40)}),
    (2, 8, {"gpu": (16, 16), "tpu": (8, 128), "cpu": (2, 8)}),
])
def test_block_rounding(block_t, block_s, want):
  for platform, (bt, bs) in want.items():
    assert kcumsum._blocks(platform, block_t, block_s) == (bt, bs)
    layout = kpa._layout(platform, block_t, block_s)  # row-at-a-time access: any block_t, but whole TPU tiles
    assert (layout.block_t, layout.block_s) == ((bt if platform == "tpu" else block_t), bs)
    assert layout.flag == (jnp.int32 if platform == "tpu" else jnp.int8)  # 32-bit rows for Mosaic


def test_compiler_params():
  from jax.experimental.pallas import tpu as pltpu
  from jax.experimental.pallas import triton as pltriton
  gpu = backend.compiler_params("gpu", 3, num_warps=8, num_stages=3)
  assert isinstance(gpu, pltriton.CompilerParams) and (gpu.num_warps, gpu.num_stages) == (8, 3)
  tpu = backend.compiler_params("tpu", 2)
  assert isinstance(tpu, pltpu.CompilerParams) and tuple(tpu.dimension_semantics) == ("parallel", "parallel")
  assert backend.compiler_params("cpu", 2) is None
  assert backend.CPU.interpret and not backend.GPU.interpret and not backend.TPU.interpret


@pytest.mark.parametrize("shape,block_t", [((2, 150, 77), 16), ((1, 5, 7), 64), ((3, 130, 200), 24)])
def test_cumsum_tpu_tiling_float64_matches_reference(shape, block_t):
  """The TPU kernel (one [block_t, 128] block per grid step, column sums carried in VMEM scratch), interpreted,
  against the float64 reference: F and the input gradient (the reverse exclusive sum of the cotangent)."""
  rng = np.random.default_rng(len(shape) + shape[1])
  x, g = rng.normal(size=shape), rng.normal(size=shape)
  fn = _fwd_bwd(kcumsum.exclusive_cumsum, 1, {"block_t": block_t, "block_s": 40})
  with jax.enable_x64(True), backend.forced(backend.Target("tpu", interpret=True)):
    want_f = np.asarray(kcumsum.exclusive_cumsum_reference(x))
    want_dx = np.flip(np.asarray(kcumsum.exclusive_cumsum_reference(np.flip(g, -2))), -2)
    assert str(jax.make_jaxpr(fn)(x, x, g)).count("arbitrary") == 2  # forward and backward on the TPU grid
    f, (dx,) = jax.jit(fn)(x, x, g)
  assert f.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(f), want_f, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-12, atol=1e-12)
