"""The Titans blocks (issue 14; dba_jax/hope/titans_blocks.py): the block's memory against the per-token recurrence
(float64), padding, causality and row independence, memory off vs on, gradients, training and the mesh."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dba_jax import losses, mesh as mesh_lib, model as model_lib, train
from dba_jax.config import ConfigError, padded_vocab, validate
from dba_jax.hope import titans, titans_blocks
from dba_jax.layers import Hooks
from helpers import load_preset

BLOCKS = ("titans_mac", "titans_mag", "titans_mal", "titans_lmm")
recurrence, memory_apply = jax.jit(titans.recurrence), jax.jit(titans.memory_apply)


def titans_config(block="titans_mac", d=32, **hope):
  """The preset shrunk: d 32, 2 layers, T 16, memory chunks of 4, segments / windows of 8, 4 persistent tokens."""
  c = load_preset("hope.py", block)
  m = c.model
  m.d_model, m.n_heads, m.d_ff, m.n_layers = d, 4, 2 * d, 2
  h = m.hope
  h.titans_chunk, h.titans_window, h.titans_persistent = 4, 8, 4
  for k, v in hope.items():
    h[k] = v
  c.data.seq_len, c.train.batch_size = 16, 8
  return validate(c)


def _memory(c):
  parts = titans_blocks.Parts(model_lib.Norm, model_lib.MLP, model_lib.Linear, None)
  return titans_blocks.NeuralMemory(c.model, parts, nnx.Rngs(0))


def _write(mem, x, keep):
  """(streams, (η, θ, α), (M_0, S_0) per row, mem.write's (reads, W, S) from them), in one jit: op-by-op dispatch
  costs more than the compile."""
  graphdef, state = nnx.split(mem)

  def run(state, x, keep):
    m = nnx.merge(graphdef, state)
    W0, S0 = m.initial(x.shape[0], x.dtype)
    return m.qkv(x), m.rates(x), (W0, S0), m.write(W0, S0, x, keep)

  return jax.jit(run)(state, x, keep)


def _rows(tree, b):
  return jax.tree.map(lambda a: a[b], tree)


def _close(a, b, tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_block_memory_with_one_token_chunks_is_the_recurrence():
  """The block's own memory pass (streams, gates, per-row vmap, chunk scan) with chunks of one token: the final
  memory and surprise equal titans.recurrence's, and token t reads M_t (store first) or M_{t−1} (retrieve first)."""
  with jax.enable_x64(True):
    c = titans_config(titans_chunk=1, titans_lr=0.5)
    mem, T = _memory(c), 5
    x = jax.random.normal(jax.random.key(1), (2, T, c.model.d_model), jnp.float64)
    got = {}
    for store_first in (True, False):
      mem.store_first = store_first
      s, (eta, theta, alpha), (W0, S0), got[store_first] = _write(mem, x, jnp.ones((T,), bool))
    for b in range(2):
      W, S, trajectory = _rows(W0, b), _rows(S0, b), [_rows(W0, b)]
      for t in range(T):  # the recurrence one token at a time, keeping every M_t
        W, S = recurrence(W, S, *(a[b, t:t + 1] for a in (s["k"], s["v"], eta, theta, alpha)))
        trajectory.append(W)
      reads = lambda shift: jnp.stack([memory_apply(trajectory[t + shift], s["q"][b, t]) for t in range(T)])
      for store_first, (got_reads, got_W, got_S) in got.items():
        _close((_rows(got_W, b), _rows(got_S, b), got_reads[b]), (W, S, reads(int(store_first))), 1e-10)
    assert float(jnp.abs(W["w0"] - W0["w0"][1]).max()) > 1e-3  # the memory really moved


def test_padded_tail_writes_nothing():
  """Masked (padding) tokens leave memory and surprise as they were, and a length that is no multiple of the chunk
  (padded inside) gives the same reads as the masked run."""
  with jax.enable_x64(True):
    c = titans_config()
    mem = _memory(c)
    x = jax.random.normal(jax.random.key(2), (2, 8, c.model.d_model), jnp.float64)
    keep = jnp.arange(8) < 6
    reads, W, S = _write(mem, x, keep)[3]
    reads6, W6, S6 = _write(mem, x[:, :6], jnp.ones((6,), bool))[3]
    _close((W, S, reads[:, :6]), (W6, S6, reads6), 1e-12)


@functools.cache
def _params(block):
  return model_lib.init_params(titans_config(block).model, jax.random.key(0))


@functools.cache
def _model(block, **hope):
  """(config, graphdef, params, jitted forward(params, tokens, valid_T) with probabilities), shared by the tests (the
  params depend on the block only: hope switches such as `memory` are static)."""
  c = titans_config(block, **hope)
  graphdef = model_lib.abstract(c.model)[0]
  fwd = jax.jit(lambda p, t, valid: nnx.merge(graphdef, p).forward(t, hooks=Hooks(valid_T=valid, return_probs=True)))
  return c, graphdef, _params(block), fwd


@pytest.mark.parametrize("block", BLOCKS[:2] + (pytest.param("titans_mal", marks=pytest.mark.slow),))
def test_causal_rows_independent_padding_masked_and_longer_than_training(block):
  """24 tokens (training length 16): position t depends on no later token and no other row; the valid_T hook's
  padded tail leaves the real tokens' logits as without it; probabilities come back in the documented layout."""
  c, graphdef, params, fwd = _model(block)
  tok = jax.random.randint(jax.random.key(3), (2, 24), 0, 256)
  out = fwd(params, tok, jnp.ones((24,), bool))
  assert bool(jnp.isfinite(out.logits).all())
  changed = tok.at[0, 12:].set((tok[0, 12:] + 1) % 256).at[1].set((tok[1] + 7) % 256)
  again = fwd(params, changed, jnp.ones((24,), bool)).logits
  np.testing.assert_allclose(np.asarray(again[0, :12]), np.asarray(out.logits[0, :12]), atol=1e-6, rtol=0)
  assert float(jnp.abs(again[0, 12:] - out.logits[0, 12:]).max()) > 1e-4
  masked = fwd(params, tok, jnp.arange(24) < 10).logits[:, :10]
  short = fwd(params, tok[:, :10], jnp.ones((10,), bool)).logits
  np.testing.assert_allclose(np.asarray(masked), np.asarray(short), atol=1e-5, rtol=0)
  P, W = c.model.hope.titans_persistent, c.model.hope.titans_window
  S = P + 2 * W if block == "titans_mac" else P + 24
  assert out.probs.shape == (2, 2, 4, 24, S)
  np.testing.assert_allclose(np.asarray(out.probs.sum(-1)), 1.0, atol=1e-5)
  with pytest.raises(NotImplementedError, match="KV-cache"):
    nnx.merge(graphdef, params).forward(tok, hooks=Hooks(cache=object()))


def test_memory_is_the_only_way_across_mac_segments():
  """MAC, 3 segments of 8: with the memory off the last segment's logits do not depend on the first segment's tokens
  (exactly); with it on they do."""
  tok = jax.random.randint(jax.random.key(4), (2, 24), 0, 256)
  changed = tok.at[:, :8].set((tok[:, :8] + 5) % 256)
  for on in (False, True):
    _, _, params, fwd = _model("titans_mac") if on else _model("titans_mac", memory=False)
    logits = lambda t: fwd(params, t, jnp.ones((24,), bool)).logits[:, 16:]
    diff = float(jnp.abs(logits(tok) - logits(changed)).max())
    assert (diff > 1e-5) if on else (diff == 0.0), (on, diff)


def test_lmm_is_causal_and_a_per_token_stack_without_memory():
  """titans_lmm (memory then MLP, no attention): later tokens never change earlier logits. Earlier tokens reach later
  positions through the memory, and (memory off too) through the q conv's titans_conv − 1 previous tokens per layer
  only; with the memory off and no conv every position's logits are its own token's alone (a per-token MLP stack)."""
  tok = jax.random.randint(jax.random.key(6), (2, 16), 0, 256)
  bump = lambda where: jnp.where(where, (tok + 3) % 256, tok)
  pos = jnp.arange(16)[None]
  rows = jnp.concatenate([tok, bump(pos >= 8), bump(pos < 4)])  # as is, the second half changed, the first quarter
  for on in (True, False):
    c, _, params, fwd = _model("titans_lmm") if on else _model("titans_lmm", memory=False)
    out = fwd(params, rows, jnp.ones((16,), bool))
    assert out.probs is None
    same, later, earlier = out.logits[:2], out.logits[2:4], out.logits[4:]
    np.testing.assert_allclose(np.asarray(later[:, :8]), np.asarray(same[:, :8]), atol=1e-6, rtol=0)
    far = 4 + (c.model.hope.titans_conv - 1) * c.model.n_layers  # beyond the convs' reach
    diff = float(jnp.abs(earlier[:, far:] - same[:, far:]).max())
    assert (diff > 1e-5) if on else (diff == 0.0), (on, diff)
  c = titans_config("titans_lmm", memory=False, titans_conv=0)
  graphdef, params = model_lib.abstract(c.model)[0], model_lib.init_params(c.model, jax.random.key(0))
  out = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, jnp.concatenate([tok, bump(pos % 2 == 0)]))
  np.testing.assert_array_equal(np.asarray(out[2:, 1::2]), np.asarray(out[:2, 1::2]))  # every other token changed
  assert float(jnp.abs(out[2:, ::2] - out[:2, ::2]).min()) > 0


def _one_step(c, shape, batch):
  """(loss, grads) of one train.Trainer loss on a (data, fsdp, tensor) mesh (the test_sharding pattern)."""
  mesh = mesh_lib.make_mesh(shape, jax.devices()[:int(np.prod(shape))])
  trainer = train.Trainer(c, mesh)
  state = trainer.init_state(0)
  grad_fn = trainer._under_mesh(jax.jit(jax.value_and_grad(lambda *a: trainer.loss_fn(*a)[0]),
                                        in_shardings=(trainer.param_shardings, trainer.batch_sharding, None)))
  loss, grads = grad_fn(state["params"], mesh_lib.global_batch(batch, trainer.batch_sharding), jax.random.key(0))
  return float(loss), jax.device_get(grads)


@pytest.mark.parametrize("block", ["titans_mac"] + [pytest.param(b, marks=pytest.mark.slow) for b in BLOCKS[1:]])
def test_gradients_reach_every_meta_parameter(block):
  """The plain LM loss trains every parameter through the memory's trajectory: M_0, W_Q/W_K/W_V, the conv, the
  η/θ/α gates, the persistent tokens (none in LMM; no stop_gradient anywhere)."""
  _, graphdef, params, _ = _model(block)
  tok = jax.random.randint(jax.random.key(5), (2, 17), 0, 256)
  loss = lambda p: losses.nll(nnx.merge(graphdef, p)(tok[:, :-1]), tok[:, 1:], 256).mean()
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(float(value))
  flat = {"/".join(map(str, p)): np.asarray(g) for p, g in jax.tree_util.tree_leaves_with_path(grads)}
  dead = [name for name, g in flat.items() if not np.abs(g).max() > 0]
  assert not dead, dead
  assert any("m0" in name for name in flat) and (block == "titans_lmm") != any("persistent" in name for name in flat)


@pytest.mark.slow
@pytest.mark.parametrize("block", ["titans_mac", "titans_mag"])
def test_data_parallel_loss_equals_one_device(block):
  """8 simulated devices, one row each: every row keeps its own memory, so the loss and gradients are the
  single-device ones."""
  c = titans_config(block)
  batch = np.asarray(jax.random.randint(jax.random.key(5), (8, c.data.seq_len + 1), 0, 256))
  loss1, grads1 = _one_step(c, (1, 1, 1), batch)
  loss, grads = _one_step(c, (8, 1, 1), batch)
  assert abs(loss - loss1) <= 1e-5 * abs(loss1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * max(np.abs(b).max(), 1e-12), rtol=0),
               grads, grads1)


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS)
def test_each_preset_trains_three_steps(tmp_path, block):
  c = titans_config(block)
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.ckpt_every, c.train.eval_batches = 3, 1, 3, 3, 1
  summary = train.train(c, str(tmp_path), quiet=True)
  assert summary["steps"] == 3 and np.isfinite(summary["eval_loss"])


@pytest.mark.parametrize("block", BLOCKS)
def test_parameter_counts(block):
  """The presets' counts from the formula: attention 4d² + Pd; memory W_Q/W_K/W_V 3d², conv 3wd, gates 3d + 3,
  M_0 depth·d²; MLP 2·d·d_ff; norms d each (no biases); MAC / MAG gate d² + 2d; MAC norm(h) d; MAL and LMM W_o d² +
  norm d (LMM: no attention); tied embedding Vd and the final norm d."""
  c = load_preset("hope.py", block)
  m, h = c.model, c.model.hope
  d = m.d_model
  attn = 4 * d * d + h.titans_persistent * d + d  # with its norm
  memory = 3 * d * d + 3 * h.titans_conv * d + 3 * d + 3 + h.titans_memory_depth * d * d
  own = {"titans_mac": d + (d * d + 2 * d), "titans_mag": d * d + 2 * d, "titans_mal": d * d + d,
         "titans_lmm": d * d + d - attn}[block]  # LMM: W_o and the norm before the memory, no attention
  per = attn + memory + 2 * d * m.d_ff + d + own
  assert model_lib.count_params(m) == m.n_layers * per + padded_vocab(m) * m.d_model + m.d_model


def test_config_errors_name_the_key():
  with pytest.raises(ConfigError, match=r"model.hope.titans_window=12 .*titans_chunk=8"):
    titans_config(titans_window=12, titans_chunk=8)
  with pytest.raises(ConfigError, match=r"model.hope.titans_persistent=-1"):
    titans_config("titans_mag", titans_persistent=-1)
  with pytest.raises(ConfigError, match=r"attn_kind='standard'"):
    c = titans_config("titans_mal")
    c.model.attn_kind = "selective"
    validate(c)
  with pytest.raises(ConfigError, match=r"titans_positions='segment' is for titans_mac"):
    titans_config("titans_mag", titans_positions="segment")
  with pytest.raises(ConfigError, match=r"model.hope.titans_positions='relative' is not one of"):
    titans_config(titans_positions="relative")


def test_segment_positions_make_mac_the_same_at_every_offset():
  """The persistent keys carry no rotary position, so with absolute positions a query's scores against them depend
  on where it sits; segment positions (the preset) make the block shift-invariant."""
  tok = jax.random.randint(jax.random.key(3), (1, 16), 0, 256)
  shifts = {}
  for mode in ("segment", "absolute"):
    graphdef = model_lib.abstract(titans_config(titans_positions=mode).model)[0]
    f = jax.jit(lambda p, t, pos, g=graphdef: nnx.merge(g, p).forward(t, positions_T=pos).logits)
    a, b = f(_params("titans_mac"), tok, jnp.arange(16)), f(_params("titans_mac"), tok, 100 + jnp.arange(16))
    shifts[mode] = float(jnp.abs(a - b).max())
  assert shifts["segment"] == 0.0 and shifts["absolute"] > 1e-4
