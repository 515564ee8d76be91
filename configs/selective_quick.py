"""Selective vs unselective attention at equal parameters on the embedded corpus: minutes on a 2-core CPU.

A small GPT-2-style byte model (4 layers, 4 heads of 32, 256-token windows). Selective attention adds no
parameters. Results are in BUILD_NOTES.md.
  dba-train --config=configs/selective_quick.py:selective --workdir=runs/sel
  dba-train --config=configs/selective_quick.py:unselective --workdir=runs/unsel

Variants (issue 18, all at equal parameters): selective, unselective, leaky (S = leaky ReLU of the logits, slope
0.1), protect (protect-and-attack with the leaky-ReLU protection head, alpha 0.1, bias -0.05: the protection the
original log ran most), mempen (selective + the paper's memory penalty, epsilon 0.02, the better of the two the
log tried). A `_t512` suffix trains on 512-token windows at batch 4 (the same tokens per step). Many seeds:
  dba-seeds run --config=configs/selective_quick.py --variants selective unselective --seeds 0 1 2 3 4 \
      --workdir runs/seeds/quick
"""
from dba_jax.config import base_config, lock


VARIANTS = ("selective", "unselective", "leaky", "protect", "mempen")


def get_config(variant: str = "selective"):
  kind, long = (variant[:-len("_t512")], True) if variant.endswith("_t512") else (variant, False)
  if kind not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of selective_quick; choose one of {', '.join(VARIANTS)}, "
                     "optionally with the suffix _t512")
  c = base_config()
  m = c.model
  m.vocab_size, m.pad_vocab_to = 256, 128
  m.d_model, m.n_layers, m.n_heads, m.d_ff, m.max_seq_len = 128, 4, 4, 512, 256
  m.scan_unroll = 0  # 4 layers: unrolled compiles 0.6 s slower and steps 1.2-1.3x faster on CPU (issue 16)
  m.positions, m.norm, m.mlp, m.bias, m.tie_embeddings = "learned", "layernorm", "gelu", True, True
  m.attn_kind = "standard" if kind == "unselective" else "selective"
  if kind == "leaky":
    m.selective.relu_leak = 0.1
  elif kind == "protect":
    m.selective.protection, m.selective.leaky_alpha, m.selective.leaky_bias = "leaky_relu", 0.1, -0.05
  elif kind == "mempen":
    m.selective.memory_penalty, m.selective.memory_epsilon = "paper", 0.02
  c.data.source, c.data.seq_len, c.data.sampling = "stdlib", 256, "random"
  o = c.optim
  o.lr, o.b1, o.b2, o.weight_decay, o.decay, o.warmup_steps, o.min_lr_ratio = 2e-3, 0.9, 0.95, 0.1, "matrices", 50, 0.1
  t = c.train
  t.steps, t.batch_size, t.log_every, t.eval_every, t.eval_batches, t.ckpt_every = 600, 8, 25, 200, 32, 300
  if long:
    m.max_seq_len, c.data.seq_len, t.batch_size = 512, 512, 4
  return lock(c)
