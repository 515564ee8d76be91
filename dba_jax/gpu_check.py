"""`python -m dba_jax.gpu_check`: one pass over everything a CUDA host has to prove (issue 16).

  python -m dba_jax.gpu_check [--out DIR] [--sections flash selective scans timing memory gpt2] [--budget-s 390]
  python -m dba_jax.gpu_check --cpu-dry [--out DIR]     # the same code end to end on CPU: interpret mode, tiny sizes

Sections, in order (each isolated: an exception is recorded with its traceback and the next section runs):
  flash      the flash-attention kernel (MHA, GQA, D != E, a null-key prefix) forward and input gradients against
             the float64 reference (dba_jax.ops.standard.reference), fp32 and bf16, T 256-2048
  selective  the fused selective kernel (default mask, dedicated selection heads, GQA) against
             dba_jax.ops.selective's float64 reference, fp32 and bf16
  scans      the blocked cumsum and protect-and-attack kernels against their float64 XLA references
  timing     bf16 fwd+bwd of fused selective attention vs plain causal flash attention (ours and cuDNN's
             jax.nn.dot_product_attention) at T 1k-8k
  memory     scratch memory of the fused / flash kernels vs the materialising XLA paths at T 8192: XLA's compiled
             temp bytes for all four, and each selective path's device peak (`peak_bytes_in_use`, GPU only) in a
             fresh child process (the peak is a per-process high-water mark)
  gpt2       `dba-bench --config=configs/gpt2_small.py` in a child process: tokens/s and MFU

Writes DIR/results.json and DIR/results.md after every section (a run cut short keeps what finished) and prints the
markdown. Exit status: 0 when every section that ran passed; 1 when a kernel failed to compile or run, disagreed
with its reference, or a section raised; 2 for bad arguments (including an --out folder that already holds files).
The performance targets (selective <= 1.3x flash at T 2k-8k, >= 10x less peak memory at T 8192, GPT-2 small
>= 40% MFU on H100 bf16) are reported pass / fail but never change the exit status.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from dba_jax import ops
from dba_jax.ops import selective, standard
from dba_kernels import cumsum as kcumsum, flash_attention as fa, protect_attack as kpa, selective_flash as sflash

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("flash", "selective", "scans", "timing", "memory", "gpt2")
CORRECTNESS = ("flash", "selective", "scans")
FAULTS = ("flash", "selective", "cumsum", "protect_attack")
TARGET_RATIO, TARGET_MEMORY, TARGET_MFU = 1.3, 10.0, 0.40

# Max |kernel - float64 reference| as a fraction of max |reference|, per tensor (BUILD_NOTES "Numerical tolerances").
TOL = {
    ("flash", "float32"): (2e-5, 2e-5),  # (output, gradients)
    ("flash", "bfloat16"): (1e-2, 1e-2),
    ("selective", "float32"): (2e-5, 5e-5),
    ("selective", "bfloat16"): (2e-2, 2e-2),
    ("cumsum", "float32"): (2e-5, 2e-5),
    ("protect_attack", "float32"): (1e-6, 1e-6),  # dyadic inputs: every sum is exact in fp32 (see _scan_inputs)
}


@dataclass
class Plan:
  """Sizes per mode. GPU: the issue's T ranges. --cpu-dry: the same cases shrunk so interpret mode finishes."""
  flash: list  # (name, B, T, H, K, D, E, n_prefix, dtype)
  selective: list  # (name, B, T, H, K, D, E, variant dict, dtype)
  scans: list  # (name, kernel, B, T, S)
  timing_seq: list
  timing_tokens: int  # B * T per timed call: the batch shrinks as T grows, so every row does similar work
  heads: int
  head_dim: int
  memory_seq: int
  repeats: int
  gpt2_steps: int
  gpt2_overrides: list = field(default_factory=list)


def gpu_plan() -> Plan:
  return Plan(
      flash=[("mha_T256", 2, 256, 4, 4, 64, 64, 0, "float32"),
             ("gqa_dba_T1000_null", 1, 1000, 8, 2, 40, 32, 1, "float32"),  # ragged T, D != E, null key
             ("gqa_dba_T2048_null", 1, 2048, 8, 2, 40, 48, 1, "bfloat16"),
             ("mha_T2048", 1, 2048, 12, 12, 64, 64, 0, "bfloat16")],
      selective=[("default_T256", 2, 256, 4, 4, 64, 64, {}, "float32"),
                 ("heads2_T1000_no_bos", 1, 1000, 5, 5, 32, 48, {"selection_heads": 2, "protect_bos": False},
                  "float32"),
                 ("gqa_head3_T2048", 1, 2048, 8, 2, 64, 64, {"selection_head": 3}, "bfloat16"),
                 ("default_T2048", 1, 2048, 12, 12, 64, 64, {}, "bfloat16")],
      scans=[("cumsum_T256", "cumsum", 2, 256, 256), ("cumsum_T2048", "cumsum", 1, 2048, 2048),
             ("protect_attack_T256", "protect_attack", 2, 256, 256),
             ("protect_attack_T2048", "protect_attack", 1, 2048, 2048)],
      timing_seq=[1024, 2048, 4096, 8192], timing_tokens=16384, heads=12, head_dim=64, memory_seq=8192,
      repeats=10, gpt2_steps=8)


def dry_plan() -> Plan:
  return Plan(
      flash=[("mha_T64", 1, 64, 2, 2, 16, 16, 0, "float32"),
             ("gqa_dba_T100_null", 1, 100, 4, 2, 24, 16, 1, "bfloat16")],
      selective=[("default_T64", 1, 64, 2, 2, 16, 16, {}, "float32"),
                 ("gqa_head3_T100", 1, 100, 4, 2, 16, 16, {"selection_head": 3}, "bfloat16")],
      scans=[("cumsum_T100", "cumsum", 1, 100, 40), ("protect_attack_T100", "protect_attack", 1, 100, 40)],
      timing_seq=[64, 128], timing_tokens=128, heads=2, head_dim=16, memory_seq=128, repeats=2, gpt2_steps=2,
      gpt2_overrides=["--config.model.n_layers=1", "--config.model.d_model=32", "--config.model.n_heads=2",
                      "--config.model.d_ff=64", "--config.model.vocab_size=256", "--config.model.max_seq_len=32",
                      "--config.data.seq_len=32", "--config.train.batch_size=2", "--config.train.grad_accum=1"])


class Interrupted(Exception):
  """SIGTERM (the launcher's time limit): stop the current section, keep the results so far."""


# --------------------------------------------------------------------------------------------- numerics

def _compile(fn, *args):
  # Interpret-mode kernels are large HLO; on CPU XLA's backend optimisations cost more time than they save.
  opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return jax.jit(fn).lower(*args).compile(opts)


def _out_and_grads(fn, arrays):
  """[out, d inputs...] of fn at arrays[:-1] with output cotangent arrays[-1], as float64 numpy."""
  def run(*a):
    out, pull = jax.vjp(fn, *a[:-1])
    return (out, *pull(a[-1]))

  got = _compile(run, *arrays)(*arrays)
  return [np.asarray(jnp.asarray(x, jnp.float32) if x.dtype == jnp.bfloat16 else x, np.float64) for x in got]


def _vs_reference(kernel, reference, arrays64, dtype: str):
  """Kernel at `dtype` and the float64 reference, both on the same dtype-rounded inputs (float64 numpy in)."""
  low = [jnp.asarray(a, dtype) for a in arrays64]
  rounded = [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in low]
  got = _out_and_grads(kernel, low)
  with jax.enable_x64(True):  # the context, never the global flag (BUILD_NOTES "Known-bad combinations")
    want = _out_and_grads(reference, [jnp.asarray(a, jnp.float64) for a in rounded])
  return got, want


def _compare(names, got, want, tol) -> dict:
  errs = {}
  for i, (name, g, w) in enumerate(zip(names, got, want)):
    if g.shape != w.shape:
      raise ValueError(f"{name}: kernel shape {g.shape} != reference shape {w.shape}")
    scale = float(np.abs(w).max()) or 1.0
    # NaN != anything: a NaN anywhere makes the error NaN, and NaN <= tol is False, so it fails.
    errs[name] = float(np.abs(g - w).max()) / scale
  limits = {n: tol[0] if i == 0 else tol[1] for i, n in enumerate(names)}
  ok = all(errs[n] <= limits[n] for n in names)
  return {"rel_err": errs, "tol": {"out": tol[0], "grads": tol[1]}, "status": "pass" if ok else "fail"}


def _faulty(fn, kernel: str, fault: str):
  """The injected fault (--inject-fault): a 10% error in the kernel's output, far above every tolerance."""
  return (lambda *a: fn(*a) * 1.1) if kernel == fault else fn


def _case(rows: list, name: str, body):
  """One kernel case, isolated: a compile or runtime error is recorded and the other cases still run."""
  t0 = time.perf_counter()
  try:
    row = {"case": name, **body()}
  except Interrupted:
    raise
  except Exception as e:  # noqa: BLE001 - any failure of a kernel is a result to report, not a crash
    row = {"case": name, "status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
  row["seconds"] = round(time.perf_counter() - t0, 2)
  rows.append(row)
  print(f"  {name:<28} {row['status']:<6} {_errs_text(row)}", flush=True)


def _errs_text(row) -> str:
  if "rel_err" in row:
    return " ".join(f"{k} {v:.2e}" for k, v in row["rel_err"].items())
  return row.get("error", "")[:200]


def check_flash(plan: Plan, fault: str) -> dict:
  rows = []
  for name, B, T, H, K, D, E, n_prefix, dtype in plan.flash:
    def body(B=B, T=T, H=H, K=K, D=D, E=E, n_prefix=n_prefix, dtype=dtype, seed=len(rows)):
      rng = np.random.default_rng(seed)
      S = T + n_prefix
      arrays = [rng.normal(size=s) for s in ((B, T, H, D), (B, S, K, D), (B, S, K, E), (B, T, H, E))]
      kernel = _faulty(lambda q, k, v: fa.flash_attention(q, k, v, n_prefix=n_prefix), "flash", fault)
      got, want = _vs_reference(kernel, lambda q, k, v: standard.reference(q, k, v, n_prefix=n_prefix), arrays, dtype)
      return {"dtype": dtype, "T": T, "shape": f"B{B} H{H} K{K} D{D} E{E} prefix{n_prefix}",
              **_compare(("out", "dq", "dk", "dv"), got, want, TOL[("flash", dtype)])}
    _case(rows, name, body)
  return _correctness(rows)


def check_selective(plan: Plan, fault: str) -> dict:
  rows = []
  for name, B, T, H, K, D, E, variant, dtype in plan.selective:
    def body(B=B, T=T, H=H, K=K, D=D, E=E, variant=variant, dtype=dtype, seed=len(rows)):
      rng = np.random.default_rng(100 + seed)
      m = variant.get("selection_heads", 0)
      # Scale 1.5 (as tests/test_selective_flash.py): plenty of positive selection logits, so F is far from 0.
      arrays = [1.5 * rng.normal(size=s) for s in ((B, T, H, D), (B, T, K, D), (B, T, K, E), (B, T, H - m, E))]
      kernel = _faulty(lambda q, k, v: sflash.selective_flash_attention(q, k, v, **variant), "selective", fault)

      def reference(q, k, v):  # GQA: the dense reference sees k, v repeated to H heads
        g = q.shape[2] // k.shape[2]
        return selective.selective_attention(q, jnp.repeat(k, g, 2), jnp.repeat(v, g, 2), impl="reference", **variant)

      got, want = _vs_reference(kernel, reference, arrays, dtype)
      return {"dtype": dtype, "T": T, "shape": f"B{B} H{H} K{K} D{D} E{E} {variant or 'default'}",
              **_compare(("out", "dq", "dk", "dv"), got, want, TOL[("selective", dtype)])}
    _case(rows, name, body)
  return _correctness(rows)


def _scan_inputs(kind: str, rng, shape):
  """cumsum: continuous inputs (the scan is linear, so rounding is the only error). protect-and-attack: the
  gradient jumps where the pool empties exactly, so fp32 and fp64 could take different branches on continuous
  inputs; multiples of 1/4 below 4 (a quarter of them zero) keep every pool and damage exact in fp32, ties
  included, so the kernel must match the float64 reference to rounding-free precision."""
  if kind == "cumsum":
    return [rng.exponential(size=shape), rng.normal(size=shape)]
  grid = lambda: np.floor(rng.uniform(0, 16, size=shape)) / 4 * (rng.random(shape) < 0.75)
  return [grid(), grid(), np.floor(rng.uniform(-8, 8, size=shape)) / 4]


def check_scans(plan: Plan, fault: str) -> dict:
  rows = []
  for name, kind, B, T, S in plan.scans:
    def body(kind=kind, B=B, T=T, S=S, seed=len(rows)):
      arrays = _scan_inputs(kind, np.random.default_rng(200 + seed), (B, T, S))
      if kind == "cumsum":
        kernel, ref = kcumsum.exclusive_cumsum, lambda x: selective.exclusive_cumsum(x, impl="reference")
        names = ("out", "dx")
      else:
        kernel, ref = kpa.protect_and_attack, selective.protect_and_attack
        names = ("out", "da", "dp")
      got, want = _vs_reference(_faulty(kernel, kind, fault), ref, arrays, "float32")
      return {"dtype": "float32", "T": T, "shape": f"B{B} S{S}", **_compare(names, got, want, TOL[(kind, "float32")])}
    _case(rows, name, body)
  return _correctness(rows)


def _correctness(rows) -> dict:
  statuses = {r["status"] for r in rows}
  status = "error" if "error" in statuses else "fail" if "fail" in statuses else "pass"
  return {"status": status, "rows": rows}


# ----------------------------------------------------------------------------------------------- timing

def _fwd_bwd(attn):
  """fwd+bwd of attn: input gradients for a fixed output cotangent (what a training step runs)."""
  def f(q, k, v, do):
    _, pull = jax.vjp(attn, q, k, v)
    return pull(do)
  return f


def _median_ms(fn, args, repeats: int) -> float:
  compiled = _compile(fn, *args)
  jax.block_until_ready(compiled(*args))  # warm-up: autotuning, first-touch allocation
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def _attention_fns(gpu: bool) -> dict:
  impl = "cudnn" if gpu else "xla"  # cuDNN exists only on a GPU; the dry run exercises the same call on XLA
  return {"selective": lambda q, k, v: sflash.selective_flash_attention(q, k, v),
          "flash": lambda q, k, v: fa.flash_attention(q, k, v),
          "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)}


def run_timing(plan: Plan, gpu: bool, over_budget) -> dict:
  rows, notes = [], []
  fns = _attention_fns(gpu)
  H, D = plan.heads, plan.head_dim
  for T in plan.timing_seq:
    if over_budget():
      notes.append(f"T={T} and longer skipped: over the time budget")
      break
    B = max(1, plan.timing_tokens // T)
    keys = jax.random.split(jax.random.key(T), 4)
    q, k, v, do = (jax.random.normal(kk, (B, T, H, D), jnp.bfloat16) for kk in keys)
    row = {"T": T, "B": B, "H": H, "D": D}
    for name, fn in fns.items():
      try:
        row[f"{name}_ms"] = _median_ms(_fwd_bwd(fn), (q, k, v, do), plan.repeats)
      except Interrupted:
        raise
      except Exception as e:  # noqa: BLE001
        if name != "cudnn":
          raise  # our kernels must run; the section reports the error
        row["cudnn_ms"] = None  # the baseline's absence is a note, not our failure
        notes.append(f"cuDNN at T={T}: {type(e).__name__}: {str(e)[:300]}")
    row["selective_vs_flash"] = row["selective_ms"] / row["flash_ms"]
    row["selective_vs_cudnn"] = row["selective_ms"] / row["cudnn_ms"] if row.get("cudnn_ms") else None
    rows.append(row)
    print(f"  T={T:<5} B={B:<3} selective {row['selective_ms']:9.2f} ms  flash {row['flash_ms']:9.2f} ms  "
          f"cudnn {_fmt(row.get('cudnn_ms'), '9.2f')} ms", flush=True)
  return {"status": "pass", "rows": rows, "notes": notes, "cudnn_impl": "cudnn" if gpu else "xla (no GPU)"}


# ----------------------------------------------------------------------------------------------- memory

MEMORY_PATHS = ("selective_pallas", "selective_xla", "flash_pallas", "standard_xla")


def _memory_fn(path: str):
  fns = _attention_fns(False)
  attn = {"selective_pallas": fns["selective"], "flash_pallas": fns["flash"],
          "selective_xla": lambda q, k, v: ops.selective_attention(q, k, v, impl="xla"),
          "standard_xla": lambda q, k, v: ops.attention(q, k, v, impl="xla")}[path]
  return _fwd_bwd(attn)


def _memory_inputs(B, T, H, D):
  return tuple(jax.random.normal(kk, (B, T, H, D), jnp.bfloat16) for kk in jax.random.split(jax.random.key(0), 4))


def _temp_bytes(compiled):
  mem = compiled.memory_analysis()
  return getattr(mem, "temp_size_in_bytes", None) if mem is not None else None


def peak_child(spec: dict) -> dict:
  """One path, fwd+bwd once, in this (fresh) process: device peak bytes (None where the backend keeps no stats)."""
  args = _memory_inputs(spec["B"], spec["T"], spec["H"], spec["D"])
  jax.block_until_ready(args)
  stats = jax.devices()[0].memory_stats() or {}
  before = stats.get("bytes_in_use")
  compiled = _compile(_memory_fn(spec["path"]), *args)
  jax.block_until_ready(compiled(*args))
  stats = jax.devices()[0].memory_stats() or {}
  return {"path": spec["path"], "peak_bytes": stats.get("peak_bytes_in_use"), "inputs_bytes": before,
          "temp_bytes": _temp_bytes(compiled)}


def _child_env() -> dict:
  env = dict(os.environ)
  # An uninstalled checkout still imports: dba_kernels lives at kernels/dba_kernels (pyproject package-dir).
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.path.join(REPO, "kernels"), env.get("PYTHONPATH")) if p)
  return env


def run_memory(plan: Plan, gpu: bool, remaining) -> dict:
  B, T, H, D = 1, plan.memory_seq, plan.heads, plan.head_dim
  args = _memory_inputs(B, T, H, D)
  rows = []
  for path in MEMORY_PATHS:
    compiled = _compile(_memory_fn(path), *args)  # compile only: XLA's scratch high-water mark, nothing runs
    rows.append({"path": path, "T": T, "B": B, "H": H, "D": D, "temp_bytes": _temp_bytes(compiled)})
  # Device peaks: one fresh process per path (peak_bytes_in_use never goes down). Run in the dry run too, so the
  # child's code is exercised before a GPU is lent; there the peak is None (CPU keeps no allocator stats).
  for row in rows[:2]:
    spec = {"path": row["path"], "B": B, "T": T, "H": H, "D": D}
    cmd = [sys.executable, "-m", "dba_jax.gpu_check", "--peak-child", json.dumps(spec)] + ([] if gpu else ["--cpu-dry"])
    out = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), cwd=REPO,
                         timeout=max(30.0, remaining()))
    if out.returncode != 0:
      raise RuntimeError(f"peak child for {row['path']} exited {out.returncode}:\n{out.stderr[-3000:]}")
    child = json.loads(out.stdout.strip().splitlines()[-1])
    row["peak_bytes"], row["inputs_bytes"] = child["peak_bytes"], child["inputs_bytes"]
  by = {r["path"]: r for r in rows}
  sel, mat = by["selective_pallas"], by["selective_xla"]
  metric = "peak_bytes" if sel.get("peak_bytes") and mat.get("peak_bytes") else "temp_bytes"
  ratio = mat[metric] / sel[metric] if sel.get(metric) and mat.get(metric) else None
  flash_ratio = (by["standard_xla"]["temp_bytes"] / by["flash_pallas"]["temp_bytes"]
                 if by["flash_pallas"]["temp_bytes"] and by["standard_xla"]["temp_bytes"] else None)
  for r in rows:
    print(f"  {r['path']:<17} T={T} compiled temp {_mib(r['temp_bytes'])}  device peak {_mib(r.get('peak_bytes'))}",
          flush=True)
  return {"status": "pass", "rows": rows, "selective_ratio": ratio, "ratio_metric": metric,
          "flash_temp_ratio": flash_ratio}


# ------------------------------------------------------------------------------------------------- gpt2

def run_gpt2(plan: Plan, out_dir: str, remaining) -> dict:
  """dba-bench in a child process: its own allocator and compile cache, and a hang cannot stop this script."""
  if remaining() < 30:
    return {"status": "skipped", "note": "less than 30 s of the time budget left"}
  report = os.path.join(out_dir, "gpt2_bench.json")
  cmd = [sys.executable, "-m", "dba_jax.bench", f"--config={os.path.join(REPO, 'configs', 'gpt2_small.py')}",
         "--steps", str(plan.gpt2_steps), "--ckpt-every", "0", "--out", report, *plan.gpt2_overrides]
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), cwd=REPO, timeout=remaining())
  except subprocess.TimeoutExpired:
    return {"status": "skipped", "note": "dba-bench did not finish within the remaining budget", "command": cmd}
  if out.returncode != 0:
    raise RuntimeError(f"dba-bench exited {out.returncode}:\n{out.stderr[-3000:]}")
  bench = json.load(open(report))
  row = bench["rows"][0]
  print(f"  {row['tokens_per_s']:,.0f} tok/s  {row['step_ms']:.1f} ms/step  MFU {_pct(row.get('mfu'))}", flush=True)
  return {"status": "pass", "command": " ".join(cmd[1:]), "device": bench.get("device"),
          "tokens_per_s": row["tokens_per_s"], "step_ms": row["step_ms"], "mfu": row.get("mfu"),
          "flops_per_token": bench.get("flops_per_token"), "overrides": plan.gpt2_overrides}


# ---------------------------------------------------------------------------------------------- targets

def targets(results: dict, dry: bool) -> list:
  s = results["sections"]
  out = []

  def add(name, value, ok, shown):
    status = "n/a" if value is None else ("pass" if ok else "fail")
    if dry and value is not None:
      status = "n/a (cpu-dry)"  # interpret-mode numbers say nothing about the GPU targets
    out.append({"target": name, "value": value, "shown": shown, "status": status})

  timing = [r for r in s.get("timing", {}).get("rows", []) if 2048 <= r["T"] <= 8192]
  for base, label in (("flash", "ours"), ("cudnn", "cuDNN")):
    vals = [r[f"selective_vs_{base}"] for r in timing if r.get(f"selective_vs_{base}") is not None]
    worst = max(vals) if vals else None
    add(f"selective fwd+bwd <= {TARGET_RATIO}x causal flash ({label}), T 2k-8k", worst,
        worst is not None and worst <= TARGET_RATIO, "n/a" if worst is None else f"worst {worst:.2f}x")
  mem = s.get("memory", {})
  ratio = mem.get("selective_ratio")
  add(f">= {TARGET_MEMORY:.0f}x less memory than materialising, T {mem.get('rows', [{}])[0].get('T', '8192')}",
      ratio, ratio is not None and ratio >= TARGET_MEMORY,
      "n/a" if ratio is None else f"{ratio:.1f}x ({mem.get('ratio_metric')})")
  mfu = s.get("gpt2", {}).get("mfu")
  add(f"GPT-2 small MFU >= {100 * TARGET_MFU:.0f}%", mfu, mfu is not None and mfu >= TARGET_MFU,
      _pct(mfu))
  return out


# --------------------------------------------------------------------------------------------- markdown

def _fmt(x, spec=".2f"):
  return "n/a" if x is None else format(x, spec)


def _pct(x):
  return "n/a" if x is None else f"{100 * x:.1f}%"


def _mib(b):
  return "n/a" if b is None else f"{b / 2**20:,.1f} MiB"


def markdown(results: dict) -> str:
  s = results["sections"]
  lines = [f"# gpu_check {results['date']} ({results['mode']})", "",
           f"device: {results['device']} ({results['backend']}), jax {results['jax']}, "
           f"elapsed {results['elapsed_s']:.1f} s, exit {results['exit_code']}", "",
           "| section | status | seconds |", "|---|---|---|"]
  lines += [f"| {n} | {v['status']} | {v.get('seconds', 0):.1f} |" for n, v in s.items()]
  kernel_rows = [(n, r) for n in CORRECTNESS if n in s for r in s[n].get("rows", [])]
  if kernel_rows:
    lines += ["", "## Kernels vs float64 references (max |err| / max |ref|)", "",
              "| kernel | case | dtype | T | shape | errors | tol (out / grads) | status |",
              "|---|---|---|---|---|---|---|---|"]
    for n, r in kernel_rows:
      tol = r.get("tol", {})
      lines.append(f"| {n} | {r['case']} | {r.get('dtype', '')} | {r.get('T', '')} | {r.get('shape', '')} | "
                   f"{_errs_text(r)} | {tol.get('out', '')} / {tol.get('grads', '')} | {r['status']} |")
  if s.get("timing", {}).get("rows"):
    lines += ["", f"## bf16 fwd+bwd, median ms (baseline: {s['timing'].get('cudnn_impl')})", "",
              "| T | B | H x D | selective | flash (ours) | cuDNN | selective / flash | selective / cuDNN |",
              "|---|---|---|---|---|---|---|---|"]
    for r in s["timing"]["rows"]:
      lines.append(f"| {r['T']} | {r['B']} | {r['H']} x {r['D']} | {_fmt(r['selective_ms'])} | {_fmt(r['flash_ms'])} | "
                   f"{_fmt(r.get('cudnn_ms'))} | {_fmt(r['selective_vs_flash'])} | "
                   f"{_fmt(r.get('selective_vs_cudnn'))} |")
  if s.get("memory", {}).get("rows"):
    lines += ["", "## Memory, bf16 fwd+bwd (compiled temp: XLA memory_analysis; device peak: peak_bytes_in_use "
              "in a fresh process)", "", "| path | T | compiled temp | device peak |", "|---|---|---|---|"]
    for r in s["memory"]["rows"]:
      lines.append(f"| {r['path']} | {r['T']} | {_mib(r['temp_bytes'])} | {_mib(r.get('peak_bytes'))} |")
  if s.get("gpt2", {}).get("tokens_per_s") is not None:
    g = s["gpt2"]
    lines += ["", "## GPT-2 small (dba-bench)", "", "| device | tokens/s | ms/step | MFU |", "|---|---|---|---|",
              f"| {g['device']} | {g['tokens_per_s']:,.0f} | {g['step_ms']:.1f} | "
              f"{_pct(g['mfu'])} |"]
  if results.get("targets"):
    lines += ["", "## Targets (H100, bf16; reported, never the exit status)", "", "| target | measured | status |",
              "|---|---|---|"]
    lines += [f"| {t['target']} | {t['shown']} | {t['status']} |" for t in results["targets"]]
  problems = [(n, v) for n, v in s.items() if v["status"] in ("fail", "error")]
  if problems:
    lines += ["", "## Failures", ""]
    for n, v in problems:
      lines.append(f"- **{n}**: {v.get('error', '').splitlines()[0] if v.get('error') else 'see rows'}")
      lines += [f"  - {r['case']}: {r['status']} {_errs_text(r)}" for r in v.get("rows", [])
                if r.get("status") in ("fail", "error")]
  notes = [f"- {n}: {note}" for n, v in s.items() for note in v.get("notes", [])]
  return "\n".join(lines + (["", "## Notes", ""] + notes if notes else [])) + "\n"


def _write(out_dir: str, results: dict) -> None:
  """results.json and results.md, each replaced atomically (a kill mid-write leaves the previous version)."""
  for name, text in (("results.json", json.dumps(results, indent=2, default=str)), ("results.md", markdown(results))):
    tmp = os.path.join(out_dir, name + ".tmp")
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, os.path.join(out_dir, name))


# ------------------------------------------------------------------------------------------------- main

def parse(argv):
  p = argparse.ArgumentParser(prog="python -m dba_jax.gpu_check", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cpu-dry", action="store_true", help="run on CPU: interpret-mode kernels, tiny sizes")
  p.add_argument("--out", default="", help="results folder (default: results/gpu_check-<UTC time>); must be new or "
                 "empty: files already there are never overwritten")
  p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                 help=f"sections to run, from {', '.join(SECTIONS)} (default: all)")
  p.add_argument("--budget-s", type=float, default=390.0,
                 help="after this many seconds the timing sections (timing, memory, gpt2) are skipped; the "
                      "correctness sections always run (default 390: launch/gpu_check.sh stops at 450)")
  p.add_argument("--inject-fault", choices=FAULTS, default=None,
                 help="self-test: add a 10%% error to this kernel's output; the run must then exit 1")
  p.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)  # internal: one memory-section measurement
  args = p.parse_args(argv)
  if args.budget_s <= 0:
    p.error(f"--budget-s must be positive (got {args.budget_s})")
  return args


def _setup_env(cpu_dry: bool) -> None:
  """Before JAX starts its backend: the platform, and no 75% up-front GPU allocation, because the memory section's
  child processes and dba-bench need device memory while this process is alive. Both are read when the backend
  starts, except JAX_PLATFORMS, which JAX read on import: it goes to jax.config too (the children read the
  variable)."""
  if cpu_dry:
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def main(argv=None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  _setup_env(args.cpu_dry)
  if args.peak_child:
    print(json.dumps(peak_child(json.loads(args.peak_child))))
    return 0
  out_dir = args.out or os.path.join("results", "gpu_check-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    print(f"gpu_check: error: --out {out_dir} already exists and is not an empty folder; its files are never "
          "overwritten (pick a new --out)", file=sys.stderr)
    return 2
  backend = jax.default_backend()
  if args.cpu_dry and backend != "cpu":
    print(f"gpu_check: error: --cpu-dry, but JAX already started on {backend}", file=sys.stderr)
    return 2
  gpu = backend in ("gpu", "cuda", "rocm")
  if not args.cpu_dry and not gpu:
    print(f"gpu_check: error: no GPU visible to JAX (backend {backend!r}); run with --cpu-dry for the CPU check",
          file=sys.stderr)
    return 2
  os.makedirs(out_dir, exist_ok=True)
  plan = dry_plan() if args.cpu_dry else gpu_plan()
  start = time.perf_counter()
  elapsed = lambda: time.perf_counter() - start
  remaining = lambda: args.budget_s - elapsed()
  over_budget = lambda: remaining() <= 0
  results = {"tool": "dba_jax.gpu_check", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "mode": "cpu-dry" if args.cpu_dry else "gpu", "argv": sys.argv[1:] if argv is None else list(argv),
             "jax": jax.__version__, "backend": backend, "device": jax.devices()[0].device_kind,
             "inject_fault": args.inject_fault, "budget_s": args.budget_s, "sections": {}, "elapsed_s": 0.0,
             "exit_code": None}
  runners = {"flash": lambda: check_flash(plan, args.inject_fault),
             "selective": lambda: check_selective(plan, args.inject_fault),
             "scans": lambda: check_scans(plan, args.inject_fault),
             "timing": lambda: run_timing(plan, gpu, over_budget),
             "memory": lambda: run_memory(plan, gpu, remaining),
             "gpt2": lambda: run_gpt2(plan, out_dir, remaining)}

  def on_term(signum, frame):
    raise Interrupted("stopped by SIGTERM (the launcher's time limit)")

  previous = signal.signal(signal.SIGTERM, on_term)
  try:
    for name in [n for n in SECTIONS if n in args.sections]:
      print(f"[gpu_check] {name} ({elapsed():.0f} s)", flush=True)
      t0 = time.perf_counter()
      if name not in CORRECTNESS and over_budget():
        section = {"status": "skipped", "note": f"over the {args.budget_s:.0f} s budget"}
      else:
        try:
          section = runners[name]()
        except Exception as e:  # noqa: BLE001 - Interrupted included: record it, write, stop below
          section = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
      section["seconds"] = round(time.perf_counter() - t0, 2)
      results["sections"][name] = section
      results["elapsed_s"] = elapsed()
      results["targets"] = targets(results, args.cpu_dry)
      _write(out_dir, results)
      if section.get("error", "").startswith("Interrupted"):
        break
  finally:
    signal.signal(signal.SIGTERM, previous)
  bad = [n for n, v in results["sections"].items() if v["status"] in ("fail", "error")]
  results["exit_code"] = 1 if bad else 0
  results["elapsed_s"] = elapsed()
  _write(out_dir, results)
  print(markdown(results))
  print(f"[gpu_check] {'FAILED: ' + ', '.join(bad) if bad else 'all sections passed'}; results in {out_dir}",
        file=sys.stderr if bad else sys.stdout)
  return results["exit_code"]


def cli():
  sys.exit(main())


if __name__ == "__main__":
  cli()
