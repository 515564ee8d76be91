"""The run configuration: its sections, the rules between fields, and today's names for old config.json keys.

Every preset in configs/ starts from `base_config()` and changes fields. Each field is declared once (type, range or
choices, one line of doc) in a `configlib.Section`: the model, data, optim, train and mesh sections here, an
attention kind's section with its kind (dba_jax/attention/<kind>.py, under model.<kind>), HOPE's in
dba_jax/hope/config.py. `validate` checks every field from those declarations, then the cross-field rules. The
config is locked: assigning a key that is not declared raises.
"""
from __future__ import annotations

import sys

from dba_jax import attention, tokenizers
from dba_jax.configlib import Config, ConfigError, Field, Section, attn_dim, kv_heads, lock, need, padded_vocab
from dba_jax.hope import config as hope_config

__all__ = ["BLOCK_NAMES", "Config", "ConfigError", "attn_dim", "base_config", "kv_heads", "lock", "padded_vocab",
           "schema", "upgrade", "validate"]

BLOCK_NAMES = ("pre_norm",) + hope_config.HOPE_BLOCKS + hope_config.TITANS_BLOCKS
DEFAULT_KIND = "standard"


# Hugging Face's `rope_scaling` (ops.RopeScaling): the defaults leave RoPE as it is.
ROPE_SCALING = Section(
    "RoPE frequencies stretched beyond the pretraining context (model.positions='rope')",
    kind=Field("none", "none | linear: every frequency / factor | llama3: Llama 3.1's, long wavelengths / factor, "
               "short ones kept, a ramp between", choices=("none", "linear", "llama3")),
    factor=Field(1.0, "linear, llama3: the stretch factor", gt=0.0),
    low_freq_factor=Field(1.0, "llama3: wavelengths above original_max_positions / this are divided by factor",
                          gt=0.0),
    high_freq_factor=Field(4.0, "llama3: wavelengths below original_max_positions / this are kept", gt=0.0),
    original_max_positions=Field(8192, "llama3: the pretraining context length", ge=1),
)


def _model_section() -> Section:
  return Section(
      "the decoder",
      vocab_size=Field(256, "tokenizer vocabulary; the embedding is padded up to `pad_vocab_to` multiples", ge=1),
      pad_vocab_to=Field(128, "embedding rows are a multiple of this", ge=1),
      d_model=Field(128, "residual width", ge=1),
      n_layers=Field(4, "blocks", ge=1),
      n_heads=Field(4, "attention heads", ge=1),
      n_kv_heads=Field(0, "0: same as n_heads (MHA); fewer: grouped-query attention", ge=0),
      d_ff=Field(512, "MLP hidden width", ge=1),
      max_seq_len=Field(128, "learned position table size; RoPE needs no table", ge=1),
      attn_kind=Field(DEFAULT_KIND, "attention kind (dba_jax/attention/); its fields are model.<kind>.*",
                      choices=attention.names),
      attn_dim=Field(0, "0: d_model. Smaller gives the 'bottleneck' baseline; for DBA it is the value width", ge=0),
      positions=Field("rope", "position encoding", choices=("rope", "learned", "none")),
      rope_base=Field(10000.0, "RoPE base frequency", gt=0.0),
      rope_scaling=ROPE_SCALING,
      norm=Field("rmsnorm", "normalisation", choices=("rmsnorm", "layernorm")),
      norm_eps=Field(1e-5, "normalisation epsilon", gt=0.0),
      mlp=Field("swiglu", "swiglu (fused gate|up) | gelu", choices=("swiglu", "gelu")),
      bias=Field(False, "biases in linear layers (and LayerNorm)"),
      qkv_bias=Field(False, "biases on the q, k and v projections only (Qwen2); model.bias puts them everywhere"),
      sliding_window=Field(0, "0: full causal attention; W > 0: a query sees the W most recent positions, its own "
                           "included (Mistral's sliding_window)", ge=0),
      tie_embeddings=Field(False, "the head is the embedding transposed"),
      dropout=Field(0.0, "on embeddings and residual branches", ge=0.0, lt=1.0),
      init_std=Field(0.02, "normal init std", ge=0.0),
      scale_residual_init=Field(True, "GPT-2: out/down projections get std / sqrt(2 * n_layers)"),
      scan_layers=Field(True, "lax.scan over stacked layers (else a Python loop)"),
      scan_unroll=Field(1, "layers per iteration of the layer scan; 0: fully unrolled (same parameters, same math)",
                        ge=0),
      block=Field("pre_norm", "pre_norm | hope_* (model.hope) | titans_* (the Titans paper's memory)",
                  choices=BLOCK_NAMES),
      mup=Field(False, "muP: attn scale 1/d_head, readout x 1/width_mult, matrix init / sqrt(width_mult), MuAdamW"),
      mup_base_d_model=Field(768, "width_mult = d_model / mup_base_d_model", ge=1),
      mup_zero_query=Field(False, "mup_zero_init: zero the query projections"),
      attn_impl=Field("auto", "reference | xla | pallas (flash kernels) | auto (pallas on GPU/TPU, xla on CPU)",
                      choices=("reference", "xla", "pallas", "auto")),
      compute_dtype=Field("float32", "activations; the optimizer state is always float32",
                          choices=("float32", "bfloat16", "float64")),
      param_dtype=Field("float32", "stored parameters. bfloat16 halves a frozen or evaluated model's memory (the "
                        "forward promotes them to compute_dtype); dba-train trains float32 parameters",
                        choices=("float32", "bfloat16")),
      hope=hope_config.SECTION,
      **{k.name: k.section for k in attention.KINDS.values() if k.section is not None},
  )


DATA = Section(
    "the token stream",
    source=Field("stdlib", "synthetic: made from data.seed by data.generator",
                 choices=("stdlib", "npy", "bin", "text", "synthetic")),
    generator=Field("", "synthetic: passkey | arith_qa (dba_jax.data.GENERATORS) | module:function"),
    synthetic_chars=Field(2_000_000, "synthetic: train split size in characters", ge=1),
    mix_stdlib=Field(0.0, "synthetic: fraction of the train/val tokens taken from the stdlib corpus", ge=0.0, lt=1.0),
    train_path=Field("", "file or glob for npy / bin / text"),
    val_path=Field("", "empty: hold out `val_fraction` of the train tokens (stdlib splits by file hash)"),
    val_fraction=Field(0.05, "held-out fraction", gt=0.0, lt=1.0),
    tokenizer=Field("byte", "gpt2: tiktoken, only from files already on this machine; bpe_qa: in-process BPE; "
                    "hf:PATH: a Hugging Face tokenizer.json (or a directory holding one), specials from its files",
                    choices=tokenizers.NAMES),
    sampling=Field("random", "random windows (DBA runs) | contiguous windows (nanoGPT runs)",
                   choices=("random", "contiguous")),
    seq_len=Field(128, "tokens per training sequence", ge=1),
    seed=Field(0, "data order and synthetic data", ge=0),
)

OPTIM = Section(
    "AdamW (or Muon / M3 on the matrices) with warmup and cosine decay",
    name=Field("adamw", "adamw | muon: torch.optim.Muon on the matrices, AdamW on the rest (the HOPE original's "
               "hybrid) | m3: the Nested Learning paper's multi-scale-momentum Muon there (dba_jax/optim.py)",
               choices=("adamw", "muon", "m3")),
    lr=Field(3e-4, "peak learning rate", gt=0.0),
    b1=Field(0.9, "Adam beta1", ge=0.0, lt=1.0),
    b2=Field(0.999, "Adam beta2", ge=0.0, lt=1.0),
    eps=Field(1e-8, "Adam epsilon", gt=0.0),
    weight_decay=Field(0.1, "decoupled weight decay", ge=0.0),
    decay=Field("all", "all | matrices (only >= 2-D parameters decay)", choices=("all", "matrices")),
    warmup_steps=Field(100, "linear warmup steps", ge=0),
    min_lr_ratio=Field(0.0, "final lr / peak lr", ge=0.0, le=1.0),
    clip_norm=Field(1.0, "global gradient-norm clip; 0 disables clipping", ge=0.0),
    momentum=Field(0.95, "muon: the matrices' (Nesterov) momentum", ge=0.0, lt=1.0),
    ns_steps=Field(0, "muon / m3: Newton–Schulz iterations; 0: the optimizer's own (muon 5 quintic, m3 3 cubic)",
                   ge=0),
    m3_beta3=Field(0.9, "m3: weight of each slow chunk's gradient sum in the slow momentum M2", ge=0.0),
    m3_alpha=Field(1.0, "m3: weight of the orthogonalised slow momentum in the step", ge=0.0),
    m3_slow_chunk=Field(100, "m3: steps between slow-momentum updates (0: never)", ge=0),
)

TRAIN = Section(
    "the loop",
    steps=Field(1000, "optimizer steps", ge=1),
    batch_size=Field(16, "sequences per optimizer step (global), split into grad_accum micro-batches", ge=1),
    grad_accum=Field(1, "micro-batches per step", ge=1),
    ce_chunk=Field(0, "> 0: vocab projection + cross-entropy fused over chunks of this many tokens (no [B, T, V] "
                   "logits kept for backward); must divide the micro-batch's tokens. 0: logits, then nll", ge=0),
    seed=Field(0, "parameter init and dropout", ge=0),
    log_every=Field(10, "steps between metrics lines", ge=1),
    eval_every=Field(200, "steps between evaluations", ge=1),
    eval_batches=Field(8, "batches per evaluation", ge=1),
    ckpt_every=Field(500, "steps between checkpoints", ge=1),
    keep_ckpts=Field(3, "checkpoints kept", ge=1),
    async_ckpt=Field(True, "write checkpoints in the background"),
    init_from=Field("", "a dba_jax workdir or checkpoint dir: start from its params (fresh optimizer)"),
    surgery=Field("none", "applied to init_from's params", choices=("none", "add_head_start", "add_head_end")),
    surgery_init=Field("ko_zero", "the added head's init",
                       choices=("normal", "zero", "k_zero", "ko_zero", "o_zero", "o_rescaled")),
    nonfinite=Field("stop", "on a NaN/inf loss or gradient: stop (last good checkpoint kept) | skip the batch",
                    choices=("stop", "skip")),
    on_no_good_checkpoint=Field("stop", "every checkpoint broken: stop (say so) | restart from step 0",
                                choices=("stop", "restart")),
)

MESH = Section("device mesh", shape=Field((-1, 1, 1), "over (data, fsdp, tensor); -1 takes the remaining devices",
                                          ge=-1))


def schema() -> Section:
  """The whole config's declarations (the model section holds every registered attention kind's)."""
  return Section("a run", model=_model_section(), data=DATA, optim=OPTIM, train=TRAIN, mesh=MESH)


def base_config() -> Config:
  return schema().defaults()


def validate(c: Config) -> Config:
  """Raises ConfigError naming the first impossible field. Returns the config for chaining."""
  schema().check(c)
  m, d, t = c.model, c.data, c.train
  H, K = m.n_heads, kv_heads(m)
  need(H % K == 0, f"model.n_heads={H} is not a multiple of model.n_kv_heads={K}")
  need(attn_dim(m) % H == 0, f"model.attn_dim={attn_dim(m)} is not divisible by model.n_heads={H}")
  kind = attention.get(m)
  for other in attention.KINDS.values():  # another kind's fields do nothing: setting one is a mistake
    if other is not kind and other.section is not None:
      changed = sorted(k for k, v in m[other.name].items() if v != other.section.entries[k].default)
      need(not changed, f"model.{other.name}.{(changed or [''])[0]} is set but model.attn_kind={m.attn_kind!r}")
  kind.validate(m)
  _check_standard_features(m, kind)
  if m.positions == "learned":
    need(d.seq_len <= m.max_seq_len, f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
  if d.source == "synthetic":
    need(bool(d.generator), "data.source='synthetic' needs data.generator (a registered generator name)")
  elif d.source != "stdlib":
    need(bool(d.train_path), f"data.train_path is empty but data.source={d.source!r} needs a file")
  need(t.batch_size % t.grad_accum == 0,
       f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
  micro_tokens = t.batch_size // t.grad_accum * d.seq_len
  need(t.ce_chunk == 0 or micro_tokens % t.ce_chunk == 0,
       f"train.ce_chunk={t.ce_chunk} must be 0 or divide the {micro_tokens} tokens of a micro-batch")
  need(not (t.ce_chunk and (m.mup or m.block != "pre_norm")),
       f"train.ce_chunk={t.ce_chunk} needs model.mup=False and model.block='pre_norm' (the plain readout)")
  need(t.surgery == "none" or bool(t.init_from), "train.surgery needs train.init_from (the model to operate on)")
  _check_optim_fields(c.optim)
  need(len(c.mesh.shape) == 3, f"mesh.shape={tuple(c.mesh.shape)} must have 3 entries (data, fsdp, tensor)")
  hope_config.validate(c, DEFAULT_KIND)
  return c


def _check_optim_fields(o: Config):
  """Another optimizer's fields do nothing: setting one is a mistake."""
  users = {"momentum": ("muon",), "ns_steps": ("muon", "m3"), "m3_beta3": ("m3",), "m3_alpha": ("m3",),
           "m3_slow_chunk": ("m3",)}
  for key, names in users.items():
    need(o.name in names or o[key] == OPTIM.entries[key].default,
         f"optim.{key}={o[key]!r} is for optim.name in {list(names)} (optim.name={o.name!r})")


def _check_standard_features(m: Config, kind):
  """q/k/v biases and RoPE scaling live in the standard kind's projection, the sliding window in its attend: a
  kind or block that does not run them refuses them."""
  r = m.rope_scaling
  used = [(key, value) for key, value, on in (("qkv_bias", m.qkv_bias, m.qkv_bias),
                                              ("rope_scaling.kind", r.kind, r.kind != "none"),
                                              ("sliding_window", m.sliding_window, m.sliding_window > 0)) if on]
  for key, value in used:
    need(m.block == "pre_norm", f"model.{key}={value!r} needs model.block='pre_norm' (model.block={m.block!r})")
    projects = issubclass(kind.module, attention.standard.StandardAttention)
    attends = key != "sliding_window" or kind.module.attend is attention.standard.StandardAttention.attend
    need(projects and attends,
         f"model.{key}={value!r} is not supported by model.attn_kind={m.attn_kind!r} (standard attention's)")
  need(m.rope_scaling.kind == "none" or m.positions == "rope",
       f"model.rope_scaling.kind={m.rope_scaling.kind!r} needs model.positions='rope'")
  need(m.rope_scaling.kind != "llama3" or m.rope_scaling.high_freq_factor > m.rope_scaling.low_freq_factor,
       f"model.rope_scaling.high_freq_factor={m.rope_scaling.high_freq_factor} must exceed "
       f"model.rope_scaling.low_freq_factor={m.rope_scaling.low_freq_factor} (llama3 scaling)")


# ------------------------------------------------------------------------------------- old config.json names

# Before issue 25 the kinds' fields sat flat in the model section.
RENAMED = {
    **{f"sel_{old}": f"selective.{new}" for old, new in (
        ("head", "selection_head"), ("protect_bos", "protect_bos"), ("allow_self_mask", "allow_self_mask"),
        ("relu_leak", "relu_leak"), ("relu_after_cumsum", "relu_after_cumsum"), ("scan", "scan"),
        ("scan_dtype", "scan_dtype"), ("disable", "disable_selection"), ("mask_heads", "selection_heads"),
        ("mask_slices", "selection_slices"), ("combo", "combo"), ("combo_lr_scale", "combo_lr_scale"),
        ("latent_masks", "latent_masks"), ("latent_full_heads", "latent_full_heads"),
        ("latent_init", "latent_init"), ("latent_multiplier", "latent_multiplier"),
        ("residual_masks", "residual_masks"), ("protection", "protection"),
        ("protection_scale", "protection_scale"), ("protection_bias", "protection_bias"),
        ("leaky_alpha", "leaky_alpha"), ("leaky_bias", "leaky_bias"))},
    **{f"memory_{k}": f"selective.memory_{k}" for k in ("penalty", "epsilon", "tau")},
    "sem_dim": "dba.sem_dim", "geo_dim": "dba.geo_dim", "dba_gate": "dba.gate", "dba_gate_dynamic": "dba.gate_dynamic",
    "null_attn": "dba.null_attn", "tie_qk": "dba.tie_qk", "rope_semantic": "dba.rope_semantic",
}


def upgrade(saved: dict, path: str = "config.json", quiet: bool = False) -> dict:
  """A saved config dict with old model keys moved to today's names (RENAMED); says once what it translated."""
  model = saved.get("model")
  old = [k for k in (model or {}) if k in RENAMED]
  if not old:
    return saved
  model = dict(model)
  for key in old:
    section, field = RENAMED[key].split(".")
    model[section] = {**model.get(section, {}), field: model.pop(key)}
  if not quiet:
    print(f"{path}: read {len(old)} old model keys under today's names (e.g. model.{old[0]} -> "
          f"model.{RENAMED[old[0]]})", file=sys.stderr)
  return {**saved, "model": model}
