"""`dba-bench`: train-step time, with and without async checkpointing, on chosen meshes; tokens/s and MFU.

  dba-bench --config=configs/quickstart.py:dba [--config.x=...] [--steps 20] [--ckpt-every 5]
            [--devices 8 --meshes 8,1,1 2,4,1 2,2,2 1,1,8] [--peak-tflops 989] [--out bench.json [--force]]

  dba-bench attention [--seq 256 512 1024 2048 4096] [--heads 4] [--head-dim 64] [--out attn.json]

  dba-bench decode [--layers 12] [--d-model 256] [--heads 4] [--prompt 512] [--gen 64] [--caches fp16 q4/q8/q4]

  dba-bench convert [--config=configs/dba_paper_12l.py:decoupled] [--config.x=...] [--dir DIR] [--out conv.json]

  dba-bench addition --config=configs/addition.py:456p [--config.x=...] [--steps 300] [--num-models 1 8]
                     [--batching vmap map] [--torch-threads 0 1] [--out add.json]

  dba-bench gpt --torch [--attn standard selective] [--shapes d256_v50k d128_v256 d512_v50k] [--config.x=...]
                [--steps 4] [--rounds 3] [--breakdown] [--out gpt.json]

`--devices N` simulates N CPU devices (it sets XLA_FLAGS before JAX starts its backend). Model FLOPs count
6 x (matmul parameters) per token plus attention, causal-halved as MaxText does; MFU = model FLOP/s / peak (given,
or known for H100/H200: 989 TFLOP/s dense bf16).

Every mode checks its numbers (counts >= 1, meshes that fit the devices) and --out before any work; --out is
written atomically and never replaced without --force.

One module per mode: train_step (the default), attention, decode, convert, addition, gpt; timing holds what they
share. `dba_jax.bench.train_step.flops_per_token` is the FLOP count aot's MFU uses too.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from dba_jax.cli import command, entry
from dba_jax.configlib import ConfigError

MODES = ("attention", "decode", "convert", "addition", "gpt")  # dba_jax/bench/MODE.py; the default: train_step.py


def simulate_cpu_devices(argv) -> None:
  """--devices N: N CPU devices, set in the environment before JAX starts its backend (importing dba_jax.model
  starts it, so this runs before any mode module is imported)."""
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument("--devices", default="0")
  n = p.parse_known_args(argv)[0].devices
  n = int(n) if n.isdigit() else 0  # anything else is refused by the mode's own parser, before JAX starts
  if n:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


@command("dba-bench", errors=(ConfigError,), argv0=False)
def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  mode = argv[0] if argv and argv[0] in MODES else "train_step"
  if mode == "train_step":
    simulate_cpu_devices(argv)
  # The chosen mode's module only, imported now: dba_jax.model starts JAX's backend on import (after --devices).
  module = importlib.import_module(f"dba_jax.bench.{mode}")
  return module.main(argv, description=__doc__) if mode == "train_step" else module.main(argv[1:])


cli = entry(main)
