"""Addition checkpoints: the original PyTorch `.pt` files (read without torch by dba_jax.torch_io) and our own
run directories.

PyTorch side (others.md A.7): a zip holding `<name>/data.pkl` and raw little-endian storages `<name>/data/<N>`;
the pickle is a dict with `model_state` (state dict), `model_config`, `train_config`, `step`, `val_exact`, `params`.
Two key layouts exist and both map here: the early one (`use_rmsnorm`, `tie_qkv` in the config, e.g. `attn.qkv_A`,
`attn.qkv_Bq`, `attn.qkv_Bkv`) and the older 512p/582p one without those config keys (so LayerNorm and `tie_qkv`
none: `attn.qkv.A`/`attn.qkv.B` with the B columns split q|k|v).

Our side: `<run>/model_<i>/{best,last}/params.npz` (dotted torch-style names; full linears as `...kernel` (in, out))
plus `meta.json` (step, val_exact, arch, seed). The models have ~1000 parameters, so a flat npz is enough and keeps
a 16-model sweep from paying a checkpoint manager's per-save cost at every improvement.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os

import numpy as np

from dba_jax import rundir, torch_io
from dba_jax.addition.model import Arch, param_spec
from dba_jax.conversion import ConversionError, Keys, json_safe

# ----------------------------------------------------------------------------------- state dict <-> params


def arch_from_torch_config(mc: dict) -> Arch:
  """The original ModelConfig dict -> Arch; keys the older format lacks take the original defaults."""
  unknown = set(mc) - {"n_layer", "d_model", "n_head", "d_ff", "dropout", "max_seq_len", "vocab_size", "pos_rank",
                       "qkv_rank", "attn_out_rank", "ffn_rank", "use_rmsnorm", "tie_qkv"}
  if unknown:
    raise ConversionError(f"model_config has fields this converter does not know: {sorted(unknown)}")
  if float(mc.get("dropout", 0.0)) != 0.0:
    raise ConversionError(f"model_config.dropout={mc['dropout']}: only dropout 0 is implemented")
  return Arch(d_model=int(mc.get("d_model", 7)), d_ff=int(mc.get("d_ff", 14)), n_layer=int(mc.get("n_layer", 1)),
              n_head=int(mc.get("n_head", 1)), vocab_size=int(mc.get("vocab_size", 14)),
              max_seq_len=int(mc.get("max_seq_len", 33)), pos_rank=int(mc.get("pos_rank", 0)),
              qkv_rank=int(mc.get("qkv_rank", 0)), attn_out_rank=int(mc.get("attn_out_rank", 0)),
              ffn_rank=int(mc.get("ffn_rank", 0)), norm="rmsnorm" if mc.get("use_rmsnorm", False) else "layernorm",
              tie_qkv=str(mc.get("tie_qkv", "none")))


def arch_to_torch_config(a: Arch) -> dict:
  if a.pos_basis != "learned" or not a.block_norm_weight or a.tie_qkv == "shareA_folded":
    raise ConversionError(f"pos_basis={a.pos_basis!r}, block_norm_weight={a.block_norm_weight}, tie_qkv="
                          f"{a.tie_qkv!r}: the original TinyDecoderLM has only learned positions, weighted norms "
                          "and its own tie modes")
  return {"n_layer": a.n_layer, "d_model": a.d_model, "n_head": a.n_head, "d_ff": a.d_ff, "dropout": 0.0,
          "max_seq_len": a.max_seq_len, "vocab_size": a.vocab_size, "pos_rank": a.pos_rank, "qkv_rank": a.qkv_rank,
          "attn_out_rank": a.attn_out_rank, "ffn_rank": a.ffn_rank, "use_rmsnorm": a.norm == "rmsnorm",
          "tie_qkv": a.tie_qkv}


def _leaf_paths(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaf_paths(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _set(tree: dict, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _torch_name(path) -> tuple[str, bool]:
  """(state-dict key, transposed?) of a param path; full linears are torch [out, in]."""
  if path[-1] == "kernel":
    return ".".join(path[:-1] + ("weight",)), True
  return ".".join(path), False


def to_params(state: dict, a: Arch, source: str = "checkpoint") -> dict:
  """Torch state dict -> nested float32 params for `a`; every key must be used, every shape must fit."""
  keys = Keys(state, source)
  params = {}
  for path, (shape, _) in _leaf_paths(param_spec(a)):
    name, transposed = _torch_name(path)
    x = keys.take(name, shape[::-1] if transposed else shape)
    if x is not None:
      _set(params, path, np.ascontiguousarray(x.T if transposed else x))
  head = keys.take("lm_head.weight", (a.vocab_size, a.d_model))
  emb = state.get("token_emb.weight")
  if head is not None and emb is not None and not np.array_equal(head, np.asarray(emb, np.float32)):
    keys.problems.append("lm_head.weight differs from token_emb.weight, but the head is tied")
  keys.finish()
  return params


def from_params(params: dict) -> dict:
  """Nested params -> torch-style state dict (numpy float32; `lm_head.weight` repeats the token embedding)."""
  out = collections.OrderedDict()
  for path, x in _leaf_paths(params):
    name, transposed = _torch_name(path)
    x = np.asarray(x, np.float32)
    out[name] = np.ascontiguousarray(x.T if transposed else x)
  out["lm_head.weight"] = out["token_emb.weight"].copy()
  return out


# ----------------------------------------------------------------------------------------- our run format


def save(directory: str, params: dict, a: Arch, meta: dict) -> None:
  """Write params.npz and meta.json as the directory `directory`, replacing what is there: both are written into
  a temporary directory beside it that is then renamed into place (rundir.atomic_output), so a failure or a
  kill leaves the old model or the new one, never half of one. Metadata JSON cannot hold (a path or a numpy
  scalar from an original checkpoint) is stored as a string or number (conversion.json_safe)."""
  flat = {".".join(p): np.asarray(x, np.float32) for p, x in _leaf_paths(params)}
  text = json.dumps({**json_safe(meta), "arch": dataclasses.asdict(a)}, indent=2)  # fails before anything is written
  directory = os.path.normpath(directory)
  os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
  with rundir.atomic_output(directory) as tmp:
    os.makedirs(tmp)
    np.savez(os.path.join(tmp, "params.npz"), **flat)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      f.write(text)


@dataclasses.dataclass
class Loaded:
  name: str  # where it came from
  arch: Arch
  params: dict  # nested numpy float32
  meta: dict  # step, val_exact, seed, training config where known


def _load_ours(directory: str) -> Loaded:
  with open(os.path.join(directory, "meta.json")) as f:
    meta = json.load(f)
  a = Arch(**meta.pop("arch"))
  with np.load(os.path.join(directory, "params.npz")) as z:
    flat = {k: z[k] for k in z.files}
  params = {}
  for path, (shape, _) in _leaf_paths(param_spec(a)):
    x = flat.pop(".".join(path), None)
    if x is None or tuple(x.shape) != tuple(shape):
      raise ConversionError(f"{directory}: {'.'.join(path)} is {None if x is None else x.shape}, expected {shape}")
    _set(params, path, x)
  if flat:
    raise ConversionError(f"{directory}: unexpected arrays {sorted(flat)}")
  return Loaded(directory, a, params, meta)


def _load_torch(path: str) -> Loaded:
  obj = torch_io.load(path)
  if not isinstance(obj, dict) or "model_state" not in obj or "model_config" not in obj:
    raise ConversionError(f"{path}: expected a dict with model_state and model_config (the addition format)")
  a = arch_from_torch_config(obj["model_config"])
  params = to_params({k: np.asarray(v) for k, v in obj["model_state"].items()}, a, path)
  tc = json_safe(obj.get("train_config") or {})  # the original's scripts may save paths and numpy scalars here
  tc = tc if isinstance(tc, dict) else {"value": tc}
  meta = json_safe({"step": obj.get("step"), "val_exact": obj.get("val_exact"), "params": obj.get("params"),
                    "seed": tc.get("seed"), "total_steps": tc.get("train_steps"), "train_config": tc})
  return Loaded(path, a, params, meta)


def load(path: str, which: str = "best") -> list[Loaded]:
  """Every model `path` names: a .pt file; a best/ or last/ directory; a model_<i>/ directory (its `which`);
  or a run directory (each model_<i>'s `which`). A model directory a kill caught between the two renames of
  its replacement is read where it then is (rundir.settled_dir)."""
  if os.path.isfile(path):
    return [_load_torch(path)]
  path = rundir.settled_dir(os.path.normpath(path))
  if os.path.isfile(os.path.join(path, "params.npz")):
    return [_load_ours(path)]
  if os.path.isdir(rundir.settled_dir(os.path.join(path, which))):
    return [_load_ours(rundir.settled_dir(os.path.join(path, which)))]
  number = lambda d: int(d.rsplit("model_", 1)[-1])
  models = sorted((d for d in glob.glob(os.path.join(path, "model_*")) if d.rsplit("model_", 1)[-1].isdigit()
                   and os.path.isdir(rundir.settled_dir(os.path.join(d, which)))), key=number)
  if not models:
    raise ConversionError(f"{path}: no .pt file, params.npz, {which}/ or model_*/{which}/ found")
  return [_load_ours(rundir.settled_dir(os.path.join(m, which))) for m in models]
