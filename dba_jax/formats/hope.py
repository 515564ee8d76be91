"""nested_learning (HOPE) checkpoints <-> dba_jax parameters (hope_latentwire.md A, "State-dict keys").

Read: `embed.weight` [V, d] (= `lm_head.weight`, stored twice), `norm.{weight,bias}`, and per block i
  blocks.i.attn.qkv.weight [3d, d], attn.out_proj.weight [d, d], attn.norm.{weight,bias}, attn.local_conv.weight
  [d, 1, w] (optional);
  hope_attention:   blocks.i.cms.blocks.<level>.net.0.{weight,bias} (LN), net.1.{weight [h, d], bias},
                    net.3.{weight [d, h], bias}, levels in the file's order (fastest first);
  hope_transformer: blocks.i.mlp.norm.{weight,bias}, mlp.net.0.weight [h, d], mlp.net.2.weight [d, h].
Sizes come from the shapes; the head count and the level periods do not: they come from --config (or the file's
pickled config through dba-convert). hope_hybrid (titan_memory, self_modifier) and hope_selfmod are refused by name.
"""
from __future__ import annotations

import re

import numpy as np

from dba_jax.conversion import ConversionError, Keys, given

NAME = "hope"
BLOCK = re.compile(r"blocks\.(\d+)\.")
LEVEL = re.compile(r"blocks\.0\.cms\.blocks\.([^.]+)\.net\.1\.weight$")
NOT_BUILT = re.compile(r"blocks\.\d+\.(titan_memory|self_modifier|selfmod)\.")


def detect(keys) -> bool:
  return "embed.weight" in keys and "blocks.0.attn.qkv.weight" in keys


def _levels(t: dict) -> list[str]:
  return [mt.group(1) for k in t if (mt := LEVEL.match(k))]


def config_from(tensors: dict, c):
  t, m = tensors, c.model
  bad = sorted({mt.group(1) for k in t if (mt := NOT_BUILT.match(k))})
  if bad:
    raise ConversionError(f"hope checkpoint: blocks with {bad} (hope_hybrid / hope_selfmod) are not built in dba_jax yet")
  V, d = t["embed.weight"].shape
  layers = sorted({int(mt.group(1)) for k in t if (mt := BLOCK.match(k))})
  if layers != list(range(len(layers))):
    raise ConversionError(f"hope checkpoint: blocks.N found for N in {layers}; expected 0 .. L-1")
  fixed = {"d_model": d, "n_layers": len(layers), "positions": "none", "norm": "layernorm", "tie_embeddings": True,
           "bias": True, "attn_kind": "standard", "n_kv_heads": 0, "attn_dim": 0, "scale_residual_init": False}
  if not given(c, "model.vocab_size"):
    fixed.update(vocab_size=V, pad_vocab_to=1)
  levels = _levels(t)
  fixed["block"] = "hope_attention" if levels else "hope_transformer"
  for field, value in fixed.items():
    if given(c, f"model.{field}") and m[field] != value:
      raise ConversionError(f"hope checkpoint: embed.weight {tuple(t['embed.weight'].shape)} and its blocks set "
                            f"model.{field}={value!r}, but the config says model.{field}={m[field]!r}")
    m[field] = value
  if not given(c, "model.n_heads") or d % m.n_heads:
    fits = [f"{d // D} (heads of {D})" for D in (64, 128, 32, 16, 8) if d % D == 0][:3]
    raise ConversionError(f"blocks.0.attn.qkv.weight is {tuple(t['blocks.0.attn.qkv.weight'].shape)}: the head count "
                          "cannot be read from shapes; give --config.model.n_heads" +
                          (f", e.g. {' or '.join(fits)}" if fits else ""))
  hidden_key = f"blocks.0.cms.blocks.{levels[0]}.net.1.weight" if levels else "blocks.0.mlp.net.0.weight"
  m.hope.cms_hidden_mult = t[hidden_key].shape[0] // d
  if levels and len(levels) != len(m.hope.cms_periods):
    raise ConversionError(f"hope checkpoint: {len(levels)} CMS levels {levels}, but model.hope.cms_periods="
                          f"{tuple(m.hope.cms_periods)}; give one period per level (--config.model.hope.cms_periods)")
  conv = "blocks.0.attn.local_conv.weight"
  m.hope.local_conv = int(t[conv].shape[-1]) if conv in t else 0
  return c


def _level_keys(m) -> list[tuple[str, str]]:
  if m.block == "hope_attention":
    return [("norm_scale", "net.0.weight"), ("norm_bias", "net.0.bias"), ("w1", "net.1.weight"),
            ("b1", "net.1.bias"), ("w2", "net.3.weight"), ("b2", "net.3.bias")]
  return [("norm_scale", "norm.weight"), ("norm_bias", "norm.bias"), ("w1", "net.0.weight"), ("w2", "net.2.weight")]


def _prefixes(t_or_levels, m) -> list[str]:
  """The torch prefix of each level of a block: cms.blocks.<name>. or mlp."""
  if m.block == "hope_attention":
    return [f"cms.blocks.{name}." for name in t_or_levels]
  return ["mlp."]


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
    qkv = keys.take(b + "attn.qkv.weight", (3 * d, d))
    attn = {"qkv": None if qkv is None else qkv.reshape(3, d, d).transpose(2, 0, 1),
            "out": _t(keys.take(b + "attn.out_proj.weight", (d, d))),
            "norm_scale": keys.take(b + "attn.norm.weight", (d,)), "norm_bias": keys.take(b + "attn.norm.bias", (d,))}
    if m.hope.local_conv:
      w = keys.take(b + "attn.local_conv.weight", (d, 1, m.hope.local_conv))
      attn["conv"] = None if w is None else w[:, 0, :].T
    levels = {}
    for j, pre in enumerate(prefixes):
      shapes = {"norm_scale": (d,), "norm_bias": (d,), "w1": (h, d), "b1": (h,), "w2": (d, h), "b2": (d,)}
      lv = {ours: keys.take(b + pre + theirs, shapes[ours]) for ours, theirs in _level_keys(m)}
      levels[j] = {k: (_t(v) if k in ("w1", "w2") else v) for k, v in lv.items()}
    blocks.append({"attn": attn, "levels": levels})
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
  d = m.d_model
  f32 = lambda x: np.asarray(x, np.float32)
  out = {"embed.weight": f32(params["embed"])[:m.vocab_size]}
  names = (layout or {}).get("levels") or [f"level{j}" for j in range(len(m.hope.cms_periods))]
  prefixes = _prefixes(names, m)
  for i in range(m.n_layers):
    p = _tree_map(lambda x: x[i], params["blocks"]) if m.scan_layers else params["blocks"][i]
    b = f"blocks.{i}."
    a = p["attn"]
    out[b + "attn.qkv.weight"] = f32(a["qkv"]).transpose(1, 2, 0).reshape(3 * d, d)
    out[b + "attn.out_proj.weight"] = _t(a["out"])
    out[b + "attn.norm.weight"], out[b + "attn.norm.bias"] = f32(a["norm_scale"]), f32(a["norm_bias"])
    if "conv" in a:
      out[b + "attn.local_conv.weight"] = np.ascontiguousarray(f32(a["conv"]).T[:, None, :])
    for j, pre in enumerate(prefixes):
      lv = p["levels"][j] if j in p["levels"] else p["levels"][str(j)]
      for ours, theirs in _level_keys(m):
        out[b + pre + theirs] = _t(lv[ours]) if ours in ("w1", "w2") else f32(lv[ours])
  out["norm.weight"], out["norm.bias"] = f32(params["final_norm"]["scale"]), f32(params["final_norm"]["bias"])
  out["lm_head.weight"] = out["embed.weight"].copy()
  return out
