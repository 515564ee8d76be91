"""Flash-attention Pallas kernel (interpret mode on CPU) against dba_jax.standard.reference.

Shapes are DBA's: q/k head dim D = sem + geo differs from v's E, GQA with K kv heads, causal with n_prefix
always-visible null-token columns (S = T + n_prefix), T not a multiple of the blocks.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dba_jax.ops import standard
from dba_kernels import _backend as backend
from dba_kernels import flash_attention as fa
from kernel_base import PLATFORMS, kernel_vs_reference, lowered_text, normal

TPU_INTERPRET = backend.Target("tpu", interpret=True)  # the Mosaic tiling, run by the Pallas interpreter


def _inputs(B, T, H, K, D, E, S, seed=0):
  return normal([(B, T, H, D), (B, S, K, D), (B, S, K, E), (B, T, H, E)], seed)


def _both(q, k, v, do, dtype, **kw):
  """Kernel and reference (O, dQ, dK, dV); the reference always in float64 on the dtype-rounded inputs."""
  blocks = {name: kw.pop(name) for name in ("block_q", "block_k") if name in kw}
  return kernel_vs_reference(lambda *a: fa.flash_attention(*a, **kw, **blocks),
                             lambda *a: standard.reference(*a, **kw), (q, k, v, do), dtype)


NAMES = ("out", "dq", "dk", "dv")

# (B, T, H, K, D, E, S, n_prefix, causal, scale, block_q, block_k)
FLOAT64_CASES = [
    (1, 7, 2, 2, 24, 32, 7, 0, True, None, 16, 16),     # T below one block
    (2, 100, 4, 2, 40, 40, 101, 1, True, 1.0, 16, 32),  # DBA: null token, scale folded into q, GQA
    (1, 64, 4, 1, 24, 24, 65, 1, True, 0.3, 32, 16),    # one kv head; T a block multiple, S not
    (1, 1, 2, 1, 40, 32, 2, 1, True, None, 16, 16),     # a single query: sees the null and key 0
    (1, 100, 2, 1, 40, 32, 100, 0, False, None, 16, 32),  # non-causal, padded last key block
    (1, 20, 2, 2, 24, 32, 12, 1, True, None, 16, 16),   # causal with S < T + n_prefix
]


@pytest.mark.parametrize("B,T,H,K,D,E,S,n_prefix,causal,scale,bq,bk", FLOAT64_CASES)
def test_float64_matches_reference(B, T, H, K, D, E, S, n_prefix, causal, scale, bq, bk):
  with jax.enable_x64(True):
    got, want = _both(*_inputs(B, T, H, K, D, E, S), jnp.float64, scale=scale, causal=causal, n_prefix=n_prefix,
                      block_q=bq, block_k=bk)
  for name, g, w in zip(NAMES, got, want):
    np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("B,T,H,K,D,E,n_prefix,causal,bq,bk", [
    (2, 100, 4, 1, 40, 32, 0, True, 32, 32),
    (1, 64, 2, 2, 24, 40, 1, True, 16, 16),
    (1, 7, 4, 2, 24, 24, 1, True, 16, 32),
    (1, 64, 4, 2, 40, 24, 0, False, 32, 16),
])
def test_float32_matches_reference(B, T, H, K, D, E, n_prefix, causal, bq, bk):
  S = T + n_prefix
  got, want = _both(*_inputs(B, T, H, K, D, E, S, seed=1), jnp.float32, causal=causal, n_prefix=n_prefix,
                    block_q=bq, block_k=bk)
  for name, g, w in zip(NAMES, got, want):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=name)


def test_bfloat16_close_to_reference():
  """bf16 in, fp32 accumulation: p and dS are rounded to bf16 before their matmuls, O and grads are stored in
  bf16. Loose tolerance: 1% of each tensor's largest magnitude (bf16 has an 8-bit significand; measured 0.3-0.4%,
  the same as standard.xla in bf16)."""
  B, T, H, K, D, E, n_prefix = 2, 100, 4, 2, 40, 32, 1
  got, want = _both(*_inputs(B, T, H, K, D, E, T + n_prefix, seed=2), jnp.bfloat16, scale=1.0 / 6,
                    n_prefix=n_prefix, block_q=32, block_k=32)
  for name, g, w in zip(NAMES, got, want):
    assert np.abs(g - w).max() <= 0.01 * np.abs(w).max(), name


def test_causal_skips_invisible_blocks():
  """NaNs where a causal block never looks: a kernel that visited those blocks would spread them (0 * NaN).

  Forward and dQ: query rows < 32 must not touch key blocks >= 32 (NaN values there). dK/dV: key blocks >= 32
  must not touch query rows < 32 (NaN queries and output gradients there)."""
  B, T, H, K, D, E = 1, 64, 2, 1, 24, 32
  q, k, v, do = _inputs(B, T, H, K, D, E, T, seed=3)
  kw = dict(n_prefix=0, block_q=16, block_k=16)
  _, want = _both(q, k, v, do, jnp.float32, **kw)

  v_late_nan = v.copy()
  v_late_nan[:, 32:] = np.nan
  got_o, got_dq, _, _ = _both(q, k, v_late_nan, do, jnp.float32, **kw)[0]
  np.testing.assert_allclose(got_o[:, :32], want[0][:, :32], rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(got_dq[:, :32], want[1][:, :32], rtol=2e-5, atol=2e-5)

  q_early_nan, do_early_nan = q.copy(), do.copy()
  q_early_nan[:, :32], do_early_nan[:, :32] = np.nan, np.nan
  _, _, got_dk, got_dv = _both(q_early_nan, k, v, do_early_nan, jnp.float32, **kw)[0]
  np.testing.assert_allclose(got_dk[:, 32:], want[2][:, 32:], rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(got_dv[:, 32:], want[3][:, 32:], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("n_prefix,K", [(0, 2), (1, 1)])
def test_padded_dot_product_attention_matches_reference(n_prefix, K):
  B, T, H, D, E = 2, 33, 4, 24, 40
  q, k, v, _ = _inputs(B, T, H, K, D, E, T + n_prefix, seed=4)
  q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
  got = jax.jit(functools.partial(fa.padded_dot_product_attention, scale=0.25, n_prefix=n_prefix))(q, k, v)
  with jax.enable_x64(True):
    reference = jax.jit(functools.partial(standard.reference, scale=0.25, n_prefix=n_prefix))
    want = reference(*(jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)))
  assert got.shape == (B, T, H, E)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("bq,bk", [(24, 16), (16, 8), (16, 48)])
def test_rejects_block_sizes_that_are_not_powers_of_two_from_16(bq, bk):
  q, k, v = jnp.zeros((1, 8, 2, 24)), jnp.zeros((1, 8, 2, 24)), jnp.zeros((1, 8, 2, 32))
  with pytest.raises(ValueError, match="power of two"):
    fa.flash_attention(q, k, v, block_q=bq, block_k=bk)


@pytest.mark.parametrize("lowering,call", PLATFORMS)
def test_forward_and_backward_lower_for_triton_and_mosaic(lowering, call):
  """From a CPU host, with no patching (the backend is chosen when lowered): builds the Triton / Mosaic kernels
  (block shapes, ops), not the device compile."""
  B, T, H, K, D, E, n_prefix = 2, 100, 4, 2, 40, 32, 1
  shapes = [(B, T, H, D), (B, T + n_prefix, K, D), (B, T + n_prefix, K, E)]
  for dtype in (jnp.float32, jnp.bfloat16):
    for causal in (True, False):
      loss = lambda q, k, v: fa.flash_attention(q, k, v, n_prefix=n_prefix, causal=causal, block_q=32,
                                                block_k=64).astype(jnp.float32).sum()
      args = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
      text = lowered_text(jax.grad(loss, argnums=(0, 1, 2)), args, lowering)
      assert text.count(f"custom_call {call}") == 3  # forward, dQ, dK/dV kernels


# The TPU kernels (one tile per grid step, carries in VMEM scratch, causal tiles skipped) in interpret mode.
# Their tiles are at least fa.TPU_BLOCK = 128 wide, so T and S of a few hundred give several blocks.

def _tpu_both(q, k, v, do, dtype, **kw):
  """_both with the TPU kernels (checked: the forward, dQ and dK/dV grids each end in a reduction axis)."""
  with backend.forced(TPU_INTERPRET):
    shapes = [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)]
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda *a: fa.flash_attention(*a, **kw).sum(), argnums=(0, 1, 2)))(*shapes))
    assert jaxpr.count("arbitrary") == 3
    return _both(q, k, v, do, dtype, **kw)


# (B, T, H, K, D, E, S, n_prefix, causal, block_q, block_k)
TPU_CASES = [
    (1, 260, 4, 2, 40, 24, 261, 1, True, 16, 16),     # DBA: GQA, D != E, null token; ragged T and S
    (2, 200, 2, 1, 40, 24, 150, 0, False, 16, 16),    # non-causal, S < T, a padded key block
    (1, 300, 2, 2, 24, 40, 290, 1, True, 256, 128),   # causal with S < T + n_prefix; bq != bk
    (1, 100, 2, 1, 24, 24, 300, 1, True, 128, 128),   # S > T + n_prefix: key blocks no query sees
    (1, 5, 2, 1, 24, 32, 6, 1, True, 16, 16),         # one block, mostly padding
]


@pytest.mark.parametrize("B,T,H,K,D,E,S,n_prefix,causal,bq,bk", TPU_CASES)
def test_tpu_tiling_float64_matches_reference(B, T, H, K, D, E, S, n_prefix, causal, bq, bk):
  with jax.enable_x64(True):
    got, want = _tpu_both(*_inputs(B, T, H, K, D, E, S, seed=5), jnp.float64, causal=causal, n_prefix=n_prefix,
                          block_q=bq, block_k=bk)
  for name, g, w in zip(NAMES, got, want):
    np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_tiling_float32_and_bfloat16_match_reference(dtype):
  """float32: as tight as the GPU tiling's test. bf16: 1% of each tensor's largest magnitude (see
  test_bfloat16_close_to_reference)."""
  B, T, H, K, D, E, n_prefix = 1, 260, 4, 2, 40, 24, 1
  got, want = _tpu_both(*_inputs(B, T, H, K, D, E, T + n_prefix, seed=6), dtype, n_prefix=n_prefix, scale=1.0 / 6)
  for name, g, w in zip(NAMES, got, want):
    if dtype == jnp.float32:
      np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=name)
    else:
      assert np.abs(g - w).max() <= 0.01 * np.abs(w).max(), name


def test_tpu_tiling_skips_invisible_tiles():
  """As test_causal_skips_invisible_blocks, with 128-wide TPU tiles: NaNs in the tiles a causal kernel never
  sees (pl.when skips them; the clamped index maps do not even fetch them on a TPU)."""
  B, T, H, K, D, E = 1, 256, 1, 1, 24, 32
  q, k, v, do = _inputs(B, T, H, K, D, E, T, seed=7)
  _, want = _both(q, k, v, do, jnp.float32)

  v_late_nan = v.copy()
  v_late_nan[:, 128:] = np.nan
  got_o, got_dq, _, _ = _tpu_both(q, k, v_late_nan, do, jnp.float32)[0]
  np.testing.assert_allclose(got_o[:, :128], want[0][:, :128], rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(got_dq[:, :128], want[1][:, :128], rtol=2e-5, atol=2e-5)

  q_early_nan, do_early_nan = q.copy(), do.copy()
  q_early_nan[:, :128], do_early_nan[:, :128] = np.nan, np.nan
  _, _, got_dk, got_dv = _tpu_both(q_early_nan, k, v, do_early_nan, jnp.float32)[0]
  np.testing.assert_allclose(got_dk[:, 128:], want[2][:, 128:], rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(got_dv[:, 128:], want[3][:, 128:], rtol=2e-5, atol=2e-5)
