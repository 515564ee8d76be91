"""The 22-layer ~1.2B paper models (dba.md §2.2): baseline and DBA sem16 / sem8 / gated sem8, 100k-step recipe.

  dba-train --config=configs/dba_paper_1b.py:sem8 --config.data.train_path=/data/fineweb_20b.npy --workdir=runs/sem8
"""
from dba_jax.config import base_config, lock

VARIANTS = {
    # name: (sem_dim, geo_dim, attn_dim, gate, peak lr)
    "baseline": (0, 0, 2048, False, 3e-4),
    "sem16": (512, 1024, 1536, False, 2e-4),
    "sem8": (256, 1024, 1280, False, 2e-4),
    "sem8_gated": (256, 1024, 1280, True, 2e-4),
}


def get_config(variant: str = "sem8"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of dba_paper_1b; choose one of {sorted(VARIANTS)}")
  sem, geo, attn, gate, lr = VARIANTS[variant]
  c = base_config()
  m = c.model
  m.vocab_size, m.pad_vocab_to = 50257, 128  # GPT-2 BPE padded to 50304
  m.d_model, m.n_layers, m.n_heads, m.d_ff = 2048, 22, 32, 5632  # 5632: what the benchmarked checkpoints used
  m.attn_kind = "standard" if variant == "baseline" else "dba"
  m.attn_dim, m.dba.sem_dim, m.dba.geo_dim, m.dba.gate = attn, sem, geo, gate
  m.positions, m.rope_base = "rope", 10000.0
  m.norm, m.norm_eps, m.mlp, m.bias, m.tie_embeddings = "rmsnorm", 1e-5, "swiglu", False, False
  m.max_seq_len = 2048
  m.compute_dtype = "bfloat16"

  c.data.source, c.data.tokenizer = "npy", "gpt2"
  c.data.train_path = "data/fineweb_20b.npy"  # GPT-2-tokenised FineWeb-Edu, uint16, no separators
  c.data.sampling, c.data.seq_len, c.data.seed = "random", 2048, 42

  o = c.optim
  o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.decay = lr, 0.9, 0.999, 1e-8, 0.1, "all"
  o.warmup_steps, o.min_lr_ratio, o.clip_norm = 2000, 0.0, 1.0

  t = c.train
  t.steps, t.batch_size, t.grad_accum, t.seed = 100_000, 32, 8, 42  # 32 x 2048 = 65,536 tokens per step
  t.log_every, t.eval_every, t.eval_batches, t.ckpt_every = 10, 1000, 50, 1000
  return lock(c)
