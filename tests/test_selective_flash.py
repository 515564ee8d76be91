"""Fused selective flash attention (dba_kernels.selective_flash) against dba_jax.ops.selective's dense reference.

Interpret mode on CPU. Each case compiles the kernel forward + backward once (cached below) and is compared in
float64 (exact up to rounding), float32 and bf16. Shapes are small but give several query/key blocks, ragged
last blocks (T = 7, 129 over 16/32 blocks), blocks larger than T (T = 1, 7), Bq != Bk in both directions and one
T = 512 case over 64-blocks. Variants: the default single mask (any selection head, BOS protection and self
masking on or off), dedicated selection heads (selection_heads = 1, 2 with a wrapped remainder head, H / 2) and
GQA (k, v with fewer heads; the reference sees them repeated to H heads).

The TPU kernels (a different tiling: one tile per grid step, scratch carries, the heads of a mask on a grid axis)
run in the interpreter too (TPU_CASES; most in the slow tier), against the same reference. Their Mosaic
compiles are in tests/test_tpu_compile.py.
"""
import dataclasses
import functools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dba_jax import ops
from dba_jax.ops import selective
from dba_kernels import _backend as backend, _selective_tiles as tiles, selective_flash as sflash
from kernel_base import FAST_COMPILE, kernel_vs_reference, lowered_text, normal, out_and_grads, rounded

HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Case:
  T: int
  B: int = 2
  H: int = 3
  K: int = 0  # kv heads; 0: K = H
  D: int = 16
  E: int = 16
  block_q: int | None = 16  # None: the platform's default
  block_k: int | None = 32
  dtype: str = "float64"
  variant: tuple = ()  # sorted (name, value) pairs of selective-attention options

  @property
  def kw(self):
    return dict(self.variant)

  @property
  def kv_heads(self):
    return self.K or self.H

  @property
  def m(self):
    return self.kw.get("selection_heads", 0)


def _v(**kw):
  return tuple(sorted(kw.items()))


def _inputs(case: Case, seed=0):
  """q, k, v, cotangent as float64 numpy, already rounded to the case's dtype (so the reference sees the same values)."""
  B, T, H, K = case.B, case.T, case.H, case.kv_heads
  shapes = [(B, T, H, case.D), (B, T, K, case.D), (B, T, K, case.E), (B, T, H - case.m, case.E)]
  # Scale 1.5 keeps plenty of positive selection logits, so F is far from 0 and the selection path is exercised.
  return rounded(normal(shapes, seed, scale=1.5), case.dtype)


def _reference(q, k, v, **kw):
  """The dense reference; GQA k, v repeated to H heads (q head h reads kv head h // (H / K)), so their gradients
  are the sums over each group."""
  group = q.shape[2] // k.shape[2]
  return selective.selective_attention(q, jnp.repeat(k, group, 2), jnp.repeat(v, group, 2), impl="reference", **kw)


def _compiled(fn, *args):
  """jit of `fn`, compiled without XLA's backend optimisations (the interpreted kernels' compile dominates)."""
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


TPU_TILING = backend.Target("tpu", interpret=True)  # the TPU kernels, run by the Pallas interpreter


@functools.lru_cache(maxsize=None)
def run(case: Case, target: backend.Target | None = None):
  """(kernel [out, dq, dk, dv], float64 reference [out, dq, dk, dv]) as float64 numpy; the kernel built for
  `target` if given (forced while forward and backward are traced), else for the platform (CPU: interpreter)."""
  kernel = functools.partial(sflash.selective_flash_attention, block_q=case.block_q, block_k=case.block_k, **case.kw)
  reference = functools.partial(_reference, **case.kw)
  if target is None:
    return kernel_vs_reference(kernel, reference, _inputs(case), case.dtype)
  with backend.forced(target):
    return kernel_vs_reference(kernel, reference, _inputs(case), case.dtype)


def _max_err(a, b):
  return float(np.abs(a - b).max())


F64_CASES = {
    "default_T129": Case(129),
    "no_bos_T129_wide_q": Case(129, D=32, E=16, block_q=32, block_k=16, variant=_v(protect_bos=False)),
    "self_mask_T64": Case(64, variant=_v(allow_self_mask=True)),
    "head2_no_bos_T129": Case(129, variant=_v(selection_head=2, protect_bos=False)),
    "T1": Case(1, H=2),
    "T7_self_no_bos": Case(7, H=2, variant=_v(allow_self_mask=True, protect_bos=False)),
    # none_with_no_head: head 0 selects for heads 1, 2
    "heads1_T129": Case(129, variant=_v(selection_heads=1)),
    # two_masks: 3 attending heads over 2 masks -> masks [0, 1, 0] (the remainder head wraps to mask 0)
    "heads2_wrap_T129_no_bos": Case(129, H=5, variant=_v(selection_heads=2, protect_bos=False)),
    # one_mask_per_head: H / 2 = 3 masks for 3 heads
    "heads3_of6_T64_self": Case(64, H=6, block_q=32, block_k=16, variant=_v(selection_heads=3, allow_self_mask=True)),
    "heads2_wrap_T7": Case(7, H=5, variant=_v(selection_heads=2)),
    # GQA: 2 q heads per kv head; the selection head 3 reads kv head 1
    "gqa_T129_head3": Case(129, H=4, K=2, variant=_v(selection_head=3)),
    "mqa_T7_head1_no_bos": Case(7, H=4, K=1, variant=_v(selection_head=1, protect_bos=False)),
    "gqa_T1": Case(1, H=4, K=2),
    "heads2_wrap_T512": Case(512, H=5, block_q=64, block_k=64, variant=_v(selection_heads=2)),
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


# Reduced precision against the float64 reference. Rounding errors grow with the reduction length N = T (F is a
# sum of up to T selection scores, whose rounding shifts every logit; softmax and the gradients sum over T keys or
# queries), so the stated tolerance, per tensor, is
#     max|err| <= C * u * sqrt(T) * max|ref|,   u = unit roundoff (2^-24 float32, 2^-8 bf16), C = 4 (f32), 1 (bf16)
# (random-walk growth of rounding errors over T terms; a conservative model: the measured relative errors barely
# grow from T = 64 to 512). Measured (printed with -s): float32 <= 0.63 u sqrt(T) max|ref|, bf16 (where bf16
# rounding of probabilities, dZ and outputs dominates) <= 0.12 u sqrt(T) max|ref|.
LOW_CASES = {
    "f32_default_T129_e16": Case(129, D=32, E=16, block_q=32, block_k=16, dtype="float32"),
    "f32_heads2_wrap_T129": Case(129, H=5, dtype="float32", variant=_v(selection_heads=2)),
    "f32_gqa_T512": Case(512, B=1, H=4, K=2, block_q=64, block_k=64, dtype="float32", variant=_v(selection_head=1)),
    "bf16_head1_no_bos_T64": Case(64, B=1, H=2, D=32, E=32, dtype="bfloat16",
                                  variant=_v(selection_head=1, protect_bos=False)),
    "bf16_heads1_T129": Case(129, H=3, dtype="bfloat16", variant=_v(selection_heads=1)),
    "bf16_gqa_T129": Case(129, H=4, K=2, dtype="bfloat16"),
}
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8}
TOLERANCE_C = {"float32": 4.0, "bfloat16": 1.0}


@pytest.mark.parametrize("name", list(LOW_CASES))
def test_reduced_precision_close_to_float64(name):
  case = LOW_CASES[name]
  got, want = run(case)
  u_sqrt_t = UNIT_ROUNDOFF[case.dtype] * np.sqrt(case.T)
  bound = TOLERANCE_C[case.dtype] * u_sqrt_t
  for label, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    scale = np.abs(b).max()
    err = _max_err(a, b)
    print(f"{name} {label}: max err {err:.2e} = {err / scale:.2e} of max|ref| = {err / scale / u_sqrt_t:.2f} u sqrt(T)")
    assert err <= bound * scale, (label, err, scale)
    assert err > 0  # really ran in reduced precision


# ------------------------------------------------------------------------------ TPU tiling (interpret mode)
# The TPU kernels (grids walking one tile per step, scratch carries, clamped index maps, heads of a mask on a
# grid axis) against the same float64 reference: float64 to rounding, f32 / bf16 with the tolerance above.
# Small blocks give many steps, ragged last blocks, Bq != Bk both ways and skipped tiles; None: TPU's 128.
TPU_CASES = {
    "default_T129": F64_CASES["default_T129"],
    "no_bos_T129_wide_q": F64_CASES["no_bos_T129_wide_q"],
    "self_mask_head2_T100": Case(100, block_q=32, block_k=16, variant=_v(selection_head=2, allow_self_mask=True)),
    "T7_self_no_bos": F64_CASES["T7_self_no_bos"],
    "heads1_T129": F64_CASES["heads1_T129"],
    "heads2_wrap_T129_no_bos": F64_CASES["heads2_wrap_T129_no_bos"],
    "heads3_of6_T64_self": F64_CASES["heads3_of6_T64_self"],
    "heads3_wrap_of8_T80": Case(80, H=8, block_q=16, block_k=16, variant=_v(selection_heads=3)),  # masks [0,1,2,0,1]
    "heads2_of3_T40": Case(40, H=3, block_q=16, block_k=16, variant=_v(selection_heads=2)),  # mask 1 has no head
    "gqa_T129_head3": F64_CASES["gqa_T129_head3"],
    "mqa_T7_head1_no_bos": F64_CASES["mqa_T7_head1_no_bos"],
    "default_blocks_T300": Case(300, B=1, D=32, E=16, block_q=None, block_k=None),  # 3 blocks of 128, ragged
    "f32_heads2_wrap_T129": LOW_CASES["f32_heads2_wrap_T129"],
    "f32_gqa_T200_default_blocks": Case(200, B=1, H=4, K=2, block_q=None, block_k=None, dtype="float32",
                                        variant=_v(selection_head=1, protect_bos=False)),
    "bf16_gqa_T129": LOW_CASES["bf16_gqa_T129"],
    "bf16_heads2_wrap_T150_default_blocks": Case(150, B=1, H=5, D=64, E=64, block_q=None, block_k=None,
                                                 dtype="bfloat16", variant=_v(selection_heads=2)),
}


TPU_FAST = ("default_T129", "heads2_of3_T40", "gqa_T129_head3", "default_blocks_T300", "bf16_gqa_T129")


@pytest.mark.parametrize("name", [n if n in TPU_FAST else pytest.param(n, marks=pytest.mark.slow) for n in TPU_CASES])
def test_tpu_tiling_matches_reference(name):
  case = TPU_CASES[name]
  got, want = run(case, TPU_TILING)
  u_sqrt_t = UNIT_ROUNDOFF.get(case.dtype, 0.0) * np.sqrt(case.T)
  for label, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert a.shape == b.shape, label
    scale = np.abs(b).max()
    if case.dtype == "float64":
      tol = 1e-10 if label == "out" else 1e-9  # as test_forward_float64 / test_gradients_float64
      np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=label)
    else:
      err = _max_err(a, b)
      print(f"{name} {label}: max err {err / scale:.2e} of max|ref| = {err / scale / u_sqrt_t:.2f} u sqrt(T)")
      assert err <= TOLERANCE_C[case.dtype] * u_sqrt_t * scale, (label, err, scale)


def test_tpu_tiling_selection_only_heads_get_gradient_only_through_f():
  """The TPU sel_kv / sel_q head axis (a wrapped remainder head, empty slots) gives the selection-only heads
  their F gradient and no dv (the values themselves are checked above)."""
  case = TPU_CASES["heads3_wrap_of8_T80"]
  (out, dq, dk, dv), _ = run(case, TPU_TILING)
  assert out.shape == (case.B, case.T, case.H - case.m, case.E)
  assert np.all(dv[:, :, :case.m] == 0)
  for d in (dq, dk):
    assert np.all(np.abs(d[:, :, :case.m]).max(axis=(0, 1, 3)) > 0.05 * np.abs(d).max())


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


@pytest.mark.parametrize("name", ["default_T129", "head2_no_bos_T129"])
def test_selection_path_carries_gradient(name):
  """The gradient through F reaches only the selection head's q and k, and it is large there."""
  case = F64_CASES[name]
  got, want = run(case)
  q, k, v, g = _inputs(case)
  with jax.enable_x64(True):
    args = tuple(map(jnp.asarray, (q, k, v, g)))
    full, cut = (out_and_grads(functools.partial(_dense, stop_f=stop, **case.kw), *args) for stop in (False, True))
  for a, b in zip(full, want):  # the local dense version is the reference
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
  sel = case.kw.get("selection_head", 0)
  others = [h for h in range(case.H) if h != sel]
  for label, d_got, d_cut in zip(("dq", "dk"), got[1:3], cut[1:3]):
    np.testing.assert_allclose(d_got[:, :, others], d_cut[:, :, others], rtol=1e-9, atol=1e-9, err_msg=label)
    diff = np.abs(d_got[:, :, sel] - d_cut[:, :, sel]).max()
    assert diff > 0.05 * np.abs(d_cut[:, :, sel]).max(), (label, diff)
  np.testing.assert_allclose(got[3], cut[3], rtol=1e-9, atol=1e-9)  # dv does not see the selection path


@pytest.mark.parametrize("name", ["heads1_T129", "heads2_wrap_T129_no_bos", "heads3_of6_T64_self"])
def test_selection_only_heads_get_gradient_only_through_f(name):
  """Selection-only heads: their values are unused (dv exactly 0), yet their q and k get a real gradient (via F,
  matched to the reference by test_gradients_float64); the output has H - m heads."""
  case = F64_CASES[name]
  (out, dq, dk, dv), _ = run(case)
  m = case.m
  assert out.shape == (case.B, case.T, case.H - m, case.E)
  assert np.all(dv[:, :, :m] == 0)
  assert np.all(np.abs(dv[:, :, m:]).max(axis=(0, 1, 3)) > 0)
  for d in (dq, dk):
    assert np.all(np.abs(d[:, :, :m]).max(axis=(0, 1, 3)) > 0.05 * np.abs(d).max())


@pytest.mark.parametrize("H", [3, 5, 7, 8])  # wrapped remainders: (5, 2), (7, 2), (7, 3), (8, 3), ...
def test_mask_index_map_matches_mask_assignment(H):
  """The kernels' mask of each attending head (block index maps) and the heads each mask's backward sums over
  (sel_kv / sel_q loops) agree with dba_jax.ops.selective.mask_assignment, for every m."""
  for m in range(1, H):
    A = H - m
    cfg = tiles._Cfg(scale=1.0, protect_bos=True, allow_self_mask=False, bq=16, bk=16, T=16, src=0, n_masks=m,
                      first=m, n_att=A, group=1)
    want = selective.mask_assignment(m, A)
    assert [int(tiles._mask_of(cfg, jnp.int32(a))) for a in range(A)] == want, (H, m)
    heads_of = jax.jit(jax.vmap(lambda n: tiles._fold_mask_heads(cfg, n, lambda a, c: c.at[a].add(1),
                                                                 jnp.zeros(A, jnp.int32))))
    counts_MA = np.asarray(heads_of(jnp.arange(m, dtype=jnp.int32)))
    np.testing.assert_array_equal(counts_MA, np.eye(m, dtype=np.int32)[want].T, err_msg=f"H={H}, m={m}")
    # TPU: slot g of mask n (grid axis) holds the same heads in the same order; an empty slot names a real head
    # (block index maps), the slot before it if there is one (nothing new to fetch).
    slots = [[tuple(int(x) for x in tiles._mask_head(cfg, jnp.int32(n), jnp.int32(g)))
              for g in range(tiles._head_slots(cfg))] for n in range(m)]
    assert [[a for a, ok in row if ok] for row in slots] == [[a for a in range(A) if want[a] == n]
                                                             for n in range(m)], (H, m, slots)
    assert all(0 <= a < A for row in slots for a, _ in row), (H, m, slots)
    assert all(row[g][0] == row[g - 1][0] for row in slots for g in range(1, len(row)) if not row[g][1]), slots


CAUSAL_CASES = ["f32_default_T129_e16", "f32_heads2_wrap_T129"]


@pytest.mark.parametrize("name", CAUSAL_CASES + ["gqa_T129_head3"])
def test_causal_bit_for_bit(name):
  """Perturbing q, k and v at position t (mid-block and on a block boundary) leaves every output before t
  bit-for-bit unchanged (masked entries contribute exact zeros), and changes the output at t."""
  case = LOW_CASES.get(name) or dataclasses.replace(F64_CASES[name], dtype="float32")
  q, k, v, _ = (jnp.asarray(x, case.dtype) for x in _inputs(case))
  fn = functools.partial(sflash.selective_flash_attention, block_q=case.block_q, block_k=case.block_k, **case.kw)
  forward = _compiled(fn, q, k, v)
  base = np.asarray(forward(q, k, v))
  rng = np.random.default_rng(1)
  for t in (37, 64, 128):
    bumped = [x.at[:, t].add(jnp.asarray(rng.normal(size=x[:, t].shape), x.dtype)) for x in (q, k, v)]
    out = np.asarray(forward(*bumped))
    np.testing.assert_array_equal(out[:, :t], base[:, :t], err_msg=f"t={t}")
    assert np.abs(out[:, t] - base[:, t]).max() > 1e-3, t


# ------------------------------------------------------------------------------------------ no T x T buffers

_STABLEHLO_TYPE = re.compile(r"tensor<((?:[0-9?]+x)+)[a-z]\w*>")  # tensor<2x3x256x16xf32>
_HLO_TYPE = re.compile(r"\b(?:pred|bf16|[fsuc]\d+)\[([0-9,]+)\]")  # f32[2,3,256,16]{3,2,1,0}


def _array_shapes(text):
  """Shapes of every array type in StableHLO (tensor<AxBxf32>) and HLO (f32[A,B]) text."""
  shapes = [tuple(int(d) for d in dims.rstrip("x").split("x") if d != "?") for dims in _STABLEHLO_TYPE.findall(text)]
  return shapes + [tuple(int(d) for d in dims.split(",")) for dims in _HLO_TYPE.findall(text)]


def _square_buffers(text, T):
  """Array types whose two trailing dims are both >= T (a [.., T, T] buffer)."""
  return sorted({s for s in _array_shapes(text) if len(s) >= 2 and min(s[-2:]) >= T})


HLO_T = 256
HLO_VARIANTS = {
    "default": (3, 3, {}),
    "heads2_wrap": (5, 5, dict(selection_heads=2)),
    "gqa": (4, 2, dict(selection_head=3)),
}


def _loss_and_grads_text(fn, H, K, *, platform=None, compile_cpu=False):
  """Lowered (and for the CPU path also compiled) text of jit(value_and_grad) of sum(fn(q, k, v)), T = HLO_T."""
  q = jax.ShapeDtypeStruct((2, HLO_T, H, 16), jnp.float32)
  kv = jax.ShapeDtypeStruct((2, HLO_T, K, 16), jnp.float32)
  loss = lambda q, k, v: fn(q, k, v).sum()
  traced = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).trace(q, kv, kv)
  lowered = traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()
  text = lowered.as_text()
  if compile_cpu:  # the optimised HLO too (low LLVM effort: the buffers are what matters, not the code)
    text += lowered.compile({"xla_backend_optimization_level": 0}).as_text()
  return text


@pytest.mark.parametrize("name", list(HLO_VARIANTS))
def test_no_t_by_t_buffer_in_fused_program(name):
  """The Pallas path's forward + backward program (CPU interpret: StableHLO and compiled HLO; Triton lowering for
  CUDA: the XLA-level StableHLO around the kernels) holds no [.., T, T] array: activations are O(T)."""
  H, K, kw = HLO_VARIANTS[name]
  fn = functools.partial(sflash.selective_flash_attention, block_q=64, block_k=64, **kw)
  cpu = _loss_and_grads_text(fn, H, K, compile_cpu=True)
  assert (2, HLO_T, H, 16) in _array_shapes(cpu)  # the regexes do see the program's arrays
  assert not _square_buffers(cpu, HLO_T), _square_buffers(cpu, HLO_T)[:5]
  cuda = _loss_and_grads_text(fn, H, K, platform="cuda")
  assert (2, HLO_T, H, 16) in _array_shapes(cuda)
  assert cuda.count("triton") >= 6  # carry, forward, sel_kv, sel_q, dkdv, dq
  assert not _square_buffers(cuda, HLO_T), _square_buffers(cuda, HLO_T)[:5]
  tpu = _loss_and_grads_text(fn, H, K, platform="tpu")
  assert tpu.count("tpu_custom_call") >= 6
  assert not _square_buffers(tpu, HLO_T), _square_buffers(tpu, HLO_T)[:5]


def test_xla_path_has_t_by_t_buffers():
  """The check above can fail: the materialised path (impl="xla") has [B, H, T, T] logits and F."""
  fn = functools.partial(selective.selective_attention, impl="xla")
  found = _square_buffers(_loss_and_grads_text(fn, 3, 3), HLO_T)
  assert (2, 3, HLO_T, HLO_T) in found, found


# ---------------------------------------------------------------------------------------- wiring and arguments

def test_selective_attention_uses_the_kernel_for_selection_heads(caplog):
  """impl="pallas" runs the fused kernel for selection_heads > 0 (nothing falls back) and matches impl="xla";
  selection slices still fall back with a logged reason."""
  q, k, v = (jax.random.normal(jax.random.key(i), (1, 20, 5, 16)) * 1.5 for i in range(3))
  attend = lambda impl, **kw: jax.jit(functools.partial(ops.selective_attention, impl=impl, **kw))(q, k, v)
  ops._warned.clear()
  got = attend("pallas", selection_heads=2)
  assert not ops._warned, ops._warned
  want = attend("xla", selection_heads=2)
  assert got.shape == (1, 20, 3, 16)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-5)
  with caplog.at_level(logging.WARNING, logger="dba_jax"):
    jax.eval_shape(functools.partial(ops.selective_attention, impl="pallas", selection_heads=1, selection_slices=2),
                   q, k, v)
  assert "selection_slices" in caplog.text and "fused kernel does not support" in caplog.text


def test_padding_does_not_leak():
  """Garbage-free padding: the first 64 positions of a T = 129 run equal a T = 64 run (causality)."""
  case = F64_CASES["default_T129"]
  q, k, v, _ = _inputs(case)
  with jax.enable_x64(True):
    short = sflash.selective_flash_attention(*(jnp.asarray(x[:, :64]) for x in (q, k, v)), block_q=16, block_k=32)
  np.testing.assert_allclose(np.asarray(short), run(case)[0][0][:, :64], rtol=1e-12, atol=1e-12)


def test_rejects_bad_arguments():
  x = jnp.zeros((1, 8, 4, 16), jnp.float32)
  with pytest.raises(ValueError, match="power of two"):
    sflash.selective_flash_attention(x, x, x, block_q=24)
  with pytest.raises(ValueError, match="power of two"):
    sflash.selective_flash_attention(x, x, x, block_k=8)
  with pytest.raises(ValueError, match="selection_head"):
    sflash.selective_flash_attention(x, x, x, selection_head=4)
  with pytest.raises(ValueError, match="need q"):
    sflash.selective_flash_attention(x, x[:, :4], x)
  with pytest.raises(ValueError, match="H % K"):
    sflash.selective_flash_attention(x, x[:, :, :3], x[:, :, :3])  # 4 q heads over 3 kv heads
  with pytest.raises(ValueError, match="at least one attending head"):
    sflash.selective_flash_attention(x, x, x, selection_heads=4)
  with pytest.raises(ValueError, match="kv heads"):
    sflash.selective_flash_attention(x, x[:, :, :2], x[:, :, :2], selection_heads=1)  # GQA with selection heads
  with pytest.raises(TypeError, match="dtypes differ"):
    sflash.selective_flash_attention(x, x, x.astype(jnp.bfloat16))


@pytest.mark.parametrize("variant", list(HLO_VARIANTS))
@pytest.mark.parametrize("platform,marker", [("cuda", "triton"), ("tpu", "tpu_custom_call")])
def test_lowers_for_gpu_and_tpu(platform, marker, variant):
  """Forward and backward lower (not compile: no device here) through Pallas-Triton and Mosaic TPU, with
  T = 150 (ragged, 3 query blocks: a non-power-of-two block count) and bf16, D = 64, for the single mask,
  selection heads with a wrapped remainder (traced mask index maps) and GQA (kv index maps)."""
  H, K, kw = HLO_VARIANTS[variant]
  q = jax.ShapeDtypeStruct((2, 150, H, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 150, K, 64), jnp.bfloat16)

  def loss(q, k, v):
    return sflash.selective_flash_attention(q, k, v, block_q=64, block_k=32, **kw).astype(jnp.float32).sum()

  text = lowered_text(jax.grad(loss, (0, 1, 2)), (q, kv, kv), platform)
  assert text.count(marker) >= 6  # carry, forward, sel_kv, sel_q, dkdv, dq
