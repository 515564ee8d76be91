"""The 12-layer ablation suite (dba.md §2.3): baseline, bottleneck (attn 1536), decoupled (sem16/geo32/v48), GQA 32Q/4KV."""
from dba_jax.config import base_config, lock

VARIANTS = {
    # name: (attn_kind, attn_dim, sem_dim, geo_dim, n_kv_heads, peak lr)
    "baseline": ("standard", 2048, 0, 0, 0, 3e-4),
    "bottleneck": ("standard", 1536, 0, 0, 0, 3e-4),
    "decoupled": ("dba", 1536, 512, 1024, 0, 2e-4),
    "gqa": ("standard", 2048, 0, 0, 4, 3e-4),
}


def get_config(variant: str = "decoupled"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of dba_paper_12l; choose one of {sorted(VARIANTS)}")
  kind, attn, sem, geo, kv, lr = VARIANTS[variant]
  c = base_config()
  m = c.model
  m.vocab_size, m.pad_vocab_to = 50257, 128
  m.d_model, m.n_layers, m.n_heads, m.d_ff = 2048, 12, 32, 4096
  m.attn_kind, m.attn_dim, m.dba.sem_dim, m.dba.geo_dim, m.n_kv_heads = kind, attn, sem, geo, kv
  m.positions, m.rope_base, m.max_seq_len = "rope", 10000.0, 2048
  m.norm, m.mlp, m.bias, m.tie_embeddings = "rmsnorm", "swiglu", False, False
  m.compute_dtype = "bfloat16"

  c.data.source, c.data.tokenizer = "npy", "gpt2"
  c.data.train_path = "data/fineweb_100m.npy"
  c.data.sampling, c.data.seq_len, c.data.seed = "random", 2048, 1337

  o = c.optim
  o.lr, o.weight_decay, o.decay, o.warmup_steps, o.min_lr_ratio, o.clip_norm = lr, 0.1, "all", 500, 0.0, 1.0
  t = c.train
  t.steps, t.batch_size, t.grad_accum, t.seed = 5000, 16, 2, 1337  # 8 x 2 sequences of 2048
  t.eval_every, t.ckpt_every = 500, 500
  return lock(c)
