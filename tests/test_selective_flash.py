"""Fused selective flash attention (dba_kernels.selective_flash) against dba_jax.selective's dense reference.

Interpret mode on CPU. Each case compiles the kernel forward + backward once (cached below) and is compared in
float64 (exact up to rounding), float32 and bf16. Shapes are small but give several query/key blocks, ragged
last blocks (T = 100 over 16/32 blocks), blocks larger than T (T = 1, 7) and Bq != Bk in both directions.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dba_jax import selective
from dba_kernels import selective_flash as sflash

HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Case:
  T: int
  B: int = 2
  H: int = 3
  D: int = 16
  E: int = 16
  block_q: int = 16
  block_k: int = 32
  dtype: str = "float64"
  variant: tuple = ()  # sorted (name, value) pairs of selective-attention options

  @property
  def kw(self):
    return dict(self.variant)


def _v(**kw):
  return tuple(sorted(kw.items()))


def _inputs(case: Case, seed=0):
  """q, k, v, cotangent as float64 numpy, already rounded to the case's dtype (so the reference sees the same values)."""
  rng = np.random.default_rng(seed)
  shapes = [(case.B, case.T, case.H, case.D)] * 2 + [(case.B, case.T, case.H, case.E)] * 2
  # Scale 1.5 keeps plenty of positive selection logits, so F is far from 0 and the selection path is exercised.
  arrays = [rng.normal(size=s) * 1.5 for s in shapes]
  return [np.asarray(jnp.asarray(a, case.dtype).astype(jnp.float32), np.float64) if case.dtype != "float64" else a
          for a in arrays]


def _out_and_grads(fn, q, k, v, g):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(g))


def _compiled(fn, *args):
  """jit of out-and-grads, compiled without XLA's backend optimisations: compiling the interpreted kernels
  dominates this file's runtime, and the arithmetic is the same."""
  lowered = jax.jit(functools.partial(_out_and_grads, fn)).lower(*args)
  return lowered.compile({"xla_backend_optimization_level": 0})(*args)


@functools.lru_cache(maxsize=None)
def run(case: Case):
  """(kernel [out, dq, dk, dv], float64 reference [out, dq, dk, dv]) as float64 numpy."""
  q, k, v, g = _inputs(case)
  kernel = functools.partial(sflash.selective_flash_attention, block_q=case.block_q, block_k=case.block_k, **case.kw)
  reference = functools.partial(selective.selective_attention, impl="reference", **case.kw)
  if case.dtype == "float64":
    with jax.enable_x64(True):
      got = _compiled(kernel, *map(jnp.asarray, (q, k, v, g)))
      got = [np.asarray(x) for x in got]
  else:
    got = _compiled(kernel, *(jnp.asarray(x, case.dtype) for x in (q, k, v, g)))
    assert all(x.dtype == jnp.dtype(case.dtype) for x in got)  # output and gradients in the input dtype
    got = [np.asarray(x.astype(jnp.float32), np.float64) for x in got]
  with jax.enable_x64(True):
    want = _compiled(reference, *map(jnp.asarray, (q, k, v, g)))
    want = [np.asarray(x) for x in want]
  return got, want


def _max_err(a, b):
  return float(np.abs(a - b).max())


F64_CASES = {
    "default": Case(100),
    "no_bos": Case(100, variant=_v(protect_bos=False)),
    "self_mask": Case(100, variant=_v(allow_self_mask=True)),
    "head2_no_bos": Case(100, variant=_v(selection_head=2, protect_bos=False)),
    "T1": Case(1, H=2),
    "T7_self_no_bos": Case(7, B=1, H=2, variant=_v(allow_self_mask=True, protect_bos=False)),
    "T64_wide_q_head1": Case(64, B=1, D=32, E=16, block_q=32, block_k=16, variant=_v(selection_head=1)),
}


@pytest.mark.parametrize("name", list(F64_CASES))
def test_forward_float64(name):
  (out, *_), (want, *_) = run(F64_CASES[name])
  assert out.shape == want.shape
  np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(F64_CASES))
def test_gradients_float64(name):
  got, want = run(F64_CASES[name])
  for label, a, b in zip(("dq", "dk", "dv"), got[1:], want[1:]):
    assert a.shape == b.shape, label
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9, err_msg=label)


F32_CASES = {
    "default_e16": Case(100, D=32, E=16, block_q=32, block_k=16, dtype="float32"),
    "head1_no_bos": Case(64, B=1, H=2, dtype="float32", variant=_v(selection_head=1, protect_bos=False)),
}


@pytest.mark.parametrize("name", list(F32_CASES))
def test_float32_close_to_float64(name):
  got, want = run(F32_CASES[name])
  np.testing.assert_allclose(got[0], want[0], rtol=0, atol=2e-5)  # measured ~1e-6 (outputs ~5)
  for label, a, b in zip(("dq", "dk", "dv"), got[1:], want[1:]):
    np.testing.assert_allclose(a, b, rtol=0, atol=5e-5, err_msg=label)  # measured ~3e-6 (gradients ~10-20)


def test_bfloat16_close_to_float32():
  """bf16 inputs, float32 accumulation: the loss is bf16 rounding of the probabilities and dZ fed to matmuls
  (2^-8 relative) and of the outputs. Stated tolerance: 2e-2 of the largest reference value."""
  got, want = run(Case(64, B=1, H=2, D=32, E=32, block_q=16, block_k=32, dtype="bfloat16"))
  for label, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    scale = np.abs(b).max()
    assert _max_err(a, b) <= 2e-2 * scale, (label, _max_err(a, b), scale)
    assert _max_err(a, b) > 0  # really ran in reduced precision


def _dense(q, k, v, *, stop_f, protect_bos=True, allow_self_mask=False, selection_head=0):
  """Dense selective attention where F may be cut out of the gradient (selection path off)."""
  T, D = q.shape[1], q.shape[-1]
  logits = jnp.einsum("bthd,bshd->bhts", q, k, precision=HI) * D ** -0.5
  f = selective.selection_mask(logits[:, selection_head], protect_bos=protect_bos, allow_self_mask=allow_self_mask,
                               impl="reference")
  f = jax.lax.stop_gradient(f) if stop_f else f
  causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
  probs = jax.nn.softmax(jnp.where(causal, logits - f[:, None], -jnp.inf), axis=-1)
  return jnp.einsum("bhts,bshe->bthe", probs, v, precision=HI)


@pytest.mark.parametrize("name", ["default", "no_bos", "head2_no_bos"])
def test_selection_path_carries_gradient(name):
  """The gradient through F reaches only the selection head's q and k, and it is large there."""
  case = F64_CASES[name]
  got, want = run(case)
  q, k, v, g = _inputs(case)
  with jax.enable_x64(True):
    full = _compiled(functools.partial(_dense, stop_f=False, **case.kw), *map(jnp.asarray, (q, k, v, g)))
    cut = _compiled(functools.partial(_dense, stop_f=True, **case.kw), *map(jnp.asarray, (q, k, v, g)))
  full, cut = [np.asarray(x) for x in full], [np.asarray(x) for x in cut]
  for a, b in zip(full, want):  # the local dense version is the reference
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
  sel = case.kw.get("selection_head", 0)
  others = [h for h in range(case.H) if h != sel]
  for label, d_got, d_cut in zip(("dq", "dk"), got[1:3], cut[1:3]):
    np.testing.assert_allclose(d_got[:, :, others], d_cut[:, :, others], rtol=1e-9, atol=1e-9, err_msg=label)
    diff = np.abs(d_got[:, :, sel] - d_cut[:, :, sel]).max()
    assert diff > 0.05 * np.abs(d_cut[:, :, sel]).max(), (label, diff)
  np.testing.assert_allclose(got[3], cut[3], rtol=1e-9, atol=1e-9)  # dv does not see the selection path


def test_padding_does_not_leak():
  """Garbage-free padding: the first 64 positions of a T = 100 run equal a T = 64 run (causality)."""
  case = F64_CASES["default"]
  q, k, v, _ = _inputs(case)
  with jax.enable_x64(True):
    short = sflash.selective_flash_attention(*(jnp.asarray(x[:, :64]) for x in (q, k, v)), block_q=16, block_k=32)
  np.testing.assert_allclose(np.asarray(short), run(case)[0][0][:, :64], rtol=1e-12, atol=1e-12)


def test_rejects_bad_arguments():
  x = jnp.zeros((1, 8, 2, 16), jnp.float32)
  with pytest.raises(ValueError, match="power of two"):
    sflash.selective_flash_attention(x, x, x, block_q=24)
  with pytest.raises(ValueError, match="power of two"):
    sflash.selective_flash_attention(x, x, x, block_k=8)
  with pytest.raises(ValueError, match="selection_head"):
    sflash.selective_flash_attention(x, x, x, selection_head=2)
  with pytest.raises(ValueError, match="need q, k"):
    sflash.selective_flash_attention(x, x[:, :4], x)
  with pytest.raises(TypeError, match="dtypes differ"):
    sflash.selective_flash_attention(x, x, x.astype(jnp.bfloat16))


@pytest.mark.parametrize("platform,backend,marker", [("cuda", "gpu", "triton"), ("tpu", "tpu", "tpu_custom_call")])
def test_lowers_for_gpu_and_tpu(monkeypatch, platform, backend, marker):
  """Forward and backward lower (not compile: no device here) through Pallas-Triton and Mosaic TPU, with
  T = 150 (ragged, 3 query blocks: a non-power-of-two block count) and bf16, D = 64."""
  monkeypatch.setattr(sflash, "_backend", lambda: backend)
  x = jax.ShapeDtypeStruct((2, 150, 3, 64), jnp.bfloat16)

  def loss(q, k, v):
    return sflash.selective_flash_attention(q, k, v, block_q=64, block_k=32).astype(jnp.float32).sum()

  text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(x, x, x).lower(lowering_platforms=(platform,)).as_text()
  assert text.count(marker) >= 6  # carry, forward, sel_kv, sel_q, dkdv, dq
