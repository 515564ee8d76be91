"""Memory state files (dba_jax.hope.memstate, `dba-eval hope read`): a memory saved after reading one text and loaded
for the next continues exactly as one call over both texts; states that do not fit are refused by name; nothing is
overwritten."""
import os
import types

import jax
import numpy as np
import pytest

from dba_jax import model as model_lib
from dba_jax.evals import hope_memory as evals
from dba_jax.hope import memstate
from test_hope import hope_config
from test_titans_blocks import titans_config


def _config(block):
  if block.startswith("titans_mac"):  # titans_mac_absolute: positions counted from the start of the first text
    c = titans_config("titans_mac", titans_positions=block[11:] or "segment")
    c.model.vocab_size = 256
  else:  # a strong inner loop, so that what the memory read shows in later chunks
    c = hope_config(block, periods=(2, 4), vocab=256, online_chunk=8, teach_scale=1.0, inner_lr=0.05)
  return c


def _scorer(c):
  params = model_lib.init_params(c.model, jax.random.key(0))
  return evals.Scorer(types.SimpleNamespace(params=params), c, memory=True)


@pytest.mark.parametrize("block", ["hope_attention", "titans_mac",
                                   pytest.param("titans_mac_absolute", marks=pytest.mark.slow)])
def test_a_saved_state_continues_as_one_call(tmp_path, block):
  c = _config(block)
  scorer = _scorer(c)
  assert scorer.chunk == 8
  seq = np.random.default_rng(0).integers(0, 256, 33).astype(np.int32)  # 32 inputs: 4 chunks / segments of 8
  whole = scorer.read(seq)[0]
  first, fired, state = scorer.read(seq[:17])
  assert fired > 0
  memstate.save(str(tmp_path / "a"), state, c.model, {"tokens_read": 17})
  loaded, info = memstate.load(str(tmp_path / "a"), scorer.zero_state(), c.model)
  assert info["tokens_read"] == 17 and info["block"] == c.model.block
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), loaded)
  second = scorer.read(seq[16:], loaded, start=16)[0]
  np.testing.assert_allclose(second, whole[16:], atol=1e-5, rtol=0)
  # What the memory read earlier matters: the same tokens from the meta weights score differently.
  assert np.abs(scorer.read(seq[16:])[0] - whole[16:]).max() > 1e-4


def test_states_that_do_not_fit_are_refused_by_name(tmp_path):
  c = _config("hope_attention")
  scorer = _scorer(c)
  state = scorer.read(np.arange(17, dtype=np.int32))[2]
  path = tmp_path / "s"
  memstate.save(str(path), state, c.model, {})
  before = (path / "state.npz").read_bytes()
  with pytest.raises(memstate.MemStateError, match="exists"):
    memstate.save(str(path), state, c.model, {})
  assert (path / "state.npz").read_bytes() == before
  # A save that fails half-way (here: the disk, at the second file) leaves the old state whole and nothing else.
  real_dump = memstate.json.dump

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  memstate.json.dump = full_disk
  try:
    with pytest.raises(OSError):
      memstate.save(str(path), state, c.model, {"tokens_read": 9}, force=True)
    with pytest.raises(OSError):
      memstate.save(str(tmp_path / "new"), state, c.model, {})
  finally:
    memstate.json.dump = real_dump
  assert (path / "state.npz").read_bytes() == before and sorted(os.listdir(tmp_path)) == ["s"]
  memstate.save(str(path), state, c.model, {"tokens_read": 9}, force=True)  # --force: replaced whole
  assert memstate.load(str(path), scorer.zero_state(), c.model)[1]["tokens_read"] == 9
  wide = _config("hope_attention")
  wide.model.d_model = 64
  with pytest.raises(memstate.MemStateError, match="d_model=32"):
    memstate.load(str(path), scorer.zero_state(), wide.model)
  other = _config("hope_attention")
  other.model.hope.cms_periods = (2, 4, 8)  # one more level: leaves differ
  with pytest.raises(memstate.MemStateError, match="leaves differ"):
    memstate.load(str(path), _scorer(other).zero_state(), other.model)
  with pytest.raises(memstate.MemStateError, match="state.json is missing"):
    memstate.load(str(tmp_path), scorer.zero_state(), c.model)
  mag = titans_config("titans_mag")
  with pytest.raises(memstate.MemStateError, match="carries no memory state"):
    evals.read(types.SimpleNamespace(params=None), mag, "some text", save_dir=str(tmp_path / "t"))
  assert not (tmp_path / "t").exists()
  (path / "state.npz").write_bytes(before[:len(before) // 2])  # cut short: refused by name, no traceback
  with pytest.raises(memstate.MemStateError, match="state.npz: unreadable"):
    memstate.load(str(path), scorer.zero_state(), c.model)
