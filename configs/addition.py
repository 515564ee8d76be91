"""Tiny 10-digit addition transformers (others.md A.4, A.5): the published parameter counts.

  dba-addition-train --config=configs/addition.py:456p --workdir=runs/add456
  dba-addition-train --config=configs/addition.py:1128p --workdir=runs/add1128 --config.train.num_models=4

Variant = (d_model, d_ff, pos/qkv/out/ffn ranks (0 = full), norm, tie_qkv); `expect_params` pins the count.
A `+ft` suffix (e.g. `456p+ft`) is the fine-tuning recipe for a model started from a trained checkpoint with
`--config.train.init_from=CKPT` and smaller ranks (launch/addition_shrink.sh): short, low lr, no curriculum,
and no pinned count, since shrinking changes it.
"""
from dba_jax.addition.config import base_config

VARIANTS = {
    "456p": (7, 14, (3, 3, 2, 3), "rmsnorm", "shareA_tieKV"),
    "512p": (7, 14, (3, 3, 3, 3), "layernorm", "none"),
    "498p": (7, 14, (3, 3, 2, 3), "layernorm", "none"),
    "582p": (7, 14, (3, 3, 3, 0), "layernorm", "none"),
    "763p": (7, 14, (0, 0, 0, 0), "layernorm", "none"),
    "959p": (7, 28, (0, 0, 0, 0), "layernorm", "none"),
    "1128p": (8, 28, (0, 0, 0, 0), "layernorm", "none"),
    # Below 456 from scratch (issue 18), with the exact tricks only: 456p's q/k/v products folded (shareA_folded),
    # ln1/ln2 weights folded into the next linear, then the position table's left factor fixed to sinusoids.
    "401p": (7, 14, (3, 3, 2, 3), "rmsnorm", "shareA_folded"),
    "302p": (7, 14, (3, 3, 2, 3), "rmsnorm", "shareA_folded"),
}
FOLDED = {"401p": {"block_norm_weight": False}, "302p": {"block_norm_weight": False, "pos_basis": "sinusoidal"}}


def get_config(variant: str = "456p"):
  variant, finetune = variant.removesuffix("+ft"), variant.endswith("+ft")
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of addition; choose one of {list(VARIANTS)} (optionally +ft)")
  c = base_config()
  m = c.model
  m.d_model, m.d_ff, ranks, m.norm, m.tie_qkv = VARIANTS[variant]
  m.pos_rank, m.qkv_rank, m.attn_out_rank, m.ffn_rank = ranks
  m.expect_params = int(variant[:-1])
  for k, v in FOLDED.get(variant, {}).items():
    m[k] = v
  if variant in ("456p", "401p", "302p"):  # the released grokking run's recipe (grok_456p_s43)
    c.train.steps, c.train.eval_interval, c.train.seed = 54000, 500, 43
  if variant == "1128p":  # the robust d=8 config of A.9
    c.optim.lr, c.train.steps = 0.015, 30000
  if finetune:
    m.expect_params = 0
    c.optim.lr, c.optim.warmup_steps = 0.003, 100
    c.train.steps, c.train.eval_interval, c.train.curriculum = 4000, 500, "1-10:0"
  c.lock()
  return c
