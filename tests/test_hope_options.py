"""HOPE inner-loop options from the original (issue 29): DeepMomentum's l2_objective, the loss / logit_entropy
surprise gates, and hope.init = torch_default (torch's default draws), against float64 numpy written from
nested_learning's optim/deep.py, training.py and torch's nn.Linear / nn.Embedding / nn.LayerNorm defaults."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dba_jax import model as model_lib
from dba_jax.config import ConfigError, base_config, validate
from dba_jax.hope import cms, step as hope_step, teach
from helpers import load_preset


def hope_config(block="hope_attention", **hope):
  c = load_preset("hope.py", "cpu")
  m = c.model
  m.block, m.vocab_size, m.pad_vocab_to, m.d_model, m.n_layers, m.n_heads = block, 61, 64, 16, 2, 2
  c.model.hope.cms_periods, c.model.hope.online_chunk = (2, 4), 8
  for k, v in hope.items():
    c.model.hope[k] = v
  c.data.seq_len, c.train.batch_size = 16, 3
  return validate(c)


def test_l2_objective_direction():
  """optim/deep.py: u = g + 0.1·mean(g, last axis of torch's layout), then m' = β m + (1 − β) u."""
  rng = np.random.default_rng(0)
  shapes = {"w1": (6, 12), "b1": (12,), "w2": (12, 6), "b2": (6,), "norm_scale": (6,)}
  g = {k: rng.normal(size=s) for k, s in shapes.items()}
  m = {k: rng.normal(size=s) for k, s in shapes.items()}
  with jax.enable_x64(True):
    step, new = cms.deep_momentum(g, {"m": m}, jnp.ones(6), "l2_objective", beta=0.8)
  for k, gk in g.items():
    gt = gk.T if gk.ndim == 2 else gk  # torch Linear weight [out, in]
    u = gt + 0.1 * gt.mean(-1, keepdims=True)
    want = 0.8 * m[k] + 0.2 * (u.T if gk.ndim == 2 else u)
    np.testing.assert_allclose(np.asarray(step[k]), want, rtol=1e-12, atol=1e-14, err_msg=k)
    np.testing.assert_allclose(np.asarray(new["m"][k]), want, rtol=1e-12, atol=1e-14)


def test_surprise_gates():
  """Per row (each row carries its own memory): teach_norm = mean ‖s‖ per layer, loss = mean CE, logit_entropy =
  mean −Σ p log p over the real vocab (padded columns are no classes); a row with no teach signal never updates."""
  rng = np.random.default_rng(1)
  L, B, T, d, V, pad = 2, 4, 5, 3, 7, 9
  s = rng.normal(size=(L, B, T, d)) * np.array([0.1, 1.0, 3.0, 1.0])[None, :, None, None]
  s[:, 3] = 0.0  # row 3: no teach signal
  mask = np.ones((B, T), bool)
  nll = rng.uniform(0, 4, (B, T))
  logits = rng.normal(size=(B, T, pad)) * np.array([0.1, 3.0, 1.0, 1.0])[:, None, None]
  p = np.exp(logits[..., :V]) / np.exp(logits[..., :V]).sum(-1, keepdims=True)
  want = {"teach_norm": np.linalg.norm(s, axis=-1).mean(-1),
          "loss": np.broadcast_to(nll.mean(-1), (L, B)),
          "logit_entropy": np.broadcast_to(-(p * np.log(p)).sum(-1).mean(-1), (L, B))}
  for metric, value in want.items():
    vals = np.unique(value)
    for threshold in (vals[:-1] + vals[1:]) / 2:  # between two rows' values: the rows above it pass
      got = teach.gate(metric, float(threshold), jnp.asarray(s), jnp.asarray(mask), jnp.asarray(nll),
                       jnp.asarray(logits), V)
      expect = (value >= threshold) & (np.linalg.norm(s, axis=-1).mean(-1) > 0)
      np.testing.assert_array_equal(np.asarray(got), expect, err_msg=f"{metric} {threshold}")
  assert not np.asarray(teach.gate("loss", 0.0, jnp.asarray(s), jnp.asarray(mask), jnp.asarray(nll),
                                   jnp.asarray(logits), V))[:, 3].any()


@pytest.mark.parametrize("teach_mode,metric", [("per_layer", "logit_entropy"),
                                               pytest.param("global", "loss", marks=pytest.mark.slow)])  # ~8 s
def test_a_surprise_gate_above_every_row_stops_the_memory(teach_mode, metric):
  """Through the two-pass step: a threshold above any row's CE / entropy (both about log 61 at init) fires no
  update; threshold 0 fires them."""
  c = hope_config(teach=teach_mode, surprise_metric=metric, surprise_threshold=1e3, cms_periods=(2,))
  c.model.n_layers = 1
  decoder = model_lib.Decoder(c.model, nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 9)), jnp.int32)
  fired = lambda h: int(hope_step.memory_forward(decoder, tokens, 0, h, 61).fired.sum())
  assert fired(c.model.hope) == 0
  c.model.hope.surprise_threshold = 0.0
  assert fired(c.model.hope) > 0


def _params(block, init):
  c = hope_config(block, init=init)
  return c, nnx.to_pure_dict(nnx.state(model_lib.Decoder(c.model, nnx.Rngs(3))))


def _uniform(x, bound):
  """Drawn from U(±bound): inside it, with std bound/√3 (and reaching near both ends when there are many)."""
  x = np.asarray(x)
  assert np.abs(x).max() <= bound, (np.abs(x).max(), bound)
  if x.size >= 256:
    assert x.max() > 0.9 * bound and x.min() < -0.9 * bound, (x.min(), x.max(), bound)
    np.testing.assert_allclose(x.std(), bound / np.sqrt(3), rtol=0.15)
  else:
    assert 0.35 * bound < x.std() < 0.8 * bound, (x.std(), bound)


def test_torch_default_init():
  c, p = _params("hope_hybrid", "torch_default")
  d, h = c.model.d_model, c.model.d_model * c.model.hope.cms_hidden_mult
  b = p["blocks"]
  np.testing.assert_allclose(np.asarray(p["embed"]).std(), 1.0, rtol=0.05)  # nn.Embedding N(0, 1)
  _uniform(b["attn"]["qkv"], d ** -0.5)
  _uniform(b["attn"]["out"], d ** -0.5)
  for lv in b["levels"].values():
    _uniform(lv["w1"], d ** -0.5)
    _uniform(lv["b1"], d ** -0.5)  # nn.Linear bias: the bound of its own weight's fan-in
    _uniform(lv["w2"], h ** -0.5)
    _uniform(lv["b2"], h ** -0.5)
    np.testing.assert_array_equal(lv["norm_scale"], 1.0)
    np.testing.assert_array_equal(lv["norm_bias"], 0.0)
  _uniform(b["modifier"]["w1"], (3 * d) ** -0.5)
  _uniform(b["titan"]["w2"], h ** -0.5)
  np.testing.assert_array_equal(p["final_norm"]["scale"], 1.0)
  assert not np.allclose(b["attn"]["qkv"][0], b["attn"]["qkv"][1])  # every stacked layer its own draw
  _, normal = _params("hope_hybrid", "normal")
  np.testing.assert_allclose(np.asarray(normal["blocks"]["levels"][0]["w1"]).std(), 0.02, rtol=0.1)
  _, p = _params("hope_selfmod", "torch_default")
  _uniform(p["blocks"]["conv"], c.model.hope.selfmod_conv ** -0.5)  # depthwise Conv1d: fan-in = the window
  _uniform(p["blocks"]["m_eta"]["w1"], d ** -0.5)


def test_torch_default_init_is_for_hope_blocks():
  c = base_config()
  c.model.hope.init = "torch_default"
  with pytest.raises(ConfigError, match="model.hope.init='torch_default' is for the HOPE blocks"):
    validate(c)
