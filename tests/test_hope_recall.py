"""The token-level passkey (dba_jax/evals/hope_recall.py): a tiny titans_mac trained for a fixed budget recalls the key
above chance, through its memory only (the same weights with the memory off are at chance), and the statistics the
memory evals report with (exact binomial against chance, Holm)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dba_jax import model as model_lib
from dba_jax.config import validate
from dba_jax.evals import hope_report, stats
from dba_jax.evals import hope_recall as recall
from helpers import load_preset


def recall_config(**model):
  c = load_preset("hope.py", "recall")
  for k, v in model.items():
    c.model[k] = v
  return validate(c)


def test_prompts_put_the_key_after_the_needle_and_last():
  tokens, keys, other = recall.sample(np.random.default_rng(0), 64, 20, 32, 8)
  assert tokens.shape == (64, 21) and tokens.dtype == np.int32
  assert (tokens[:, 0] == recall.NEEDLE).all() and (tokens[:, -2] == recall.QUERY).all()
  assert (tokens[:, 1] == keys).all() and (tokens[:, -1] == keys).all() and (other != keys).all()
  first_filler = recall.FIRST_KEY + 8
  assert (tokens[:, 2:-2] >= first_filler).all() and set(np.unique(keys)) <= set(range(recall.FIRST_KEY, first_filler))
  with pytest.raises(ValueError, match="vocab_size"):
    recall.check(recall_config(vocab_size=12).model, 32, 8)


def test_with_the_memory_off_the_answer_cannot_see_the_key():
  """MAC attends within 16-token segments: with the memory off, the key 30 tokens back changes nothing (exactly);
  with it on, it does."""
  c = recall_config()
  tokens = recall.sample(np.random.default_rng(1), 4, 32, 32, 8)[0]
  swapped = tokens.copy()
  swapped[:, 1] = (tokens[:, 1] - recall.FIRST_KEY + 1) % 8 + recall.FIRST_KEY
  params = model_lib.init_params(c.model, jax.random.key(0))
  change = {}
  for arm in ("memory", "memory_off"):
    graphdef = model_lib.abstract(recall.arm_config(c.model, arm))[0]
    logits = jax.jit(lambda t, g=graphdef: nnx.merge(g, params).forward(t[:, :-1]).logits[:, -1])
    change[arm] = float(jnp.abs(logits(jnp.asarray(tokens)) - logits(jnp.asarray(swapped))).max())
  assert change["memory_off"] == 0.0 and change["memory"] > 1e-4


def test_tiny_mac_recalls_the_key_above_chance_only_through_its_memory():
  """150 steps of batch 32 (one layer): at the training length the memory arm is above chance at p < 0.01 on 256
  fresh prompts, and the same weights with the memory off are not (their answer cannot depend on the key)."""
  c = recall_config(n_layers=1)
  params, loss = recall.train(c, 150, 32, seed=0)
  assert loss[-10:].mean() < loss[:10].mean()
  right = recall.score(c, params, 32, 256, seed=7, arms=("memory", "memory_off"))
  p_mem = stats.binomial_greater(int(right["memory"].sum()), 256, 0.5)
  p_off = stats.binomial_greater(int(right["memory_off"].sum()), 256, 0.5)
  assert p_mem < 0.01, (right["memory"].mean(), p_mem)
  assert p_off > 0.01, (right["memory_off"].mean(), p_off)
  assert stats.mcnemar_exact(right["memory"], right["memory_off"])["p"] < 0.01


def test_binomial_and_holm_against_direct_sums():
  n, p0 = 40, 0.3
  direct = sum(math.comb(n, i) * p0 ** i * (1 - p0) ** (n - i) for i in range(17, n + 1))
  assert stats.binomial_greater(17, n, p0) == pytest.approx(direct, rel=1e-10)
  assert stats.binomial_greater(0, n, p0) == 1.0 and stats.binomial_greater(n + 1, n, p0) == 0.0
  # Holm: sorted p times (m - rank), made monotone, capped at 1, returned in the input order.
  assert stats.holm([0.04, 0.01, 0.03, 0.5]) == pytest.approx([0.09, 0.04, 0.09, 0.5])


def test_recall_table_adjusts_every_p_over_the_table(tmp_path):
  """Two result files, two lengths each: 8 tests, each printed beside its Holm adjustment over all 8."""
  paths, raw = [], []
  for seed in range(2):
    rows = []
    for T, p_chance, p_mc in ((32, 1e-5 * (seed + 1), 1e-4), (64, 0.02, 0.3 + 0.1 * seed)):
      arm = lambda acc, p=1.0: {"acc": acc, "ci95": (acc - 0.05, acc + 0.05), "p_chance": p}
      rows.append({"length": T, "samples": 512, "train_length": 32, "memory": arm(0.9, p_chance),
                   "writes_off": arm(0.5), "memory_off": arm(0.5), "memory_vs_memory_off": {"p": p_mc}})
      raw += [p_chance, p_mc]
    path = tmp_path / f"r{seed}.json"
    path.write_text(json.dumps({"block": "titans_mac", "seed": seed, "steps": 10, "by_length": rows}))
    paths.append(str(path))
  text = hope_report.recall_table(paths)
  adjusted = stats.holm(raw)
  lines = [ln for ln in text.splitlines() if ln.startswith("| titans_mac")]
  assert len(lines) == 4 and "8 tests" in text
  for i, ln in enumerate(lines):
    for j in (2 * i, 2 * i + 1):
      assert f"{raw[j]:.2g} ({adjusted[j]:.2g})" in ln
