"""One-token decoding of the memory blocks (dba_jax.hope.decode): teacher-forced logits and greedy tokens equal the
chunked forward (hope.step.memory_forward's read passes; per-chunk attention for hope_transformer; one forward for
Titans), a saved memory state seeds a decode exactly, and `dba-eval generate` runs memory checkpoints."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dba_jax import ckpt, eval_cli, generate, losses, model as model_lib
from dba_jax.config import validate
from dba_jax.hope import blocks, decode, memstate, step as hope_step
from dba_jax.layers import Hooks
from test_hope import hope_config
from test_titans_blocks import titans_config

V = 64
# Strong inner loops and small periods, so that the memory moves inside the text and changes later chunks.
FAST = dict(teach_scale=1.0, inner_lr=0.05)
CONFIGS = {  # block: (hope fields, layers, online chunk = the decode chunk C, chunks in the text)
    # teach "global" keeps the compiles short; the driver runs hope.step.chunk_pass whichever teach signal it makes
    "hope_attention": (dict(FAST, teach="global", inner_lr=0.5, local_conv=2, qk_l2_norm=True), 1, 4, 3),
    "hope_transformer": (dict(local_conv=2), 1, 8, 3),  # C: the generator's `chunk` (a training seq_len)
    "hope_selfmod": (dict(FAST, teach="global", selfmod_chunk=2, selfmod_chunk_memory=4, selfmod_lr=0.5,
                          selfmod_momentum=0.5), 1, 8, 3),
    "hope_hybrid": (dict(FAST, titan_period=2, titan_lr=0.05), 2, 4, 3),  # per_layer teach, unrolled layers
}


def _model(block, scan=True):
  hope, layers, C, _ = CONFIGS[block]
  c = hope_config(block, periods=(2,), vocab=V, layers=layers,
                  online_chunk=C if block != "hope_transformer" else 0, **hope)
  c.model.scan_layers = scan
  m = validate(c).model
  params = jax.tree.map(lambda a: 3.0 * a if a.ndim >= 2 else a, model_lib.init_params(m, jax.random.key(1)))
  return model_lib.Model(m, model_lib.abstract(m)[0], params), C


@functools.lru_cache(maxsize=None)
def _reference_fn(model, C):
  m = model.config
  decoder, h = model.module, m.hope

  def per_chunk(toks_BT1):  # hope_transformer: each chunk alone, no state
    B, T1 = toks_BT1.shape
    x = toks_BT1[:, :-1].reshape(B * ((T1 - 1) // C), C)
    return decoder.forward(x).logits.reshape(B, T1 - 1, -1)

  def two_pass(toks_BT1, fast):  # hope.step.memory_forward's loop, each chunk's read-pass logits kept
    B, T1 = toks_BT1.shape
    xs = tuple(a.reshape(B, -1, C).swapaxes(0, 1) for a in (toks_BT1[:, :-1], toks_BT1[:, 1:]))
    chunk = hope_step.chunk_pass(decoder, h.teach_warmup, h, m.vocab_size, True)

    def body(f, x_y):
      logits = decoder.forward(x_y[0], hooks=Hooks(training=True), cache_state=f).logits
      f, (_, _, nll) = chunk(f, x_y)
      return f, (logits, nll, f)

    _, (logits, nll, after) = jax.lax.scan(body, fast, xs)
    return logits.swapaxes(0, 1).reshape(B, T1 - 1, -1), nll.swapaxes(0, 1).reshape(B, T1 - 1), after

  return jax.jit(two_pass if m.block in hope_step.TWO_PASS_BLOCKS else per_chunk)


def chunked_reference(model, toks, C):
  """(logits [B, T - 1, V], NLL of each next token, fast state after each chunk [n, L, B, ...]) of the chunked
  forward over toks [B, T] (T - 1 whole chunks): memory_forward's loop (hope.step.chunk_pass per chunk) from the
  zero state with each chunk's read-pass logits kept; hope_transformer: each chunk's own forward (no NLL, no state)."""
  m = model.config
  if m.block not in hope_step.TWO_PASS_BLOCKS:
    return np.asarray(_reference_fn(model, C)(jnp.asarray(toks))), None, None
  logits, nll, after = _reference_fn(model, C)(jnp.asarray(toks), blocks.init_fast_state(m, model.module, len(toks)))
  return np.asarray(logits), np.asarray(nll), after


# hope_attention stays in the default tier (the selfmod decode is checked there by the memory-state test)
@pytest.mark.parametrize("block", ["hope_attention"] + [pytest.param(b, marks=pytest.mark.slow) for b in
                                                        ("hope_selfmod", "hope_hybrid", "hope_transformer")])
def test_one_token_decoding_equals_the_chunked_forward(block):
  model, C = _model(block, scan=block != "hope_hybrid")
  n = CONFIGS[block][3]
  toks = np.random.default_rng(0).integers(0, V, (2, n * C + 1)).astype(np.int32)
  gen = decode.MemoryGenerator(model, max_len=n * C + 1, batch=2, chunk=C)
  assert gen.chunk == C
  got = np.asarray(generate.teacher_forced_logits(gen, toks, 3))[:, :-1]  # positions 2 .. nC - 1
  ref, ref_nll, _ = chunked_reference(model, toks, C)
  np.testing.assert_allclose(got, ref[:, 2:], atol=1e-5, rtol=0)
  if ref_nll is not None:  # the loss the training / eval loop computes from its own read pass
    nll = np.asarray(losses.nll(jnp.asarray(got), jnp.asarray(toks[:, 3:]), V))
    np.testing.assert_allclose(nll, ref_nll[:, 2:], atol=1e-5, rtol=0)
  # The test can fail: the memory (two-pass) or the per-chunk restart (transformer) changes the logits.
  other = np.asarray(model(toks[:, :-1])) if ref_nll is None else _no_memory(model, toks, C)
  assert np.abs(other[:, C:] - ref[:, C:]).max() > 1e-3
  # Greedy: each new token is the argmax of the chunked forward on the text so far (the same compiled step).
  prompt = toks[:, :C - 1]
  out = gen.generate(prompt, max_new=(n - 1) * C + 2)
  assert gen.traces == {"step": 1} and out["new_tokens"] == 2 * ((n - 1) * C + 2)
  text = np.concatenate([prompt, np.asarray(out["tokens"], np.int32)], axis=1)
  want = chunked_reference(model, text, C)[0][:, C - 2:, :V].argmax(-1)
  np.testing.assert_array_equal(text[:, C - 1:], want)


def _no_memory(model, toks, C):
  """Each chunk read from the meta weights (the fast state never moves)."""
  m = model.config
  B = toks.shape[0]
  fast = blocks.init_fast_state(m, model.module, B * (toks.shape[1] - 1) // C)
  x = jnp.asarray(toks[:, :-1].reshape(-1, C))
  out = jax.jit(lambda x, f: model.module.forward(x, hooks=Hooks(training=True), cache_state=f).logits)(x, fast)
  return np.asarray(out).reshape(B, toks.shape[1] - 1, -1)


def test_a_memory_state_seeds_the_decode(tmp_path):
  """A state saved after reading a text (whole chunks) continues like one chunked read of the text then the
  prompt, whose first token is the text's last."""
  model, C = _model("hope_selfmod")
  m = model.config
  seq = np.random.default_rng(2).integers(0, V, (1, 4 * C + 1)).astype(np.int32)
  whole, _, after = chunked_reference(model, seq, C)
  memstate.save(str(tmp_path / "s"), jax.tree.map(lambda a: a[1], after), m, {"positions_read": 2 * C})
  gen = decode.MemoryGenerator(model, max_len=2 * C + 1, state=str(tmp_path / "s"))
  assert gen.start == 2 * C
  got = np.asarray(generate.teacher_forced_logits(gen, seq[:, 2 * C:], 1))[:, :-1]
  np.testing.assert_allclose(got, whole[:, 2 * C:], atol=1e-5, rtol=0)
  gen.fast0 = jax.tree.map(jnp.zeros_like, gen.fast0)  # the same prompt from the meta weights differs
  assert np.abs(np.asarray(generate.teacher_forced_logits(gen, seq[:, 2 * C:], 1))[:, :-1] - got).max() > 1e-3
  with pytest.raises(memstate.MemStateError, match="carries no memory state"):
    decode.MemoryGenerator(_model("hope_transformer")[0], state=str(tmp_path / "s"))


def test_the_driver_runs_titans_mac():
  c = titans_config("titans_mac")
  m = c.model
  model = model_lib.Model(m, model_lib.abstract(m)[0], model_lib.init_params(m, jax.random.key(0)))
  toks = np.random.default_rng(3).integers(0, m.vocab_size, (2, 20)).astype(np.int32)
  gen = decode.MemoryGenerator(model, max_len=24, batch=2)
  got = np.asarray(generate.teacher_forced_logits(gen, toks, 3))
  np.testing.assert_allclose(got, np.asarray(model(toks))[:, 2:], atol=1e-5, rtol=0)
  out = gen.generate(toks[:, :3], max_new=17)  # greedy: the argmax of one forward over the text so far
  text = np.concatenate([toks[:, :3], np.asarray(out["tokens"], np.int32)], axis=1)
  np.testing.assert_array_equal(text[:, 3:], np.asarray(model(text))[:, 2:-1, :m.vocab_size].argmax(-1))


# ------------------------------------------------------------------------------------------------------ CLI

def _workdir(d, c):
  """A run directory holding `c` and step 1 of fresh weights (what dba-eval reads)."""
  c.model.pad_vocab_to = 128
  validate(c)
  d.mkdir()
  (d / "config.json").write_text(c.to_json(indent=2))
  saver = ckpt.Checkpointer(str(d / "checkpoints"), async_save=False)
  saver.save(1, model_lib.init_params(c.model, jax.random.key(0)), {"count": jnp.zeros(())}, {"step": 1})
  saver.close()
  return d


def test_cli_generates_from_a_memory_checkpoint_and_a_saved_state(tmp_path, capsys):
  c = hope_config("hope_attention", periods=(2,), vocab=256, layers=1, online_chunk=4, teach="global", **FAST)
  d = _workdir(tmp_path / "run", c)
  state = tmp_path / "state"
  memstate.save(str(state), blocks.init_fast_state(c.model, model_lib.Decoder(c.model, nnx.Rngs(0)), 1), c.model,
                {"positions_read": 8})
  argv = ["generate", "--checkpoint", str(d), "--prompt", "key", "--max-new", "6"]
  assert eval_cli.main(argv + ["--state", str(state)]) == 0
  out = json.loads(capsys.readouterr().out)
  assert len(out["tokens"]) == 6 and out["state"] == str(state) and out["start_position"] == 8
  assert out["decoder"] == "memory" and out["chunk"] == 4 and out["cache_bytes"] > 0
  info = json.loads((state / "state.json").read_text())
  info["d_model"] = 64  # a state another model saved: refused in one line, before the model loads
  (state / "state.json").write_text(json.dumps(info))
  for extra, msg in ((["--state", str(state)], "model.d_model=64"), (["--cache", "q8_0"], "--cache")):
    assert eval_cli.main(argv + extra) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_refuses_a_state_for_a_model_without_memory(tmp_path, capsys):
  c = hope_config("hope_transformer", vocab=256, layers=1)
  d = _workdir(tmp_path / "run", c)
  argv = ["generate", "--checkpoint", str(d), "--prompt", "key", "--max-new", "3"]
  assert eval_cli.main(argv + ["--state", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "carries no memory state" in err and err.count("\n") == 1
  assert eval_cli.main(argv) == 0  # hope_transformer itself decodes: a per-chunk KV cache, chunk = data.seq_len
  assert json.loads(capsys.readouterr().out)["chunk"] == c.data.seq_len
