"""muP-era selective attention runs (selective.md §6.3, §7).

Variants:
  mini12: the "12-head mini" model of the muP sweeps: 12 heads x 22 (d_model 264), T 256, 131,072 tokens per
          step, 4,375 steps, warmup 250, lr 3e-3, muP against base width 768 (GPT-2 small), vocab 50304.
  cpu:    a byte-level 2-layer model on the embedded corpus (4 heads x 16) for `dba-coord-check` on a laptop:
            dba-coord-check --config=configs/selective_mup.py:cpu --heads=1,2,4,8 --steps=10 --out=runs/coords
          Add --config.model.mup=False to see the standard parametrisation drift with width.
"""
from dba_jax.config import base_config, lock

VARIANTS = ("mini12", "cpu")


def get_config(variant: str = "mini12"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of selective_mup; choose one of {list(VARIANTS)}")
  c = base_config()
  m = c.model
  m.attn_kind, m.mup, m.mup_base_d_model = "selective", True, 768
  m.positions, m.norm, m.mlp, m.bias, m.tie_embeddings = "learned", "layernorm", "gelu", True, True
  o = c.optim
  o.b1, o.b2, o.eps, o.weight_decay, o.decay, o.min_lr_ratio, o.clip_norm = 0.9, 0.95, 1e-8, 0.1, "matrices", 0.1, 1.0
  t = c.train
  if variant == "mini12":
    m.vocab_size, m.pad_vocab_to = 50304, 64
    m.n_layers, m.n_heads, m.d_model, m.d_ff, m.max_seq_len = 12, 12, 264, 4 * 264, 256
    m.compute_dtype = "bfloat16"
    c.data.source, c.data.tokenizer, c.data.sampling, c.data.seq_len = "npy", "gpt2", "contiguous", 256
    c.data.train_path, c.data.val_path = "data/edu_fineweb10B/edufineweb_train_*.npy", \
        "data/edu_fineweb10B/edufineweb_val_000000.npy"
    o.lr, o.warmup_steps = 3e-3, 250
    t.steps, t.batch_size, t.grad_accum, t.seed = 4375, 512, 8, 1337
  else:
    m.vocab_size, m.pad_vocab_to = 256, 128
    m.n_layers, m.n_heads, m.d_model, m.d_ff, m.max_seq_len = 2, 4, 64, 256, 64
    m.mup_base_d_model = 64
    c.data.seq_len = 64
    o.lr, o.warmup_steps, o.min_lr_ratio = 1e-2, 0, 1.0
    t.steps, t.batch_size = 10, 8
  return lock(c)
