"""Memory state files: the fast state of one context after reading a text, saved so that a later call continues
from it (`dba-eval hope read --text FILE [--state DIR] [--save-state DIR]`).

Training starts every batch row's memory at the meta weights, so a training checkpoint has no fast state to hold;
what a user wants kept is a memory that has read something (a document, a conversation), to rescore or continue
later without re-reading it. Blocks that carry one: hope_attention / hope_selfmod / hope_hybrid (the two-pass loop's
fast state) and titans_mac (its memory's M − M_0 and surprise; MAG / MAL need the previous call's tokens too).

A state directory holds state.npz (every leaf of the per-layer state, keyed by its tree path, leading axes [L, 1])
and state.json (block, model sizes, the checkpoint it came from, tokens read, the text's sha256). It is written
under a temporary name and renamed (rundir.atomic_output), so a save killed half-way leaves nothing that loads and
an earlier state replaced with --force is either the old one or the new one, whole.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib

import jax
import numpy as np

from dba_jax import rundir
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


def save(path: str, fast, m, meta: dict, force: bool = False) -> None:
  """Write `fast` (batch 1) to the directory `path`, built under a temporary name and renamed (rundir.atomic_output:
  a kill leaves no half-written state). An existing `path` is refused unless `force`, then replaced whole."""
  if os.path.exists(path) and not (force and os.path.isdir(path)):
    raise MemStateError(f"{path}: exists; the memory state goes to a new directory (move or remove this one)")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with rundir.atomic_output(path) as tmp:
    os.mkdir(tmp)
    np.savez(os.path.join(tmp, "state.npz"), **_flat(fast))
    info = {"format": FORMAT, **{k: m[k] for k in SIZES}, **meta}
    with open(os.path.join(tmp, "state.json"), "w") as f:
      json.dump(info, f, indent=1)


def read(path: str, m) -> tuple[dict, dict]:
  """(the saved arrays by tree path, state.json) of a directory `save` wrote, checked against the model config `m`
  (block and sizes) and read whole: a missing, truncated or foreign file is a MemStateError naming it."""
  info_file, arrays_file = os.path.join(path, "state.json"), os.path.join(path, "state.npz")
  for f in (info_file, arrays_file):
    if not os.path.isfile(f):
      raise MemStateError(f"{path}: not a memory state directory ({os.path.basename(f)} is missing)")
  try:
    with open(info_file) as f:
      info = json.load(f)
  except ValueError as e:  # not JSON, not UTF-8
    raise MemStateError(f"{info_file}: not JSON ({e})") from None
  if not isinstance(info, dict) or info.get("format") != FORMAT:
    raise MemStateError(f"{info_file}: format {(info.get('format') if isinstance(info, dict) else info)!r}, "
                        f"expected {FORMAT!r}")
  for k in SIZES:
    if info.get(k) != m[k]:
      raise MemStateError(f"{info_file}: saved with model.{k}={info.get(k)!r}, this model has {m[k]!r}")
  try:
    with np.load(arrays_file) as z:
      return {k: z[k] for k in z.files}, info
  except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:  # truncated or not an .npz
    raise MemStateError(f"{arrays_file}: unreadable ({type(e).__name__}: {e}); not a whole memory state") from None


def load(path: str, template, m) -> tuple[dict, dict]:
  """(fast state shaped like `template`, its state.json) from a directory `save` wrote, checked against the model."""
  saved, info = read(path, m)
  arrays_file = os.path.join(path, "state.npz")
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
