"""Context pruning for selective attention (dba_jax.evals.pruning): keep-ratio masks and per-layer KV budgets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dba_jax import model as model_lib
from dba_jax.evals import pruning
from dba_jax.ops import selective
from dba_jax.config import validate
from helpers import layer as nth_block, tiny

T = 16


@pytest.fixture(scope="module")
def setup():
  m = validate(tiny("standard", attn_kind="selective")).model
  # Weights x3 so the selection scores are large: pruning and eviction must change the loss.
  params = jax.tree.map(lambda a: 3.0 * a if a.ndim >= 2 else a, model_lib.init_params(m, jax.random.key(1)))
  model = model_lib.Model(m, model_lib.abstract(m)[0], params)
  windows = np.random.default_rng(0).integers(0, m.vocab_size, (4, T + 1)).astype(np.int32)
  return model, windows, pruning.KVBudgetEval(model, windows)


def test_ratio_one_reproduces_unpruned_loss(setup):
  model, windows, _ = setup
  unpruned = pruning.pruned_loss(model, windows, None)
  assert pruning.pruned_loss(model, windows, 1.0) == unpruned  # bitwise
  assert abs(pruning.pruned_loss(model, windows, 0.25) - unpruned) > 1e-4  # the mask reaches the logits


def test_small_ratio_keeps_budget_minus_one_smallest_plus_self():
  n = 10
  rng = np.random.default_rng(3)
  f = rng.permutation(n * n).reshape(n, n).astype(np.float32) + 1.0  # distinct values: no ties
  f[:, 0] = 0.0  # BOS is protected
  for ratio in (0.0, 0.25, 0.5):
    keep = np.asarray(pruning.keep_mask(jnp.asarray(f)[None], ratio))[0]
    budget = max(1, int(n * ratio))
    for i in range(n):
      smallest = set(np.argsort(f[i, :i + 1])[:min(budget - 1, i + 1)].tolist())
      assert set(np.flatnonzero(keep[i]).tolist()) == smallest | {i}, (ratio, i)
      assert keep[i].sum() == min(budget - 1, i + 1) + (i not in smallest)
      assert not keep[i, i + 1:].any()
  per_row = np.asarray(pruning.keep_mask(jnp.asarray(f), 0.3, rule="per_row"))
  for i in range(n):
    smallest = set(np.argsort(f[i, :i + 1])[:int(np.ceil(0.3 * (i + 1)))].tolist())
    assert set(np.flatnonzero(per_row[i]).tolist()) == smallest | {0, i}


def test_budget_at_least_T_equals_full_sequence_loss(setup):
  model, windows, ev = setup
  full = pruning.pruned_loss(model, windows, None)
  assert abs(ev.loss(T) - full) <= 1e-5
  assert abs(ev.loss([T + 5, T]) - full) <= 1e-5
  assert abs(ev.loss(3) - full) > 1e-4  # eviction changes the loss


def _full_f_layer0(model, windows):
  """Layer 0's full-sequence F [B, T, T]: its inputs do not depend on eviction in later positions."""
  decoder = nnx.merge(model.graphdef, model.params)
  block = nth_block(decoder, 0)
  positions = jnp.arange(T)
  q, k, v = block.attn.project(block.attn_norm(decoder.embed_tokens(jnp.asarray(windows[:, :-1]), positions)),
                               positions)
  return np.asarray(selective.selective_attention(q, k, v, scale=block.attn.scale, return_mask=True)[1])


def test_tiny_budget_evicts_largest_f_and_keeps_bos(setup):
  model, windows, ev = setup
  budget = 3
  trace = ev.trace(budget, windows)
  full_f = _full_f_layer0(model, windows)
  evictions = 0
  for layer, seen in enumerate(trace):
    for t in range(T):
      for b in range(windows.shape[0]):
        before, after, f = seen["pos_before"][t, b], seen["pos"][t, b], seen["f"][t, b]
        alive = set(after[after >= 0].tolist())
        assert 0 in alive and t in alive and len(alive) == min(t + 1, budget)
        candidates = {int(p): float(f[s]) for s, p in enumerate(before) if p > 0}  # BOS and the new token excluded
        evicted = set(candidates) - alive
        if layer == 0:  # the running F equals the full-sequence F on the kept keys
          for s, p in enumerate(after):
            if p >= 0:
              assert abs(f[s] - full_f[b, t, p]) <= 1e-4 * max(1.0, abs(full_f[b, t, p]))
        if t >= budget:
          assert len(evicted) == 1
          (gone,) = evicted
          assert candidates[gone] == max(candidates.values())
          evictions += 1
        else:
          assert not evicted
  assert evictions == len(trace) * windows.shape[0] * (T - budget)


def test_search_finds_budget_meeting_target(setup):
  _, _, ev = setup
  full, tight = ev.loss(T), ev.loss(2)
  target = 0.5 * (full + tight)
  found = pruning.search_budgets(ev, target)
  assert found["met"] and found["loss"] <= target and ev.loss(found["budgets"]) <= target
  shared = found["shared_budget"]
  assert shared == 2 or ev.loss(shared - 1) > target  # the smallest shared budget
  greedy = pruning.search_budgets(ev, target, per_layer=True)
  assert greedy["loss"] <= target and greedy["kept_fraction"] <= found["kept_fraction"]
  assert not pruning.search_budgets(ev, full - 1.0)["met"]


def test_target_from_a_baseline_is_its_full_context_loss_on_the_same_windows(setup, tmp_path):
  import types
  from dba_jax import losses
  model, _, _ = setup
  c = validate(tiny("standard", attn_kind="selective"))
  bm = validate(tiny("standard")).model  # an unselective baseline, other weights
  baseline = model_lib.Model(bm, model_lib.abstract(bm)[0], model_lib.init_params(bm, jax.random.key(7)))
  tokens = np.random.default_rng(3).integers(0, bm.vocab_size, 40 * T).astype(np.int32)
  args = types.SimpleNamespace(seq_len=T, max_windows=6, target_loss=0.0, ratios=[1.0], rule="original",
                               batch_size=4, budgets=[], per_layer=True, within=0.05)
  out = pruning.prune_main(model, c, tokens, args, baseline=baseline)
  w = np.stack([pruning.perplexity.windows(tokens, T, T)[int(i)] for i in np.linspace(0, 39 - 1, 6).astype(int)])
  direct = float(losses.nll(baseline(jnp.asarray(w[:, :-1])), jnp.asarray(w[:, 1:]), bm.vocab_size).mean())
  assert out["baseline_loss"] == pytest.approx(direct, rel=1e-5) and out["target_loss"] == out["baseline_loss"]
  s = out["search"]
  if s["met"]:
    assert s["loss"] <= out["target_loss"] and s["reduction"] == pytest.approx(s["full_kv_slots"] / s["kv_slots"])
  else:  # the selective model misses the baseline even with its full cache
    assert out["unpruned_loss"] > out["target_loss"]
  own = out["search_within"]
  assert own["met"] and own["target"] == pytest.approx(1.05 * own["full_cache_loss"]) and own["loss"] <= own["target"]
  assert own["full_cache_loss"] == pytest.approx(out["unpruned_loss"], rel=1e-5)  # decoding = the full forward
  # dba-seeds pruning tabulates such results (dba-eval adds the checkpoint names).
  import json
  from dba_jax import seeds
  path = tmp_path / "prune.json"
  path.write_text(json.dumps({"checkpoint": "sel", "target_from": "unsel", **out}))
  row, = seeds.pruning_rows([str(path)])
  assert row["T"] == T and row["budgets"] == s["budgets"] and row["within_budgets"] == own["budgets"]
  assert row["within_reduction"] == pytest.approx(own["full_kv_slots"] / own["kv_slots"])
  assert "| 16 | sel |" in seeds.pruning_markdown([row])
