"""Records decode / pruning / attention-probe outputs of the pre-redesign code (issue 13) into
tests/data/forward_goldens.npz; tests/test_forward_goldens.py checks the redesigned forward against them.

Run once, at the commit before the redesign: `python tests/record_forward_goldens.py`."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dba_jax import compare_eval, generate, model as model_lib, pruning  # noqa: E402
from dba_jax.config import validate  # noqa: E402
from helpers import tiny  # noqa: E402

# name -> (helpers.tiny flavour, model overrides); weights x3 as in test_generate.
MODELS = {
    "standard": ("standard", {}),
    "gqa": ("gqa", {}),
    "gqa_unrolled": ("gqa", {"scan_layers": False}),
    "dba": ("dba", {}),
    "dba_gated_null": ("dba", dict(dba_gate=True, dba_gate_dynamic=True, null_attn=True)),
    "selective": ("standard", dict(attn_kind="selective")),
    "selective_bos_self": ("standard", dict(attn_kind="selective", sel_protect_bos=False, sel_allow_self_mask=True,
                                            sel_relu_after_cumsum=True, sel_relu_leak=0.1)),
    "selective_heads_residual": ("standard", dict(attn_kind="selective", sel_mask_heads=1, sel_residual_masks=True)),
    "gpt2_unrolled": ("gpt2", dict(scan_layers=False)),
}
CACHES = {"standard": ["float32", "bfloat16", "q8_0"], "gqa": ["float32", "q4_0"], "gqa_unrolled": ["float32", "nf4"],
          "dba": ["float32", "q4/q8/q4"], "dba_gated_null": ["float32", "nf4"], "selective": ["float32", "float16"],
          "selective_bos_self": ["float32"], "gpt2_unrolled": ["float32", "q8_0"]}
T, PROMPT, MAX_LEN = 20, 5, 24


def make_model(name):
  kind, kw = MODELS[name]
  m = validate(tiny(kind, **kw)).model
  params = jax.tree.map(lambda a: 3.0 * a if a.ndim >= 2 else a, model_lib.init_params(m, jax.random.key(1)))
  return model_lib.Model(m, model_lib.abstract(m)[0], params)


def tokens(m, batch=2, length=T, seed=0):
  return np.random.default_rng(seed).integers(0, m.vocab_size, (batch, length)).astype(np.int32)


def record() -> dict:
  out = {}
  for name in MODELS:
    model = make_model(name)
    toks = tokens(model.config)
    out[f"{name}/logits"] = np.asarray(model(toks))
    for cache in CACHES.get(name, []):
      for window in (0, 3) if cache not in ("float32",) else (0,):
        gen = generate.Generator(model, cache=cache, window=window, max_len=MAX_LEN, batch=2)
        out[f"{name}/decode/{cache}/w{window}"] = np.asarray(generate.teacher_forced_logits(gen, toks, PROMPT))
    decoder = compare_eval.dense_decoder(model)
    block, h, positions_T, res = compare_eval.last_layer_input(decoder, toks[:, :12])
    out[f"{name}/probs"] = np.asarray(compare_eval.attention_probs(block.attn, h, positions_T, res)[0])
  for name in ("selective", "selective_bos_self"):
    model = make_model(name)
    windows = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 17)).astype(np.int32)
    for rule in pruning.RULES:
      out[f"{name}/pruned/{rule}"] = np.asarray([pruning.pruned_loss(model, windows, r, rule)
                                                for r in (None, 1.0, 0.5, 0.25, 0.0)])
    ev = pruning.KVBudgetEval(model, windows)
    out[f"{name}/budgets"] = np.asarray([ev.loss(b) for b in (2, 3, 5, 8, 16, [4, 9])])
    trace = ev.trace([3, 6])
    for layer, t in enumerate(trace):
      for k, v in t.items():
        out[f"{name}/trace/{layer}/{k}"] = v
  return out


if __name__ == "__main__":
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "forward_goldens.npz")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  arrays = record()
  np.savez_compressed(path, **arrays)
  print(f"wrote {len(arrays)} arrays to {path} ({os.path.getsize(path):,} bytes)")
