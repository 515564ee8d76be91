"""nanoGPT's GPT-2 small (124M): learned positions, LayerNorm with bias, GELU MLP, biases, tied head, vocab 50304."""
from dba_jax.config import base_config, lock


def get_config(arg: str = ""):
  del arg
  c = base_config()
  m = c.model
  m.vocab_size, m.pad_vocab_to = 50257, 64
  m.d_model, m.n_layers, m.n_heads, m.d_ff, m.max_seq_len = 768, 12, 12, 3072, 1024
  m.attn_kind, m.positions, m.norm, m.mlp, m.bias, m.tie_embeddings = "standard", "learned", "layernorm", "gelu", True, True
  m.compute_dtype = "bfloat16"

  c.data.source, c.data.tokenizer = "bin", "gpt2"
  c.data.train_path, c.data.val_path = "data/fineweb10B/fineweb_train_*.bin", "data/fineweb10B/fineweb_val_*.bin"
  c.data.sampling, c.data.seq_len = "contiguous", 1024

  o = c.optim
  o.lr, o.b1, o.b2, o.weight_decay, o.decay = 6e-4, 0.9, 0.95, 0.1, "matrices"
  o.warmup_steps, o.min_lr_ratio, o.clip_norm = 2000, 0.1, 1.0
  t = c.train
  t.steps, t.batch_size, t.grad_accum = 600_000, 480, 40  # ~0.5M tokens per step, as nanoGPT
  t.eval_every, t.eval_batches, t.ckpt_every = 2000, 200, 2000
  return lock(c)
