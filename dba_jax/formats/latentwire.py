"""LatentWire translator state dicts (BottleneckedGatedTranslator, hope_latentwire.md B) <-> dba_jax bridge workdirs.

The file is the original's bare `translator.state_dict()`:
  query_tokens [1, K, b]
  blocks.i.{q_norm,src_norm,ffn_norm}.{weight,bias}      LayerNorms ([b], [s], [b])
  blocks.i.self_attn.in_proj_weight [3b, b], in_proj_bias [3b], out_proj.{weight [b, b], bias}
  blocks.i.cross_attn.{q_proj_weight [b, b], k_proj_weight [b, s], v_proj_weight [b, s]}, or in_proj_weight [3b, b]
                      when s == b (torch's nn.MultiheadAttention packs q/k/v only when kdim == vdim == embed_dim),
                      in_proj_bias [3b], out_proj.{weight, bias}
  blocks.i.{cross,ffn}_gate [1]
  blocks.i.ffn.0.{weight [f b, b], bias}, ffn.3.{weight [b, f b], bias}    (ffn = Linear, GELU, Dropout, Linear)
  output_norm.{weight,bias} [b], output_proj.{weight [t, b], bias [t]}
K, b, depth, the FFN multiple, s and t come from the shapes; the head count is not in the file, so it comes from
--config=configs/latentwire.py:<bridge variant> (model.heads, default 4). bfloat16 files (the original cast its
translator to bf16) are read exactly into float32.

This is a model family of its own (not the dba_jax Decoder), so it converts file to file: `import_file` writes a
dba-latentwire-train workdir (config.json, a checkpoint at step 0 with a fresh optimizer state, converted_from.json
with the widths) and `export_dir` writes the state dict back, from an imported or a trained bridge (a trained one
takes its widths from its source / target LMs).
"""
from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
from flax import nnx

from dba_jax import ckpt, conversion, loading, rundir, torch_io
from dba_jax.conversion import GIVEN, ConversionError, Keys
from dba_jax.latentwire import bridge as bridge_lib, train as lw_train

NAME = "latentwire"
CONTAINER = None  # a bare state dict: .pt and .safetensors hold the same mapping
IMPORT_WITH_CONFIG = True  # import_file(src, out, c): the head count comes from --config
RECORD = "converted_from.json"
BLOCK = re.compile(r"blocks\.(\d+)\.")


def detect(keys) -> bool:
  return "query_tokens" in keys and "output_proj.weight" in keys and "blocks.0.cross_gate" in keys


def is_bridge_dir(workdir: str) -> bool:
  """Whether a workdir's config.json is a bridge's (dba-latentwire-train or this format), not an LM's."""
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(saved.get("model"), dict) and "K" in saved["model"] and "loss" in saved


# ---------------------------------------------------------------------------------------------- shapes

def shapes_of(t: dict) -> dict:
  """{K, b, depth, ffn_mult, s, t} from the tensors' shapes; a missing or misshapen anchor key is an error."""
  def shape(key, ndim):
    if key not in t:
      raise ConversionError(f"missing key {key}: a LatentWire translator state dict has it")
    if t[key].ndim != ndim:
      raise ConversionError(f"{key}: shape {tuple(t[key].shape)}, expected {ndim} dimensions")
    return t[key].shape

  q = shape("query_tokens", 3)
  if q[0] != 1:
    raise ConversionError(f"query_tokens: shape {tuple(q)}, expected [1, K, b]")
  K, b = q[1], q[2]
  depth = 1 + max((int(m.group(1)) for k in t if (m := BLOCK.match(k))), default=-1)
  if depth == 0:
    raise ConversionError("no blocks.<i>.* keys: a translator has at least one block")
  missing = [i for i in range(depth) if f"blocks.{i}.cross_gate" not in t]
  if missing:
    raise ConversionError(f"blocks {missing} are missing (keys run to blocks.{depth - 1}); no blocks.<i>.cross_gate")
  f = shape("blocks.0.ffn.0.weight", 2)[0]
  if f % b:
    raise ConversionError(f"blocks.0.ffn.0.weight: shape {tuple(t['blocks.0.ffn.0.weight'].shape)}; its rows are "
                          f"not a multiple of b={b} (from query_tokens)")
  s = shape("blocks.0.src_norm.weight", 1)[0]
  tw = shape("output_proj.weight", 2)[0]
  return {"K": int(K), "b": int(b), "depth": depth, "ffn_mult": int(f // b), "s": int(s), "t": int(tw)}


def configure(c, sh: dict):
  """A bridge config (from --config) with K, b, depth, ffn_mult from the shapes; a field set on the command line
  that the shapes contradict is an error naming both."""
  if "model" not in c or "K" not in c.model or "heads" not in c.model:
    raise ConversionError("a LatentWire translator does not record its head count: pass "
                          "--config=configs/latentwire.py:bridge_k8 (model.heads=4) and --config.model.heads=H if "
                          "it had another")
  c.unlock()
  for key in ("K", "b", "depth", "ffn_mult"):
    if f"model.{key}" in GIVEN and c.model[key] != sh[key]:
      raise ConversionError(f"--config.model.{key}={c.model[key]} but the file has {key}={sh[key]} "
                            "(from the shapes of query_tokens / blocks.* / ffn.0.weight)")
    c.model[key] = sh[key]
  c.lock()
  if sh["b"] % c.model.heads:
    raise ConversionError(f"model.heads={c.model.heads} does not divide the file's b={sh['b']} "
                          "(query_tokens); pass --config.model.heads")
  for role, width in (("source", sh["s"]), ("target", sh["t"])):
    if c[role]:  # an LM named with --config.source / --config.target must have the file's width
      try:
        d = loading.read_config(loading.locate(c[role])[0]).model.d_model
      except (OSError, ValueError) as e:
        raise ConversionError(f"--config.{role}={c[role]}: {e}") from None
      if d != width:
        key = "blocks.0.src_norm.weight" if role == "source" else "output_proj.weight"
        raise ConversionError(f"--config.{role}={c[role]} has width {d}, but {key} says {width}")
  return c


# ------------------------------------------------------------------------------------------ tensor maps

def _linear(keys: Keys, prefix: str, d_in: int, d_out: int) -> dict:
  w = keys.take(f"{prefix}.weight", (d_out, d_in))
  return {"kernel": None if w is None else w.T.copy(), "bias": keys.take(f"{prefix}.bias", (d_out,))}


def _norm(keys: Keys, prefix: str, d: int) -> dict:
  return {"scale": keys.take(f"{prefix}.weight", (d,)), "bias": keys.take(f"{prefix}.bias", (d,))}


def _mha(keys: Keys, prefix: str, b: int, d_kv: int, packed: bool) -> dict:
  """nn.MultiheadAttention -> {q, k, v, o_proj}: rows of in_proj_weight / in_proj_bias are q, k, v in that order."""
  if packed:
    w = keys.take(f"{prefix}.in_proj_weight", (3 * b, b))
    ws = [None] * 3 if w is None else np.split(w, 3)
  else:
    ws = [keys.take(f"{prefix}.{n}_proj_weight", (b, d)) for n, d in (("q", b), ("k", d_kv), ("v", d_kv))]
  bias = keys.take(f"{prefix}.in_proj_bias", (3 * b,))
  bs = [None] * 3 if bias is None else np.split(bias, 3)
  out = {n: {"kernel": None if w is None else w.T.copy(), "bias": bb} for n, w, bb in zip("qkv", ws, bs)}
  out["o_proj"] = _linear(keys, f"{prefix}.out_proj", b, b)
  return out


def to_params(t: dict, sh: dict, source: str = "checkpoint") -> dict:
  """The pure params dict of bridge.Translator(s, t, b, K, depth, heads, ffn_mult), tensor by tensor."""
  keys = Keys(t, source)
  b, s, f = sh["b"], sh["s"], sh["ffn_mult"] * sh["b"]
  q = keys.take("query_tokens", (1, sh["K"], b))
  params = {"query_tokens": None if q is None else q[0], "blocks": {}}
  for i in range(sh["depth"]):
    p = f"blocks.{i}"
    params["blocks"][i] = {
        "q_norm": _norm(keys, f"{p}.q_norm", b), "src_norm": _norm(keys, f"{p}.src_norm", s),
        "ffn_norm": _norm(keys, f"{p}.ffn_norm", b),
        "self_attn": _mha(keys, f"{p}.self_attn", b, b, packed=True),
        "cross_attn": _mha(keys, f"{p}.cross_attn", b, s, packed=s == b),
        "cross_gate": keys.take(f"{p}.cross_gate", (1,)), "ffn_gate": keys.take(f"{p}.ffn_gate", (1,)),
        "ffn_in": _linear(keys, f"{p}.ffn.0", b, f), "ffn_out": _linear(keys, f"{p}.ffn.3", f, b)}
  params["output_norm"] = _norm(keys, "output_norm", b)
  params["output_proj"] = _linear(keys, "output_proj", b, sh["t"])
  keys.finish()  # every missing / unexpected key and shape problem in one error
  return params


def from_params(params: dict, s: int) -> dict:
  """The original's state dict (its names, shapes, float32) from a Translator's pure params dict."""
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  out = {"query_tokens": f32(params["query_tokens"])[None]}

  def linear(prefix, lin):
    out[f"{prefix}.weight"], out[f"{prefix}.bias"] = f32(np.asarray(lin["kernel"]).T), f32(lin["bias"])

  def norm(prefix, n):
    out[f"{prefix}.weight"], out[f"{prefix}.bias"] = f32(n["scale"]), f32(n["bias"])

  def mha(prefix, a, packed):
    ws = [np.asarray(a[n]["kernel"]).T for n in "qkv"]
    if packed:
      out[f"{prefix}.in_proj_weight"] = f32(np.concatenate(ws))
    else:
      for n, w in zip("qkv", ws):
        out[f"{prefix}.{n}_proj_weight"] = f32(w)
    out[f"{prefix}.in_proj_bias"] = f32(np.concatenate([np.asarray(a[n]["bias"]) for n in "qkv"]))
    linear(f"{prefix}.out_proj", a["o_proj"])

  b = np.asarray(params["query_tokens"]).shape[1]
  blocks = params["blocks"]
  for i in sorted(blocks, key=int):
    blk, p = blocks[i], f"blocks.{i}"
    for n in ("q_norm", "src_norm"):
      norm(f"{p}.{n}", blk[n])
    mha(f"{p}.self_attn", blk["self_attn"], True)
    mha(f"{p}.cross_attn", blk["cross_attn"], s == b)
    out[f"{p}.cross_gate"] = f32(blk["cross_gate"])
    linear(f"{p}.ffn.0", blk["ffn_in"])
    linear(f"{p}.ffn.3", blk["ffn_out"])
    norm(f"{p}.ffn_norm", blk["ffn_norm"])
    out[f"{p}.ffn_gate"] = f32(blk["ffn_gate"])
  norm("output_norm", params["output_norm"])
  linear("output_proj", params["output_proj"])
  return out


# ------------------------------------------------------------------------------------------ file to file

def import_file(src: str, out: str, c) -> dict:
  tensors, _ = conversion.unwrap(torch_io.load(src), src)
  sh = shapes_of(tensors)
  c = lw_train.validate(configure(c, sh))
  params = to_params(tensors, sh, src)
  del tensors
  opt = lw_train.make_optimizer(c, params).init(jax.tree.map(np.asarray, params))
  conversion.refuse_existing_dir(out)
  rundir.write_config(c, out)
  with open(os.path.join(out, RECORD), "w") as f:
    json.dump({"source": os.path.abspath(src), "format": NAME, "widths": {"source": sh["s"], "target": sh["t"]},
               "step": 0}, f, indent=2)
  ck = ckpt.Checkpointer(os.path.join(out, "checkpoints"), async_save=False)
  ck.save(0, params, opt, {"step": 0, "source": os.path.abspath(src), "format": NAME})
  ck.close()
  return {"workdir": out, "format": NAME, "step": 0, **sh}


def widths(workdir: str, c) -> tuple[int, int]:
  """(s, t): recorded by import, else the d_model of the bridge's source and target LMs."""
  path = os.path.join(workdir, RECORD)
  if os.path.exists(path):
    with open(path) as f:
      w = json.load(f).get("widths")
    if w:
      return int(w["source"]), int(w["target"])
  out = []
  for role in ("source", "target"):
    if not c[role]:
      raise ConversionError(f"{workdir}: config.json names no {role} LM and no {RECORD} records the widths")
    try:
      out.append(loading.read_config(loading.locate(c[role])[0]).model.d_model)
    except (OSError, ValueError) as e:
      raise ConversionError(f"{workdir}: its {role} LM {c[role]}: {e}") from None
  return out[0], out[1]


def load_translator(workdir: str):
  """(pure params dict, bridge config, s, t) of a bridge workdir, without loading its LMs."""
  workdir = loading.locate(workdir)[0]
  if not is_bridge_dir(workdir):
    raise ConversionError(f"{workdir}/config.json is not a LatentWire bridge's (no model.K / loss section)")
  c = lw_train.read_config(workdir, ConversionError)
  s, t = widths(workdir, c)
  m = c.model
  build = lambda: bridge_lib.Translator(s, t, m.b, m.K, m.depth, m.heads, m.ffn_mult, rngs=nnx.Rngs(0))
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(build)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  ckpts = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    if not ckpts.all_steps():
      raise ConversionError(f"{workdir}/checkpoints holds no checkpoint")
    _, params, _, _ = ckpts.restore_first_good(abstract)
  except (ckpt.CheckpointDamaged, ckpt.CheckpointMismatch) as e:
    raise ConversionError(f"{workdir}: {e}") from None
  finally:
    ckpts.close()
  return jax.tree.map(np.asarray, params), c, s, t


def export_dir(workdir: str, out: str) -> dict:
  params, _, s, _ = load_translator(workdir)
  return from_params(params, s)
