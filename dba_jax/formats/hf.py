"""Hugging Face `save_pretrained` directories <-> dba_jax workdirs: GPT2LMHeadModel, LlamaForCausalLM,
MistralForCausalLM and Qwen2ForCausalLM.

  dba-convert HF_DIR --out DIR [--format hf]             config.json + model.safetensors (or a sharded
                                                          model.safetensors.index.json; pytorch_model.bin also)
  dba-convert --to-torch DIR --out HF_DIR --format hf     config.json + model.safetensors (in the run's
                                                          model.param_dtype), which transformers'
                                                          AutoModelForCausalLM.from_pretrained loads

Reading: config.json (transformers 4.x `rope_theta` + `rope_scaling`, or 5.x `rope_parameters`) sets the model
config; every field that changes the logits is either mapped or checked, and one that dba_jax cannot honour (an
o_proj or MLP bias, a rope type other than default / linear / llama3, per-layer sliding windows, exact-erf GELU, ...)
stops the conversion with a line naming it. Fields that leave the logits alone (dropouts, init ranges, token ids,
generation settings) are not carried over; keys transformers' own class does not know are listed in a warning.
Tensors are memory-mapped (safetensors: dba_jax.torch_io's reader) and converted one at a time into the params
tree, which is allocated once in model.param_dtype (float32; bfloat16 with dba-convert --dtype bf16): bf16 / fp16 /
fp32 files read alike, and the peak is the params plus the checkpoint writer's pieces (ckpt._Piecewise).

Key map (i = layer; Linear weights [out, in] become kernels [in, out]; GPT-2's Conv1D weights are already
[in, out]; A = heads x head_dim, A_kv = kv heads x head_dim; V = the HF vocab, the embedding's rows beyond it are the
zero padding of model.pad_vocab_to, its logits never read):

  GPT2LMHeadModel (prefix `transformer.`, absent in GPT2Model-style files)   dba_jax param
  wte.weight [V, d] / wpe.weight [T, d]                                       embed[:V] / pos_embed
  h.{i}.ln_1 / ln_2 .weight .bias                                             attn_norm / mlp_norm .scale .bias
  h.{i}.attn.c_attn.weight [d, 3A] / .bias [3A]                               attn.q / k / v .kernel .bias (columns)
  h.{i}.attn.c_proj.weight [A, d] / .bias                                     attn.out
  h.{i}.mlp.c_fc.weight [d, 4d] / c_proj.weight [4d, d] (+ .bias)             mlp.w_in / mlp.w_out
  ln_f.weight / .bias ; lm_head.weight [V, d] (tied: absent or equal to wte)  final_norm ; head.kernel[:, :V]
  h.{i}.attn.bias / attn.masked_bias                                          causal-mask buffers: not parameters

  Llama / Mistral / Qwen2 (prefix `model.`)                                   dba_jax param
  embed_tokens.weight [V, d]                                                  embed[:V]
  layers.{i}.input_layernorm / post_attention_layernorm .weight               attn_norm / mlp_norm .scale
  layers.{i}.self_attn.q_proj [A, d] / k_proj, v_proj [A_kv, d] .weight       attn.q / k / v .kernel
  layers.{i}.self_attn.q_proj / k_proj / v_proj .bias (Qwen2)                 attn.q / k / v .bias (model.qkv_bias)
  layers.{i}.self_attn.o_proj.weight [d, A]                                   attn.out.kernel
  layers.{i}.mlp.gate_proj / up_proj .weight [F, d]                           mlp.w_in[:, 0] / [:, 1] (SwiGLU)
  layers.{i}.mlp.down_proj.weight [d, F]                                      mlp.w_out.kernel
  norm.weight ; lm_head.weight (untied)                                       final_norm.scale ; head.kernel[:, :V]
  ...rotary_emb.inv_freq                                                      recomputed buffers: not parameters

A directory that holds tokenizer.json sets the run's data.tokenizer to hf:<that directory, absolute> (unless the
config sets data.tokenizer), so the converted model reads and writes text with its own tokenizer. Export copies an
hf: data.tokenizer's files (tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json)
into the new directory.

Export picks the architecture recorded on import (keeping its config.json's other entries: token ids, ...), else
the one the model fits: learned positions + LayerNorm + GELU -> GPT-2; RoPE + RMSNorm + SwiGLU -> Qwen2 with q/k/v
biases, Mistral with a sliding window, Llama otherwise. RoPE settings are written the 4.x way (`rope_theta`,
`rope_scaling`), which transformers 5 reads too.
"""
from __future__ import annotations

import copy
import json
import mmap
import os
import re
import shutil
import sys

import numpy as np
from flax import nnx

from dba_jax import model as model_lib, torch_io
from dba_jax.configlib import attn_dim, kv_heads
from dba_jax.conversion import ConversionError, Keys, field_of, given, unwrap

NAME = "hf"
CONFIG = "config.json"
# Weight files in transformers' order of preference: safetensors first, sharded or not.
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}
MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM"}
PREFIX = {"gpt2": "transformer.", "llama": "model.", "mistral": "model.", "qwen2": "model."}
HEAD = "lm_head.weight"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": torch_io.BF16}
# A directory holding tokenizer.json becomes the converted run's data.tokenizer (hf:DIR, its special tokens from the
# files beside it), unless the user set data.tokenizer: read_dir passes it to config_from_saved under this key.
TOKENIZER_FILE, TOKENIZER = "tokenizer.json", "_dba_jax_tokenizer"
# What an export copies beside the tokenizer.json of an hf: data.tokenizer (its special tokens, generation's EOS).
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
BUFFERS = re.compile(r".*(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the tanh approximation dba_jax's MLP computes

# config.json entries that leave the logits alone: PretrainedConfig's generic ones, generation settings, token ids,
# training-time dropouts and inits. Not carried over.
INERT = {
    "architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype", "id2label",
    "label2id", "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_return_dict",
    "chunk_size_feed_forward", "problem_type", "tokenizer_class", "prefix", "bos_token_id", "eos_token_id",
    "pad_token_id", "sep_token_id", "decoder_start_token_id", "task_specific_params", "finetuning_task", "use_cache",
    "num_labels", "is_decoder", "is_encoder_decoder", "tie_encoder_decoder", "cross_attention_hidden_size",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "tf_legacy_loss",
    "initializer_range", "attention_dropout", "attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_type",
    "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout", "n_ctx",
    "reorder_and_upcast_attn", "pretraining_tp", "_attn_implementation_autoset", "auto_map", "gradient_checkpointing",
}
# What each family reads (mapped or checked below); anything else is neither INERT nor known: a warning.
READS = {
    "gpt2": {"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
             "layer_norm_epsilon", "tie_word_embeddings", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
             "add_cross_attention", "pruned_heads", "quantization_config"},
    "llama": {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
              "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
              "attention_bias", "mlp_bias", "pruned_heads", "quantization_config"},
}
READS["mistral"] = READS["llama"] - {"attention_bias", "mlp_bias"} | {"sliding_window"}
READS["qwen2"] = READS["llama"] - {"attention_bias", "mlp_bias"} | {"sliding_window", "use_sliding_window",
                                                                    "max_window_layers", "layer_types"}
ROPE_KEYS = {"default": set(), "linear": {"factor"},
             "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}


def _warn(msg: str):
  print(f"dba-convert: warning: {msg}", file=sys.stderr)


def detect(keys) -> bool:
  """A single weights file is never enough (config.json holds what the shapes cannot tell): directories only."""
  return False


def detect_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG)) and any(os.path.isfile(os.path.join(path, w)) for w in WEIGHTS)


# ------------------------------------------------------------------------------------------------- reading


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      out = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f"{path}: unreadable ({e})") from None
  if not isinstance(out, dict):
    raise ConversionError(f"{path}: holds a {type(out).__name__}, not a JSON object")
  return out


def family_of(cfg: dict, source: str) -> tuple[str, str]:
  """(architecture, family) of a config.json, or one line naming what is not supported."""
  archs = cfg.get("architectures") or ([MODEL_TYPES[cfg["model_type"]]] if cfg.get("model_type") in MODEL_TYPES
                                       else [])
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    raise ConversionError(f"{source}: architectures {archs or cfg.get('model_type')} not supported (supported: "
                          f"{', '.join(ARCHITECTURES)})")
  return archs[0], ARCHITECTURES[archs[0]]


def _weights(src: str) -> dict:
  """{key: array} of the directory's weights, memory-mapped where the file format allows."""
  found = next((w for w in WEIGHTS if os.path.isfile(os.path.join(src, w))), None)
  if found is None:
    raise ConversionError(f"{src}: no weights ({', '.join(WEIGHTS)})")
  path = os.path.join(src, found)
  read = lambda p: torch_io.read_safetensors(p)[0] if p.endswith(".safetensors") else unwrap(torch_io.load(p), p)[0]
  if not found.endswith(".index.json"):
    return read(path)
  weight_map = _read_json(path).get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise ConversionError(f"{path}: no weight_map")
  tensors, problems = {}, []
  for shard in sorted(set(weight_map.values())):
    if not os.path.isfile(os.path.join(src, shard)):
      raise ConversionError(f"{path}: shard {shard} is missing")
    for key, x in read(os.path.join(src, shard)).items():
      if weight_map.get(key) != shard:
        problems.append(f"{shard} holds {key}, which the index puts in {weight_map.get(key)}")
      tensors[key] = x
  problems += [f"{key} is not in {shard}" for key, shard in weight_map.items() if key not in tensors]
  if problems:
    raise ConversionError(f"{path} does not match its shards:\n  " + "\n  ".join(problems))
  return tensors


def read_dir(src: str) -> tuple[dict, dict]:
  """(tensors under their full GPT2LMHeadModel / *ForCausalLM names, {"config": config.json, "layout": ...})."""
  cfg = _read_json(os.path.join(src, CONFIG))
  arch, family = family_of(cfg, os.path.join(src, CONFIG))
  model_fields(cfg, family, os.path.join(src, CONFIG))  # an unsupported config stops before any weight is read
  tensors = _weights(src)
  prefix = PREFIX[family]
  if not any(k.startswith(prefix) for k in tensors):  # saved from the base model (GPT2Model, LlamaModel)
    tensors = {(k if k == HEAD else prefix + k): x for k, x in tensors.items()}
  # config_from_saved sees only the config: the directory's own tokenizer travels in a key of a copy of it
  saved = {**cfg, TOKENIZER: f"hf:{os.path.abspath(src)}"} if os.path.isfile(os.path.join(src, TOKENIZER_FILE)) \
      else cfg
  return tensors, {"config": saved, "layout": {"architecture": arch, "config": cfg}}


# -------------------------------------------------------------------------------------------------- config


def _rope(cfg: dict, source: str) -> tuple[float, dict]:
  """(rope_theta, model.rope_scaling fields) from 4.x `rope_theta` / `rope_scaling` or 5.x `rope_parameters`."""
  params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
  if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
    raise ConversionError(f"{source}: per-layer-type RoPE parameters {params} are not supported")
  theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in ROPE_KEYS:
    raise ConversionError(f"{source}: rope type {kind!r} is not supported (supported: {', '.join(ROPE_KEYS)})")
  extra = sorted(set(params) - ROPE_KEYS[kind] - {"rope_type", "type", "rope_theta"})
  partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise ConversionError(f"{source}: partial_rotary_factor={partial} (RoPE on part of each head) is not supported")
  extra = [k for k in extra if k != "partial_rotary_factor"]
  if extra:
    raise ConversionError(f"{source}: rope {kind!r} parameters {extra} are not supported")
  if kind == "default":
    return theta, {"kind": "none"}
  need = ROPE_KEYS[kind] - {"original_max_position_embeddings"}
  if need - set(params):
    raise ConversionError(f"{source}: rope {kind!r} needs {sorted(need)}; it has {sorted(params)}")
  out = {"kind": kind, "factor": float(params["factor"])}
  if kind == "llama3":
    out.update(low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"]),
               original_max_positions=int(params.get("original_max_position_embeddings",
                                                     cfg.get("max_position_embeddings", 8192))))
  return theta, out


def _sliding_window(cfg: dict, family: str, n_layers: int, source: str) -> int:
  if family == "mistral":
    return int(cfg.get("sliding_window") or 0)
  if family != "qwen2":
    return 0
  window = cfg.get("sliding_window")
  types = cfg.get("layer_types") or (["sliding_attention" if cfg.get("use_sliding_window") and window is not None
                                      and i >= cfg.get("max_window_layers", 28) else "full_attention"
                                      for i in range(n_layers)])
  if set(types) == {"full_attention"}:
    return 0
  if set(types) == {"sliding_attention"} and window:
    return int(window)
  raise ConversionError(f"{source}: sliding windows on some layers only (layer_types {types}) are not supported")


def model_fields(cfg: dict, family: str, source: str, warn: bool = True) -> dict:
  """{model field: value} that config.json determines; one line naming a field dba_jax cannot honour."""
  get = cfg.get
  if get("quantization_config"):
    raise ConversionError(f"{source}: a quantized checkpoint (quantization_config) is not supported")
  if get("pruned_heads"):
    raise ConversionError(f"{source}: pruned_heads {get('pruned_heads')} are not supported")
  unknown = sorted(set(cfg) - INERT - READS[family])
  if unknown and warn:
    _warn(f"{source}: entries dba_jax does not know, not read: {', '.join(unknown)}")
  if family == "gpt2":
    checks = {"activation_function": (get("activation_function", "gelu_new"), TANH_GELUS),
              "scale_attn_weights": (get("scale_attn_weights", True), (True,)),
              "scale_attn_by_inverse_layer_idx": (get("scale_attn_by_inverse_layer_idx", False), (False,)),
              "add_cross_attention": (get("add_cross_attention", False), (False,))}
    _refuse(checks, source)
    d = int(get("n_embd", 768))
    return dict(vocab_size=int(get("vocab_size", 50257)), d_model=d, n_layers=int(get("n_layer", 12)),
                n_heads=int(get("n_head", 12)), n_kv_heads=0, attn_dim=0, d_ff=int(get("n_inner") or 4 * d),
                max_seq_len=int(get("n_positions", 1024)), positions="learned", norm="layernorm",
                norm_eps=float(get("layer_norm_epsilon", 1e-5)), mlp="gelu", bias=True, qkv_bias=False,
                tie_embeddings=bool(get("tie_word_embeddings", True)), sliding_window=0,
                **{"rope_scaling.kind": "none"})
  _refuse({"hidden_act": (get("hidden_act", "silu"), ("silu",)),
           "attention_bias": (get("attention_bias", False), (False,)),
           "mlp_bias": (get("mlp_bias", False), (False,))}, source)
  d, H = int(get("hidden_size", 4096)), int(get("num_attention_heads", 32))
  K = int(get("num_key_value_heads") or H)
  head_dim = int(get("head_dim") or d // H)
  theta, scaling = _rope(cfg, source)
  L = int(get("num_hidden_layers", 32))
  return dict(vocab_size=int(get("vocab_size", 32000)), d_model=d, n_layers=L, n_heads=H,
              n_kv_heads=0 if K == H else K, attn_dim=0 if head_dim * H == d else head_dim * H,
              d_ff=int(get("intermediate_size", 11008)), max_seq_len=int(get("max_position_embeddings", 2048)),
              positions="rope", rope_base=theta, norm="rmsnorm", norm_eps=float(get("rms_norm_eps", 1e-6)),
              mlp="swiglu", bias=False, qkv_bias=family == "qwen2",
              tie_embeddings=bool(get("tie_word_embeddings", False)),
              sliding_window=_sliding_window(cfg, family, L, source),
              **{f"rope_scaling.{k}": v for k, v in scaling.items()})


def _refuse(checks: dict, source: str):
  bad = [f"{k}={v!r} (supported: {', '.join(map(repr, ok))})" for k, (v, ok) in checks.items() if v not in ok]
  if bad:
    raise ConversionError(f"{source}: not supported: {'; '.join(bad)}")


def config_from_saved(saved: dict, c, tensors: dict | None = None):
  """`c` with every model field config.json determines; a field the user set to something else is an error.
  The config's layout fields (muP, the block, the attention kind) must stay the plain decoder's."""
  _, family = family_of(saved, CONFIG)
  c = copy.deepcopy(c)
  m = c.model
  for field, value in model_fields(saved, family, CONFIG, warn=False).items():  # read_dir warned
    node, name = field_of(m, field)
    if given(c, f"model.{field}") and node[name] != value:
      raise ConversionError(f"{CONFIG} gives model.{field}={value!r}, but the config says model.{field}="
                            f"{node[name]!r}")
    node[name] = value
  fixed = {"attn_kind": "standard", "block": "pre_norm", "mup": False}
  bad = [f"model.{k}={m[k]!r}" for k, v in fixed.items() if m[k] != v]
  if bad:
    raise ConversionError(f"a {family} checkpoint is a plain decoder: {', '.join(bad)} cannot hold it")
  if m.positions == "learned" and c.data.seq_len > m.max_seq_len and not given(c, "data.seq_len"):
    c.data.seq_len = m.max_seq_len  # the default training length would not fit the position table
  if saved.get(TOKENIZER) and not given(c, "data.tokenizer"):
    c.data.tokenizer = saved[TOKENIZER]  # evals, decoding and training read text with the model's own tokenizer
  return c


def config_from(tensors: dict, c):
  """Everything came from config.json (config_from_saved); the tensors are checked in to_params."""
  return c


# -------------------------------------------------------------------------------------------- the key table


def _table(m, family: str) -> list[tuple]:
  """[(HF key, its shape, params path, index into the param, index into the HF tensor, transposed)]: the one
  description both directions use. Block paths are ("blocks", i, ...); a param index of () is all of it."""
  d, L, F, V = m.d_model, m.n_layers, m.d_ff, m.vocab_size
  A, Akv = attn_dim(m), kv_heads(m) * (attn_dim(m) // m.n_heads)
  rows: list[tuple] = []
  add = lambda key, shape, path, p=(), h=(), t=False: rows.append((key, shape, path, p, h, t))
  all_ = slice(None)
  if family == "gpt2":
    add("transformer.wte.weight", (V, d), ("embed",), (slice(0, V),))
    add("transformer.wpe.weight", (m.max_seq_len, d), ("pos_embed",))
    for i in range(L):
      key, b = f"transformer.h.{i}.", ("blocks", i)
      for hf, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
        add(f"{key}{hf}.weight", (d,), b + (ours, "scale"))
        add(f"{key}{hf}.bias", (d,), b + (ours, "bias"))
      for j, x in enumerate("qkv"):
        add(f"{key}attn.c_attn.weight", (d, 3 * A), b + ("attn", x, "kernel"), (), (all_, slice(j * A, (j + 1) * A)))
        add(f"{key}attn.c_attn.bias", (3 * A,), b + ("attn", x, "bias"), (), (slice(j * A, (j + 1) * A),))
      for hf, ours, shape in (("attn.c_proj", ("attn", "out"), (A, d)), ("mlp.c_fc", ("mlp", "w_in"), (d, F)),
                              ("mlp.c_proj", ("mlp", "w_out"), (F, d))):
        add(f"{key}{hf}.weight", shape, b + ours + ("kernel",))
        add(f"{key}{hf}.bias", shape[1:], b + ours + ("bias",))
    add("transformer.ln_f.weight", (d,), ("final_norm", "scale"))
    add("transformer.ln_f.bias", (d,), ("final_norm", "bias"))
  else:
    add("model.embed_tokens.weight", (V, d), ("embed",), (slice(0, V),))
    for i in range(L):
      key, b = f"model.layers.{i}.", ("blocks", i)
      add(f"{key}input_layernorm.weight", (d,), b + ("attn_norm", "scale"))
      for x, width in (("q", A), ("k", Akv), ("v", Akv)):
        add(f"{key}self_attn.{x}_proj.weight", (width, d), b + ("attn", x, "kernel"), t=True)
        if m.qkv_bias:
          add(f"{key}self_attn.{x}_proj.bias", (width,), b + ("attn", x, "bias"))
      add(f"{key}self_attn.o_proj.weight", (d, A), b + ("attn", "out", "kernel"), t=True)
      add(f"{key}post_attention_layernorm.weight", (d,), b + ("mlp_norm", "scale"))
      add(f"{key}mlp.gate_proj.weight", (F, d), b + ("mlp", "w_in"), (all_, 0), t=True)
      add(f"{key}mlp.up_proj.weight", (F, d), b + ("mlp", "w_in"), (all_, 1), t=True)
      add(f"{key}mlp.down_proj.weight", (d, F), b + ("mlp", "w_out", "kernel"), t=True)
    add("model.norm.weight", (d,), ("final_norm", "scale"))
  if not m.tie_embeddings:
    add(HEAD, (V, d), ("head", "kernel"), (all_, slice(0, V)), t=True)
  return rows


def _family_for(m) -> str:
  return "gpt2" if m.positions == "learned" else "llama"


def _locate(params: dict, path: tuple, p_idx: tuple, scanned: bool = True):
  """(the array holding a param, the index of `path`'s slice in it): scanned block params are stacked [L, ...],
  unscanned ones are per-layer trees."""
  node, idx = params, p_idx
  if path[0] == "blocks":
    blocks, i = params["blocks"], path[1]
    if scanned:
      node, idx = blocks, (i,) + p_idx
    else:
      node = blocks[i] if i in blocks else blocks[str(i)]
    path = path[2:]
  for k in path:
    node = node[k]
  return node, idx


def _by_key(rows: list) -> dict:
  """{HF key: its table rows} in table order (a fused tensor, e.g. c_attn, has several)."""
  out: dict[str, list] = {}
  for row in rows:
    out.setdefault(row[0], []).append(row)
  return out


def to_params(tensors: dict, c) -> dict:
  """The params tree, allocated once (zeros: the vocab padding stays 0) and filled key by key from the memory-mapped
  tensors; every key, shape and dtype checked, one error listing every problem."""
  m = c.model
  stacked = copy.deepcopy(m)
  stacked.scan_layers = True  # built stacked [L, ...], split per layer at the end when the model is not scanned
  shapes = nnx.to_pure_dict(model_lib.abstract(stacked)[1])
  params = _tree_map(lambda a: np.zeros(a.shape, a.dtype), shapes)  # float32, or bfloat16 (--dtype bf16)
  keys = Keys(tensors, "Hugging Face checkpoint")
  keys.ignore(lambda k: bool(BUFFERS.match(k)))
  for key, rows in _by_key(_table(m, _family_for(m))).items():
    x = keys.take(key, rows[0][1])
    for _, _, path, p_idx, h_idx, t in rows if x is not None else ():
      dst, idx = _locate(params, path, p_idx)
      part = x[h_idx] if h_idx else x
      dst[idx] = part.T if t else part
    _release(tensors[key])
  if m.tie_embeddings and HEAD in tensors:  # a tied head saved anyway must be the embedding
    keys.take(HEAD, (m.vocab_size, m.d_model))
    if not keys.problems and not np.array_equal(np.asarray(tensors[HEAD]).astype(params["embed"].dtype),
                                                params["embed"][:m.vocab_size]):
      keys.problems.append(f"{HEAD} differs from the embedding but tie_word_embeddings is true")
  keys.finish()
  if not m.scan_layers:
    params["blocks"] = {i: _tree_map(lambda a, i=i: a[i], params["blocks"]) for i in range(m.n_layers)}
  return params


def _release(x):
  """Drop a memory-mapped tensor's pages from this process once it is copied (they stay in the page cache, and
  are read again if touched): the peak is the params, not the params plus the file."""
  while x is not None and not isinstance(x, np.memmap):
    x = getattr(x, "base", None)
  mapped = getattr(x, "_mmap", None)
  if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
    mapped.madvise(mmap.MADV_DONTNEED)


def _tree_map(fn, tree):
  return {k: _tree_map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


# ------------------------------------------------------------------------------------------------- writing


def _fits(m, family: str) -> list[str]:
  """Why the model cannot be written as `family` (empty: it can)."""
  want = {"attn_kind": "standard", "block": "pre_norm", "mup": False}
  if family == "gpt2":
    want.update(positions="learned", norm="layernorm", mlp="gelu", bias=True, qkv_bias=False, sliding_window=0)
  else:
    want.update(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=family == "qwen2")
    if family != "mistral" or not m.sliding_window:
      want["sliding_window"] = 0
  bad = [f"model.{k}={m[k]!r}" for k, v in want.items() if m[k] != v]
  if family == "gpt2" and (attn_dim(m) != m.d_model or kv_heads(m) != m.n_heads):
    bad.append(f"attn_dim={attn_dim(m)} with {kv_heads(m)} kv heads (GPT-2 has d_model={m.d_model} and all heads kv)")
  return bad


def architecture_for(m, recorded: str | None = None) -> str:
  """The recorded architecture when the model still fits it, else the one it fits; one line when none does."""
  if recorded in ARCHITECTURES and not _fits(m, ARCHITECTURES[recorded]):
    return recorded
  if m.positions == "learned":
    family = "gpt2"
  else:
    family = "qwen2" if m.qkv_bias else "mistral" if m.sliding_window else "llama"
  bad = _fits(m, family)
  if bad:
    raise ConversionError(f"no Hugging Face architecture holds this model: as {MODEL_TYPES[family]} it would need "
                          f"{'; '.join(bad)} changed")
  if recorded and recorded != MODEL_TYPES[family]:
    _warn(f"the model no longer fits {recorded} (converted from); writing {MODEL_TYPES[family]}")
  return MODEL_TYPES[family]


def hf_config(m, arch: str, base: dict | None = None) -> dict:
  """config.json for the model: the recorded one's other entries (token ids, ...) kept, every math field ours."""
  family = ARCHITECTURES[arch]
  out = {k: v for k, v in (base or {}).items() if k in INERT and k not in ("dtype", "torch_dtype")}
  out.update(architectures=[arch], model_type=family, vocab_size=m.vocab_size, tie_word_embeddings=m.tie_embeddings,
             dtype=m.param_dtype)
  if family == "gpt2":
    out.update(n_positions=m.max_seq_len, n_embd=m.d_model, n_layer=m.n_layers, n_head=m.n_heads, n_inner=m.d_ff,
               activation_function="gelu_new", layer_norm_epsilon=m.norm_eps, scale_attn_weights=True,
               scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
    if not base:  # dba_jax's dropout is on embeddings and residual branches
      out.update(embd_pdrop=m.dropout, resid_pdrop=m.dropout, attn_pdrop=0.0)
    return out
  r = m.rope_scaling
  scaling = None if r.kind == "none" else {"rope_type": r.kind, "factor": r.factor}
  if r.kind == "llama3":
    scaling.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
                   original_max_position_embeddings=r.original_max_positions)
  out.update(hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.n_layers,
             num_attention_heads=m.n_heads, num_key_value_heads=kv_heads(m), head_dim=attn_dim(m) // m.n_heads,
             hidden_act="silu", max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
             rope_theta=m.rope_base, rope_scaling=scaling)
  if family == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  elif family == "mistral":
    out.update(sliding_window=m.sliding_window or None)
  else:
    out.update(use_sliding_window=bool(m.sliding_window), sliding_window=m.sliding_window or None,
               max_window_layers=0, layer_types=["sliding_attention" if m.sliding_window else "full_attention"]
               * m.n_layers)
  return out


def _hf_tensor(params: dict, rows: list, scanned: bool, dtype) -> np.ndarray:
  """One HF tensor (C order) from its table rows."""
  key, shape = rows[0][:2]
  out = np.empty(shape, dtype)
  for _, _, path, p_idx, h_idx, t in rows:
    src, idx = _locate(params, path, p_idx, scanned)
    part = np.asarray(src[idx])  # sliced first: a restored (jax) param is never copied whole
    out[h_idx] = part.T if t else part
  return out


def from_params(params: dict, c, layout: dict | None = None) -> dict:
  """The HF state dict (in model.param_dtype, torch's key names; a tied head is not written, as transformers saves
  it)."""
  m = c.model
  arch = architecture_for(m, (layout or {}).get("architecture"))
  return {key: _hf_tensor(params, rows, m.scan_layers, DTYPES[m.param_dtype])
          for key, rows in _by_key(_table(m, ARCHITECTURES[arch])).items()}


def _write_safetensors(path: str, params: dict, c, arch: str):
  """model.safetensors written tensor by tensor (in model.param_dtype, transformers' `format: pt` metadata): the
  header from the table's shapes, then each tensor built, written and dropped; the peak stays the params."""
  m = c.model
  by_key = _by_key(_table(m, ARCHITECTURES[arch]))
  dtype, code = DTYPES[m.param_dtype], {"float32": "F32", "bfloat16": "BF16"}[m.param_dtype]
  header, offset = {}, 0
  for key, rows in by_key.items():
    n = dtype.itemsize * int(np.prod(rows[0][1]))
    header[key] = {"dtype": code, "shape": list(rows[0][1]), "data_offsets": [offset, offset + n]}
    offset += n
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the reference writer does
  with open(path, "xb") as f:
    f.write(len(blob).to_bytes(8, "little") + blob)
    for rows in by_key.values():
      _hf_tensor(params, rows, m.scan_layers, dtype).tofile(f)


def write_dir(out: str, params: dict, c, layout: dict | None = None) -> str:
  """config.json and model.safetensors (with transformers' `format: pt` metadata) into the new directory `out`;
  returns the architecture written."""
  layout = layout or {}
  arch = architecture_for(c.model, layout.get("architecture"))
  base = layout.get("config") if layout.get("architecture") == arch else None
  with open(os.path.join(out, CONFIG), "x") as f:
    json.dump(hf_config(c.model, arch, base), f, indent=2)
  _write_safetensors(os.path.join(out, "model.safetensors"), params, c, arch)
  _copy_tokenizer(c.data.tokenizer, out)
  return arch


def _copy_tokenizer(name: str, out: str):
  """An hf: tokenizer's files go along, so transformers' AutoTokenizer.from_pretrained(out) reads the same one."""
  if not name.startswith("hf:"):
    return
  path = name[len("hf:"):]
  src = path if os.path.isdir(path) else os.path.dirname(path)
  files = [TOKENIZER_FILE, *TOKENIZER_FILES] if os.path.isdir(path) else [os.path.basename(path), *TOKENIZER_FILES]
  if not os.path.isfile(os.path.join(src, files[0])):
    _warn(f"data.tokenizer={name!r}: {os.path.join(src, files[0])} is gone; the export has no tokenizer")
    return
  for f in files:
    if os.path.isfile(os.path.join(src, f)):
      shutil.copyfile(os.path.join(src, f), os.path.join(out, TOKENIZER_FILE if f == files[0] else f))

