"""The flash kernels behind `attn_impl="pallas"`: models match the XLA path, unsupported selective variants fall
back with a logged reason, and the per-device kernel calls under a mesh match one device (interpret mode)."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dba_jax import model as model_lib, ops
from dba_jax.config import validate
from helpers import tiny
from test_sharding import one_step, rel_close

KINDS = {
    "dba_null_gqa": ("dba", dict(null_attn=True, n_kv_heads=2, gate=True)),
    "standard": ("standard", {}),
    "selective": ("standard", dict(attn_kind="selective")),
    "selective_no_bos_self": ("standard", dict(attn_kind="selective", protect_bos=False,
                                               allow_self_mask=True)),
}


def loss_and_grads(c, tokens):
  graphdef, _ = model_lib.abstract(c.model)
  params = model_lib.init_params(c.model, jax.random.key(0))

  def loss(p):
    logits = nnx_merge(graphdef, p)(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits[..., :256], -1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

  return jax.jit(jax.value_and_grad(loss))(params)


def nnx_merge(graphdef, params):
  from flax import nnx
  return nnx.merge(graphdef, params)


@pytest.mark.parametrize("name", list(KINDS))
def test_pallas_model_matches_xla(name):
  kind, extra = KINDS[name]
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 21), 0, 256))
  (l_x, g_x), (l_p, g_p) = (loss_and_grads(validate(tiny(kind, attn_impl=impl, **extra)), tokens)
                            for impl in ("xla", "pallas"))
  assert abs(float(l_p) - float(l_x)) <= 1e-5 * abs(float(l_x))
  jax.tree.map(lambda a, b: rel_close(np.asarray(a), np.asarray(b), 2e-5), g_p, g_x)


def test_unsupported_selective_variant_falls_back_with_a_reason(caplog):
  q, k, v = (jax.random.normal(jax.random.key(i), (1, 9, 2, 16)) for i in range(3))
  with caplog.at_level(logging.WARNING, logger="dba_jax"):
    got = ops.selective_attention(q, k, v, impl="pallas", relu_leak=0.1)
  assert "relu_leak" in caplog.text and "fused kernel does not support" in caplog.text
  want = ops.selective_attention(q, k, v, impl="xla", relu_leak=0.1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["attention", "selective_attention"])
def test_auto_is_chosen_when_lowered(op):
  """impl="auto": the XLA path when lowered for CPU (the same numbers as impl="xla"), the kernels when the same
  function is lowered for CUDA or TPU from this CPU host."""
  fn = lambda q, k, v: getattr(ops, op)(q, k, v, impl="auto").sum()
  grads = jax.jit(jax.grad(fn, (0, 1, 2)))
  args = [jax.ShapeDtypeStruct((2, 64, 4, 16), jax.numpy.float32)] * 3
  assert "custom_call" not in grads.trace(*args).lower().as_text()
  assert "tpu_custom_call" in grads.trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  assert "triton" in grads.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 64, 4, 16)) for i in range(3))
  want = jax.jit(jax.grad(lambda *a: getattr(ops, op)(*a, impl="xla").sum(), (0, 1, 2)))(q, k, v)
  for g, w in zip(grads(q, k, v), want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


def test_impl_names_are_checked():
  assert ops.resolve_impl("pallas") == "pallas"
  q = jax.numpy.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="impl='bogus'"):
    ops.attention(q, q, q, impl="bogus")
  with pytest.raises(ValueError, match="impl='pallas_scan'"):  # a selective-only impl
    ops.attention(q, q, q, impl="pallas_scan")
  with pytest.raises(ValueError, match="impl='bogus'"):
    ops.selective_attention(q, q, q, impl="bogus")


@pytest.mark.parametrize("kind", ["dba", "selective"])
def test_kernels_under_a_mesh_match_one_device(kind):
  """Kernels run per device block under shard_map: batch over data x fsdp, heads over tensor (selective keeps
  heads whole, since every head's gradient feeds the shared mask)."""
  extra = dict(sem_dim=16, geo_dim=32, attn_dim=48) if kind == "dba" else dict(attn_kind="selective")
  c = validate(tiny("dba" if kind == "dba" else "standard", n_heads=8, attn_impl="pallas", **extra))
  c.train.batch_size = 8
  batch = np.asarray(jax.random.randint(jax.random.key(1), (8, c.data.seq_len + 1), 0, 256))
  ops._warned.clear()
  loss1, grads1 = one_step(c, (1, 1, 1), jax.devices()[:1], batch)[:2]
  loss, grads = one_step(c, (2, 2, 2), jax.devices()[:8], batch)[:2]
  assert not ops._warned  # the kernels ran; nothing fell back to XLA
  assert abs(loss - loss1) <= 1e-5 * abs(loss1)
  jax.tree.map(rel_close, grads, grads1)
