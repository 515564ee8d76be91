"""Selective vs unselective attention at equal parameters on the embedded corpus: minutes on a 2-core CPU.

A small GPT-2-style byte model (4 layers, 4 heads of 32, 256-token windows). Selective attention adds no
parameters. Results are in BUILD_NOTES.md.
  dba-train --config=configs/selective_quick.py:selective --workdir=runs/sel
  dba-train --config=configs/selective_quick.py:unselective --workdir=runs/unsel
"""
from dba_jax.config import base_config, lock


def get_config(variant: str = "selective"):
  if variant not in ("selective", "unselective"):
    raise ValueError(f"unknown variant {variant!r} of selective_quick; choose selective or unselective")
  c = base_config()
  m = c.model
  m.vocab_size, m.pad_vocab_to = 256, 128
  m.d_model, m.n_layers, m.n_heads, m.d_ff, m.max_seq_len = 128, 4, 4, 512, 256
  m.scan_unroll = 0  # 4 layers: unrolled compiles 0.6 s slower and steps 1.2-1.3x faster on CPU (issue 16)
  m.positions, m.norm, m.mlp, m.bias, m.tie_embeddings = "learned", "layernorm", "gelu", True, True
  m.attn_kind = "selective" if variant == "selective" else "standard"
  c.data.source, c.data.seq_len, c.data.sampling = "stdlib", 256, "random"
  o = c.optim
  o.lr, o.b1, o.b2, o.weight_decay, o.decay, o.warmup_steps, o.min_lr_ratio = 2e-3, 0.9, 0.95, 0.1, "matrices", 50, 0.1
  t = c.train
  t.steps, t.batch_size, t.log_every, t.eval_every, t.eval_batches, t.ckpt_every = 600, 8, 25, 200, 32, 300
  return lock(c)
