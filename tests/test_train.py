"""Training end to end: loss falls, eval is finite, restarts continue exactly, data parallelism is exact."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dba_jax
from dba_jax import data, losses as losses_lib, mesh as mesh_lib, optim, train
from dba_jax.config import validate
from helpers import load_preset, tiny


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("variant", [pytest.param("baseline", marks=pytest.mark.slow), "dba"])
def test_quickstart_loss_falls(tmp_path, variant, optimized):
  c = load_preset("quickstart.py", variant)
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.ckpt_every, c.train.eval_batches = 60, 10, 60, 60, 2
  summary = train.train(c, str(tmp_path), quiet=True)
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(10, 61, 10))
  # Byte-level text starts at ~ln(256) = 5.5 nats; within 60 steps the model must learn byte statistics.
  assert rows[0]["loss"] > 3.5 and rows[-1]["loss"] < 3.0, rows
  assert np.isfinite(summary["eval_loss"]) and summary["eval_loss"] < 3.2
  assert all(np.isfinite(r["grad_norm"]) and r["lr"] > 0 for r in rows)


def constant_lr(c):
  c.optim.warmup_steps, c.optim.min_lr_ratio = 0, 1.0  # the schedule must not depend on train.steps here
  return c


@pytest.mark.slow  # ~60 s; tests/test_resume.py and test_fault_matrix.py resume bitwise in the default tier
def test_restart_continues_from_saved_step_exactly(tmp_path):
  c = constant_lr(tiny("dba", dropout=0.1))  # dropout: the per-step rng must also continue
  interrupted, straight = str(tmp_path / "a"), str(tmp_path / "b")
  c.train.steps = 4
  train.train(c, interrupted, quiet=True)
  c.train.steps = 6
  train.train(c, interrupted, quiet=True)
  train.train(c, straight, quiet=True)
  runs = read_jsonl(os.path.join(interrupted, "runs.jsonl"))
  assert [r["resumed_from"] for r in runs] == [None, 4]
  a, b = read_jsonl(os.path.join(interrupted, "metrics.jsonl")), read_jsonl(os.path.join(straight, "metrics.jsonl"))
  assert [r["step"] for r in a] == list(range(1, 7))
  assert [r["loss"] for r in a] == [r["loss"] for r in b]
  pa, pb = dba_jax.load_model(interrupted)[0].params, dba_jax.load_model(straight)[0].params
  jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_load_model_reproduces_eval_loss(tmp_path):
  c = tiny("gpt2")
  summary = train.train(c, str(tmp_path), quiet=True)
  model, cfg = dba_jax.load_model(str(tmp_path))
  assert cfg.model.to_dict() == validate(c).model.to_dict()
  splits = data.load_splits(cfg.data, cfg.model.vocab_size)
  batches = data.eval_batches(splits, cfg.data.seq_len, cfg.train.batch_size, cfg.train.eval_batches)
  losses = [float(losses_lib.nll(model(b[:, :-1]), jnp.asarray(b[:, 1:]), cfg.model.vocab_size).mean())
            for b in batches]
  np.testing.assert_allclose(np.mean(losses), summary["eval_loss"], rtol=1e-5)
  assert model(batches[0][:, :-1]).shape == (8, 16, 256)


# DBA's sharded loss and gradients are checked on every mesh in test_sharding; its train steps here are slow-tier.
@pytest.mark.parametrize("kind", ["standard", pytest.param("dba", marks=pytest.mark.slow)])
def test_data_parallel_equals_one_device(kind):
  c = validate(tiny(kind))
  splits = data.load_splits(c.data, c.model.vocab_size)
  it = data.train_iterator(splits, c.data, c.train.batch_size)
  batches = [next(it).reshape(1, -1, c.data.seq_len + 1) for _ in range(3)]
  losses, params = {}, {}
  for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices()[:8])):
    mesh = mesh_lib.make_mesh((-1, 1, 1), devices)
    trainer = train.Trainer(c, mesh)
    state = trainer.init_state(0)
    losses[name] = []
    for b in batches:
      state, metrics = trainer.train_step(state, mesh_lib.global_batch(b, trainer.accum_sharding, batch_axis=1))
      losses[name].append(float(metrics["loss"]))
    params[name] = jax.device_get(state["params"])
    if name == "eight":
      assert mesh.shape["data"] == 8
      assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(state["params"]))
  np.testing.assert_allclose(losses["eight"], losses["one"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params["eight"], params["one"])


def test_lr_schedule_shape():
  c = tiny("standard")
  c.optim.lr, c.optim.warmup_steps, c.optim.min_lr_ratio = 1.0, 10, 0.1
  f = optim.lr_schedule(c.optim, total_steps=110)
  np.testing.assert_allclose([float(f(s)) for s in (0, 4, 9)], [0.1, 0.5, 1.0], rtol=1e-6)  # (s+1)/warmup
  np.testing.assert_allclose(float(f(10)), 1.0, rtol=1e-6)  # cosine starts at the peak
  np.testing.assert_allclose(float(f(60)), 0.1 + 0.9 * 0.5, rtol=1e-6)  # half way
  np.testing.assert_allclose(float(f(110)), 0.1, rtol=1e-6)  # ends at min_lr_ratio


def test_weight_decay_mask():
  from dba_jax import model as model_lib
  c = tiny("gpt2")
  axes = model_lib.param_axes(validate(c).model)
  c.optim.decay = "matrices"
  mask = optim.decay_mask(c, axes)
  assert mask["blocks"]["attn"]["q"]["kernel"] and mask["embed"] and mask["blocks"]["mlp"]["w_in"]["kernel"]
  assert not mask["blocks"]["attn_norm"]["scale"]  # [layers, embed]: a stacked vector, not a matrix
  assert not mask["blocks"]["mlp"]["w_in"]["bias"] and not mask["final_norm"]["scale"]
  c.optim.decay = "all"
  assert all(jax.tree.leaves(optim.decay_mask(c, axes)))


def test_grad_accumulation_matches_one_big_batch():
  c = validate(tiny("dba"))
  mesh = mesh_lib.make_mesh((-1, 1, 1), jax.devices()[:2])
  batch = np.asarray(jax.random.randint(jax.random.key(0), (8, c.data.seq_len + 1), 0, 256))
  out = {}
  for accum in (1, 4):
    c.train.grad_accum = accum
    trainer = train.Trainer(c, mesh)
    state, metrics = trainer.train_step(trainer.init_state(0), mesh_lib.global_batch(
        batch.reshape(accum, -1, batch.shape[-1]), trainer.accum_sharding, batch_axis=1))
    out[accum] = (float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(state["params"]))
    state, _ = trainer.train_step(state, mesh_lib.global_batch(
        batch.reshape(accum, -1, batch.shape[-1]), trainer.accum_sharding, batch_axis=1))
    assert trainer.train_step_jit._cache_size() == 1  # the second step reuses the first step's executable
  np.testing.assert_allclose(out[4][:2], out[1][:2], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out[4][2], out[1][2])


def test_bf16_compute_tracks_fp32():
  from dba_jax import model as model_lib
  c = validate(tiny("dba"))
  params = model_lib.init_params(c.model, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
  logits = {}
  for dtype in ("float32", "bfloat16"):
    c.model.compute_dtype = dtype
    graphdef, _ = model_lib.abstract(c.model)
    logits[dtype] = np.asarray(model_lib.Model(c.model, graphdef, params)(tokens), np.float32)
  assert logits["bfloat16"].dtype == np.float32 and np.isfinite(logits["bfloat16"]).all()
  # bf16 keeps 8 mantissa bits: logits of this tiny net (|x| < 1) agree to ~1e-2, not to fp32 precision.
  np.testing.assert_allclose(logits["bfloat16"], logits["float32"], atol=3e-2)
  assert np.abs(logits["bfloat16"] - logits["float32"]).max() > 0  # the compute dtype really changed


def test_loss_curve_plot_is_valid_svg_with_one_curve_per_series(tmp_path):
  import xml.etree.ElementTree as ET

  from dba_jax.evals import runs_table as compare
  for name, losses in (("a", [3.0, 2.0, 1.5]), ("b", [3.2, 2.5, 2.2])):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": 10 * (i + 1), "loss": v}) + "\n"
                                             for i, v in enumerate(losses)))
    (d / "eval.jsonl").write_text(json.dumps({"step": 30, "eval_loss": losses[-1] + 0.1}) + "\n")
  out = tmp_path / "curves.svg"
  compare.loss_curves_svg([str(tmp_path / "a"), str(tmp_path / "b")], str(out))
  lines = ET.parse(out).getroot().findall("{http://www.w3.org/2000/svg}polyline")
  assert len(lines) == 4  # train and val for each run
  first = [tuple(map(float, p.split(","))) for p in lines[0].get("points").split()]
  assert len(first) == 3 and first[0][1] < first[-1][1]  # the loss falls, so the curve goes down the page
