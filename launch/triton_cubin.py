"""Compile the dba_kernels Pallas-Triton kernels to cubin for sm_80 and sm_90 on a host with no GPU (issue 24).

XLA:GPU cannot compile here (no driver: the CUDA plugin's cuInit fails, and jax 0.10.2's
get_topology_desc(platform="cuda") raises NotImplementedError), but lowering for CUDA works on any host, and the
lowered StableHLO carries each kernel as a `__gpu$xla.gpu.triton` custom call whose backend config holds the
Triton module (tt dialect, as MLIR bytecode) with its num_warps / num_stages / grid. This script takes those
modules out and compiles them with the pip `triton` package's own pipeline (ttir -> ttgir -> llir -> ptx ->
cubin, with the ptxas it ships), for a GPUTarget given by hand, so no device is needed.

Two halves, because jaxlib and triton each carry their own MLIR/LLVM and the two are kept in separate processes:
  extract (needs jax, i.e. the project venv): lower each case for CUDA, write OUT/<case>/<i>_<kernel>.ttir (text)
           and OUT/<case>/kernels.json;
  compile (needs only triton, any Python that has it): compile every .ttir under OUT for each arch, write the
           cubins beside them and OUT/compiled.json: shared memory, registers and stack bytes per kernel.

  .venv/bin/python launch/triton_cubin.py extract OUT [--cases flash_mha_T2048 ...]
  /tmp/tritonvenv/bin/python launch/triton_cubin.py compile OUT [--arch 80 90]
  .venv/bin/python launch/triton_cubin.py all OUT --triton-python /tmp/tritonvenv/bin/python   # both, one table

Triton: python3.11 -m venv /tmp/tritonvenv && /tmp/tritonvenv/bin/pip install triton==3.9.0 (any of 3.3.1, 3.5.0,
3.8.0, 3.9.0 compiles the modules jax 0.10.2 emits). What this proves: the Triton IR our kernels lower to is
valid, goes through a real Triton pipeline for Ampere and Hopper, fits their shared memory, and what ptxas makes
of it (registers; stack = local memory, i.e. spills). What it does not: XLA compiles these modules with its own
pinned Triton, not the pip one, so the cubin here is a close proxy, not the binary a GPU will run; and nothing
is executed, so numerics, grid/launch wiring and speed are still for the GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

TRITON_CALL = "__gpu$xla.gpu.triton"
ARCHS = (80, 90)
# The most shared memory one block can opt into (CUDA programming guide, compute capabilities table).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

# The shapes of dba_jax.gpu_check's gpu_plan (what the first GPU runs), forward and backward.
#   flash / selective: (name, B, T, H, K, D, E, kwargs, dtype); scans: (name, kernel, B, T, S)
CASES = {
    "flash_mha_T256": ("flash", 2, 256, 4, 4, 64, 64, {}, "float32"),
    "flash_gqa_dba_T1000_null": ("flash", 1, 1000, 8, 2, 40, 32, {"n_prefix": 1}, "float32"),
    "flash_gqa_dba_T2048_null": ("flash", 1, 2048, 8, 2, 40, 48, {"n_prefix": 1}, "bfloat16"),
    "flash_mha_T2048": ("flash", 1, 2048, 12, 12, 64, 64, {}, "bfloat16"),
    "selective_default_T256": ("selective", 2, 256, 4, 4, 64, 64, {}, "float32"),
    "selective_heads2_T1000_no_bos": ("selective", 1, 1000, 5, 5, 32, 48,
                                      {"selection_heads": 2, "protect_bos": False}, "float32"),
    "selective_gqa_head3_T2048": ("selective", 1, 2048, 8, 2, 64, 64, {"selection_head": 3}, "bfloat16"),
    "selective_default_T2048": ("selective", 1, 2048, 12, 12, 64, 64, {}, "bfloat16"),
    "cumsum_T2048": ("cumsum", 1, 2048, 2048),
    "protect_attack_T2048": ("protect_attack", 1, 2048, 2048),
}


# ------------------------------------------------------------------------------------- extract (needs jax)

def case_fn(name: str):
  """(fn, args): fn(*inputs, cotangent) -> (output, input gradients), so both the forward and the backward
  kernels are lowered; args are ShapeDtypeStructs. The kernels pick Triton because this is lowered for CUDA."""
  import functools

  import jax
  import jax.numpy as jnp

  spec = CASES[name]
  kind = spec[0]
  if kind in ("flash", "selective"):
    _, B, T, H, K, D, E, kw, dtype = spec
    if kind == "flash":
      from dba_kernels import flash_attention as module
      kernel = functools.partial(module.flash_attention, **kw)
    else:
      from dba_kernels import selective_flash as module
      kernel = functools.partial(module.selective_flash_attention, **kw)
    A = H - kw.get("selection_heads", 0)
    shapes = [(B, T, H, D), (B, T, K, D), (B, T, K, E), (B, T, A, E)]
  else:
    _, B, T, S = spec
    if kind == "cumsum":
      from dba_kernels import cumsum as module
      kernel = module.exclusive_cumsum
      shapes = [(B, T, S)] * 2
    else:
      from dba_kernels import protect_attack as module
      kernel = module.protect_and_attack
      shapes = [(B, T, S)] * 3
    dtype = "float32"
  def fn(*a):
    out, pull = jax.vjp(kernel, *a[:-1])
    return out, pull(a[-1])

  return fn, [jax.ShapeDtypeStruct(s, jnp.dtype(dtype)) for s in shapes]


def triton_kernels(fn, args) -> list[dict]:
  """Every Pallas-Triton kernel in jit(fn) lowered for CUDA: name, num_warps, num_stages, grid and the Triton
  module as text (the custom call's bytecode parsed with jaxlib's MLIR, printed for Triton's own parser)."""
  import jax
  from jax.extend.mlir import ir
  from jaxlib.triton import dialect as tt_dialect  # jaxlib's own bindings of the Triton dialect

  module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
  tt_dialect.register_dialect(module.context)  # the lowering context does not keep `tt` loaded
  found = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          child = child.operation
          if child.name == "stablehlo.custom_call":
            attrs = child.attributes
            if ir.StringAttr(attrs["call_target_name"]).value == TRITON_CALL:
              key = "mhlo.backend_config" if "mhlo.backend_config" in attrs else "backend_config"
              cfg = ir.DictAttr(attrs[key])
              num = lambda k: ir.IntegerAttr(cfg[k]).value
              tt = ir.Module.parse(ir.StringAttr(cfg["ir"]).value_bytes, context=module.context)
              found.append({"name": ir.StringAttr(cfg["name"]).value, "num_warps": num("num_warps"),
                            "num_stages": num("num_stages"),
                            "grid": [num("grid_x"), num("grid_y"), num("grid_z")],
                            "ttir": tt.operation.get_asm(enable_debug_info=True)})
          walk(child)

  walk(module.operation)
  return found


def extract(out: str, cases) -> dict:
  """Write OUT/<case>/<i>_<kernel>.ttir and OUT/<case>/kernels.json; {case: [kernel records]} (each with its
  .ttir path relative to OUT)."""
  written = {}
  for case in cases:
    folder = os.path.join(out, case)
    os.makedirs(folder, exist_ok=True)
    records = []
    for i, k in enumerate(triton_kernels(*case_fn(case))):
      path = os.path.join(folder, f"{i}{k['name']}.ttir" if k["name"].startswith("_") else f"{i}_{k['name']}.ttir")
      with open(path, "w") as f:
        f.write(k.pop("ttir"))
      records.append({**k, "ttir": os.path.relpath(path, out)})
    with open(os.path.join(folder, "kernels.json"), "w") as f:
      json.dump(records, f, indent=1)
    written[case] = records
  return written


# --------------------------------------------------------------------------------- compile (needs triton)

def _resource_usage(cubin_path: str) -> dict:
  """Registers per thread and stack bytes per thread (local memory: spills and register arrays that ptxas could
  not keep in registers) from `cuobjdump -res-usage`, the cuobjdump that ships with triton; the driver reports
  the same numbers when it loads the cubin."""
  from triton.backends.nvidia.compiler import get_ptxas
  tool = os.path.join(os.path.dirname(get_ptxas(80).path), "cuobjdump")
  r = subprocess.run([tool, "-res-usage", cubin_path], capture_output=True, text=True)
  found = re.search(r"REG:(\d+) STACK:(\d+)", r.stdout)
  if r.returncode or not found:
    return {"resource_error": (r.stdout + r.stderr)[-2000:]}
  return {"registers": int(found.group(1)), "stack": int(found.group(2))}


def compile_one(ttir_path: str, arch: int, num_warps: int, num_stages: int) -> dict:
  """Compile one Triton module for sm_<arch> with the installed triton; writes <ttir>.sm<arch>.{ptx,cubin}."""
  import triton
  from triton.backends.compiler import GPUTarget

  target = GPUTarget("cuda", arch, 32)
  try:
    k = triton.compile(ttir_path, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
  except Exception as e:  # a kernel that does not compile is a result, not a crash of the whole run
    return {"ok": False, "error": f"{type(e).__name__}: {e}"[-4000:]}
  stem = f"{ttir_path[:-len('.ttir')]}.sm{arch}"
  with open(stem + ".ptx", "w") as f:
    f.write(k.asm["ptx"])
  with open(stem + ".cubin", "wb") as f:
    f.write(k.asm["cubin"])
  shared = int(k.metadata.shared)
  res = {"ok": True, "cubin": os.path.basename(stem + ".cubin"), "cubin_bytes": len(k.asm["cubin"]),
         "is_elf": k.asm["cubin"][:4] == b"\x7fELF", "shared": shared,
         "shared_limit": SMEM_LIMIT.get(arch), "fits_shared": shared <= SMEM_LIMIT.get(arch, 48 * 1024)}
  try:
    res.update(_resource_usage(stem + ".cubin"))
  except Exception as e:  # an older triton without these helpers: the compile itself has already succeeded
    res["resource_error"] = f"{type(e).__name__}: {e}"
  return res


def compile_all(out: str, archs=ARCHS) -> dict:
  """Compile every kernel listed in OUT/*/kernels.json for each arch; writes and returns OUT/compiled.json."""
  import triton
  results = {"triton": triton.__version__, "cases": {}}
  for case in sorted(os.listdir(out)):
    listing = os.path.join(out, case, "kernels.json")
    if not os.path.exists(listing):
      continue
    with open(listing) as f:
      kernels = json.load(f)
    results["cases"][case] = [
        {"name": k["name"], "num_warps": k["num_warps"], "num_stages": k["num_stages"], "grid": k["grid"],
         **{f"sm{a}": compile_one(os.path.join(out, k["ttir"]), a, k["num_warps"], k["num_stages"]) for a in archs}}
        for k in kernels]
  with open(os.path.join(out, "compiled.json"), "w") as f:
    json.dump(results, f, indent=1)
  return results


def table(results: dict, archs=ARCHS) -> str:
  rows = [f"triton {results['triton']}",
          "| case | kernel | warps/stages | " + " | ".join(f"sm{a}: shared B, regs, stack B" for a in archs) + " |",
          "|---|---|---|" + "---|" * len(archs)]
  for case, kernels in results["cases"].items():
    for k in kernels:
      cells = []
      for a in archs:
        r = k[f"sm{a}"]
        cells.append(f"{r['shared']}, {r.get('registers')}, {r.get('stack')}" if r["ok"]
                     else "FAILED: " + r["error"].splitlines()[0][:100])
      rows.append(f"| {case} | {k['name']} | {k['num_warps']}/{k['num_stages']} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("mode", choices=("extract", "compile", "all"))
  p.add_argument("out")
  p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
  p.add_argument("--arch", nargs="+", type=int, default=list(ARCHS))
  p.add_argument("--triton-python", default=os.environ.get("DBA_TRITON_PYTHON", sys.executable),
                 help="a Python with triton installed, for `all` (default $DBA_TRITON_PYTHON or this one)")
  a = p.parse_args(argv)
  if a.mode in ("extract", "all"):
    extract(a.out, a.cases)
  if a.mode == "extract":
    return 0
  if a.mode == "all":  # the compile half in a Python with triton, its own process (it prints the table)
    return subprocess.run([a.triton_python, os.path.abspath(__file__), "compile", a.out, "--arch",
                           *map(str, a.arch)]).returncode
  results = compile_all(a.out, a.arch)
  print(table(results, a.arch))
  bad = [(c, k["name"], arch) for c, ks in results["cases"].items() for k in ks for arch in a.arch
         if not (k[f"sm{arch}"]["ok"] and k[f"sm{arch}"]["fits_shared"])]
  if bad:
    print("failed or over the shared-memory limit:", bad, file=sys.stderr)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
