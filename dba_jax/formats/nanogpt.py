"""nanoGPT / context-compression GPT-2 checkpoints (selective.md §6, §8) <-> dba_jax parameters.

A checkpoint is `model_XXXXX.pt` = {"model": state_dict, "config": GPTConfig, "step", "val_loss", ...} or a raw
state dict; dba-convert unwraps it and strips `_orig_mod.` / `module.`. Key map (i = layer; PyTorch Linear weights
[out, in] become kernels [in, out]; dba_jax params are `blocks[i]...`, or `blocks...[i]` with scan_layers; A = the
attention width n_heads x head_dim, which may differ from n_embd = d):

  nanoGPT key                              shape          dba_jax param
  transformer.wte.weight                   [V, d]         embed (V = padded vocab: 50304, or 50257, or ...)
  transformer.wpe.weight                   [T, d]         pos_embed (T = model.max_seq_len)
  transformer.h.{i}.ln_1.weight / .bias    [d]            attn_norm.scale / .bias
  transformer.h.{i}.attn.c_attn.weight     [3A, d]        rows [q | k | v], each head-major: attn.q/k/v.kernel [d, A]
  transformer.h.{i}.attn.c_attn.bias       [3A]           attn.q/k/v.bias
  transformer.h.{i}.attn.c_proj.weight     [d, A]         attn.out.kernel [A, d] (+ .bias [d])
  transformer.h.{i}.ln_2.weight / .bias    [d]            mlp_norm.scale / .bias
  transformer.h.{i}.mlp.c_fc.weight        [4d, d]        mlp.w_in.kernel (+ .bias)
  transformer.h.{i}.mlp.c_proj.weight      [d, 4d]        mlp.w_out.kernel (+ .bias)
  transformer.ln_f.weight / .bias          [d]            final_norm.scale / .bias
  lm_head.weight                           [V, d]         tied to wte (must be equal); untied: head.kernel
  transformer.h.{i}.attn.bias              [1,1,T,T]      the selective class's causal-mask buffer: ignored on
                                                          import, written back (tril of ones) for attn_kind selective

The config gets the GPT-2 layout (learned positions, LayerNorm eps 1e-5 with biases, tanh-GELU MLP, biases, tied
head) and every size the shapes tell. The head count cannot be told when A = heads x 64 = 12 x 64 or 13 x 64 ...:
it comes from --config (model.n_heads) or else from the pickled GPTConfig's n_head; A / n_heads must divide.
vocab_size is the wte rows unless --config gives it (50257 inside 50304 rows), and pad_vocab_to is chosen so the
padded vocab is exactly the wte rows. Selective checkpoints have the same weights: convert them with
--config.model.attn_kind=selective (selection variants that add parameters are refused).

The training trio. Beside `model_XXXXX.pt`, `optimizer_XXXXX.pt` = {"optimizer": AdamW state_dict, "rng_state",
"cuda_rng_state"} and `dataloader_XXXXX.pt` = {"current_shard", "current_position"} are read when present:
  - AdamW `exp_avg` / `exp_avg_sq` become optax's ScaleByAdamState mu / nu, laid out like the params (transposed,
    c_attn split, layers stacked). Torch numbers parameters by group: configure_optimizers puts the parameters with
    dim >= 2 first (named_parameters order: wte, wpe, then per layer c_attn.weight, attn c_proj.weight,
    c_fc.weight, mlp c_proj.weight), then those with dim < 2 (LayerNorm weights and biases, Linear biases, ln_f),
    the tied lm_head never separately. Every index is checked against its parameter's shape.
  - the AdamW `step` (updates done) becomes the optax counts (Adam's bias correction and the lr schedule) and the
    dba_jax run's step: the checkpoint is written at that step and `dba-train --workdir` resumes from it with the
    same schedule position. torch's own `step` entry of the model file (the loop index) is kept in meta.
  - AdamW betas / eps / weight decay are not taken over: a warning names those that differ from config.optim.
  - The dataloader position cannot become dba_jax's data-iterator state (dba_jax shuffles fixed-length windows
    with grain; nanoGPT walks shuffled shards contiguously), so it is recorded as meta["torch_dataloader"] with a
    warning, and the dba_jax iterator continues at its own batch `step`. The torch / CUDA RNG states are dropped.
"""
from __future__ import annotations

import copy
import os
import re
import sys

import numpy as np

from dba_jax.config import attn_dim, kv_heads, padded_vocab
from dba_jax.formats import GIVEN, ConversionError, Keys, given, is_float

NAME = "nanogpt"
WTE, WPE, HEAD = "transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"
LAYER = re.compile(r"transformer\.h\.(\d+)\.")
MASK_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.bias$")
# Layer parameters in the order of the torch module's named_parameters (and state_dict, less the buffer).
LAYER_KEYS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
              "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
              "mlp.c_proj.weight", "mlp.c_proj.bias")
# Selective-attention options that add parameters the nanoGPT keys do not carry.
EXTRA_PARAMS = {"sel_mask_heads": 0, "sel_combo": "none", "sel_latent_masks": 0, "sel_residual_masks": False,
                "sel_protection": ("none", "zero", "head_two", "leaky_relu", "big_constant")}


def detect(keys) -> bool:
  return WTE in keys and WPE in keys and any(k.startswith("transformer.h.0.attn.c_attn.") for k in keys)


# ------------------------------------------------------------------------------------------------- config


def _set(c, field: str, value, why: str):
  """c.model.field = value because of `why`; an error when the user set it to something else."""
  if given(c, f"model.{field}") and c.model[field] != value:
    raise ConversionError(f"{why}, so model.{field}={value!r}, but the config says model.{field}={c.model[field]!r}")
  c.model[field] = value


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


def config_from_saved(saved, c):
  """The head count from a pickled GPTConfig (a torch_io.StandIn or any object with `n_head`), when the user
  gave none; the shapes are checked against it in config_from."""
  n_head = getattr(saved, "n_head", None)
  if isinstance(n_head, int) and not given(c, "model.n_heads"):
    c = copy.deepcopy(c)
    c.model.n_heads = n_head
    GIVEN.add("model.n_heads")
  return c


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
  for field, ok in EXTRA_PARAMS.items():
    if m[field] not in (ok if isinstance(ok, tuple) else (ok,)):
      raise ConversionError(f"model.{field}={m[field]!r} adds parameters that nanoGPT checkpoints do not hold")
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

  # Attention widths: c_attn rows = 3 x A, c_proj [d, A]; heads from the config.
  qkv = "transformer.h.0.attn.c_attn.weight"
  rows = shape(qkv)[0]
  A = rows // 3
  if not given(c, "model.n_heads"):
    raise ConversionError(f"{qkv} has shape {shape(qkv)}: {A} attention features, but the head count cannot be "
                          "read from shapes; give --config.model.n_heads (e.g. 12 or 13 for heads of 64)")
  H = m.n_heads
  if rows % 3 or A % H:
    raise ConversionError(f"{qkv} has shape {shape(qkv)}: its rows / 3 = {rows / 3:g} attention features do not "
                          f"split into model.n_heads={H} heads")
  if kv_heads(m) != H:
    raise ConversionError(f"model.n_kv_heads={m.n_kv_heads}: nanoGPT attention has as many kv heads as heads ({H})")
  if given(c, "model.attn_dim") and attn_dim(m) != A:
    raise ConversionError(f"{qkv} has shape {shape(qkv)}: attention width {A}, but model.attn_dim={attn_dim(m)}")
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
  d, L, A, F, V = m.d_model, m.n_layers, attn_dim(m), m.d_ff, padded_vocab(m)
  want = {WTE: (V, d), WPE: (m.max_seq_len, d), "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
  for i in range(L):
    want.update({f"transformer.h.{i}.{k}": s for k, s in zip(LAYER_KEYS, _layer_shapes(d, A, F))})
  if HEAD in tensors or not m.tie_embeddings:
    want[HEAD] = (V, d)
  ok = {k: keys.take(k, s) is not None for k, s in want.items()}
  if m.tie_embeddings and HEAD in tensors and ok[HEAD] and ok[WTE] and not _same(tensors[HEAD], tensors[WTE]):
    keys.problems.append(f"{HEAD} differs from {WTE} but model.tie_embeddings=True")
  keys.finish()
  get = lambda k: np.asarray(tensors[k], np.float32)

  def layer(i):
    g = lambda k: get(f"transformer.h.{i}.{k}")
    w, b = g("attn.c_attn.weight"), g("attn.c_attn.bias")
    return {"attn_norm": {"scale": g("ln_1.weight"), "bias": g("ln_1.bias")},
            "attn": {"q": _dense(w[:A], b[:A]), "k": _dense(w[A:2 * A], b[A:2 * A]),
                     "v": _dense(w[2 * A:], b[2 * A:]), "out": _dense(g("attn.c_proj.weight"), g("attn.c_proj.bias"))},
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


def _same(x, y) -> bool:
  return x is y or (x.shape == y.shape and np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32)))


def _layer_shapes(d, A, F):
  return [(d,), (d,), (3 * A, d), (3 * A,), (d, A), (d,), (d,), (d,), (F, d), (F,), (d, F), (d,)]


# ------------------------------------------------------------------------------------------------ from_params


def _f32(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, np.float32))


def from_params(params: dict, c) -> dict:
  """A nanoGPT state dict in torch's state_dict order; a tied lm_head is the same array as wte (saved as one
  shared storage), selective models get their causal-mask buffers back."""
  m = c.model
  layout = dict(positions="learned", norm="layernorm", mlp="gelu", bias=True, attn_kind=("standard", "selective"))
  bad = [f"{k}={m[k]!r}" for k, v in layout.items() if m[k] not in (v if isinstance(v, tuple) else (v,))]
  bad += [f"{k}={m[k]!r}" for k, ok in EXTRA_PARAMS.items() if m[k] not in (ok if isinstance(ok, tuple) else (ok,))]
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
    out[h + "ln_2.weight"], out[h + "ln_2.bias"] = _f32(p["mlp_norm"]["scale"]), _f32(p["mlp_norm"]["bias"])
    for name, part in (("c_fc", "w_in"), ("c_proj", "w_out")):
      out[h + f"mlp.{name}.weight"] = _f32(np.asarray(p["mlp"][part]["kernel"]).T)
      out[h + f"mlp.{name}.bias"] = _f32(p["mlp"][part]["bias"])
  out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = _f32(params["final_norm"]["scale"]), \
      _f32(params["final_norm"]["bias"])
  out[HEAD] = wte if m.tie_embeddings else _f32(np.asarray(params["head"]["kernel"]).T)
  return out


# ----------------------------------------------------------------------------------------------- the trio


def parameter_order(c) -> list[tuple[str, tuple]]:
  """(key, torch shape) in nanoGPT's optimizer order: the decay group (dim >= 2), then the no-decay group."""
  m = c.model
  d, A, F, V = m.d_model, attn_dim(m), m.d_ff, padded_vocab(m)
  named = [(WTE, (V, d)), (WPE, (m.max_seq_len, d))]
  for i in range(m.n_layers):
    named += [(f"transformer.h.{i}.{k}", s) for k, s in zip(LAYER_KEYS, _layer_shapes(d, A, F))]
  named += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
  if not m.tie_embeddings:
    named.append((HEAD, (V, d)))
  return [x for x in named if len(x[1]) >= 2] + [x for x in named if len(x[1]) < 2]


def companions(path: str) -> dict[str, str]:
  """{"optimizer": path, "dataloader": path} for the files that sit beside `.../model_XXXXX.pt`."""
  folder, name = os.path.split(path)
  found = re.fullmatch(r"model_(\d+)\.pt", name)
  if not found:
    return {}
  paths = {kind: os.path.join(folder, f"{kind}_{found.group(1)}.pt") for kind in ("optimizer", "dataloader")}
  return {k: p for k, p in paths.items() if os.path.isfile(p)}


def _warn(msg: str):
  print(f"dba-convert: warning: {msg}", file=sys.stderr)


def adam_moments(opt: dict, c, source: str) -> tuple[dict, dict, int]:
  """(mu, nu, step) from a torch AdamW state_dict: mu / nu are params-shaped trees, step the update count."""
  if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
    raise ConversionError(f"{source}: not a torch optimizer state_dict (no 'state' and 'param_groups')")
  order = parameter_order(c)
  indices = [i for g in opt["param_groups"] for i in g.get("params", [])]
  if len(indices) != len(order):
    raise ConversionError(f"{source}: the optimizer has {len(indices)} parameters in its groups but the model "
                          f"has {len(order)} ({sum(len(s) >= 2 for _, s in order)} decayed + "
                          f"{sum(len(s) < 2 for _, s in order)} not)")
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
  return to_params(mu, c), to_params(nu, c), steps.pop()


def companion_state(path: str, c, load) -> dict:
  """What the trio adds to the conversion: {"mu", "nu", "step"} from the optimizer file and {"meta"} entries.
  `load` reads a checkpoint file (torch_io.load)."""
  files = companions(path)
  out: dict = {"meta": {}}
  if "optimizer" in files:
    opt = load(files["optimizer"])
    sd = opt.get("optimizer", opt) if isinstance(opt, dict) else opt
    out["mu"], out["nu"], out["step"] = adam_moments(sd, c, files["optimizer"])
    out["meta"]["torch_optimizer"] = files["optimizer"]
  if "dataloader" in files:
    dl = load(files["dataloader"])
    pos = {k: int(np.asarray(dl[k]).item()) for k in ("current_shard", "current_position")
           if isinstance(dl, dict) and k in dl}
    out["meta"]["torch_dataloader"] = pos
    _warn(f"{files['dataloader']}: the nanoGPT data position {pos} has no dba_jax iterator equivalent (different "
          "shard order and window shuffling); recorded in meta['torch_dataloader'] only")
  return out
