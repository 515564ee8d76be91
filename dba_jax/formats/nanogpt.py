"""nanoGPT / context-compression GPT-2 checkpoints (selective.md §6, §8) <-> dba_jax parameters.

A checkpoint is `model_XXXXX.pt` = {"model": state_dict, "config": GPTConfig, "step", "val_loss", ...} or a raw
state dict; dba-convert unwraps it and strips `_orig_mod.` / `module.`. Key map (i = layer; PyTorch Linear weights
[out, in] become kernels [in, out]; dba_jax params are `blocks[i]...`, or `blocks...[i]` with scan_layers; A = the
attention width n_heads x head_dim, which may differ from n_embd = d; A' = (n_heads + m) x head_dim with m
selection-only heads, A' = A without them):

  nanoGPT key                              shape          dba_jax param
  transformer.wte.weight                   [V, d]         embed (V = padded vocab: 50304, or 50257, or ...)
  transformer.wpe.weight                   [T, d]         pos_embed (T = model.max_seq_len)
  transformer.h.{i}.ln_1.weight / .bias    [d]            attn_norm.scale / .bias
  transformer.h.{i}.attn.c_attn.weight     [3A', d]       rows [q | k | v], each head-major: attn.q/k/v.kernel [d, A']
  transformer.h.{i}.attn.c_attn.bias       [3A']          attn.q/k/v.bias
  transformer.h.{i}.attn.c_proj.weight     [d, A]         attn.out.kernel [A, d] (+ .bias [d])
  transformer.h.{i}.ln_2.weight / .bias    [d]            mlp_norm.scale / .bias
  transformer.h.{i}.mlp.c_fc.weight        [4d, d]        mlp.w_in.kernel (+ .bias)
  transformer.h.{i}.mlp.c_proj.weight      [d, 4d]        mlp.w_out.kernel (+ .bias)
  transformer.ln_f.weight / .bias          [d]            final_norm.scale / .bias
  lm_head.weight                           [V, d]         tied to wte (must be equal); untied: head.kernel
  transformer.h.{i}.attn.bias              [1,1,T,T]      the selective class's causal-mask buffer: ignored on
                                                          import, written back (tril of ones) for attn_kind selective

Selective variants (context_compression/attn.py; selective.md §3.7, §4.5, §4.6), H = n_heads, H' = H + m:
  c_attn with H' heads (m = c_attn rows / 3 / head_dim - H)   model.selective.selection_heads = m: the first m heads only
      select (none_with_no_head / n_sliced_masks / n_latent_masks m = 1, two_masks 2, one_mask_per_head H). With
      m = 1 and no selection_head the file cannot tell none_with_no_head from n_sliced_masks: model.selective.selection_slices
      comes from --config or the pickled GPTConfig (selection_head_linear_combo, n_sliced_masks).
  attn.selection_head.weight  [1, H]   attn.sel_combo_w [H] ("true" / with_head_zero: Linear(H -> 1), no bias)
  attn.selection_head.bias    [1]      attn.sel_combo_b [] (with_head_zero_and_bias; 0 without the key)
  attn.selection_head.weight  [H, n]   attn.sel_latent_w [n, H] (n_latent_masks, m = 1 with n slices, or m = n heads)
  attn.selection_head.bias    [H]      attn.sel_latent_b [H]
  attn.protection_head.weight [1, H]   attn.protect_w [H]   (protection_kind linear_combo / linear_combo_head_two)
  attn.protection_head.bias   [1]      attn.protect_b []
  attn.raw_att_head.weight    [H', H'] attn.res_mix [H', H'] (residual_attention_masks; transposed like a kernel)
The config gets what these keys imply (attn_kind selective, sel_mask_heads, sel_combo, sel_latent_masks, ...);
options without parameters (protection kinds head_two / leaky_relu / ..., BOS and self masking) must come from
--config. `mask_layernorm`, `S_layernorm` and `att_conv` modules have no dba_jax counterpart and are refused.
dba_jax re-masks the latent mix causally; the original left its bias at future positions (selective.md §4.5): a
positive latent bias is converted with a warning that the logits differ.

The config gets the GPT-2 layout (learned positions, LayerNorm eps 1e-5 with biases, tanh-GELU MLP, biases, tied
head) and every size the shapes tell. The head count cannot be told when A = heads x 64 = 12 x 64 or 13 x 64 ...:
it comes from --config (model.n_heads) or else from the pickled GPTConfig's n_head; A / n_heads must divide. The
pickled GPTConfig's n_layer, n_embd, block_size and n_head x head_dim are checked against the shapes.
vocab_size is the wte rows unless --config gives it (50257 inside 50304 rows), and pad_vocab_to is chosen so the
padded vocab is exactly the wte rows. Selective checkpoints without extra parameters have the standard weights:
convert them with --config.model.attn_kind=selective.

The training trio. Beside `model_XXXXX.pt`, `optimizer_XXXXX.pt` = {"optimizer": AdamW state_dict, "rng_state",
"cuda_rng_state"} and `dataloader_XXXXX.pt` = {"current_shard", "current_position"} are read when present:
  - AdamW `exp_avg` / `exp_avg_sq` become optax's ScaleByAdamState mu / nu, laid out like the params (transposed,
    c_attn split, layers stacked). Torch numbers parameters by group: configure_optimizers puts the parameters with
    dim >= 2 first (named_parameters order: wte, wpe, then per layer c_attn.weight, attn c_proj.weight,
    c_fc.weight, mlp c_proj.weight), then those with dim < 2 (LayerNorm weights and biases, Linear biases, ln_f),
    then context-compression's `selection_head` group; the tied lm_head never separately. Every index is checked
    against its parameter's shape. The groups' settings are kept in meta["torch_param_groups"].
  - the AdamW `step` (updates done) becomes the optax counts (Adam's bias correction and the lr schedule) and the
    dba_jax run's step: the checkpoint is written at that step and `dba-train --workdir` resumes from it with the
    same schedule position. torch's own `step` entry of the model file (the loop index) is kept in meta.
  - AdamW betas / eps / weight decay are not taken over: a warning names those that differ from config.optim.
  - The dataloader position cannot become dba_jax's data-iterator state (dba_jax shuffles fixed-length windows
    with grain; nanoGPT walks shuffled shards contiguously), so it is recorded as meta["torch_dataloader"] with a
    warning, and the dba_jax iterator continues at its own batch `step`. The torch / CUDA RNG states are dropped.
Export (`trio`): `--to-torch DIR --out .../model_XXXXX.pt` writes {"model": state_dict, "step"} and, when the
checkpoint has taken optimizer steps, `optimizer_XXXXX.pt` = {"optimizer": AdamW state_dict} with the moments laid
back out in the same group order (settings from meta["torch_param_groups"] when recorded, else config.optim's),
and `dataloader_XXXXX.pt` from meta["torch_dataloader"] when recorded.
"""
from __future__ import annotations

import copy
import os
import re
import sys

import numpy as np

from dba_jax.configlib import attn_dim, kv_heads, padded_vocab
from dba_jax import conversion
from dba_jax.conversion import GIVEN, ConversionError, Keys, given, is_float

NAME = "nanogpt"
WTE, WPE, HEAD = "transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"
LAYER = re.compile(r"transformer\.h\.(\d+)\.")
MASK_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.bias$")
# Modules of the original's selective class that dba_jax has no counterpart for: refused by name.
UNMAPPED = re.compile(r"transformer\.h\.\d+\.attn\.(mask_layernorm|S_layernorm|att_conv)[._]")
SEL_W, SEL_B = "attn.selection_head.weight", "attn.selection_head.bias"
PROT_W, PROT_B = "attn.protection_head.weight", "attn.protection_head.bias"
RES_W = "attn.raw_att_head.weight"
LINEAR_PROTECTIONS = ("linear_combo", "linear_combo_head_two")


def detect(keys) -> bool:
  return WTE in keys and WPE in keys and any(k.startswith("transformer.h.0.attn.c_attn.") for k in keys)


# ------------------------------------------------------------------------------------------------- config


def _set(c, field: str, value, why: str):
  """c.model.field = value because of `why` (field may be dotted: "selective.combo"); an error when the user set it
  to something else."""
  node, name = conversion.field_of(c.model, field)
  if given(c, f"model.{field}") and node[name] != value:
    raise ConversionError(f"{why}, so model.{field}={value!r}, but the config says model.{field}={node[name]!r}")
  node[name] = value


def _pad_for(vocab: int, rows: int, current: int) -> int | None:
  """A pad_vocab_to that pads `vocab` to exactly `rows`: the current one, a power of two, or `rows` itself."""
  for p in (current, *(2 ** k for k in range(7, -1, -1)), rows):
    if p > 0 and -(-vocab // p) * p == rows:
      return p
  return None


def _n_layers(t: dict) -> int:
  found = sorted({int(mt.group(1)) for k in t if (mt := LAYER.match(k))})
  if found != list(range(len(found))):
    raise ConversionError(f"nanoGPT checkpoint: layers transformer.h.N found for N in {found}; expected 0 .. L-1")
  return len(found)


def _value(x):
  """A pickled enum member (a torch_io.StandIn of e.g. SelectionHeadLinearComboKind('n_sliced_masks')) as its
  value; anything else as it is."""
  args = getattr(x, "args", None)
  return args[0] if getattr(x, "class_path", None) and isinstance(args, tuple) and args else x


def config_from_saved(saved, c, tensors: dict | None = None):
  """What a pickled GPTConfig (a torch_io.StandIn, or any object with its fields) tells that the shapes cannot:
  the head count, and for one selection-only head whether it is sliced. Each is taken only when the user gave
  none. With `tensors`, the sizes it names are checked against the shapes first."""
  get = lambda name: getattr(saved, name, None)
  if tensors is not None:
    t, proj = tensors, "transformer.h.0.attn.c_proj.weight"
    shape = lambda key: tuple(t[key].shape) if key in t else None
    width = get("n_head") * get("head_dim") if all(isinstance(get(n), int) for n in ("n_head", "head_dim")) else None
    # (field, the pickled value, what the tensors say, which tensors say it)
    checks = [("n_layer", get("n_layer"), _n_layers(t), "layers transformer.h.N"),
              ("n_embd", get("n_embd"), (shape(WTE) or (0, None))[1], f"{WTE} {shape(WTE)}"),
              ("block_size", get("block_size"), (shape(WPE) or (None,))[0], f"{WPE} {shape(WPE)}"),
              ("n_head x head_dim", width, (shape(proj) or (0, None))[1], f"{proj} {shape(proj)}")]
    bad = [f"the pickled GPTConfig says {field}={said} but the checkpoint has {have} ({where})"
           for field, said, have, where in checks if isinstance(said, int) and have is not None and said != have]
    if bad:
      raise ConversionError("the checkpoint's config and its tensors disagree:\n  " + "\n  ".join(bad))
  c = copy.deepcopy(c)
  n_head = get("n_head")
  if isinstance(n_head, int) and not given(c, "model.n_heads"):
    c.model.n_heads = n_head
    GIVEN.add("model.n_heads")
  kind = _value(get("selection_head_linear_combo"))
  if not given(c, "model.selective.selection_slices") and kind in ("n_sliced_masks", "none_with_no_head"):
    c.model.selective.selection_slices = int(get("n_sliced_masks") or 1) if kind == "n_sliced_masks" else 1
    GIVEN.add("model.selective.selection_slices")
  return c


def _selective_config(t: dict, c, H: int, D: int, extra: int):
  """Sets the selective options the extra tensors of layer 0 imply (module docstring); refuses unmapped modules."""
  m, shape = c.model, lambda key: tuple(t[key].shape)
  key = lambda name: f"transformer.h.0.{name}"
  unmapped = sorted(k for k in t if UNMAPPED.match(k))
  if unmapped:
    raise ConversionError("the checkpoint has selective-attention modules with no dba_jax counterpart: " +
                          ", ".join(f"{k} {shape(k)}" for k in unmapped))
  present = [k for k in (SEL_W, PROT_W, RES_W) if key(k) in t]
  if not (present or extra):
    for field, none in (("selective.selection_heads", 0), ("selective.combo", "none"), ("selective.latent_masks", 0),
                        ("selective.residual_masks", False)):
      _set(c, field, none, "the checkpoint has no selection-head tensors")
    if m.selective.protection in LINEAR_PROTECTIONS:
      raise ConversionError(f"model.selective.protection={m.selective.protection!r} needs {key(PROT_W)}, which the "
                            "file lacks")
    return
  why = f"{key(present[0])} has shape {shape(key(present[0]))}" if present else \
      f"{key('attn.c_attn.weight')} has shape {shape(key('attn.c_attn.weight'))}: {H + extra} heads of {D}"
  _set(c, "attn_kind", "selective", f"{why} (a selective-attention variant)")
  qkv = key("attn.c_attn.weight")
  _set(c, "selective.selection_heads", extra,
       f"{qkv} has shape {shape(qkv)}: {H + extra} heads of {D} for {H} attending")
  sel = key(SEL_W)
  if sel in t and extra == 0:  # Linear(heads -> 1) over all heads' logits
    if shape(sel) != (1, H):
      raise ConversionError(f"{sel} has shape {shape(sel)}; a selection mix over {H} heads is (1, {H})")
    _set(c, "selective.combo", "with_head_zero_and_bias" if key(SEL_B) in t else "with_head_zero",
         f"{sel} is a linear mix of the heads' logits, {'with' if key(SEL_B) in t else 'without'} {key(SEL_B)}")
    _set(c, "selective.latent_masks", 0, f"{sel} mixes heads, not latent masks")
  elif sel in t:  # n_latent_masks: Linear(n latents -> heads)
    n = shape(sel)[1]
    if shape(sel)[0] != H or extra not in (1, n):
      raise ConversionError(f"{sel} has shape {shape(sel)}: a latent-mask mix (heads, n) needs {H} rows and n "
                            f"latents from 1 sliced head or n selection heads, but c_attn has {extra} extra")
    _set(c, "selective.combo", "none", f"{sel} mixes latent masks")
    _set(c, "selective.latent_masks", n, f"{sel} has shape {shape(sel)} ({n} latent masks)")
    mixes = f"{sel} mixes {n} latents of {extra} selection head(s)"
    _set(c, "selective.latent_full_heads", extra == n and n > 1, mixes)
    _set(c, "selective.selection_slices", n if extra == 1 else 1, mixes)
  else:
    _set(c, "selective.combo", "none", f"the checkpoint has no {sel}")
    _set(c, "selective.latent_masks", 0, f"the checkpoint has no {sel}")
    if extra == 1 and not given(c, "model.selective.selection_slices"):
      raise ConversionError(f"{qkv} has shape {shape(qkv)}: one selection-only head besides {H} attending, which "
                            "is none_with_no_head or n_sliced_masks; give --config.model.selective.selection_slices=1 "
                            "or =s")
  prot = key(PROT_W)
  if prot in t:
    if shape(prot) != (1, H + extra):
      raise ConversionError(f"{prot} has shape {shape(prot)}; a protection mix over {H} heads is (1, {H})")
    if m.selective.protection not in LINEAR_PROTECTIONS:
      _set(c, "selective.protection", "linear_combo", f"{prot} is a linear protection head")
  elif m.selective.protection in LINEAR_PROTECTIONS:
    raise ConversionError(f"model.selective.protection={m.selective.protection!r} needs {prot}, which the file lacks")
  _set(c, "selective.residual_masks", key(RES_W) in t, f"{key(RES_W)} is {'present' if key(RES_W) in t else 'absent'}")


def config_from(tensors: dict, c):
  t = tensors
  required = [WTE, WPE, "transformer.h.0.attn.c_attn.weight", "transformer.ln_f.weight"]
  missing = [k for k in required if k not in t]
  if missing:
    sample = sorted(t)[:12]
    raise ConversionError(f"not a nanoGPT checkpoint: missing {missing}; its {len(t)} keys include {sample}")
  c = copy.deepcopy(c)
  m = c.model
  shape = lambda key: tuple(t[key].shape)
  if m.attn_kind not in ("standard", "selective"):
    raise ConversionError(f"model.attn_kind={m.attn_kind!r}: nanoGPT checkpoints hold standard (or selective) "
                          "attention")
  has = lambda key: f"{key} has shape {shape(key)}"
  V, d = shape(WTE)
  _set(c, "d_model", d, has(WTE))
  _set(c, "max_seq_len", shape(WPE)[0], has(WPE))
  if not given(c, "data.seq_len"):
    c.data.seq_len = m.max_seq_len  # nanoGPT trains on block_size windows
  L = _n_layers(t)
  _set(c, "n_layers", L, f"the checkpoint has layers transformer.h.0 .. {L - 1}")
  fc = "transformer.h.0.mlp.c_fc.weight"
  if fc in t:
    _set(c, "d_ff", shape(fc)[0], has(fc))
  for field, value in (("positions", "learned"), ("norm", "layernorm"), ("mlp", "gelu"), ("bias", True)):
    _set(c, field, value, "nanoGPT checkpoints are GPT-2 models")
  if not given(c, "model.norm_eps"):
    m.norm_eps = 1e-5  # torch LayerNorm's default
  if HEAD in t and not _same(t[HEAD], t[WTE]):
    _set(c, "tie_embeddings", False, f"{HEAD} differs from {WTE}")
  else:
    _set(c, "tie_embeddings", True, f"{HEAD} is absent or equal to {WTE}")

  # Attention widths: c_proj [d, A] for the H attending heads, c_attn rows = 3 x A' (A' = A plus selection-only
  # heads); heads from the config.
  qkv, proj = "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight"
  rows = shape(qkv)[0]
  A = shape(proj)[1] if proj in t else rows // 3
  if not given(c, "model.n_heads"):
    fits = [f"{A // D} (heads of {D})" for D in (64, 128, 32, 16, 8) if A % D == 0][:3]
    raise ConversionError(f"{qkv} has shape {shape(qkv)}: {A} attention features, but the head count cannot be "
                          "read from shapes; give --config.model.n_heads"
                          + (f", e.g. {' or '.join(fits)}" if fits else ""))
  H = m.n_heads
  if rows % 3 or A % H:
    raise ConversionError(f"{qkv} has shape {shape(qkv)} and {proj} {shape(proj) if proj in t else 'is absent'}: "
                          f"its {A} attention features do not split into model.n_heads={H} heads")
  D = A // H
  extra = rows // 3 - A
  if extra < 0 or extra % D:
    raise ConversionError(f"{qkv} has shape {shape(qkv)}: rows / 3 = {rows // 3} is not (model.n_heads={H} + m) "
                          f"heads of {D} ({proj} has shape {shape(proj)})")
  _selective_config(t, c, H, D, extra // D)
  if kv_heads(m) != H:
    raise ConversionError(f"model.n_kv_heads={m.n_kv_heads}: nanoGPT attention has as many kv heads as heads ({H})")
  if given(c, "model.attn_dim") and attn_dim(m) != A:
    raise ConversionError(f"{proj} has shape {shape(proj)}: attention width {A}, but model.attn_dim={attn_dim(m)}")
  if not given(c, "model.attn_dim"):
    m.attn_dim = 0 if A == d else A

  # Vocab: wte rows unless the config names the tokenizer vocab; padding lands exactly on the rows.
  if not given(c, "model.vocab_size"):
    m.vocab_size = V
  if m.vocab_size > V:
    raise ConversionError(f"{WTE} has {V} rows, fewer than model.vocab_size={m.vocab_size}")
  if padded_vocab(m) != V:
    pad = None if given(c, "model.pad_vocab_to") else _pad_for(m.vocab_size, V, m.pad_vocab_to)
    if pad is None:
      raise ConversionError(f"{WTE} has {V} rows but model.vocab_size={m.vocab_size} with model.pad_vocab_to="
                            f"{m.pad_vocab_to} pads to {padded_vocab(m)}")
    m.pad_vocab_to = pad
  return c


# ------------------------------------------------------------------------------------------------- to_params


def _layer_keys(m) -> list[tuple[str, tuple]]:
  """One layer's parameters (key after `transformer.h.{i}.`, torch shape) in named_parameters order: the
  selective class registers selection_head, protection_head and raw_att_head after c_proj."""
  d, A, F, H = m.d_model, attn_dim(m), m.d_ff, m.n_heads
  sel = m.attn_kind == "selective"
  Hp = H + (m.selective.selection_heads if sel else 0)
  Ap = Hp * (A // H)
  out = [("ln_1.weight", (d,)), ("ln_1.bias", (d,)), ("attn.c_attn.weight", (3 * Ap, d)),
         ("attn.c_attn.bias", (3 * Ap,)), ("attn.c_proj.weight", (d, A)), ("attn.c_proj.bias", (d,))]
  if sel and m.selective.combo != "none":
    out.append((SEL_W, (1, H)))
    if m.selective.combo == "with_head_zero_and_bias":
      out.append((SEL_B, (1,)))
  if sel and m.selective.latent_masks:
    out += [(SEL_W, (H, m.selective.latent_masks)), (SEL_B, (H,))]
  if sel and m.selective.protection in LINEAR_PROTECTIONS:
    out += [(PROT_W, (1, Hp)), (PROT_B, (1,))]
  if sel and m.selective.residual_masks:
    out.append((RES_W, (Hp, Hp)))
  return out + [("ln_2.weight", (d,)), ("ln_2.bias", (d,)), ("mlp.c_fc.weight", (F, d)), ("mlp.c_fc.bias", (F,)),
                ("mlp.c_proj.weight", (d, F)), ("mlp.c_proj.bias", (d,))]


def _dense(w, b) -> dict:
  return {"kernel": w.T, "bias": b}


def _map(fn, *trees):
  if isinstance(trees[0], dict):
    return {k: _map(fn, *(t[k] for t in trees)) for k in trees[0]}
  return fn(*trees)


def to_params(tensors: dict, c) -> dict:
  """Checked first (every key, shape and dtype, one error listing all problems), then built layer by layer: each
  tensor is read (a view of the memory-mapped file, or one converted copy for bf16 / fp16) only while its slice
  of the result is filled, so the result is the only full copy held."""
  m = c.model
  keys = Keys(tensors, "nanoGPT checkpoint")
  keys.ignore(lambda k: bool(MASK_BUFFER.match(k)))
  d, L, V = m.d_model, m.n_layers, padded_vocab(m)
  Ap = (m.n_heads + (m.selective.selection_heads if m.attn_kind == "selective" else 0)) * (attn_dim(m) // m.n_heads)
  want = {WTE: (V, d), WPE: (m.max_seq_len, d), "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
  for i in range(L):
    want.update({f"transformer.h.{i}.{k}": s for k, s in _layer_keys(m)})
  if HEAD in tensors or not m.tie_embeddings:
    want[HEAD] = (V, d)
  ok = {k: keys.take(k, s) is not None for k, s in want.items()}
  if m.tie_embeddings and HEAD in tensors and ok[HEAD] and ok[WTE] and not _same(tensors[HEAD], tensors[WTE]):
    keys.problems.append(f"{HEAD} differs from {WTE} but model.tie_embeddings=True")
  keys.finish()
  get = lambda k: np.asarray(tensors[k], np.float32)
  if m.attn_kind == "selective" and m.selective.latent_masks:
    biases = [f"transformer.h.{i}.{SEL_B}" for i in range(L)]
    positive = [k for k in biases if (np.asarray(tensors[k]) > 0).any()]
    if positive:
      _warn(f"{', '.join(positive)}: positive latent-mask biases; the original added them at future positions too "
            "(F[:, j] grows by j x ReLU(b)), dba_jax masks them causally, so the logits differ from the original's")

  def layer(i):
    g = lambda k: get(f"transformer.h.{i}.{k}")
    w, b = g("attn.c_attn.weight"), g("attn.c_attn.bias")
    attn = {"q": _dense(w[:Ap], b[:Ap]), "k": _dense(w[Ap:2 * Ap], b[Ap:2 * Ap]), "v": _dense(w[2 * Ap:], b[2 * Ap:]),
            "out": _dense(g("attn.c_proj.weight"), g("attn.c_proj.bias"))}
    if m.attn_kind == "selective":
      attn.update(_selective_to_params(g, m))
    return {"attn_norm": {"scale": g("ln_1.weight"), "bias": g("ln_1.bias")}, "attn": attn,
            "mlp_norm": {"scale": g("ln_2.weight"), "bias": g("ln_2.bias")},
            "mlp": {"w_in": _dense(g("mlp.c_fc.weight"), g("mlp.c_fc.bias")),
                    "w_out": _dense(g("mlp.c_proj.weight"), g("mlp.c_proj.bias"))}}

  if m.scan_layers:  # one [L, ...] array per parameter, filled a layer at a time
    first = layer(0)
    blocks = _map(lambda x: np.empty((L,) + x.shape, np.float32), first)
    for i in range(L):
      _map(lambda dst, x: dst.__setitem__(i, x), blocks, first if i == 0 else layer(i))
  else:
    blocks = {i: _map(np.ascontiguousarray, layer(i)) for i in range(L)}
  params = {"embed": np.array(get(WTE)), "pos_embed": np.array(get(WPE)), "blocks": blocks,
            "final_norm": {"scale": np.array(get("transformer.ln_f.weight")),
                           "bias": np.array(get("transformer.ln_f.bias"))}}
  if not m.tie_embeddings:
    params["head"] = {"kernel": np.ascontiguousarray(get(HEAD).T)}
  return params


def _selective_to_params(g, m) -> dict:
  """One layer's selection / protection / residual-mask parameters (torch Linear weights [out, in])."""
  out = {}
  if m.selective.combo != "none":  # Linear(heads -> 1): weight [1, H]; no bias key: a zero bias
    out["sel_combo_w"] = g(SEL_W)[0]
    out["sel_combo_b"] = g(SEL_B).reshape(()) if m.selective.combo == "with_head_zero_and_bias" else np.zeros((), np.float32)
  if m.selective.latent_masks:  # Linear(n -> heads): weight [H, n] -> [n, H]
    out["sel_latent_w"], out["sel_latent_b"] = g(SEL_W).T, g(SEL_B)
  if m.selective.protection in LINEAR_PROTECTIONS:
    out["protect_w"], out["protect_b"] = g(PROT_W)[0], g(PROT_B).reshape(())
  if m.selective.residual_masks:  # out_h = sum_g W[h, g] in_g; dba_jax mixes with einsum("bgts,gh->bhts")
    out["res_mix"] = g(RES_W).T
  return out


def _same(x, y) -> bool:
  return x is y or (x.shape == y.shape and np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32)))


# ------------------------------------------------------------------------------------------------ from_params


def _f32(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, np.float32))


def from_params(params: dict, c) -> dict:
  """A nanoGPT state dict in torch's state_dict order; a tied lm_head is the same array as wte (saved as one
  shared storage), selective models get their causal-mask buffers and selection-head tensors back."""
  m = c.model
  layout = dict(positions="learned", norm="layernorm", mlp="gelu", bias=True, attn_kind=("standard", "selective"))
  bad = [f"{k}={m[k]!r}" for k, v in layout.items() if m[k] not in (v if isinstance(v, tuple) else (v,))]
  if bad or kv_heads(m) != m.n_heads:
    raise ConversionError(f"not a nanoGPT-layout model ({', '.join(bad) or f'n_kv_heads={m.n_kv_heads}'}): needs "
                          "learned positions, layernorm, gelu, bias, standard or selective attention, all heads kv")
  blocks = params["blocks"]
  layer = (lambda i: _map(lambda x: np.asarray(x)[i], blocks)) if m.scan_layers else \
      (lambda i: blocks[i] if i in blocks else blocks[str(i)])
  wte = _f32(params["embed"])
  out = {WTE: wte, WPE: _f32(params["pos_embed"])}
  T = m.max_seq_len
  mask = np.tril(np.ones((T, T), np.float32)).reshape(1, 1, T, T) if m.attn_kind == "selective" else None
  for i in range(m.n_layers):
    p, h = layer(i), f"transformer.h.{i}."
    a = p["attn"]
    out[h + "ln_1.weight"], out[h + "ln_1.bias"] = _f32(p["attn_norm"]["scale"]), _f32(p["attn_norm"]["bias"])
    if mask is not None:
      out[h + "attn.bias"] = mask
    out[h + "attn.c_attn.weight"] = _f32(np.concatenate([np.asarray(a[x]["kernel"]).T for x in "qkv"]))
    out[h + "attn.c_attn.bias"] = _f32(np.concatenate([np.asarray(a[x]["bias"]) for x in "qkv"]))
    out[h + "attn.c_proj.weight"], out[h + "attn.c_proj.bias"] = _f32(np.asarray(a["out"]["kernel"]).T), \
        _f32(a["out"]["bias"])
    if m.attn_kind == "selective":
      out.update({h + k: v for k, v in _selective_from_params(a, m, h).items()})
    out[h + "ln_2.weight"], out[h + "ln_2.bias"] = _f32(p["mlp_norm"]["scale"]), _f32(p["mlp_norm"]["bias"])
    for name, part in (("c_fc", "w_in"), ("c_proj", "w_out")):
      out[h + f"mlp.{name}.weight"] = _f32(np.asarray(p["mlp"][part]["kernel"]).T)
      out[h + f"mlp.{name}.bias"] = _f32(p["mlp"][part]["bias"])
  out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = _f32(params["final_norm"]["scale"]), \
      _f32(params["final_norm"]["bias"])
  out[HEAD] = wte if m.tie_embeddings else _f32(np.asarray(params["head"]["kernel"]).T)
  return out


def _selective_from_params(a: dict, m, h: str) -> dict:
  """The inverse of _selective_to_params, in the original's registration order."""
  out = {}
  if m.selective.combo != "none":
    out[SEL_W] = _f32(np.asarray(a["sel_combo_w"])[None, :])
    b = np.asarray(a["sel_combo_b"], np.float32)
    if m.selective.combo == "with_head_zero_and_bias":
      out[SEL_B] = _f32(b.reshape(1))
    elif b != 0:
      raise ConversionError(f"{h}attn.sel_combo_b = {float(b)!r}, but model.selective.combo='with_head_zero' is the "
                            "original's Linear(heads -> 1) without a bias: it cannot hold it")
  if m.selective.latent_masks:
    out[SEL_W], out[SEL_B] = _f32(np.asarray(a["sel_latent_w"]).T), _f32(a["sel_latent_b"])
  if m.selective.protection in LINEAR_PROTECTIONS:
    out[PROT_W], out[PROT_B] = _f32(np.asarray(a["protect_w"])[None, :]), _f32(np.asarray(a["protect_b"]).reshape(1))
  if m.selective.residual_masks:
    out[RES_W] = _f32(np.asarray(a["res_mix"]).T)
  return out


# ----------------------------------------------------------------------------------------------- the trio


def parameter_order(c) -> list[tuple[str, tuple]]:
  """(key, torch shape) in the optimizer order of nanoGPT's / context-compression's configure_optimizers: the
  decay group (dim >= 2), the no-decay group (dim < 2), then the `selection_head` group, each in
  named_parameters order."""
  m = c.model
  d, V = m.d_model, padded_vocab(m)
  named = [(WTE, (V, d)), (WPE, (m.max_seq_len, d))]
  for i in range(m.n_layers):
    named += [(f"transformer.h.{i}.{k}", s) for k, s in _layer_keys(m)]
  named += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
  if not m.tie_embeddings:
    named.append((HEAD, (V, d)))
  own = lambda key: "selection_head" in key
  return [x for x in named if len(x[1]) >= 2 and not own(x[0])] + \
      [x for x in named if len(x[1]) < 2 and not own(x[0])] + [x for x in named if own(x[0])]


def _group_sizes(c) -> list[int]:
  order = parameter_order(c)
  own = sum("selection_head" in k for k, _ in order)
  decay = sum(len(s) >= 2 for k, s in order if "selection_head" not in k)
  return [decay, len(order) - decay - own] + ([own] if own else [])


def trio_paths(path: str) -> dict[str, str]:
  """{"optimizer": path, "dataloader": path} that go with `.../model_XXXXX.pt` ({} for other names)."""
  folder, name = os.path.split(path)
  found = re.fullmatch(r"model_(\d+)\.pt", name)
  if not found:
    return {}
  return {kind: os.path.join(folder, f"{kind}_{found.group(1)}.pt") for kind in ("optimizer", "dataloader")}


def companions(path: str) -> dict[str, str]:
  """{"optimizer": path, "dataloader": path} for the files that sit beside `.../model_XXXXX.pt`."""
  return {k: p for k, p in trio_paths(path).items() if os.path.isfile(p)}


def _warn(msg: str):
  print(f"dba-convert: warning: {msg}", file=sys.stderr)


def adam_moments(opt: dict, c, source: str) -> tuple[dict, dict, int, list]:
  """(mu, nu, step, groups) from a torch AdamW state_dict: mu / nu are params-shaped trees, step the update
  count, groups the param_groups' settings with their sizes (JSON)."""
  if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
    raise ConversionError(f"{source}: not a torch optimizer state_dict (no 'state' and 'param_groups')")
  order = parameter_order(c)
  indices = [i for g in opt["param_groups"] for i in g.get("params", [])]
  sizes = [len(g.get("params", [])) for g in opt["param_groups"]]
  if len(indices) != len(order):
    want = _group_sizes(c)
    raise ConversionError(f"{source}: the optimizer has {len(indices)} parameters in its groups {sizes} but the "
                          f"model has {len(order)} (groups decay / no decay / selection_head: {want})")
  problems, mu, nu, steps = [], {}, {}, set()
  for idx, (key, shape) in zip(indices, order):
    st = opt["state"].get(idx)
    if not isinstance(st, dict) or not all(n in st for n in ("exp_avg", "exp_avg_sq", "step")):
      problems.append(f"parameter {idx} ({key}): no AdamW state (exp_avg, exp_avg_sq, step)")
      continue
    for name in ("exp_avg", "exp_avg_sq"):
      x = st[name]
      if not is_float(x) or tuple(x.shape) != shape:
        problems.append(f"parameter {idx} ({key}): {name} {getattr(x, 'dtype', type(x))} "
                        f"{tuple(getattr(x, 'shape', ()))}, expected float {shape}")
    mu[key], nu[key] = st["exp_avg"], st["exp_avg_sq"]
    steps.add(int(np.asarray(st["step"]).item()))
  if len(steps) > 1:
    problems.append(f"parameters were updated different numbers of times: steps {sorted(steps)}")
  if problems:
    raise ConversionError(f"{source} does not fit the model ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
  if c.model.tie_embeddings:
    mu[HEAD], nu[HEAD] = mu[WTE], nu[WTE]  # the tied head has no moments of its own
  o = c.optim
  group = opt["param_groups"][0]
  differ = [f"{name} {mine} (config) vs {theirs} (file)" for name, mine, theirs in
            (("betas", (o.b1, o.b2), tuple(group.get("betas", (o.b1, o.b2)))), ("eps", o.eps, group.get("eps", o.eps)),
             ("weight_decay", o.weight_decay, group.get("weight_decay", o.weight_decay))) if mine != theirs]
  if differ:
    _warn(f"{source}: AdamW settings differ from config.optim: {'; '.join(differ)}; "
          "training continues with the config's")
  groups = [{"n_params": n, **{k: _json(v) for k, v in g.items() if k != "params"}}
            for n, g in zip(sizes, opt["param_groups"])]
  return to_params(mu, c), to_params(nu, c), (steps.pop() if steps else 0), groups


def _json(x):
  """A param_group setting as JSON (betas a list; tensors, e.g. a capturable lr, as floats)."""
  if isinstance(x, (tuple, list)):
    return [_json(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.item()
  return x if x is None or isinstance(x, (bool, int, float, str)) else str(x)


def companion_state(path: str, c, load) -> dict:
  """What the trio adds to the conversion: {"mu", "nu", "step"} from the optimizer file and {"meta"} entries.
  `load` reads a checkpoint file (torch_io.load)."""
  files = companions(path)
  out: dict = {"meta": {}}
  if "optimizer" in files:
    opt = load(files["optimizer"])
    sd = opt.get("optimizer", opt) if isinstance(opt, dict) else opt
    out["mu"], out["nu"], out["step"], groups = adam_moments(sd, c, files["optimizer"])
    out["meta"]["torch_optimizer"] = files["optimizer"]
    out["meta"]["torch_param_groups"] = groups
  if "dataloader" in files:
    dl = load(files["dataloader"])
    pos = {k: int(np.asarray(dl[k]).item()) for k in ("current_shard", "current_position")
           if isinstance(dl, dict) and k in dl}
    out["meta"]["torch_dataloader"] = pos
    _warn(f"{files['dataloader']}: the nanoGPT data position {pos} has no dba_jax iterator equivalent (different "
          "shard order and window shuffling); recorded in meta['torch_dataloader'] only")
  return out


def trio(out: str, state: dict, c, mu, nu, count: int, meta: dict) -> dict[str, object]:
  """{path: object} to write for `--to-torch --out .../model_XXXXX.pt` ({out: state} for other names): the model
  file as the training loop saves it, the AdamW state_dict when the optimizer has taken steps, the dataloader
  position when one is recorded. `state` is from_params's state dict; mu / nu the optax Adam moments."""
  paths = trio_paths(out)
  if not paths:
    return {out: state}
  torch_step = meta.get("torch_step", max(count - 1, 0))  # the loop index of the last update, as nanoGPT saves it
  files: dict[str, object] = {out: {"model": state, "step": int(torch_step)}}
  if count > 0:
    files[paths["optimizer"]] = {"optimizer": optimizer_state_dict(mu, nu, count, c, meta.get("torch_param_groups"))}
  if isinstance(meta.get("torch_dataloader"), dict):
    files[paths["dataloader"]] = dict(meta["torch_dataloader"])
  return files


def optimizer_state_dict(mu, nu, count: int, c, groups: list | None = None) -> dict:
  """A torch AdamW state_dict for the optax moments: parameters numbered in parameter_order, every one at step
  `count`; group settings as recorded on import, else config.optim's (no-decay and selection_head groups
  without weight decay)."""
  order = parameter_order(c)
  sizes = _group_sizes(c)
  mu_sd, nu_sd = from_params(mu, c), from_params(nu, c)
  # One step tensor per parameter: torch's AdamW increments each in place.
  state = {i: {"step": np.asarray(count, np.float32), "exp_avg": mu_sd[k], "exp_avg_sq": nu_sd[k]}
           for i, (k, _) in enumerate(order)}
  if groups and len(groups) >= len(sizes) and sum(g.get("n_params", 0) for g in groups) == len(order):
    settings = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items() if k != "n_params"} for g in groups]
    sizes = [g["n_params"] for g in groups]
  else:
    o = c.optim
    base = {"lr": o.lr, "betas": (o.b1, o.b2), "eps": o.eps, "amsgrad": False, "foreach": None, "maximize": False,
            "capturable": False, "differentiable": False, "fused": None}
    wd = [o.weight_decay, 0.0, 0.0]
    settings = [{**base, "weight_decay": wd[j]} for j in range(len(sizes))]
    if len(sizes) == 3:
      settings[2]["lr"] = o.lr * c.model.selective.combo_lr_scale
  starts = np.cumsum([0] + sizes)
  return {"state": state, "param_groups": [{**g, "params": list(range(int(starts[j]), int(starts[j + 1])))}
                                           for j, g in enumerate(settings)]}
