"""Every dba_kernels kernel compiles with Mosaic for real TPU chips from this CPU host: libtpu's XLA:TPU and Mosaic
compilers, forward and backward, with no patching (the kernels choose Mosaic because the step is lowered for TPU).
A CPU interpreter fallback would compile too, so each case also counts the Mosaic custom calls in the compiled HLO.

Default tier: one size per kernel (`aot_kernels.matrix(False)`). Slow tier: issue 24's full matrix (every chip,
T 2048 / 8192 / 32768, f32 and bf16, head dims 64 and 128, GQA, D != E with a null prefix). Without libtpu (the
`tpu` extra) every case skips with the reason."""
import functools

import jax
import pytest

from dba_jax import aot_kernels as ak

# Mosaic kernels per forward + backward: flash (fwd, dQ, dK/dV), selective (carry, fwd; carry again, sel_kv, sel_q,
# dkdv, dq), the scans (fwd, bwd); Titans' window attention is an XLA program (no kernel yet).
MOSAIC_CALLS = {"flash_attention": 3, "selective_flash": 7, "cumsum": 2, "protect_attack": 2, "window_attention": 0}


@functools.cache
def _devices(chip: str):
  return ak.topology_devices(ak.CHIPS[chip])


def _compile(case: ak.Case) -> dict:
  try:
    devices = _devices(case.chip)
  except Exception as e:  # no libtpu, or a libtpu that cannot build this topology
    pytest.skip(f"no {case.chip} topology here ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                "install the tpu extra: pip install -e '.[tpu]'")
  return ak.compile_case(case, devices)


def _check(case: ak.Case):
  r = _compile(case)
  assert r["ok"], f"{case.name}: {r['error']}"
  assert r["mosaic_kernels"] == MOSAIC_CALLS[case.kernel], r
  if case.kernel == "window_attention":  # blocked: below half of one [H, T, T] float32 logits array (measured, v5p
    assert r["temp_bytes"] < case.heads * case.T * case.T * 4 / 2, r  # T 8192: 0.8 GiB; the dense path 4.7 GiB)


@pytest.mark.parametrize("case", ak.matrix(full=False), ids=lambda c: c.name)
def test_kernel_compiles_with_mosaic(case):
  _check(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", ak.matrix(full=True), ids=lambda c: c.name)
def test_kernel_matrix_compiles_with_mosaic(case):
  _check(case)


def test_an_interpreted_kernel_has_no_mosaic_call():
  """The Mosaic count can fail: the same kernel lowered for CPU (the interpreter) has none."""
  case = ak.matrix(full=False)[2]  # the cumsum: the smallest
  fn, in_shapes, out_shape, dt = ak._fn_and_args(case)
  text = jax.jit(lambda *a: jax.vjp(fn, *a[:-1])[1](a[-1])).lower(
      *[jax.ShapeDtypeStruct(s, dt) for s in in_shapes + [out_shape]]).as_text()
  assert ak.MOSAIC not in text and "while" in text
