"""Sharded training on 8 simulated CPU devices equals one device, and parameters are laid out as the rules say."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dba_jax import mesh as mesh_lib, train
from dba_jax.config import validate
from helpers import tiny

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]


def sharded_config(kind):
  # 8 heads so tensor=8 splits whole heads; widths divisible by fsdp=4.
  extra = dict(sem_dim=16, geo_dim=32, attn_dim=48) if kind == "dba" else {}
  c = validate(tiny(kind, n_heads=8, **extra))
  c.train.batch_size = 8
  return c


def one_step(c, shape, devices, batch):
  mesh = mesh_lib.make_mesh(shape, devices)
  trainer = train.Trainer(c, mesh)
  state = trainer.init_state(0)
  grad_fn = trainer._under_mesh(jax.jit(jax.value_and_grad(lambda *a: trainer.loss_fn(*a)[0]),
                                        in_shardings=(trainer.param_shardings, trainer.batch_sharding, None)))
  loss, grads = grad_fn(state["params"], mesh_lib.global_batch(batch, trainer.batch_sharding), jax.random.key(0))
  return float(loss), jax.device_get(grads), state["params"], mesh


@pytest.fixture(scope="module")
def reference():
  out = {}
  for kind in ("standard", "dba"):
    c = sharded_config(kind)
    batch = np.asarray(jax.random.randint(jax.random.key(1), (8, c.data.seq_len + 1), 0, 256))
    out[kind] = (c, batch) + one_step(c, (1, 1, 1), jax.devices()[:1], batch)[:2]
  return out


def rel_close(a, b, tol=1e-5):
  scale = max(np.abs(b).max(), 1e-12)
  assert np.abs(a - b).max() <= tol * scale, (np.abs(a - b).max(), scale)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["standard", "dba"])
def test_sharded_loss_and_grads_equal_one_device(reference, kind, shape):
  c, batch, loss1, grads1 = reference[kind]
  loss, grads, params, mesh = one_step(c, shape, jax.devices()[:8], batch)
  assert abs(loss - loss1) <= 1e-5 * abs(loss1)
  jax.tree.map(rel_close, grads, grads1)  # each gradient to 1e-5 of its own scale
  # The layout follows the rules table: embed -> fsdp, heads / mlp / vocab -> tensor, layers replicated.
  spec = lambda x: x.sharding.spec
  fsdp = "fsdp" if mesh.shape["fsdp"] > 1 else None
  tensor = "tensor" if mesh.shape["tensor"] > 1 else None
  attn = params["blocks"]["attn"]
  q = attn["q"]["kernel"] if kind == "standard" else attn["q_sem"]["kernel"]
  assert spec(q) == P(None, fsdp, tensor)
  assert spec(attn["out"]["kernel"]) == P(None, tensor, fsdp)
  assert spec(params["blocks"]["mlp"]["w_in"]) == P(None, fsdp, None, tensor)
  assert spec(params["embed"]) == P(tensor, fsdp)
  assert spec(params["blocks"]["attn_norm"]["scale"]) == P(None, fsdp)
  if fsdp or tensor:  # a parameter really lives in pieces
    assert q.addressable_shards[0].data.size < q.size


def test_indivisible_dimension_is_a_clear_error():
  c = validate(tiny("standard", n_heads=4, d_model=36, attn_dim=32))  # d_model 36 over fsdp=8
  with pytest.raises(ValueError, match=r"embed.*=36 does not divide over mesh axes \('fsdp',\) of size 8"):
    train.Trainer(c, mesh_lib.make_mesh((1, 8, 1), jax.devices()[:8]))


def test_dropped_sharding_constraint_is_logged_once(caplog):
  """A constraint whose dimension does not divide its mesh axes is dropped (XLA picks the layout), never silently."""
  mesh = mesh_lib.make_mesh((1, 1, 8), jax.devices())
  mesh_lib._dropped.clear()
  f = jax.jit(lambda x: mesh_lib.constrain(x, ("batch", "seq", "act_heads", None)) * 2)
  with caplog.at_level("WARNING", logger="dba_jax"), jax.set_mesh(mesh):
    f(np.ones((2, 3, 6, 4), np.float32))  # 6 heads over tensor=8
    f(np.ones((2, 3, 6, 4), np.float32) + 1)
  dropped = [r for r in caplog.records if "sharding constraint dropped" in r.getMessage()]
  assert len(dropped) == 1 and "act_heads=6" in dropped[0].getMessage(), caplog.text


@pytest.mark.parametrize("shape,n,micro,want", [
    ((-1, 1, 1), 8, None, (8, 1, 1)),  # no batch given: -1 takes every remaining device
    ((-1, 1, 1), 8, 8, (8, 1, 1)),
    ((-1, 1, 1), 64, 4, (4, 1, 16)),  # the 1B presets' 4-sequence micro-batch on a 64-chip slice
    ((1, -1, 1), 64, 4, (1, 4, 16)),
    ((2, -1, 1), 64, 4, (2, 2, 16)),
    ((-1, 1, 1), 12, 8, (4, 1, 3)),  # gcd(12, 8)
    ((-1, 1, 2), 64, 4, (32, 1, 2)),  # an explicit tensor axis: left alone (check_batch then refuses the batch)
    ((1, 1, -1), 8, 1, (1, 1, 8)),
])
def test_mesh_minus_one_fits_the_micro_batch(shape, n, micro, want):
  assert mesh_lib.resolve_shape(shape, n, micro) == want
