"""The addition run schema: one locked ConfigDict (model / optim / train) and its validation.

Defaults are the original early recipe (others.md A.5); configs/addition.py sets the published variants.
"""
from __future__ import annotations

import ml_collections

from dba_jax.addition import data
from dba_jax.addition.model import SHARED_FACTOR_MODES, TIE_MODES, Arch, count_params
from dba_jax.configlib import ConfigError

Config = ml_collections.ConfigDict


def base_config() -> Config:
  c = Config()
  c.model = m = Config()
  m.d_model = 7
  m.d_ff = 14
  m.n_layer = 1
  m.n_head = 1
  m.vocab_size = data.VOCAB  # fixed by the encoding
  m.max_seq_len = data.SEQ_LEN  # fixed by the encoding (33)
  m.pos_rank = 0  # 0: full (T, d) position table; r: A (T, r) · B (r, d)
  m.pos_basis = "learned"  # learned | sinusoidal (fixed (T, r) left factor, or the whole table when pos_rank=0)
  m.qkv_rank = 0  # 0: full-rank q/k/v projections
  m.attn_out_rank = 0
  m.ffn_rank = 0
  m.norm = "layernorm"  # layernorm (eps 1e-5, weight and bias) | rmsnorm (eps 1e-8 inside the sqrt, weight only)
  m.block_norm_weight = True  # False (rmsnorm only): ln1/ln2 without weight, folded into the next linear's rows
  m.tie_qkv = "none"  # one of model.TIE_MODES (shareA_folded is ours: shareA_tieKV with fewer parameters)
  m.expect_params = 0  # > 0: validation fails unless the model has exactly this many parameters

  c.optim = o = Config()
  o.lr = 0.02
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.01  # decoupled, on every parameter (norms and embeddings too)
  o.warmup_steps = 1350
  o.min_lr_ratio = 0.1  # cosine from lr to min_lr_ratio·lr at train.steps, flat afterwards
  o.clip_norm = 1.0  # global norm; 0 disables

  c.train = t = Config()
  t.steps = 27000
  t.batch_size = 512
  t.seed = 42  # model i of num_models uses seed + i (init, splits, data stream)
  t.num_models = 1  # models trained together in one jitted step
  t.model_batching = "auto"  # vmap | map (a loop in the program: ~2x faster than vmap on XLA:CPU) | auto (map on CPU)
  t.steps_per_call = 1  # >1: steps scanned per jitted call (calls end at log/eval steps); no gain measured on CPU
  t.eval_interval = 1000  # greedy exact match on the validation split at steps % eval_interval == 0 and the last
  t.val_size = 5000
  t.test_size = 10000
  t.eval_batch_size = 512
  t.log_every = 100
  t.init_from = ""  # a trained checkpoint (.pt or ours) every model starts from, ranks shrunk to this config's
  t.curriculum = ""  # '' (the original 1-3:2000,1-6:5000,1-10:20000) or 'lo-hi:steps,...'
  return c


def _need(cond: bool, msg: str):
  if not cond:
    raise ConfigError(msg)


def validate(c: Config) -> Config:
  """Raises ConfigError naming the first impossible field; returns the config."""
  m = c.model
  _need(m.tie_qkv in TIE_MODES, f"model.tie_qkv={m.tie_qkv!r} is not one of {list(TIE_MODES)}")
  _need(m.pos_basis in ("learned", "sinusoidal"),
        f"model.pos_basis={m.pos_basis!r} is not one of ['learned', 'sinusoidal']")
  _need(m.norm in ("layernorm", "rmsnorm"), f"model.norm={m.norm!r} is not one of ['layernorm', 'rmsnorm']")
  _need(m.block_norm_weight or m.norm == "rmsnorm",
        "model.block_norm_weight=False needs model.norm='rmsnorm' (a LayerNorm bias cannot fold into a linear)")
  _need(m.vocab_size == data.VOCAB, f"model.vocab_size={m.vocab_size} must be {data.VOCAB} (fixed by the encoding)")
  _need(m.max_seq_len == data.SEQ_LEN, f"model.max_seq_len={m.max_seq_len} must be {data.SEQ_LEN}")
  for key in ("d_model", "d_ff", "n_layer", "n_head"):
    _need(m[key] > 0, f"model.{key}={m[key]} must be positive")
  for key in ("pos_rank", "qkv_rank", "attn_out_rank", "ffn_rank"):
    _need(m[key] >= 0, f"model.{key}={m[key]} must be >= 0 (0 means full rank)")
  _need(m.d_model % m.n_head == 0, f"model.d_model={m.d_model} is not divisible by model.n_head={m.n_head}")
  _need(m.tie_qkv not in SHARED_FACTOR_MODES or m.qkv_rank > 0,
        f"model.tie_qkv={m.tie_qkv!r} shares low-rank factors: it needs model.qkv_rank > 0")
  _need(m.tie_qkv != "shareA_folded" or m.n_head == 1,
        f"model.tie_qkv='shareA_folded' has one head (its q/k/v are qkv_rank wide); model.n_head={m.n_head}")
  if m.expect_params:
    n = count_params(Arch.from_config(m))
    _need(n == m.expect_params, f"model.expect_params={m.expect_params} but this model has {n} parameters")
  o = c.optim
  _need(o.lr > 0, f"optim.lr={o.lr} must be positive")
  _need(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
  _need(o.warmup_steps >= 0 and o.clip_norm >= 0 and o.weight_decay >= 0,
        "optim.warmup_steps, optim.clip_norm and optim.weight_decay must be >= 0")
  t = c.train
  _need(t.model_batching in ("auto", "vmap", "map"),
        f"train.model_batching={t.model_batching!r} is not one of ['auto', 'vmap', 'map']")
  for key in ("steps", "batch_size", "num_models", "eval_interval", "val_size", "test_size", "eval_batch_size",
              "log_every", "steps_per_call"):
    _need(t[key] > 0, f"train.{key}={t[key]} must be positive")
  try:
    phases = data.parse_curriculum(t.curriculum)
  except ValueError:
    raise ConfigError(f"train.curriculum={t.curriculum!r} is not 'lo-hi:steps,...'") from None
  for lo, hi, _ in phases:
    _need(1 <= lo <= hi <= data.N_DIGITS, f"train.curriculum={t.curriculum!r}: phase {lo}-{hi} must satisfy "
          f"1 <= lo <= hi <= {data.N_DIGITS}")
  return c
