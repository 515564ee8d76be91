"""Continued pretraining with head surgery (selective.md §4.2, §6.3): the Feb CPT runs.

Start from the unselective GPT-2-small run at step 7500 (`model_07500.pt`, converted with `dba-convert` into a
dba_jax checkpoint), add a 13th head to every layer, and continue for 2500 steps with a fresh optimizer.

Variants (the added head's init; the head goes first, so it is the selection head):
  ko_zero (default): K = 0 and O = 0: the model's function is unchanged and the new selection head masks nothing
                     at step 0, so the first loss equals the unselective model's.
  k_zero, o_zero, zero, normal, o_rescaled: the other inits of the original.
  unselective_ko_zero: the same surgery, kept unselective (the control run).
  dba-train --config=configs/selective_cpt.py:ko_zero --config.train.init_from=runs/unselective_07500 --workdir=...
"""
from dba_jax.config import lock

INITS = ("ko_zero", "k_zero", "o_zero", "zero", "normal", "o_rescaled")


def get_config(variant: str = "ko_zero"):
  import importlib.util
  import os
  selective = variant != "unselective_ko_zero"
  init = variant.removeprefix("unselective_")
  if init not in INITS:
    raise ValueError(f"unknown variant {variant!r} of selective_cpt; choose one of {list(INITS)} or "
                     "unselective_ko_zero")
  spec = importlib.util.spec_from_file_location("selective_gpt2", os.path.join(os.path.dirname(__file__),
                                                                               "selective_gpt2.py"))
  gpt2 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gpt2)
  c = gpt2.get_config("selective" if selective else "unselective")
  c.unlock()
  m = c.model
  m.n_heads = 13  # 12 + the added head
  m.attn_dim = 13 * 64  # n_embd stays 768
  t = c.train
  t.init_from = "runs/unselective_07500"
  t.surgery, t.surgery_init = "add_head_start", init
  t.steps = 2500
  return lock(c)
