"""One-token decoding of the Titans blocks (issue 29; titans_blocks.py `decode_state` and the "decode" state path):
teacher-forced, token by token through Decoder.forward with the stacked decode states, the logits equal one forward
over the whole text (fp32, 1e-5), over several memory chunks, MAC segments and MAG / MAL window wraps, with a text
length no multiple of either; the memory off too; a carried titans_mac memory continues as the forward does."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dba_jax import model as model_lib
from dba_jax.config import validate
from helpers import load_preset

T = 19  # 3 MAC segments of 8 (the last partial), 5 memory chunks of 4 (the last partial), MAG / MAL windows wrap twice


def config(block, **hope):
  c = load_preset("hope.py", block)
  m = c.model
  m.d_model, m.n_heads, m.d_ff, m.n_layers = 32, 4, 64, 2
  h = m.hope
  h.titans_chunk, h.titans_window, h.titans_persistent = 4, 8, 4
  for k, v in hope.items():
    h[k] = v
  c.data.seq_len = 16
  return validate(c)


def decode_states(m, batch: int, max_len: int) -> dict:
  """Layer 0's decode state stacked over layers (every layer's starts at zeros)."""
  one = model_lib.BLOCKS[m.block](m, nnx.Rngs(0)).decode_state(batch, max_len)
  return jax.tree.map(lambda a: jnp.broadcast_to(a[None], (m.n_layers,) + a.shape), one)


@functools.cache
def _setup(block, **hope):
  c = config(block, **hope)
  params = model_lib.init_params(c.model, jax.random.key(0))
  graphdef = model_lib.abstract(c.model)[0]

  @jax.jit
  def step(params, tok_B1, t, cache):
    out = nnx.merge(graphdef, params).forward(tok_B1, positions_T=jnp.reshape(t, (1,)), cache_state=cache)
    return out.logits[:, 0], out.cache_state

  full = jax.jit(lambda p, tok, state=None: nnx.merge(graphdef, p).forward(tok, cache_state=state))
  return c, params, step, full


def _teacher_forced(step, params, tok, cache, start=0):
  logits = []
  for t in range(tok.shape[1]):
    lt, cache = step(params, tok[:, t:t + 1], jnp.int32(start + t), cache)
    logits.append(lt)
  return jnp.stack(logits, 1), cache


CASES = [("titans_mac", True), ("titans_mag", True), ("titans_mal", True), ("titans_lmm", True), ("titans_mag", False)]


@pytest.mark.parametrize("block, memory", CASES, ids=[f"{b}-{'on' if on else 'off'}" for b, on in CASES])
def test_one_token_logits_equal_the_forward(block, memory):
  c, params, step, full = _setup(block, memory=memory)
  tok = jax.random.randint(jax.random.key(1), (2, T), 0, c.model.vocab_size)
  want = full(params, tok).logits
  got, cache = _teacher_forced(step, params, tok, {"decode": decode_states(c.model, 2, 32)})
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  assert (np.asarray(got).argmax(-1) == np.asarray(want).argmax(-1)).all()
  assert int(cache["decode"]["n"][0, 0]) == T
  moved = float(jnp.abs(cache["decode"]["memory"]["dW"]["w0"]).max())
  assert (moved > 1e-4) if memory else moved == 0.0, moved


def test_memory_state_is_used():
  """The check above can fail: decoding MAG with the memory frozen at M_0 (its decode state never carried from one
  token to the next) gives other logits than the forward."""
  c, params, step, full = _setup("titans_mag", memory=True)
  tok = jax.random.randint(jax.random.key(1), (2, T), 0, c.model.vocab_size)
  cache0 = {"decode": decode_states(c.model, 2, 32)}
  logits = []
  cache = cache0
  for t in range(T):
    lt, new = step(params, tok[:, t:t + 1], jnp.int32(t), cache)
    logits.append(lt)
    cache = {"decode": {**new["decode"], "memory": cache0["decode"]["memory"]}}
  diff = float(jnp.abs(jnp.stack(logits, 1) - full(params, tok).logits).max())
  assert diff > 1e-4, diff


def test_mac_decoding_continues_a_carried_memory():
  """titans_mac's carried memory (a memstate) in the cache: a forward over 16 tokens (two whole segments), then
  8 tokens decoded one at a time from its state, equal the forward over all 24 tokens, and the carried memory
  comes back moved as the forward's."""
  c, params, step, full = _setup("titans_mac", memory=True)
  tok = jax.random.randint(jax.random.key(2), (1, 24), 0, c.model.vocab_size)
  zero = jax.tree.map(lambda a: jnp.broadcast_to(a[None, None], (2, 1) + a.shape),
                      model_lib.BLOCKS["titans_mac"](c.model, nnx.Rngs(0)).fast_state())
  head = full(params, tok[:, :16], zero)
  cache = {**head.cache_state, "decode": decode_states(c.model, 1, 8)}
  got, cache = _teacher_forced(step, params, tok[:, 16:], cache, start=16)
  whole = full(params, tok, zero)
  np.testing.assert_allclose(np.asarray(got), np.asarray(whole.logits[:, 16:]), atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5),
               cache["titans"], whole.cache_state["titans"])
