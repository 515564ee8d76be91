"""Memory state files: the fast state of one context after reading a text, saved so that a later call continues
from it (`dba-eval hope read --text FILE [--state DIR] [--save-state DIR]`).

Training starts every batch row's memory at the meta weights, so a training checkpoint has no fast state to hold;
what a user wants kept is a memory that has read something (a document, a conversation), to rescore or continue
later without re-reading it. Blocks that carry one: hope_attention / hope_selfmod / hope_hybrid (the two-pass loop's
fast state) and titans_mac (its memory's M − M_0 and surprise; MAG / MAL need the previous call's tokens too).

A state directory holds state.npz (every leaf of the per-layer state, keyed by its tree path, leading axes [L, 1])
and state.json (block, model sizes, the checkpoint it came from, tokens read, the text's sha256). It is written
under a temporary name and renamed, so a save killed half-way leaves nothing that loads.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np

from dba_jax.hope.step import TWO_PASS_BLOCKS

FORMAT = "dba_jax.hope.memstate/1"
SIZES = ("block", "vocab_size", "d_model", "n_layers", "n_heads")


class MemStateError(ValueError):
  pass


def carries_state(m) -> bool:
  return m.block in TWO_PASS_BLOCKS or m.block == "titans_mac"


def _flat(tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def save(path: str, fast, m, meta: dict) -> None:
  """Write `fast` (batch 1) to the new directory `path`; refuses an existing one (nothing is overwritten)."""
  if os.path.exists(path):
    raise MemStateError(f"{path}: exists; the memory state goes to a new directory (move or remove this one)")
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".memstate-", dir=parent)
  try:
    np.savez(os.path.join(tmp, "state.npz"), **_flat(fast))
    info = {"format": FORMAT, **{k: m[k] for k in SIZES}, **meta}
    with open(os.path.join(tmp, "state.json"), "w") as f:
      json.dump(info, f, indent=1)
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load(path: str, template, m) -> tuple[dict, dict]:
  """(fast state shaped like `template`, its state.json) from a directory `save` wrote, checked against the model."""
  info_file, arrays_file = os.path.join(path, "state.json"), os.path.join(path, "state.npz")
  for f in (info_file, arrays_file):
    if not os.path.isfile(f):
      raise MemStateError(f"{path}: not a memory state directory ({os.path.basename(f)} is missing)")
  try:
    with open(info_file) as f:
      info = json.load(f)
  except json.JSONDecodeError as e:
    raise MemStateError(f"{info_file}: not JSON ({e})") from None
  if info.get("format") != FORMAT:
    raise MemStateError(f"{info_file}: format {info.get('format')!r}, expected {FORMAT!r}")
  for k in SIZES:
    if info.get(k) != m[k]:
      raise MemStateError(f"{info_file}: saved with model.{k}={info.get(k)!r}, this model has {m[k]!r}")
  with np.load(arrays_file) as z:
    saved = {k: z[k] for k in z.files}
  want = _flat(template)
  if set(saved) != set(want):
    missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    raise MemStateError(f"{arrays_file}: leaves differ from this model's memory state: missing {missing[:4]}, "
                        f"unexpected {extra[:4]}")
  for k, a in want.items():
    if saved[k].shape != a.shape:
      raise MemStateError(f"{arrays_file}: leaf {k} has shape {saved[k].shape}, this model's is {a.shape}")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  out = [saved[jax.tree_util.keystr(p)].astype(np.asarray(leaf).dtype) for p, leaf in leaves]
  return jax.tree_util.tree_unflatten(treedef, out), info
