"""The 10-digit-addition TinyDecoderLM checkpoints (others.md A.7) through dba-convert.

The model is not the dba_jax Decoder, so this format converts whole files: `import_file` writes an addition
model directory (params.npz + meta.json, what `dba-addition-eval --checkpoint DIR` and the addition trainer use)
and `export_dir` writes the original `{"model_state", "model_config", ...}` dict back. The key mapping itself
lives in dba_jax.addition.checkpoint.
"""
from __future__ import annotations

import os

from dba_jax.addition import checkpoint
from dba_jax.conversion import ConversionError

NAME = "addition"
CONTAINER = "model_state"  # the original's torch.save dict holds the state dict under this key


def detect(keys) -> bool:
  return "token_emb.weight" in keys and any(k.startswith("blocks.0.attn.") for k in keys)


def import_file(src: str, out: str) -> dict:
  if os.path.exists(os.path.join(out, "params.npz")) or os.path.exists(os.path.join(out, "meta.json")):
    raise ConversionError(f"--out {out} already holds an addition model; refusing to overwrite it")
  loaded = checkpoint.load(src)[0]
  checkpoint.save(out, loaded.params, loaded.arch, {**loaded.meta, "source": os.path.abspath(src)})
  return {"workdir": out, "format": NAME, "step": loaded.meta.get("step")}


def export_dir(workdir: str, out: str) -> dict:
  loaded = checkpoint.load(workdir)
  if len(loaded) != 1:
    raise ConversionError(f"{workdir} holds {len(loaded)} models; name one model_<i>/best directory")
  m = loaded[0]
  return {"model_state": checkpoint.from_params(m.params), "model_config": checkpoint.arch_to_torch_config(m.arch),
          "train_config": m.meta.get("train_config") or {}, "step": m.meta.get("step"),
          "val_exact": m.meta.get("val_exact"), "params": m.meta.get("params")}
