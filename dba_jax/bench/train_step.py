"""`dba-bench --config=...`: train-step time, with and without async checkpointing, on chosen meshes; tokens/s and
MFU. Model FLOPs count 6 x (matmul parameters) per token plus attention, causal-halved as MaxText does."""
from __future__ import annotations

import argparse
import math
import tempfile
import time

import jax
import numpy as np

from dba_jax import attention as attention_kinds, ckpt, mesh as mesh_lib, model as model_lib, train
from dba_jax.bench.timing import add_out, check_out, write_report
from dba_jax.cli import CommandError, float_at_least, int_at_least, listed, load_config
from dba_jax.config import ConfigError, padded_vocab, validate

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def flops_per_token(m, seq_len: int) -> float:
  """Training FLOPs per token: 6 x matmul params (embedding lookup excluded, head included) + attention."""
  n = model_lib.count_params(m) - padded_vocab(m) * m.d_model * (0 if m.tie_embeddings else 1)
  if m.positions == "learned":
    n -= m.max_seq_len * m.d_model
  qk, v = attention_kinds.get(m).score_dims(m)
  attention = 6 * m.n_layers * seq_len * (qk + v) * 0.5  # scores and p.v, causal half
  return 6 * n + attention


def time_steps(c, mesh_shape, steps: int, ckpt_every: int, devices=None) -> dict:
  mesh = mesh_lib.make_mesh(mesh_shape, devices)
  trainer = train.Trainer(c, mesh)
  state = trainer.init_state(0)
  t = c.train
  rng = np.random.default_rng(0)
  batch = rng.integers(0, c.model.vocab_size, (t.grad_accum, t.batch_size // t.grad_accum, c.data.seq_len + 1))
  batch = mesh_lib.global_batch(batch.astype(np.int32), trainer.accum_sharding, 1)
  state, _ = trainer.train_step(state, batch)  # compile
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory() as d:
    ckpts = ckpt.Checkpointer(d, keep=2) if ckpt_every else None
    times = []
    for i in range(1, steps + 1):
      start = time.perf_counter()
      state, metrics = trainer.train_step(state, batch)
      if ckpts and i % ckpt_every == 0:
        ckpts.save(i, state["params"], state["opt"], {"step": i})
      jax.block_until_ready(state)
      times.append(time.perf_counter() - start)
    if ckpts:
      ckpts.close()
  # Mean, not median: a save's cost lands on the steps that carry it, and those must count.
  step_s = float(np.mean(times))
  return {"mesh": "x".join(map(str, mesh.devices.shape)), "ckpt_every": ckpt_every, "step_ms": 1e3 * step_s,
          "tokens_per_s": t.batch_size * c.data.seq_len / step_s}


def mesh_devices(c, shape) -> list:
  """The devices a mesh shape runs on (a -1 takes them all), checked before any work: the shape fits the devices
  there are (mesh.resolve_shape) and the batch splits over its data-parallel shards (train.check_batch)."""
  if len(shape) != len(mesh_lib.MESH_AXES):
    raise CommandError(f"--meshes {','.join(map(str, shape))}: give {len(mesh_lib.MESH_AXES)} sizes "
                       f"({', '.join(mesh_lib.MESH_AXES)}), e.g. 2,2,1")
  n = math.prod(shape) if -1 not in shape else jax.device_count()
  if n > jax.device_count():
    raise CommandError(f"--meshes {','.join(map(str, shape))} needs {n} devices but {jax.device_count()} are "
                       "present (--devices N simulates N CPU devices)")
  devices = jax.devices()[:max(n, 1)]
  try:
    train.check_batch(c.train, mesh_lib.make_mesh(shape, devices), 1)
  except (ValueError, ConfigError) as e:
    raise CommandError(f"--meshes {','.join(map(str, shape))}: {e}") from None
  return devices


def main(argv, description: str = "") -> int:
  p = argparse.ArgumentParser(prog="dba-bench", description=description or __doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
  p.add_argument("--steps", type=int_at_least(1), default=20)
  p.add_argument("--ckpt-every", type=int_at_least(0), default=5,
                 help="also time with an async save every N steps (0: skip)")
  p.add_argument("--devices", type=int_at_least(0), default=0,
                 help="simulate this many CPU devices (dba_jax.bench.main sets them up before JAX starts)")
  p.add_argument("--meshes", nargs="+", type=listed(int), default=[],
                 help="mesh shapes like 2,2,2 (default: the config's)")
  p.add_argument("--peak-tflops", type=float_at_least(0), default=0.0)
  add_out(p)
  args, overrides = p.parse_known_args(argv)
  check_out(p.prog, args)
  c = load_config("dba-bench", args.config, overrides, validate)
  meshes = [tuple(m) for m in args.meshes] or [tuple(c.mesh.shape)]
  devices = [mesh_devices(c, shape) for shape in meshes]  # every mesh checked before the first is timed
  kind = jax.devices()[0].device_kind
  peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in kind), 0.0)
  fpt = flops_per_token(c.model, c.data.seq_len)
  rows = []
  for shape, devs in zip(meshes, devices):
    for every in ([0, args.ckpt_every] if args.ckpt_every else [0]):
      r = time_steps(c, shape, args.steps, every, devs)
      r["mfu"] = fpt * r["tokens_per_s"] / (peak * 1e12 * len(devs)) if peak else None
      rows.append(r)
      mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
      print(f"mesh {r['mesh']:>7} | ckpt every {every or '-':>3} | {r['step_ms']:8.1f} ms/step | "
            f"{r['tokens_per_s']:12,.0f} tok/s | MFU {mfu}", flush=True)
  report = {"config": args.config, "overrides": overrides, "device": kind, "devices": jax.device_count(),
            "flops_per_token": fpt, "rows": rows}
  return write_report(args.out, report)
