"""What every dba-bench mode shares: timing a compiled function or a step loop, a child's time and peak RSS, XLA's
FLOP count, and the JSON report."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import jax
import numpy as np

from dba_jax.cli import CommandError, refuse_existing, write_json


def timed(fn, *args, repeats=3):
  """(median seconds after compilation, compiled temp bytes: XLA's scratch-buffer high-water mark)."""
  jitted = jax.jit(fn)
  compiled = jitted.lower(*args).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)), temp


def steps_per_s(step, steps: int, chunk: int, sync=lambda: None) -> tuple[float, float]:
  """(median over chunks of `chunk` steps, overall) steps/s of `step(i)`. Timing whole chunks and syncing at
  the end lets JAX's async dispatch overlap the next batch's sampling with the running step, as a training loop
  does; torch on CPU runs synchronously, so there `sync` has nothing to wait for."""
  rates, total = [], 0.0
  for start in range(0, steps, chunk):
    n = min(chunk, steps - start)
    t0 = time.perf_counter()
    for i in range(start, start + n):
      step(i)
    sync()
    dt = time.perf_counter() - t0
    rates.append(n / dt)
    total += dt
  return float(np.median(rates)), steps / total


def median_ms(fn, repeats: int) -> float:
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    fn(i)
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def cost_gflop(compiled) -> float | None:
  """XLA's FLOP count of a compiled function (None where the backend gives none)."""
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca["flops"]) / 1e9 if ca and "flops" in ca else None
  except Exception:  # cost analysis is advisory; some backends raise instead of returning nothing
    return None


def child_run(cmd: list[str]) -> tuple[float, int]:
  """(seconds, peak RSS bytes) of a child process; ru_maxrss of the children is the max over those waited for,
  so each measurement runs in its own fresh child that runs the command. A failing child is a CommandError with
  the last line it printed."""
  probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); "
           "dt = time.perf_counter() - t; print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
           "sys.exit(r.returncode)")
  out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True)
  if out.returncode:
    last = next((ln for ln in reversed(out.stderr.splitlines()) if ln.strip()), "no message")
    raise CommandError(f"{' '.join(cmd[1:4])} ... failed (exit {out.returncode}): {last.strip()}")
  sec, kib = out.stdout.split()[-2:]
  return float(sec), int(kib) * 1024


def add_out(p: argparse.ArgumentParser, what: str = "the JSON report"):
  """--out and --force, the same in every mode."""
  p.add_argument("--out", default="", help=f"write {what} here (atomically)")
  p.add_argument("--force", action="store_true", help="replace an existing --out")


def check_out(prog: str, args):
  """Before any work: --out is not replaced without --force, and can be written where it is named."""
  refuse_existing(prog, args.out, args.force)


def write_report(path: str, report: dict) -> int:
  """Every dba-bench mode's JSON output (when --out is given, written atomically), stamped with the date and JAX
  version."""
  report = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, **report}
  if path:
    write_json(path, report)
  return 0
