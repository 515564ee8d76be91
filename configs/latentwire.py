"""LatentWire (issue 15): two small LMs with different tokenisers and widths, and the soft-token bridge between them.

  dba-train --config=configs/latentwire.py:source_lm --workdir=runs/lw/source    # bytes, d 128, 4 layers
  dba-train --config=configs/latentwire.py:target_lm --workdir=runs/lw/target    # bpe_qa, d 96, 3 layers, GQA 4/2
  dba-latentwire-train --config=configs/latentwire.py:bridge_k8 --source runs/lw/source --target runs/lw/target \
      --workdir runs/lw/bridge_k8
  dba-eval latentwire --manifest runs/lw/manifest.json

Both LMs train on arithmetic word problems (data.generator="arith_qa", train split only) mixed with stdlib text.
Bridge variants: bridge_k4, bridge_k8, bridge_k16 (b 64, depth 2, 4 heads: others.md C.7's CPU size) and cpu (tiny,
for tests and smoke runs). Every field of a bridge config is described in dba_jax/latentwire/train.py; the task
fields (data.task synthetic | gsm8k | squad, data.prompt / stub, data.*_path) in dba_jax/latentwire/tasks.py.
gsm8k_32: the original's 2a_stable_32tok shape (K 32, b 768, 12 heads, depth 4, lr 1e-4, warmup 600, batch 40, 3000
steps, early stopping every 250 steps with patience 5) on local GSM8K jsonl files between two converted LMs:

  dba-latentwire-train --config=configs/latentwire.py:gsm8k_32 --source runs/mistral7b --target runs/llama31_8b \
      --config.data.train_path=gsm8k/train.jsonl --config.data.dev_path=gsm8k/dev.jsonl \
      --config.data.test_path=gsm8k/test.jsonl --workdir runs/lw/m2l_k32
Interlingua (dba_jax/latentwire/interlingua.py, same trainer): interlingua (M 8, d_z 64, 2 encoder layers, both LMs
receive) and interlingua_cpu (tiny).
"""
from dba_jax.config import base_config, lock

LMS = ("source_lm", "target_lm")
BRIDGES = ("bridge_k4", "bridge_k8", "bridge_k16", "cpu", "gsm8k_32")
INTERLINGUAS = ("interlingua", "interlingua_cpu")


def lm_config(variant: str):
  c = base_config()
  m, d, o, t = c.model, c.data, c.optim, c.train
  d.source, d.generator, d.synthetic_chars, d.mix_stdlib = "synthetic", "arith_qa", 2_000_000, 0.1
  if variant == "source_lm":
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 256, 128, 4, 4, 384
    d.tokenizer, d.seq_len = "byte", 128
    t.batch_size = 16
  else:
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 384, 96, 3, 4, 2, 256
    d.tokenizer, d.seq_len = "bpe_qa", 64
    t.batch_size = 32
  m.pad_vocab_to, m.max_seq_len = 128, d.seq_len
  o.lr, o.warmup_steps, o.min_lr_ratio = 2e-3, 50, 0.1
  t.steps = 700 if variant == "source_lm" else 800  # ~5 CPU minutes each on 2 free cores
  t.log_every, t.eval_every, t.eval_batches, t.ckpt_every = 25, 250, 8, 250
  return lock(c)


def get_config(variant: str = "bridge_k8"):
  if variant in LMS:
    return lm_config(variant)
  if variant in BRIDGES:
    from dba_jax.latentwire.train import bridge_config
    return bridge_config(variant)
  if variant in INTERLINGUAS:
    from dba_jax.latentwire import interlingua
    return interlingua.interlingua_config() if variant == "interlingua" else interlingua.cpu_config()
  raise ValueError(f"unknown variant {variant!r} of latentwire; choose one of "
                   f"{', '.join(LMS + BRIDGES + INTERLINGUAS)}")
