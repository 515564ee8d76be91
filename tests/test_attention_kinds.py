"""Attention kinds own their code (issue 25): a kind registered from a test-only module (tests/toy_kind.py), with no
edit anywhere else, trains a step, decodes with the KV cache as the full forward does, prunes and runs the probes;
and no library module outside dba_jax/attention tests a kind's name."""
import os
import re

import jax
import numpy as np
import pytest

import toy_kind
from dba_jax import attention, generate, mesh as mesh_lib, model as model_lib, train
from dba_jax.config import ConfigError, base_config, validate
from dba_jax.evals import attention_probes, pruning
from helpers import REPO, tiny


@pytest.fixture
def toy():
  toy_kind.register()
  yield
  toy_kind.unregister()  # later tests (and the CLIs they start) must not see the toy section


def _model(slope: float = 0.25):
  c = validate(tiny("standard", attn_kind="toy", slope=slope))
  params = jax.tree.map(lambda a: 3.0 * a if a.ndim >= 2 else a, model_lib.init_params(c.model, jax.random.key(1)))
  return c, model_lib.Model(c.model, model_lib.abstract(c.model)[0], params)


def test_the_registry_lists_each_kind_once_and_refuses_a_clash(toy):
  assert attention.names()[:3] == ("standard", "dba", "selective") and "toy" in attention.names()
  assert base_config().model.toy.slope == 0.25  # the kind's section joins the config
  with pytest.raises(ValueError, match="already registered"):
    attention.register(toy_kind.Kind("toy", toy_kind.ToyAttention))
  with pytest.raises(ConfigError, match="model.toy.slope=-1.0 must be >= 0.0"):
    validate(tiny("standard", attn_kind="toy", slope=-1.0))
  with pytest.raises(ConfigError, match=r"model.toy.slope is set but model.attn_kind='standard'"):
    validate(tiny("standard", slope=0.5))


def test_a_toy_kind_trains_a_step(toy):
  c, _ = _model()
  trainer = train.Trainer(c, mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]))
  state = trainer.init_state(0)
  before = jax.device_get(state["params"])
  batch = np.asarray(jax.random.randint(jax.random.key(2), (1, 8, c.data.seq_len + 1), 0, 256))
  state, metrics = trainer.train_step(state, mesh_lib.global_batch(batch, trainer.accum_sharding, 1))
  assert np.isfinite(float(metrics["loss"]))
  after = jax.device_get(state["params"])
  assert not np.array_equal(after["blocks"]["attn"]["q"]["kernel"], before["blocks"]["attn"]["q"]["kernel"])


def test_a_toy_kind_decodes_with_the_kv_cache_as_the_full_forward(toy):
  c, model = _model()
  toks = np.random.default_rng(0).integers(0, 256, (2, 20)).astype(np.int32)
  ref = np.asarray(model(toks))[:, 4:]
  gen = generate.Generator(model, cache="float32", max_len=24, batch=2)
  got = np.asarray(generate.teacher_forced_logits(gen, toks, 5))
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
  assert generate.kv_bytes_per_token(c.model, "float32") == c.model.n_layers * (2 * 32 * 4 + 4)  # k, v + age
  _, flat = _model(slope=0.0)  # the penalty is really applied: without it the logits differ
  assert np.abs(np.asarray(flat(toks))[:, 4:] - ref).max() > 1e-3


def test_a_toy_kind_prunes_by_its_own_score(toy):
  _, model = _model()
  windows = np.random.default_rng(1).integers(0, 256, (4, 17)).astype(np.int32)
  full = pruning.pruned_loss(model, windows, None)
  assert pruning.pruned_loss(model, windows, 1.0) == pytest.approx(full, rel=1e-6)
  assert abs(pruning.pruned_loss(model, windows, 0.25) - full) > 1e-4
  ev = pruning.KVBudgetEval(model, windows)
  assert ev.loss(16) == pytest.approx(full, rel=1e-5)  # a budget of the whole window evicts nothing
  trace = ev.trace(3, windows)[0]  # budget 3: BOS, the newest token and one more; the oldest others go first
  kept = [sorted(p for p in trace["pos"][t, 0] if p >= 0) for t in range(16)]
  assert kept[-1] == [0, 14, 15] and all(len(k) <= 3 for k in kept)


def test_a_toy_kind_runs_the_probes(toy):
  c, model = _model()
  toks = np.random.default_rng(2).integers(0, 256, (2, 12)).astype(np.int32)
  probs_BHTS, n_prefix = attention_probes.last_layer_probs(model.module, toks)
  assert n_prefix == 0 and probs_BHTS.shape == (2, c.model.n_heads, 12, 12)
  np.testing.assert_allclose(np.asarray(probs_BHTS).sum(-1), 1.0, atol=1e-5)
  assert float(np.asarray(probs_BHTS)[..., 1:, 0].max()) > 0 and np.triu(np.asarray(probs_BHTS)[0, 0], 1).max() == 0


def test_no_module_outside_attention_tests_a_kind_name():
  """Only a kind's own module names it. Checkpoint formats (they map a foreign layout onto the kinds it holds) and
  the PyTorch speed baseline (a torch model of the nanoGPT layout) name the kinds they cover as data."""
  test = re.compile(r"attn_kind\s*(==|!=|in|not in)\s*[(\[{]?\s*['\"]|ATTENTION_KINDS")
  allowed = ("formats", "torch_gpt.py", "attention")
  offenders = []
  for d, _, files in os.walk(os.path.join(REPO, "dba_jax")):
    for f in files:
      path = os.path.join(d, f)
      rel = os.path.relpath(path, os.path.join(REPO, "dba_jax"))
      if f.endswith(".py") and not rel.startswith(allowed):
        offenders += [f"{rel}: {line.strip()}" for line in open(path) if test.search(line.split("#")[0])]
  assert not offenders, offenders
