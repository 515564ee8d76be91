"""The one forward pass reproduces what decoding, pruning and the attention probes computed before the redesign
(issue 13): tests/data/forward_goldens.npz was recorded at commit 039f8dd by tests/record_forward_goldens.py (in
that commit), when generate.py, pruning.py and compare_eval.py still had their own copies of the layer.

Tolerance: 2e-5 absolute on logits of magnitude ~10 and on probabilities; float32 CPU math whose only change is
the order of a few float32 operations (e.g. DBA's null-key score is now part of one einsum)."""
import jax
import numpy as np
import pytest

from dba_jax import generate, model as model_lib
from dba_jax.evals import attention_probes, pruning
from dba_jax.config import validate
from helpers import REPO, tiny

GOLD = np.load(f"{REPO}/tests/data/forward_goldens.npz")
ATOL = 2e-5

MODELS = {
    "standard": ("standard", {}),
    "gqa": ("gqa", {}),
    "gqa_unrolled": ("gqa", {"scan_layers": False}),
    "dba": ("dba", {}),
    "dba_gated_null": ("dba", dict(gate=True, gate_dynamic=True, null_attn=True)),
    "selective": ("standard", dict(attn_kind="selective")),
    "selective_bos_self": ("standard", dict(attn_kind="selective", protect_bos=False, allow_self_mask=True,
                                            relu_after_cumsum=True, relu_leak=0.1)),
    "selective_heads_residual": ("standard", dict(attn_kind="selective", selection_heads=1, residual_masks=True)),
    "gpt2_unrolled": ("gpt2", dict(scan_layers=False)),
}
T, PROMPT, MAX_LEN = 20, 5, 24


def make_model(name):
  kind, kw = MODELS[name]
  m = validate(tiny(kind, **kw)).model
  params = jax.tree.map(lambda a: 3.0 * a if a.ndim >= 2 else a, model_lib.init_params(m, jax.random.key(1)))
  return model_lib.Model(m, model_lib.abstract(m)[0], params)


def tokens(m):
  return np.random.default_rng(0).integers(0, m.vocab_size, (2, T)).astype(np.int32)


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_decode_and_probes_match_the_recorded_outputs(name, request):
  if name == "dba_gated_null":  # its nf4 cache's levels flip with the last bit: compiled as when it was recorded
    request.getfixturevalue("optimized")
  model = make_model(name)
  toks = tokens(model.config)
  np.testing.assert_allclose(np.asarray(model(toks)), GOLD[f"{name}/logits"], atol=ATOL, rtol=0)
  keys = [k for k in GOLD.files if k.startswith(f"{name}/decode/")]
  assert keys or name == "selective_heads_residual"  # that variant has no cached decoding
  for key in keys:
    cache, window = key[len(f"{name}/decode/"):].rsplit("/w", 1)  # a per-stream policy holds slashes itself
    window = int(window)
    gen = generate.Generator(model, cache=cache, window=window, max_len=MAX_LEN, batch=2)
    got = np.asarray(generate.teacher_forced_logits(gen, toks, PROMPT))
    np.testing.assert_allclose(got, GOLD[key], atol=ATOL, rtol=0, err_msg=key)
  probs, _ = attention_probes.last_layer_probs(model.module, toks[:, :12])
  np.testing.assert_allclose(np.asarray(probs), GOLD[f"{name}/probs"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["selective", "selective_bos_self"])
def test_pruning_matches_the_recorded_outputs(name):
  model = make_model(name)
  windows = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 17)).astype(np.int32)
  for rule in pruning.RULES:
    got = [pruning.pruned_loss(model, windows, r, rule) for r in (None, 1.0, 0.5, 0.25, 0.0)]
    np.testing.assert_allclose(got, GOLD[f"{name}/pruned/{rule}"], atol=ATOL, rtol=0)
  ev = pruning.KVBudgetEval(model, windows)
  got = [ev.loss(b) for b in (2, 3, 5, 8, 16, [4, 9])]
  np.testing.assert_allclose(got, GOLD[f"{name}/budgets"], atol=ATOL, rtol=0)
  for layer, t in enumerate(ev.trace([3, 6])):
    np.testing.assert_array_equal(t["pos_before"], GOLD[f"{name}/trace/{layer}/pos_before"])
    np.testing.assert_array_equal(t["pos"], GOLD[f"{name}/trace/{layer}/pos"])
    np.testing.assert_allclose(t["f"], GOLD[f"{name}/trace/{layer}/f"], atol=ATOL, rtol=0)
