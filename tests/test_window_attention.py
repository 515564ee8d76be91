"""Sliding-window attention with persistent prefix keys (dba_jax/ops/window.py): the blocked XLA path against the
dense masked reference (outputs, probabilities, gradients; float64 1e-12, float32 1e-5), and no [T, T] array in its
forward + backward program or in a titans_mag training step's."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dba_jax import losses, model as model_lib, ops
from dba_jax.config import validate
from dba_jax.hope import titans_blocks
from dba_jax.ops import window
from helpers import load_preset

# (T, window, n_prefix, H, K): T no multiple of the window and GQA; a window >= T (one block); window 1, no prefix
CASES = {"T37_w8_p3_gqa": (37, 8, 3, 4, 2), "T16_w32_p2": (16, 32, 2, 2, 2), "T9_w1_p0_mqa": (9, 1, 0, 2, 1)}


def _inputs(T, P, H, K, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (2, T, H, 8), dtype) * 1.5
  k = jax.random.normal(ks[1], (2, P + T, K, 8), dtype) * 1.5
  v = jax.random.normal(ks[2], (2, P + T, K, 6), dtype)
  return q, k, v, jax.random.normal(ks[3], (2, T, H, 6), dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_blocked_equals_the_masked_reference(name):
  """Outputs, dense-layout probabilities and the gradients of <out, g> for q, k, v: float64 to 1e-12, the float32
  blocked path against the float64 reference to 1e-5."""
  T, W, P, H, K = CASES[name]
  with jax.enable_x64(True):
    q, k, v, g = _inputs(T, P, H, K, jnp.float64)

    def run(path, q, k, v):
      out, probs = path(q, k, v, window=W, n_prefix=P, return_probs=True)
      grads = jax.grad(lambda *a: (path(*a, window=W, n_prefix=P) * g.astype(a[0].dtype)).sum(), (0, 1, 2))(q, k, v)
      return out, probs, grads

    want = jax.jit(functools.partial(run, window.reference))(q, k, v)
    got = jax.jit(functools.partial(run, window.xla))(q, k, v)
    low = jax.jit(functools.partial(run, window.xla))(*(x.astype(jnp.float32) for x in (q, k, v)))
  assert got[1].shape == (2, H, T, P + T)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
  for a, b in zip(jax.tree.leaves(low), jax.tree.leaves(want)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_window_sees_exactly_its_keys():
  """Query i's output changes with key j iff i − window < j <= i (or j is a prefix key)."""
  T, W, P = 13, 4, 2
  q, k, v, _ = _inputs(T, P, 2, 2, jnp.float32)
  out = jax.jit(functools.partial(ops.window_attention, window=W, n_prefix=P))
  base = np.asarray(out(q, k, v))
  for j in (0, 5, 12):  # sequence key j (column P + j)
    bumped = np.asarray(out(q, k.at[:, P + j].add(1.0), v.at[:, P + j].add(1.0)))
    changed = np.abs(bumped - base).max(axis=(0, 2, 3)) > 1e-6
    i = np.arange(T)
    np.testing.assert_array_equal(changed, (i - W < j) & (j <= i), err_msg=f"key {j}")
  assert (np.abs(np.asarray(out(q, k.at[:, 0].add(1.0), v)) - base).max(axis=(0, 2, 3)) > 1e-6).all()


def test_bad_window_is_one_line():
  q, k, v, _ = _inputs(4, 0, 2, 2, jnp.float32)
  with pytest.raises(ValueError, match=r"window=0 must be >= 1"):
    ops.window_attention(q, k, v, window=0)
  with pytest.raises(ValueError, match=r"n_prefix \+ T keys"):
    ops.window_attention(q, k, v, window=2, n_prefix=1)


# ------------------------------------------------------------------------------------------ no T x T buffers

_STABLEHLO_TYPE = re.compile(r"tensor<((?:[0-9?]+x)+)[a-z]\w*>")  # tensor<2x3x256x16xf32>
_HLO_TYPE = re.compile(r"\b(?:pred|bf16|[fsuc]\d+)\[([0-9,]+)\]")  # f32[2,3,256,16]{3,2,1,0}
T_BIG = 512


def _square_buffers(text, T):
  """Shapes of array types (StableHLO or HLO) with two or more dimensions >= T (a [.., T, .., T] buffer)."""
  shapes = [tuple(int(d) for d in dims.rstrip("x").split("x") if d != "?") for dims in _STABLEHLO_TYPE.findall(text)]
  shapes += [tuple(int(d) for d in dims.split(",")) for dims in _HLO_TYPE.findall(text)]
  assert shapes, "no array types found: the regexes see nothing"
  return sorted({s for s in shapes if sum(d >= T for d in s) >= 2})


def _op_text(fn, compile_cpu: bool):
  """jit(value_and_grad) of sum(fn(q, k, v)) at T = T_BIG, window 32, 4 prefix keys: lowered (and compiled) text."""
  q = jax.ShapeDtypeStruct((2, T_BIG, 4, 16), jnp.float32)
  kv = jax.ShapeDtypeStruct((2, T_BIG + 4, 2, 16), jnp.float32)
  loss = lambda q, k, v: fn(q, k, v, window=32, n_prefix=4).sum()
  lowered = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(q, kv, kv)
  text = lowered.as_text()
  if compile_cpu:
    text += lowered.compile({"xla_backend_optimization_level": 0}).as_text()
  return text


def test_no_t_by_t_buffer_in_forward_and_backward():
  """The blocked path's forward + backward (StableHLO and the compiled CPU HLO) holds no [.., T, T] array; the
  masked reference does (the check can fail)."""
  assert not _square_buffers(_op_text(window.xla, True), T_BIG)
  assert (T_BIG, T_BIG + 4) in [s[-2:] for s in _square_buffers(_op_text(window.reference, False), T_BIG)]


def test_no_t_by_t_buffer_in_a_titans_mag_training_step(monkeypatch):
  """A titans_mag model's loss and gradients at T = 512 (window 32): no [T, T] array in the lowered program; with
  the dense masked path in its place there is one."""
  c = load_preset("hope.py", "titans_mag")
  m = c.model
  m.d_model, m.n_heads, m.d_ff, m.n_layers, m.max_seq_len = 32, 4, 64, 1, T_BIG
  m.vocab_size, m.pad_vocab_to = 64, 64
  m.hope.titans_chunk, m.hope.titans_window, m.hope.titans_persistent = 8, 32, 4
  c.data.seq_len = T_BIG
  c = validate(c)
  graphdef, state = model_lib.abstract(c.model)
  tok = jax.ShapeDtypeStruct((2, T_BIG + 1), jnp.int32)
  loss = lambda p, t: losses.nll(nnx.merge(graphdef, p)(t[:, :-1]), t[:, 1:], 64).mean()
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.to_pure_dict(state))
  text = lambda: jax.jit(jax.value_and_grad(loss)).lower(params, tok).as_text()
  assert not _square_buffers(text(), T_BIG), _square_buffers(text(), T_BIG)[:5]
  monkeypatch.setattr(titans_blocks.ops, "window_attention", lambda *a, impl, **kw: window.reference(*a, **kw))
  assert _square_buffers(text(), T_BIG)
