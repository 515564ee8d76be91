"""Backend plumbing shared by the dba_kernels Pallas kernels: which backend to target, whether to interpret,
and the compiler parameters that pick and tune it.

The backend is chosen when the computation is lowered, not when it is traced: `per_platform(fn)` traces
fn(target, ...) once per target and wraps the versions in `jax.lax.platform_dependent`, whose lowering keeps only
the branch of the platform being compiled for. So one jitted train step lowers for CPU (interpret mode), CUDA
(Pallas-Triton) or TPU (Mosaic), e.g. `jax.jit(f).lower(<args sharded on TPU devices>)` from a CPU host, with
no patching. A kernel's custom_vjp wraps the per-platform forward and backward (not the other way round), so
its residuals must have the same shapes on every platform. `forced(target)` bypasses the dispatch for tests:
e.g. run the TPU tiling in interpret mode on a CPU.

GPU: in this JAX a pallas_call without compiler params goes to the Mosaic GPU backend, which these kernels do
not target (it rejects their iota and row tiles). Passing Pallas-Triton CompilerParams selects Triton.
TPU: Mosaic. A TPU block lives in VMEM (tens of MiB of scoped memory), not behind a pointer as on GPU, so the TPU
kernels tile the walked axis into the grid instead of looping over whole-sequence blocks inside a program: the
walked axis comes last and is "arbitrary" (sequential, accumulators in VMEM scratch), the others "parallel"
(a chip with two TensorCores splits them). VMEM per program is then O(block), whatever T. Mosaic blocks want
their last dim a multiple of LANES (or the full array dim).
"""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton  # explicit: JAX's default GPU backend is Mosaic GPU

LANES = 128  # TPU vreg lanes: the last dim of a Mosaic block is a multiple of this or the array's full dim
SUBLANES = 8  # TPU vreg sublanes for 32-bit types: row offsets that are multiples of this are tile-aligned
MIN_TRITON_DOT = 16  # Triton dots need every side >= 16


class Target(NamedTuple):
  """How a kernel is built: `platform` ('cpu', 'gpu' or 'tpu') picks tilings and compiler params; `interpret`
  runs the body through the Pallas interpreter (always on CPU; in tests, any tiling)."""
  platform: str
  interpret: bool


CPU, GPU, TPU = Target("cpu", True), Target("gpu", False), Target("tpu", False)
_forced: list[Target] = []


@contextlib.contextmanager
def forced(target: Target):
  """Within this block (at trace time), every kernel is built for `target` whatever it is lowered for."""
  _forced.append(target)
  try:
    yield
  finally:
    _forced.pop()


def per_platform(fn):
  """fn(target, *arrays) -> arrays, dispatched by the platform being lowered for (see the module docstring).
  Outputs must have the same shapes and dtypes on every platform. Unknown platforms get the interpreter."""
  @functools.wraps(fn)
  def run(*args):
    if _forced:
      return fn(_forced[-1], *args)
    return jax.lax.platform_dependent(*args, cpu=functools.partial(fn, CPU), cuda=functools.partial(fn, GPU),
                                      rocm=functools.partial(fn, GPU), tpu=functools.partial(fn, TPU),
                                      default=functools.partial(fn, CPU))
  return run


def dispatch(fn, *args, **static):
  """per_platform(fn) applied to `args`, with keyword-only `static` settings bound first."""
  return per_platform(functools.partial(fn, **static))(*args)


def compiler_params(platform: str, grid_rank: int, *, num_warps: int = 4, num_stages: int = 2,
                    semantics: tuple | None = None, vmem_limit_bytes: int | None = None):
  """Triton params on GPU (num_warps, num_stages); on TPU the grid's dimension semantics (all "parallel" unless
  given: programs that accumulate across an axis mark it "arbitrary") and an optional scoped-VMEM limit; None
  on CPU."""
  if platform == "gpu":
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  if platform == "tpu":
    return pltpu.CompilerParams(dimension_semantics=semantics or ("parallel",) * grid_rank,
                                vmem_limit_bytes=vmem_limit_bytes)
  return None


def pallas_call(kernel, *, target: Target, grid: tuple, num_warps: int = 4, num_stages: int = 2,
                semantics: tuple | None = None, vmem_limit_bytes: int | None = None, **kwargs):
  """pl.pallas_call for `target`: the interpreter or the platform's compiler params above."""
  return pl.pallas_call(kernel, grid=grid, interpret=target.interpret,
                        compiler_params=compiler_params(target.platform, len(grid), num_warps=num_warps,
                                                        num_stages=num_stages, semantics=semantics,
                                                        vmem_limit_bytes=vmem_limit_bytes), **kwargs)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def triton_block(n: int) -> int:
  """The smallest Triton-friendly tile side >= n: a power of two (Triton tiles are) and >= MIN_TRITON_DOT."""
  return max(MIN_TRITON_DOT, pl.next_power_of_2(n))
