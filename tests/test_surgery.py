"""Head surgery invariants (selective.md §4.2, §12 item 8)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dba_jax import losses, model as model_lib, surgery, train
from dba_jax.config import validate
from helpers import tiny


def build(kind, **extra):
  c = validate(tiny("gpt2", **extra))
  if kind == "selective":
    c.model.attn_kind = "selective"
  return c


def loss_of(c, params, tokens):
  graphdef, _ = model_lib.abstract(c.model)
  logits = model_lib.Model(c.model, graphdef, params)(tokens[:, :-1])
  return float(losses.nll(logits, jnp.asarray(tokens[:, 1:]), c.model.vocab_size).mean())


@pytest.fixture(scope="module")
def trained():
  """An unselective 4-head model (GPT-2 layout, biases) after a few steps, so no weight is at its init."""
  c = build("standard")
  params = model_lib.init_params(c.model, jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (4, 17), 0, 256))
  return c, params, tokens, loss_of(c, params, tokens)


def grown(c, kind):
  """The same model with 5 heads of the same head dim (attention width 32 + 8)."""
  return build(kind, n_heads=5, attn_dim=40)


@pytest.mark.parametrize("init", ["zero", "o_zero", "ko_zero"])
@pytest.mark.parametrize("at", ["start", "end"])
def test_o_zero_surgery_keeps_the_unselective_loss(trained, init, at):
  c, params, tokens, base = trained
  new = surgery.add_head(params, head_dim=8, at=at, init=init, key=jax.random.key(3))
  assert loss_of(grown(c, "standard"), new, tokens) == pytest.approx(base, abs=1e-6)


def test_ko_zero_selective_equals_unselective_at_step_zero(trained):
  c, params, tokens, base = trained
  new = surgery.add_head(params, head_dim=8, at="start", init="ko_zero", key=jax.random.key(4))
  assert loss_of(grown(c, "selective"), new, tokens) == pytest.approx(base, abs=1e-6)  # K = 0 => S = 0
  live = surgery.add_head(params, head_dim=8, at="start", init="o_zero", key=jax.random.key(4))
  assert abs(loss_of(grown(c, "selective"), live, tokens) - base) > 1e-5  # a live K does select


def test_normal_surgery_copies_old_heads_and_draws_pytorch_default_ranges(trained):
  c, params, _, _ = trained
  new = surgery.add_head(params, head_dim=8, at="start", init="normal", key=jax.random.key(5))
  q_old, q_new = params["blocks"]["attn"]["q"]["kernel"], new["blocks"]["attn"]["q"]["kernel"]
  np.testing.assert_array_equal(np.asarray(q_new[..., 8:]), np.asarray(q_old))
  assert np.abs(np.asarray(q_new[..., :8])).max() <= 32 ** -0.5 and np.abs(np.asarray(q_new[..., :8])).max() > 0.1
  np.testing.assert_array_equal(np.asarray(new["blocks"]["attn"]["q"]["bias"][..., :8]), 0)
  o_new = new["blocks"]["attn"]["out"]["kernel"]
  assert o_new.shape == (2, 40, 32) and np.abs(np.asarray(o_new[:, :8])).max() <= 40 ** -0.5
  np.testing.assert_array_equal(np.asarray(o_new[:, 8:]), np.asarray(params["blocks"]["attn"]["out"]["kernel"]))


def test_init_from_with_surgery_in_the_training_loop(trained, tmp_path):
  c, params, tokens, base = trained
  src = str(tmp_path / "src")
  c0 = build("standard")
  c0.train.steps = 2
  train.train(c0, src, quiet=True)
  c1 = grown(c0, "selective")
  c1.train.init_from, c1.train.surgery, c1.train.surgery_init = src, "add_head_start", "ko_zero"
  c1.train.steps = 2
  train.train(c1, str(tmp_path / "cpt"), quiet=True)
  import json
  first = json.loads(open(tmp_path / "cpt" / "metrics.jsonl").readline())
  # Step 1's loss is the source model's loss on that batch: the surgery changed nothing at step 0.
  import dba_jax
  from dba_jax import data
  model, cfg = dba_jax.load_model(src)
  it = data.train_iterator(data.load_splits(cfg.data, 256), cfg.data, cfg.train.batch_size)
  batch = next(it)
  want = float(losses.nll(model(batch[:, :-1]), jnp.asarray(batch[:, 1:]), 256).mean())
  assert first["loss"] == pytest.approx(want, rel=1e-5)
