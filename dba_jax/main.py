"""`dba-train --config=configs/NAME.py[:variant] [--config.a.b=value ...] --workdir=DIR [--dry-run]`.

Trains the config's model into DIR, or resumes the run DIR holds. SIGTERM or Ctrl-C saves at the current step and
exits 0 (a second Ctrl-C aborts at once); the same command then resumes."""
from __future__ import annotations

# Run as a script (python -m dba_jax.main), the stop handler comes first: a SIGTERM or Ctrl-C during the imports
# below is then a clean stop, not a kill (the console script's launcher, dba_jax/tools.py, does the same).
from dba_jax import signals

if __name__ == "__main__":
  signals.install("dba-train", stops=True)

import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
from absl import flags  # noqa: E402

from dba_jax import ckpt, data, mesh as mesh_lib, model as model_lib, train  # noqa: E402
from dba_jax.cli import CommandError, command, entry, flags_of  # noqa: E402
from dba_jax.config import Config, ConfigError, attn_dim, padded_vocab, validate  # noqa: E402


def _train_flags(fv: flags.FlagValues):
  flags.DEFINE_string("workdir", None, "Run directory: config, metrics, TensorBoard, checkpoints", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs "
                      "(env DBA_COORDINATOR_ADDRESS)", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "processes in the run (env DBA_NUM_PROCESSES)", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process's index (env DBA_PROCESS_ID)", flag_values=fv)
  flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() with no arguments (Cloud TPU VMs "
                    "and clusters JAX detects by itself)", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Print parameter count, memory estimate and mesh; allocate nothing",
                    flag_values=fv)


def memory_estimate(c: Config, n_params: int, mesh_shape: dict) -> dict:
  """Rough bytes per device: fp32 params + grads + Adam moments (16 B/param, sharded over fsdp x tensor) and
  the activations one micro-batch keeps for the backward pass (no remat)."""
  m, t = c.model, c.train
  state = 16 * n_params / (mesh_shape["fsdp"] * mesh_shape["tensor"])
  B = t.batch_size // t.grad_accum / (mesh_shape["data"] * mesh_shape["fsdp"])
  T, d, L = c.data.seq_len, m.d_model, m.n_layers
  act_bytes = 2 if m.compute_dtype == "bfloat16" else 4
  width = m.d_ff * (3 if m.mlp == "swiglu" else 2) + 4 * attn_dim(m) + 4 * d  # per-token saved tensors per layer
  per_layer = B * T * width * act_bytes / mesh_shape["tensor"] + B * m.n_heads * T * T * (4 + act_bytes)
  logits = B * T * padded_vocab(m) * (4 + act_bytes)
  return {"state": state, "activations": L * per_layer + logits, "total": state + L * per_layer + logits}


def _gib(x: float) -> str:
  return f"{x / 2**30:.2f} GiB"


def dry_run(c: Config):
  n = model_lib.count_params(c.model)
  micro = c.train.batch_size // c.train.grad_accum
  shape = dict(zip(mesh_lib.MESH_AXES, mesh_lib.resolve_shape(c.mesh.shape, jax.device_count(), micro)))
  mem = memory_estimate(c, n, shape)
  print(f"params: {n}")
  print(f"kv cache elements per token: {model_lib.kv_elems_per_token(c.model)}")
  print(f"mesh: {shape} over {jax.device_count()} {jax.devices()[0].platform} device(s)")
  print(f"memory per device (estimate): state {_gib(mem['state'])} + activations {_gib(mem['activations'])} "
        f"= {_gib(mem['total'])}")


def init_distributed(fv: flags.FlagValues) -> None:
  """Join a multi-process run when flags or DBA_* environment variables ask for one; before any JAX use."""
  addr = fv.coordinator_address or os.environ.get("DBA_COORDINATOR_ADDRESS")
  n = fv.num_processes or int(os.environ.get("DBA_NUM_PROCESSES", "0") or 0)
  pid = fv.process_id if fv.process_id is not None else os.environ.get("DBA_PROCESS_ID")
  if not (addr or fv.distributed):
    return
  if fv.distributed and not addr:
    jax.distributed.initialize()
    return
  if not n or pid is None:
    raise ConfigError("a multi-process run needs --coordinator_address, --num_processes and --process_id "
                      "(or DBA_COORDINATOR_ADDRESS, DBA_NUM_PROCESSES, DBA_PROCESS_ID)")
  jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=int(pid))


@command("dba-train", errors=(ConfigError,))
def main(argv, stop: signals.StopSignals | None = None) -> int:
  fv = flags_of(argv, _train_flags, doc=__doc__)
  if fv.config is None:
    raise CommandError("--config=configs/NAME.py[:variant] is required")
  c = validate(fv.config)
  if fv.dry_run:
    dry_run(c)
    return 0
  if not fv.workdir:
    raise ConfigError("--workdir is required (where config, metrics and checkpoints go)")
  init_distributed(fv)
  try:
    summary = train.train(c, fv.workdir, stop=stop)
  except (data.DataError, ckpt.CheckpointMismatch) as e:
    raise CommandError(str(e)) from None
  except train.TrainingStopped as e:
    print(f"dba-train: stopped: {e}", file=sys.stderr)
    return 3
  if jax.process_index() == 0:
    loss = summary["eval_loss"]
    evaluated = f"eval loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.2f})" if loss == loss else "not evaluated"
    if summary.get("stopped"):
      print(f"stopped by {summary['stopped']} after {summary['steps']} steps ({evaluated}) -> {summary['workdir']}; "
            "the same command resumes")
    else:
      print(f"done: {summary['steps']} steps, {evaluated}, {summary['tokens_per_s']:,.0f} tok/s -> "
            f"{summary['workdir']}")
  return 0


cli = entry(main, stops=True)


if __name__ == "__main__":
  cli()
