"""`load_model`: a trained or converted model from a workdir or checkpoint directory, for users and notebooks."""
from __future__ import annotations

import logging
import os

import jax
from flax import nnx

from dba_jax import ckpt, model as model_lib, rundir
from dba_jax.config import Config, base_config, upgrade

log = logging.getLogger("dba_jax")


def read_config(workdir: str) -> Config:
  """An LM run's config.json over today's defaults (fields added since the run get their default; keys renamed
  since then are read under today's names, config.upgrade)."""
  path = os.path.join(workdir, "config.json")
  return rundir.merge_saved(base_config(), upgrade(rundir.read_saved(workdir), path), path)


def locate(path: str) -> tuple[str, int | None]:
  """(workdir, step) from a workdir, its checkpoints/ directory, or one checkpoints/<step> directory."""
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, "config.json")):
    return path, None
  parent, name = os.path.split(path)
  if name == "checkpoints" and os.path.exists(os.path.join(parent, "config.json")):
    return parent, None
  grand, parent_name = os.path.split(parent)
  if parent_name == "checkpoints" and name.isdigit() and os.path.exists(os.path.join(grand, "config.json")):
    return grand, int(name)
  raise FileNotFoundError(f"{path}: no config.json here or above; expected a dba_jax workdir or checkpoint dir")


def load_model(path: str, step: int | None = None) -> tuple[model_lib.Model, Config]:
  """(model, config); `model(tokens_BT)` returns logits [B, T, padded vocab], and model.step / model.checkpoint_dir
  name the checkpoint read. The latest good step unless `step` (or a checkpoints/<step> path) names one: a damaged
  latest checkpoint is skipped with a warning naming it and the step used; a damaged named one, or none usable,
  raises ckpt.CheckpointDamaged in one line."""
  workdir, path_step = locate(path)
  step = step if step is not None else path_step
  c = read_config(workdir)
  ckpts = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    steps = ckpts.all_steps()
    if not steps:
      raise FileNotFoundError(ckpts.nothing_saved())
    if step is not None and step not in steps:
      raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint for step {step} (have {steps})")
    graphdef, state = model_lib.abstract(c.model)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            nnx.to_pure_dict(state))
    step, params = ckpts.restore_for_reading(abstract, step=step)
    model = model_lib.Model(c.model, graphdef, params)
    model.step, model.checkpoint_dir = step, ckpts.step_dir(step)
    return model, c
  finally:
    ckpts.close()
