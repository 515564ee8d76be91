"""The LatentWire optimiser (bridge and interlingua alike): clip, then AdamW per parameter group, fp32 master
weights (the original trained its translator in bf16 without them)."""
from __future__ import annotations

import jax
import optax

from dba_jax.configlib import Config


def _group(path, _):
  name = str(getattr(path[-1], "key", path[-1]))
  if name in ("cross_gate", "ffn_gate"):
    return "gate"
  return "decay" if name in ("kernel", "query_tokens", "latent", "byte_emb") else "no_decay"


def make_optimizer(c: Config, params):
  """clip -> AdamW per group (gates at gate_lr_mult x lr, no decay on biases, norms and gates)."""
  o, steps = c.optim, c.train.steps
  sched = optax.join_schedules([optax.linear_schedule(0.0, o.lr, max(o.warmup_steps, 1)),
                                optax.linear_schedule(o.lr, 0.0, max(steps - o.warmup_steps, 1))], [o.warmup_steps])
  adamw = lambda lr, wd: optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=wd)
  labels = jax.tree_util.tree_map_with_path(_group, params)
  groups = {"decay": adamw(sched, o.weight_decay), "no_decay": adamw(sched, 0.0),
            "gate": adamw(lambda s: o.gate_lr_mult * sched(s), 0.0)}
  parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
  return optax.chain(*parts, optax.multi_transform(groups, labels))
