"""optim.name = muon | m3 (the HOPE original's outer optimisers) against float64 numpy references written from
torch 2.13's torch/optim/_muon.py, torch.optim.AdamW and nested_learning's optim/m3.py, in torch's layout (a weight
[out, in]); which leaves they step; a stacked [layers, ...] leaf is one matrix per layer; resume with Muon."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dba_jax import ckpt, mesh as mesh_lib, model as model_lib, optim, train
from dba_jax.config import ConfigError, base_config, validate
from helpers import load_preset, tiny
from test_train import read_jsonl

LR, WD = 0.05, 0.1
AXES = {"embed": ("vocab", "embed"), "final_norm": {"scale": ("embed",)},
        "blocks": {"qkv": ("layers", "embed", None, "heads"), "w2": ("layers", "mlp", "embed"),
                   "norm_scale": ("layers", "embed"), "b1": ("layers", "mlp")},
        "w_q": ("embed", "mlp")}
SHAPES = {"embed": (11, 4), "final_norm": {"scale": (4,)},
          "blocks": {"qkv": (2, 4, 3, 4), "w2": (2, 8, 4), "norm_scale": (2, 4), "b1": (2, 8)}, "w_q": (4, 6)}
MATRIX = {"blocks/qkv", "blocks/w2", "w_q"}  # the rest: AdamW


def config(name, **optim_fields):
  c = base_config()
  o = c.optim
  o.name, o.lr, o.weight_decay, o.clip_norm, o.warmup_steps, o.min_lr_ratio = name, LR, WD, 0.0, 0, 1.0  # constant
  for k, v in optim_fields.items():
    o[k] = v
  return c


def tree(shapes, key):
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves)])


def flat(t):
  leaves = jax.tree_util.tree_flatten_with_path(t)[0]
  return {"/".join(str(k.key) for k in p): np.asarray(x, np.float64) for p, x in leaves}


def run(c, axes, params, grads):
  """The sum of our updates over one step per gradient tree (kept apart from the params: their float32 rounding
  would swamp the comparison)."""
  tx = optim.make_optimizer(c, axes)
  st = tx.init(params)
  step = jax.jit(tx.update)
  total = jax.tree.map(jnp.zeros_like, params)
  for g in grads:
    u, st = step(g, st, jax.tree.map(jnp.add, params, total))
    total = jax.tree.map(jnp.add, total, u)
  return total


def torch_matrices(x, name):
  """A leaf as torch's weights: [L, out, in] (the layers axis kept, 1 if unstacked)."""
  x = x if name.startswith("blocks/") else x[None]
  return np.swapaxes(x.reshape(x.shape[0], x.shape[1], -1), 1, 2)


def from_torch(w, like, name):
  w = np.swapaxes(w, 1, 2).reshape((w.shape[0],) + (like.shape[1:] if name.startswith("blocks/") else like.shape))
  return w if name.startswith("blocks/") else w[0]


def ns5_ref(G, steps=5, eps=1e-7):
  """torch 2.13 _zeropower_via_newtonschulz (in float64 here, not bfloat16)."""
  a, b, c = 3.4445, -4.775, 2.0315
  X = G.T if G.shape[0] > G.shape[1] else G.copy()
  X = X / max(np.linalg.norm(X), eps)
  for _ in range(steps):
    A = X @ X.T
    X = a * X + (b * A + c * A @ A) @ X
  return X.T if G.shape[0] > G.shape[1] else X


def ns3_ref(G, steps=3, eps=1e-8):
  """optim/m3.py _newton_schulz."""
  X = G / (np.linalg.norm(G) + eps)
  eye = np.eye(G.shape[1])
  for _ in range(steps):
    X = 0.5 * X @ (3.0 * eye - X.T @ X)
  return X


def adamw_ref(p, gs, b1=0.9, b2=0.999, eps=1e-8):
  m, v = np.zeros_like(p), np.zeros_like(p)
  for t, g in enumerate(gs, 1):
    p = p * (1 - LR * WD)
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    p = p - LR / (1 - b1 ** t) * m / (np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps)
  return p


def muon_ref(W, Gs, mom=0.95):
  """torch 2.13 _single_tensor_muon on one weight [out, in]: nesterov, decoupled decay, lr·sqrt(max(1, A/B))."""
  buf = np.zeros_like(W)
  for G in Gs:
    buf = buf + (1 - mom) * (G - buf)
    O = ns5_ref(G + mom * (buf - G))
    W = W * (1 - LR * WD) - LR * np.sqrt(max(1.0, W.shape[0] / W.shape[1])) * O
  return W


def m3_ref(W, Gs, b1=0.9, b2=0.999, b3=0.9, alpha=0.5, eps=1e-8, slow_chunk=2):
  """optim/m3.py M3.step on one weight [out, in] (coupled decay)."""
  m1, m2, v, slow, o2 = (np.zeros_like(W) for _ in range(5))
  for t, G in enumerate(Gs, 1):
    G = G + WD * W
    m1, v, slow = m1 + b1 * G, v + b2 * G * G, slow + G
    W = W - LR * (ns3_ref(m1) + alpha * o2) / (np.sqrt(v) + eps)
    if t % slow_chunk == 0:
      m2, slow = m2 + b3 * slow, np.zeros_like(slow)
      o2 = ns3_ref(m2)
  return W


@pytest.mark.parametrize("name,steps", [("muon", 1), ("muon", 4), ("m3", 1), ("m3", 5)])
def test_matches_the_float64_reference(name, steps):
  params = tree(SHAPES, jax.random.key(0))
  grads = [tree(SHAPES, jax.random.key(i + 1)) for i in range(steps)]
  extra = {"m3_slow_chunk": 2, "m3_alpha": 0.5} if name == "m3" else {}
  got = flat(run(config(name, **extra), AXES, params, grads))
  p0, gs = flat(params), [flat(g) for g in grads]
  for k, p in p0.items():
    g_k = [g[k] for g in gs]
    if k in MATRIX:
      ref = muon_ref if name == "muon" else m3_ref
      Ws, Gs = torch_matrices(p, k), [torch_matrices(g, k) for g in g_k]
      want = from_torch(np.stack([ref(Ws[i], [G[i] for G in Gs]) for i in range(len(Ws))]), p, k)
    else:
      want = adamw_ref(p, g_k)
    np.testing.assert_allclose(got[k], want - p, atol=1e-5 * np.abs(want - p).max(), err_msg=f"{name} {k}")


@pytest.mark.parametrize("name", ["muon", "m3"])
def test_a_stacked_leaf_is_one_matrix_per_layer(name):
  stacked_axes, split_axes = {"w": ("layers", "embed", "mlp")}, {"w0": ("embed", "mlp"), "w1": ("embed", "mlp")}
  params = tree({"w": (2, 6, 4)}, jax.random.key(0))
  grads = [tree({"w": (2, 6, 4)}, jax.random.key(i + 1)) for i in range(3)]
  split = lambda t: {"w0": t["w"][0], "w1": t["w"][1]}
  a = run(config(name), stacked_axes, params, grads)["w"]
  b = run(config(name), split_axes, split(params), [split(g) for g in grads])
  np.testing.assert_allclose(a, np.stack([b["w0"], b["w1"]]), rtol=1e-6, atol=1e-7)
  # one [12, 4] matrix would differ (the orthogonalisation couples its rows)
  whole = run(config(name), {"w": ("embed", "mlp")}, {"w": params["w"].reshape(12, 4)},
              [{"w": g["w"].reshape(12, 4)} for g in grads])["w"]
  assert np.abs(whole.reshape(2, 6, 4) - a).max() > 1e-4


def _split(c):
  mask = flat(jax.tree.map(float, optim.matrix_mask(model_lib.param_axes(c.model)),
                           is_leaf=lambda x: isinstance(x, bool)))
  return {k for k, v in mask.items() if v}, {k for k, v in mask.items() if not v}


def test_which_leaves_muon_steps():
  c = load_preset("hope.py", "cpu")
  c.model.d_model, c.model.n_layers, c.model.hope.cms_periods = 16, 1, (4,)
  c.model.block = "hope_hybrid"
  muon, adamw = _split(c)
  assert muon == {"blocks/attn/qkv", "blocks/attn/out", "blocks/levels/0/w1", "blocks/levels/0/w2",
                  "blocks/titan/w1", "blocks/titan/w2", "blocks/modifier/w1", "blocks/modifier/w2",
                  "blocks/modifier/w3"}
  assert {"embed", "final_norm/scale", "final_norm/bias", "blocks/attn/norm_scale", "blocks/levels/0/b1",
          "blocks/titan/norm_bias", "blocks/modifier/b3"} <= adamw
  c.model.block = "hope_selfmod"
  muon, adamw = _split(c)
  assert "blocks/conv" in adamw and {"blocks/w_q", "blocks/m_eta/w1", "blocks/m_k/w2"} <= muon
  c = tiny("gqa")  # an untied head goes with the embedding
  muon, adamw = _split(c)
  assert {"head/kernel", "embed"} <= adamw and {"blocks/attn/q/kernel", "blocks/mlp/w_in"} <= muon


def test_optimizer_fields_are_checked():
  c = base_config()
  c.optim.name = "sgd"
  with pytest.raises(ConfigError, match="optim.name"):
    validate(c)
  c.optim.name, c.optim.m3_alpha = "muon", 0.5
  with pytest.raises(ConfigError, match="optim.m3_alpha=0.5 is for optim.name in \\['m3'\\]"):
    validate(c)


@pytest.mark.parametrize("name", ["muon", pytest.param("m3", marks=pytest.mark.slow)])  # ~6 s each
def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path, name):
  c = tiny("gqa")
  c.optim.name = name
  trainer = train.Trainer(c, mesh_lib.make_mesh(c.mesh.shape, micro_batch=c.train.batch_size))
  state = trainer.init_state(0)
  leaves, treedef = jax.tree.flatten(state["opt"])
  opt = jax.tree.unflatten(treedef, [x + i + 1 for i, x in enumerate(leaves)])  # every leaf its own value
  ckpts = ckpt.Checkpointer(str(tmp_path), async_save=False)
  ckpts.save(1, state["params"], opt, {"step": 1})
  _, back, _ = ckpts.restore(1, trainer.abstract_params_sharded(), trainer.abstract_opt)
  ckpts.close()
  assert type(back) is type(opt) and jax.tree.structure(back) == treedef
  jax.tree.map(np.testing.assert_array_equal, back, opt)


@pytest.mark.slow  # ~45 s; test_optimizer_state_round_trips_through_a_checkpoint covers the state in the default tier
def test_muon_run_resumes_exactly(tmp_path):
  """Muon's state goes through the orbax checkpoint: 2 steps, then on to 3 == 3 straight."""
  c = tiny("gqa")
  c.optim.name, c.train.ckpt_every, c.train.eval_every = "muon", 2, 100
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  c.train.steps = 2
  train.train(c, a, quiet=True)
  c.train.steps = 3
  train.train(c, a, quiet=True)
  train.train(c, b, quiet=True)
  assert [r["resumed_from"] for r in read_jsonl(os.path.join(a, "runs.jsonl"))] == [None, 2]
  losses = [[r["loss"] for r in read_jsonl(os.path.join(d, "metrics.jsonl"))] for d in (a, b)]
  assert losses[0] == losses[1]
