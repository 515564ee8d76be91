"""Upcycling a Llama-family model into DBA (dba-upcycle; docs/upcycle.md). get_config(variant) is the student's run
config (dba-train, dba-train --dry-run and dba-aot read it), get_upcycle(variant) the initialiser and distillation
settings (dba_jax/upcycle/settings.py).

  llama32_1b_sem8   Llama-3.2-1B's shapes (16 layers, d_model 2048, 32 heads, 8 KV heads, head dim 64, d_ff 8192,
                    vocab 128256, rope_theta 500000, tied embeddings); DBA semantic 8 + geometric 8 per head
                    (256 + 256), values at the teacher's width (2048: V / O copied exactly). The KV cache per token
                    is 8 x (8 + 8 + 64) = 640 numbers per layer against the teacher's 8 x (64 + 64) = 1024.
  llama32_1b        caramba's llama32_1b_dba*.yml widths: semantic 128 (4 per head), geometric 256 (8 per head).
  tiny              any small Llama-family teacher: its widths are taken, DBA semantic = geometric = head_dim / 4
                    per head, values kept; a few distillation steps (tests).
  cpu               as tiny with 200 blockwise + 200 KD steps of 8 x 128 tokens on the stdlib corpus: the CPU
                    measurement (BUILD_NOTES) on a dba-train teacher (configs/quickstart.py:baseline, 2 KV heads).

  dba-upcycle ~/models/Llama-3.2-1B --config=configs/dba_upcycle.py:llama32_1b_sem8 --out runs/llama1b-dba \
      --config.data.source=text --config.data.train_path='corpus/*.txt'

The tokenizer is the teacher's (an HF directory's tokenizer.json); Llama-3.2's llama3 RoPE scaling is not carried
over: DBA's geometric path runs unscaled RoPE (svd_joint matches rotary pairs by frequency, see the docs).
"""
from dba_jax.config import base_config, lock
from dba_jax.upcycle import settings

LLAMA32_1B = dict(vocab_size=128256, pad_vocab_to=128, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                  d_ff=8192, max_seq_len=131072, rope_base=500000.0, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu",
                  tie_embeddings=True, bias=False)


def get_config(variant: str = "tiny"):
  c = base_config()
  m = c.model
  m.attn_kind = "dba"
  if variant in ("llama32_1b_sem8", "llama32_1b"):
    for k, v in LLAMA32_1B.items():
      m[k] = v
    m.dba.sem_dim, m.dba.geo_dim = (256, 256) if variant == "llama32_1b_sem8" else (128, 256)
    m.attn_dim = 2048
    m.compute_dtype = "bfloat16"
    c.data.seq_len = 2048
    c.train.batch_size, c.optim.lr, c.optim.warmup_steps = 8, 3e-5, 100
  elif variant in ("tiny", "cpu"):
    # Placeholder widths (a valid config on its own); dba-upcycle replaces them with the teacher's.
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 64, 2, 4, 2, 128
    m.dba.sem_dim, m.dba.geo_dim = 16, 16
    c.data.seq_len = 32 if variant == "tiny" else 128
  else:
    raise ValueError(f"unknown variant {variant!r} of dba_upcycle; choose llama32_1b_sem8, llama32_1b, tiny or cpu")
  return lock(c)


def get_upcycle(variant: str = "tiny"):
  u = settings.defaults()
  if variant in ("llama32_1b_sem8", "llama32_1b"):
    # caramba's preset: blockwise lr 1e-4 for 500 steps per block (its blocks one after another; ours all at once),
    # then 2000 global steps at 5e-5 (caramba: plain next-token fine-tuning; here KD on the teacher's logits).
    u.batch_size, u.eval_batches = 1, 8
    u.blockwise.steps, u.blockwise.lr = 500, 1e-4
    u.kd.steps, u.kd.lr, u.kd.warmup_steps = 2000, 5e-5, 100
  elif variant == "tiny":
    u.teacher_shapes, u.sem_frac, u.geo_frac, u.v_frac = "take", 0.25, 0.25, 1.0
    u.batch_size, u.eval_batches, u.log_every = 4, 2, 5
    u.blockwise.steps, u.blockwise.lr = 10, 3e-3
    u.kd.steps, u.kd.lr = 5, 1e-3
  elif variant == "cpu":
    u.teacher_shapes, u.sem_frac, u.geo_frac, u.v_frac = "take", 0.25, 0.25, 1.0
    u.batch_size, u.eval_batches, u.log_every = 8, 8, 25
    u.blockwise.steps, u.blockwise.lr = 200, 1e-3
    u.kd.steps, u.kd.lr, u.kd.warmup_steps = 200, 3e-4, 20
  else:
    raise ValueError(f"unknown variant {variant!r} of dba_upcycle; choose llama32_1b_sem8, llama32_1b, tiny or cpu")
  return u
