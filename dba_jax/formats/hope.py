"""nested_learning (HOPE) checkpoints <-> dba_jax parameters (hope_latentwire.md A, "State-dict keys").

Read: `embed.weight` [V, d] (= `lm_head.weight`, stored twice), `norm.{weight,bias}`, and per block i
  attention (all but hope_selfmod): blocks.i.attn.qkv.weight [3d, d], attn.out_proj.weight [d, d],
                    attn.norm.{weight,bias}, attn.local_conv.weight [d, 1, w] (optional);
  CMS levels (hope_attention, hope_selfmod, hope_hybrid): blocks.i.cms.blocks.<level>.net.0.{weight,bias} (LN),
                    net.1.{weight [h, d], bias}, net.3.{weight [d, h], bias}, levels in the file's order (fastest
                    first);
  hope_transformer: blocks.i.mlp.norm.{weight,bias}, mlp.net.0.weight [h, d], mlp.net.2.weight [d, h];
  hope_selfmod:     blocks.i.selfmod.local_conv.weight [d, 1, w] (optional), selfmod.w_q.weight [d, d],
                    selfmod.m_{k,v,q,memory}.{w2,w1}.weight [d, d], selfmod.m_{eta,alpha}.w2.weight [d, d],
                    .w1.weight [1, d], .w_skip.weight [1, d] (optional: model.hope.selfmod_skip);
  hope_hybrid:      blocks.i.titan_memory.net.{0,2}.{weight,bias} ([h, d], [d, h]), titan_memory.norm.*,
                    self_modifier.net.{0,2,4}.{weight,bias} ([h, 3d], [h, h], [d, h]).
The block comes from the keys and the sizes from the shapes. What they cannot tell (the head count, the level
periods, the Titan period, the self-modifying write's settings) comes from the file's pickled training config
(`{model, optimizer, step, config}` files; missing entries take the original's defaults) or from --config, which
wins.
"""
from __future__ import annotations

import re

import numpy as np

from dba_jax.conversion import GIVEN, ConversionError, Keys, given

NAME = "hope"
BLOCK = re.compile(r"blocks\.(\d+)\.")
LEVEL = re.compile(r"blocks\.0\.cms\.blocks\.([^.]+)\.net\.1\.weight$")
SELFMOD, TITAN = "blocks.0.selfmod.w_q.weight", "blocks.0.titan_memory.net.0.weight"
MEMORIES = ("k", "v", "q", "memory", "eta", "alpha")
# (ours, theirs) per module; weights of torch Linear layers are transposed.
TITAN_KEYS = [("w1", "net.0.weight"), ("b1", "net.0.bias"), ("w2", "net.2.weight"), ("b2", "net.2.bias"),
              ("norm_scale", "norm.weight"), ("norm_bias", "norm.bias")]
MODIFIER_KEYS = [(f"{w}{i + 1}", f"net.{2 * i}.{t}") for i in range(3) for w, t in (("w", "weight"), ("b", "bias"))]
# The original's pickled model config -> model.hope fields (with its defaults for keys a file lacks).
SAVED_SELFMOD = [("self_mod_lr", "selfmod_lr", 1e-3), ("self_mod_chunk_size", "selfmod_chunk", 1),
                 ("self_mod_objective", "selfmod_objective", "l2"),
                 ("self_mod_stopgrad_vhat", "selfmod_stopgrad_vhat", True),
                 ("self_mod_use_rank1_precond", "selfmod_rank1", True), ("self_mod_use_alpha", "selfmod_alpha", True),
                 ("self_mod_momentum", "selfmod_momentum", 0.0), ("self_mod_adaptive_q", "selfmod_adaptive_q", False),
                 ("qk_l2_norm", "qk_l2_norm", False)]


def detect(keys) -> bool:
  return "embed.weight" in keys and ("blocks.0.attn.qkv.weight" in keys or SELFMOD in keys)


def _levels(t: dict) -> list[str]:
  return [mt.group(1) for k in t if (mt := LEVEL.match(k))]


def _block_of(t: dict) -> str:
  if SELFMOD in t:
    return "hope_selfmod"
  if TITAN in t:
    return "hope_hybrid"
  return "hope_attention" if _levels(t) else "hope_transformer"


def _set(c, field: str, value, why: str):
  """c.<field> = value, unless the user chose another value (then a ConversionError naming both)."""
  section, *path = field.split(".")
  node = c[section]
  for p in path[:-1]:
    node = node[p]
  if given(c, field) and node[path[-1]] != value:
    raise ConversionError(f"hope checkpoint: {why} sets {field}={value!r}, but the config says {node[path[-1]]!r}")
  node[path[-1]] = value


def config_from_saved(saved, c, tensors: dict | None = None):
  """What the original's pickled training config tells that the shapes cannot (each only when the user gave none):
  the head count, the CMS level periods, the Titan period and the self-modifying write's settings."""
  model = saved.get("model") if isinstance(saved, dict) else getattr(saved, "model", None)
  if not isinstance(model, dict):
    return c
  h = c.model.hope

  def take(field, value):  # counts as given from here on (config_from then trusts it)
    if not given(c, field):
      _set(c, field, value, "the file's config")
      GIVEN.add(field)
  if isinstance(model.get("heads"), int):
    take("model.n_heads", model["heads"])
  levels = model.get("cms_levels")
  if isinstance(levels, (list, tuple)) and levels and all(isinstance(lv, dict) for lv in levels):
    take("model.hope.cms_periods", tuple(int(lv["update_period"]) for lv in levels))
  titan = model.get("titan_level")
  if isinstance(titan, dict) and "update_period" in titan:
    take("model.hope.titan_period", int(titan["update_period"]))
  for theirs, ours, default in SAVED_SELFMOD:
    take(f"model.hope.{ours}", type(default)(model.get(theirs, default)))
  memory_chunk = model.get("self_mod_chunk_size_memory")
  take("model.hope.selfmod_chunk_memory", int(memory_chunk) if memory_chunk is not None else h.selfmod_chunk)
  return c


def config_from(tensors: dict, c):
  t, m = tensors, c.model
  if not detect(t):
    raise ConversionError(f"not a nested_learning HOPE checkpoint: no embed.weight with blocks.0.attn.qkv.weight or "
                          f"{SELFMOD}; its {len(t)} keys include {sorted(t)[:12]}")
  V, d = t["embed.weight"].shape
  layers = sorted({int(mt.group(1)) for k in t if (mt := BLOCK.match(k))})
  if layers != list(range(len(layers))):
    raise ConversionError(f"hope checkpoint: blocks.N found for N in {layers}; expected 0 .. L-1")
  block = _block_of(t)
  fixed = {"d_model": d, "n_layers": len(layers), "positions": "none", "norm": "layernorm", "tie_embeddings": True,
           "bias": True, "attn_kind": "standard", "n_kv_heads": 0, "attn_dim": 0, "scale_residual_init": False,
           "block": block}
  if not given(c, "model.vocab_size"):
    fixed.update(vocab_size=V, pad_vocab_to=1)
  for field, value in fixed.items():
    _set(c, f"model.{field}", value, f"embed.weight {tuple(t['embed.weight'].shape)} and its blocks")
  levels = _levels(t)
  if block == "hope_selfmod":  # no attention: any head count that divides d serves
    if not given(c, "model.n_heads") or d % m.n_heads:
      m.n_heads = 1
  elif not given(c, "model.n_heads") or d % m.n_heads:
    fits = [f"{d // D} (heads of {D})" for D in (64, 128, 32, 16, 8) if d % D == 0][:3]
    raise ConversionError(f"blocks.0.attn.qkv.weight is {tuple(t['blocks.0.attn.qkv.weight'].shape)}: the head count "
                          "cannot be read from shapes; give --config.model.n_heads" +
                          (f", e.g. {' or '.join(fits)}" if fits else ""))
  if block != "hope_transformer" and not levels:
    raise ConversionError(f"hope checkpoint: a {block} block without CMS levels (blocks.0.cms.blocks.*); dba_jax's "
                          "HOPE blocks need at least one")
  hidden_key = f"blocks.0.cms.blocks.{levels[0]}.net.1.weight" if levels else "blocks.0.mlp.net.0.weight"
  m.hope.cms_hidden_mult = t[hidden_key].shape[0] // d
  if levels and len(levels) != len(m.hope.cms_periods):
    raise ConversionError(f"hope checkpoint: {len(levels)} CMS levels {levels}, but model.hope.cms_periods="
                          f"{tuple(m.hope.cms_periods)}; give one period per level (--config.model.hope.cms_periods)")
  conv = "blocks.0.attn.local_conv.weight"
  m.hope.local_conv = int(t[conv].shape[-1]) if conv in t else 0
  if block == "hope_selfmod":
    conv = "blocks.0.selfmod.local_conv.weight"
    _set(c, "model.hope.selfmod_conv", int(t[conv].shape[-1]) if conv in t else 0, conv)
    _set(c, "model.hope.selfmod_skip", "blocks.0.selfmod.m_eta.w_skip.weight" in t, "blocks.0.selfmod.m_eta.w_skip")
  if block == "hope_hybrid":
    _set(c, "model.hope.titan_hidden_mult", t[TITAN].shape[0] // d, TITAN)
    key = "blocks.0.self_modifier.net.0.weight"
    _set(c, "model.hope.self_mod_hidden", t[key].shape[0] // d if key in t else 4, key)
  return c


def _level_keys(m) -> list[tuple[str, str]]:
  if m.block != "hope_transformer":
    return [("norm_scale", "net.0.weight"), ("norm_bias", "net.0.bias"), ("w1", "net.1.weight"),
            ("b1", "net.1.bias"), ("w2", "net.3.weight"), ("b2", "net.3.bias")]
  return [("norm_scale", "norm.weight"), ("norm_bias", "norm.bias"), ("w1", "net.0.weight"), ("w2", "net.2.weight")]


def _prefixes(names, m) -> list[str]:
  """The torch prefix of each level of a block: cms.blocks.<name>. or mlp."""
  if m.block != "hope_transformer":
    return [f"cms.blocks.{name}." for name in names]
  return ["mlp."]


def _selfmod_shapes(m) -> dict:
  """torch shapes of one selfmod block's tensors, by torch name (after `blocks.i.selfmod.`)."""
  d, h = m.d_model, m.hope
  shapes = {"w_q.weight": (d, d)}
  if h.selfmod_conv:
    shapes["local_conv.weight"] = (d, 1, h.selfmod_conv)
  for name in MEMORIES:
    out = 1 if name in ("eta", "alpha") else d
    shapes.update({f"m_{name}.w2.weight": (d, d), f"m_{name}.w1.weight": (out, d)})
    if h.selfmod_skip and out != d:
      shapes[f"m_{name}.w_skip.weight"] = (out, d)
  return shapes


def _hybrid_shapes(m) -> dict:
  """torch shapes of one hybrid block's Titan level and SelfModifier, by (module, ours)."""
  d, h = m.d_model, m.hope
  ht, hs = h.titan_hidden_mult * d, h.self_mod_hidden * d
  return {("titan", "w1"): (ht, d), ("titan", "b1"): (ht,), ("titan", "w2"): (d, ht), ("titan", "b2"): (d,),
          ("titan", "norm_scale"): (d,), ("titan", "norm_bias"): (d,),
          ("modifier", "w1"): (hs, 3 * d), ("modifier", "b1"): (hs,), ("modifier", "w2"): (hs, hs),
          ("modifier", "b2"): (hs,), ("modifier", "w3"): (d, hs), ("modifier", "b3"): (d,)}


def _selfmod_ours(torch_name: str) -> tuple:
  """A selfmod tensor's place in dba_jax's block: ("w_q",), ("conv",) or ("m_k", "w2"), ..."""
  if torch_name in ("w_q.weight", "local_conv.weight"):
    return ("w_q",) if torch_name == "w_q.weight" else ("conv",)
  module, param, _ = torch_name.split(".")
  return module, param


def _hybrid_prefix(module: str) -> str:
  return "titan_memory." if module == "titan" else "self_modifier."


def _hybrid_theirs(module: str, ours: str) -> str:
  return dict(TITAN_KEYS if module == "titan" else MODIFIER_KEYS)[ours]


def _to_ours(torch_name: str, x):
  """torch [out, in] Linear weights and [d, 1, w] conv kernels -> dba_jax layouts."""
  if x is None:
    return None
  x = np.asarray(x, np.float32)
  if x.ndim == 3:
    return np.ascontiguousarray(x[:, 0, :].T)
  return _t(x) if x.ndim == 2 else x


def _to_theirs(x, shape):
  x = np.asarray(x, np.float32)
  if len(shape) == 3:
    return np.ascontiguousarray(x.T[:, None, :])
  return _t(x) if len(shape) == 2 else x


def to_params(tensors: dict, c) -> dict:
  m = c.model
  d, h = m.d_model, m.hope.cms_hidden_mult * m.d_model
  keys = Keys(tensors, "hope checkpoint")
  V = -(-m.vocab_size // m.pad_vocab_to) * m.pad_vocab_to
  embed = np.zeros((V, d), np.float32)
  embed[:m.vocab_size] = keys.take("embed.weight", (m.vocab_size, d))
  head = tensors.get("lm_head.weight")
  keys.ignore(lambda k: k == "lm_head.weight")  # the tied head, stored twice
  if head is not None and not np.array_equal(np.asarray(head, np.float32), embed[:m.vocab_size]):
    raise ConversionError("hope checkpoint: lm_head.weight differs from embed.weight; dba_jax ties them")
  prefixes = _prefixes(_levels(tensors), m)
  blocks = []
  for i in range(m.n_layers):
    b = f"blocks.{i}."
    block = {}
    if m.block != "hope_selfmod":
      qkv = keys.take(b + "attn.qkv.weight", (3 * d, d))
      block["attn"] = {"qkv": None if qkv is None else qkv.reshape(3, d, d).transpose(2, 0, 1),
                       "out": _t(keys.take(b + "attn.out_proj.weight", (d, d))),
                       "norm_scale": keys.take(b + "attn.norm.weight", (d,)),
                       "norm_bias": keys.take(b + "attn.norm.bias", (d,))}
      if m.hope.local_conv:
        block["attn"]["conv"] = _to_ours("conv", keys.take(b + "attn.local_conv.weight", (d, 1, m.hope.local_conv)))
    levels = {}
    for j, pre in enumerate(prefixes):
      shapes = {"norm_scale": (d,), "norm_bias": (d,), "w1": (h, d), "b1": (h,), "w2": (d, h), "b2": (d,)}
      lv = {ours: keys.take(b + pre + theirs, shapes[ours]) for ours, theirs in _level_keys(m)}
      levels[j] = {k: (_t(v) if k in ("w1", "w2") else v) for k, v in lv.items()}
    block["levels"] = levels
    if m.block == "hope_selfmod":
      for name, shape in _selfmod_shapes(m).items():
        place, x = _selfmod_ours(name), _to_ours(name, keys.take(b + "selfmod." + name, shape))
        if len(place) == 1:
          block[place[0]] = x
        else:
          block.setdefault(place[0], {})[place[1]] = x
    if m.block == "hope_hybrid":
      for (module, ours), shape in _hybrid_shapes(m).items():
        name = b + _hybrid_prefix(module) + _hybrid_theirs(module, ours)
        block.setdefault(module, {})[ours] = _to_ours(name, keys.take(name, shape))
    blocks.append(block)
  final = {"scale": keys.take("norm.weight", (d,)), "bias": keys.take("norm.bias", (d,))}
  keys.finish()
  out_blocks = _tree_map(lambda *xs: np.stack(xs), *blocks) if m.scan_layers else dict(enumerate(blocks))
  return {"embed": embed, "final_norm": final, "blocks": out_blocks}


def layout_of(tensors: dict) -> dict:
  """The CMS level names, so --to-torch writes the keys back as they came."""
  return {"levels": _levels(tensors)}


def _t(x):
  return None if x is None else np.ascontiguousarray(np.asarray(x, np.float32).T)


def _tree_map(fn, *trees):
  if isinstance(trees[0], dict):
    return {k: _tree_map(fn, *(t[k] for t in trees)) for k in trees[0]}
  return fn(*trees)


def from_params(params: dict, c, layout: dict | None = None) -> dict:
  m = c.model
  if m.block == "hope_selfmod" and m.hope.selfmod_alpha_init:
    raise ConversionError(f"model.hope.selfmod_alpha_init={m.hope.selfmod_alpha_init}: the original's α = σ(M_α(x)) "
                          "has no offset to carry it (its M_α has no bias)")
  d = m.d_model
  f32 = lambda x: np.asarray(x, np.float32)
  out = {"embed.weight": f32(params["embed"])[:m.vocab_size]}
  names = (layout or {}).get("levels") or [f"level{j}" for j in range(len(m.hope.cms_periods))]
  prefixes = _prefixes(names, m)
  for i in range(m.n_layers):
    p = _tree_map(lambda x: x[i], params["blocks"]) if m.scan_layers else params["blocks"][i]
    b = f"blocks.{i}."
    if m.block != "hope_selfmod":
      a = p["attn"]
      out[b + "attn.qkv.weight"] = f32(a["qkv"]).transpose(1, 2, 0).reshape(3 * d, d)
      out[b + "attn.out_proj.weight"] = _t(a["out"])
      out[b + "attn.norm.weight"], out[b + "attn.norm.bias"] = f32(a["norm_scale"]), f32(a["norm_bias"])
      if "conv" in a:
        out[b + "attn.local_conv.weight"] = _to_theirs(a["conv"], (d, 1, 0))
    for j, pre in enumerate(prefixes):
      lv = p["levels"][j] if j in p["levels"] else p["levels"][str(j)]
      for ours, theirs in _level_keys(m):
        out[b + pre + theirs] = _t(lv[ours]) if ours in ("w1", "w2") else f32(lv[ours])
    if m.block == "hope_selfmod":
      for name, shape in _selfmod_shapes(m).items():
        place = _selfmod_ours(name)
        x = p[place[0]] if len(place) == 1 else p[place[0]][place[1]]
        out[b + "selfmod." + name] = _to_theirs(x, shape)
    if m.block == "hope_hybrid":
      for (module, ours), shape in _hybrid_shapes(m).items():
        out[b + _hybrid_prefix(module) + _hybrid_theirs(module, ours)] = _to_theirs(p[module][ours], shape)
  out["norm.weight"], out["norm.bias"] = f32(params["final_norm"]["scale"]), f32(params["final_norm"]["bias"])
  out["lm_head.weight"] = out["embed.weight"].copy()
  return out
