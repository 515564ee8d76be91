"""The context-compression GPT-2-small runs (selective.md §6): selective / unselective, 12 or 13 heads of 64.

Variants:
  selective, unselective: 12 x 64 heads, n_embd 768 (the Feb runs and their HF checkpoints; vocab 50304).
  selective13, unselective13: 13 x 64 heads with n_embd 768 (train.py's later default; attn width 832).
  mini: train.py's mini model (13 x 64 / 832, T 512, 20,480 tokens per step, 1000 steps).
Recipe: AdamW(0.9, 0.95, 1e-8), weight decay 0.1 on >= 2-D parameters, warmup 715, cosine to 0.1 x 6e-4,
clip 1.0, 524,288 tokens per step (micro-batch 8 x 1024 with accumulation).
"""
from dba_jax.config import base_config, lock

VARIANTS = ("selective", "unselective", "selective13", "unselective13", "mini")


def get_config(variant: str = "selective"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of selective_gpt2; choose one of {list(VARIANTS)}")
  c = base_config()
  m = c.model
  m.vocab_size, m.pad_vocab_to = 50304, 64  # the Feb checkpoints trained on the padded vocab itself
  m.d_model, m.n_layers, m.d_ff, m.max_seq_len = 768, 12, 3072, 1024
  m.n_heads = 13 if variant.endswith("13") or variant == "mini" else 12
  m.attn_dim = 64 * m.n_heads  # n_embd may differ from heads x head_dim (832 for 13 heads)
  m.positions, m.norm, m.mlp, m.bias, m.tie_embeddings = "learned", "layernorm", "gelu", True, True
  m.attn_kind = "standard" if variant.startswith("unselective") else "selective"
  m.compute_dtype = "bfloat16"
  c.data.source, c.data.tokenizer, c.data.sampling, c.data.seq_len = "npy", "gpt2", "contiguous", 1024
  c.data.train_path, c.data.val_path = "data/edu_fineweb10B/edufineweb_train_*.npy", \
      "data/edu_fineweb10B/edufineweb_val_000000.npy"
  o = c.optim
  o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.decay = 6e-4, 0.9, 0.95, 1e-8, 0.1, "matrices"
  o.warmup_steps, o.min_lr_ratio, o.clip_norm = 715, 0.1, 1.0
  t = c.train
  t.steps, t.batch_size, t.grad_accum, t.seed = 2500, 512, 64, 1337
  t.eval_every, t.eval_batches, t.ckpt_every = 100, 16, 2500
  if variant == "mini":
    m.d_model, m.d_ff, m.max_seq_len = 832, 4 * 832, 512
    c.data.seq_len = 512
    t.steps, t.batch_size, t.grad_accum, o.warmup_steps = 1000, 40, 4, 286  # 715 x 1000 / 2500
  return lock(c)
