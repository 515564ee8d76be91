"""Small baseline and DBA byte-level models on the embedded stdlib corpus: minutes on a 2-core CPU.

  dba-train --config=configs/quickstart.py:baseline --workdir=runs/quickstart/baseline
  dba-train --config=configs/quickstart.py:dba --workdir=runs/quickstart/dba
"""
from dba_jax.config import base_config, lock


def get_config(variant: str = "dba"):
  c = base_config()
  m = c.model
  m.vocab_size, m.pad_vocab_to = 256, 128
  m.d_model, m.n_layers, m.n_heads, m.d_ff, m.max_seq_len = 128, 4, 4, 384, 128
  m.scan_unroll = 0  # 4 layers: unrolled compiles 0.6 s slower and steps 1.2-1.3x faster on CPU (issue 16)
  if variant == "baseline":
    m.attn_kind = "standard"
  elif variant == "dba":
    # The paper's sem8/geo32/v40 proportions at head dim 32: semantic 8, geometric 16, value 24 per head.
    m.attn_kind, m.dba.sem_dim, m.dba.geo_dim, m.attn_dim = "dba", 32, 64, 96
  else:
    raise ValueError(f"unknown variant {variant!r} of quickstart; choose baseline or dba")
  c.data.source, c.data.tokenizer, c.data.seq_len, c.data.sampling = "stdlib", "byte", 128, "random"
  c.optim.lr, c.optim.warmup_steps, c.optim.min_lr_ratio = 2e-3, 50, 0.1
  t = c.train
  t.steps, t.batch_size, t.log_every, t.eval_every, t.eval_batches, t.ckpt_every = 600, 16, 25, 200, 16, 300
  return lock(c)
