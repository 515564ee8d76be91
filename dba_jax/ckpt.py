"""Checkpoints: the only module that imports Orbax.

A checkpoint is three items under <workdir>/checkpoints/<step>/: `params` and `opt` (array trees, restored into
abstract trees that carry the target shardings) and `meta` (JSON: step, rng key data, data-iterator state).
Keeping params separate lets `load_model` read a model without its optimizer state.
"""
from __future__ import annotations

import os

import orbax.checkpoint as ocp

ITEMS = ("params", "opt", "meta")


class Checkpointer:
  def __init__(self, directory: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, params, opt_state, meta: dict, force: bool = False) -> bool:
    args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt=ocp.args.StandardSave(opt_state),
                              meta=ocp.args.JsonSave(meta))
    return self._mngr.save(step, args=args, force=force)

  def restore(self, step: int, abstract_params, abstract_opt=None):
    """(params, opt_state or None, meta). Abstract trees are ShapeDtypeStructs with `.sharding` set."""
    items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
    if abstract_opt is not None:
      items["opt"] = ocp.args.StandardRestore(abstract_opt)
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    return out["params"], out.get("opt") if abstract_opt is not None else None, out["meta"]

  def wait(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()
