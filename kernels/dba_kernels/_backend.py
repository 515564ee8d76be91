"""Backend plumbing shared by the dba_kernels Pallas kernels: which backend to target, whether to interpret,
and the compiler parameters that pick and tune it.

Every kernel module reads the platform through a module-level alias of `default_platform` (looked up at call
time), so a test can patch that alias and lower for GPU or TPU from a CPU host with
`jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))` (or `("tpu",)`).

GPU: in this JAX a pallas_call without compiler params goes to the Mosaic GPU backend, which these kernels do
not target (it rejects their iota and row tiles). Passing Pallas-Triton CompilerParams selects Triton.
TPU: Mosaic. Every grid in dba_kernels has independent programs (each writes its own output blocks; any
sequential walk happens inside a program), so all grid axes are marked "parallel", which lets a chip with
two TensorCores split the grid. Mosaic blocks want their last dim a multiple of LANES (or the full array dim).
"""
from __future__ import annotations

import jax
from jax.experimental import pallas as pl

LANES = 128  # TPU vreg lanes: the last dim of a Mosaic block is a multiple of this or the array's full dim
SUBLANES = 8  # TPU vreg sublanes for 32-bit types: row offsets that are multiples of this are tile-aligned
MIN_TRITON_DOT = 16  # Triton dots need every side >= 16


def default_platform() -> str:
  """'cpu', 'gpu' or 'tpu': the backend of the default device, which is where the kernel will run."""
  name = jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name  # JAX says "gpu", but accept the specific names too


def interpret(platform: str) -> bool:
  """CPU has no Pallas backend: run the kernel body through the interpreter."""
  return platform == "cpu"


def compiler_params(platform: str, grid_rank: int, *, num_warps: int = 4, num_stages: int = 2):
  """Triton params on GPU (num_warps, num_stages), all-"parallel" TPU params for a grid of `grid_rank` axes,
  None on CPU."""
  if platform == "gpu":
    from jax.experimental.pallas import triton as pltriton  # explicit: the default GPU backend is Mosaic GPU
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  if platform == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * grid_rank)
  return None


def pallas_call(kernel, *, platform: str, grid: tuple, num_warps: int = 4, num_stages: int = 2, **kwargs):
  """pl.pallas_call for `platform`: interpret on CPU, the compiler params above elsewhere."""
  return pl.pallas_call(kernel, grid=grid, interpret=interpret(platform),
                        compiler_params=compiler_params(platform, len(grid), num_warps=num_warps,
                                                        num_stages=num_stages), **kwargs)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def triton_block(n: int) -> int:
  """The smallest Triton-friendly tile side >= n: a power of two (Triton tiles are) and >= MIN_TRITON_DOT."""
  return max(MIN_TRITON_DOT, pl.next_power_of_2(n))
