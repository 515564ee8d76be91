"""Every dba_kernels kernel compiled ahead of time for real TPU chips from this host (XLA:TPU and Mosaic in libtpu).

A case is one kernel's forward and backward (jax.vjp: the input gradients) at one shape and dtype on one chip of a
topology. `compile_case` lowers it with no patching (the kernels choose Mosaic because the computation is lowered
for TPU), compiles it, and reports compile seconds, per-device temp bytes (HBM), the number of Mosaic kernels in
the compiled HLO (a CPU interpreter fallback would have none), and for a failure the compiler's first line
(scoped-VMEM overflows name their size). `matrix(full)` lists the cases of issue 24; `dba-aot --kernels` runs them.
Beside the kernels: ops.window_attention (Titans' sliding window, an XLA program with no Mosaic kernel yet) at long
T, where a dense [T, T] mask would be large: its temp bytes show the blocked program stays O(T·window).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import itertools
import os
import re
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dba_jax.configlib import ConfigError
from dba_jax.ops import window as window_op
from dba_kernels import cumsum, flash_attention, protect_attack, selective_flash

if not glob.glob("/dev/accel*") and not os.path.exists("/dev/vfio"):
  # A host without TPU chips only compiles: no GCE metadata to query (libtpu would print start-up errors for each
  # missing value), and several processes (test workers, a second dba-aot) may load libtpu at once.
  for key, value in {"TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_ACCELERATOR_TYPE": "v5p-8",
                     "TPU_WORKER_HOSTNAMES": "localhost"}.items():
    os.environ.setdefault(key, value)

# One single-host topology per generation (a kernel case uses its first chip).
CHIPS = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2", "v4": "v4:2x2x1"}
MOSAIC = "tpu_custom_call"


@dataclasses.dataclass(frozen=True)
class Case:
  kernel: str  # flash_attention | selective_flash | cumsum | protect_attack | window_attention
  chip: str  # a key of CHIPS
  T: int
  dtype: str  # float32 | bfloat16
  heads: int = 12
  kv_heads: int = 12
  head_dim: int = 64  # D (q, k)
  v_dim: int = 64  # E
  n_prefix: int = 0  # flash_attention, window_attention: always-visible leading keys (DBA's null token)
  window: int = 0  # window_attention: the sliding window

  @property
  def name(self) -> str:
    shape = f"H{self.heads}K{self.kv_heads}D{self.head_dim}E{self.v_dim}" + (f"p{self.n_prefix}" if self.n_prefix
                                                                          else "")
    return f"{self.kernel}/{self.chip}/T{self.T}/{self.dtype}/{shape}" + (f"w{self.window}" if self.window else "")


def _fn_and_args(c: Case):
  """(fn(*inputs) -> out, input shapes, output cotangent shape, dtype) for one batch row."""
  dt = jnp.dtype(c.dtype)
  if c.kernel == "flash_attention":
    S = c.T + c.n_prefix
    fn = functools.partial(flash_attention.flash_attention, n_prefix=c.n_prefix)
    return fn, [(1, c.T, c.heads, c.head_dim), (1, S, c.kv_heads, c.head_dim), (1, S, c.kv_heads, c.v_dim)], \
        (1, c.T, c.heads, c.v_dim), dt
  if c.kernel == "window_attention":
    S = c.T + c.n_prefix
    fn = functools.partial(window_op.window_attention, window=c.window, n_prefix=c.n_prefix, impl="xla")
    return fn, [(1, c.T, c.heads, c.head_dim), (1, S, c.kv_heads, c.head_dim), (1, S, c.kv_heads, c.v_dim)], \
        (1, c.T, c.heads, c.v_dim), dt
  if c.kernel == "selective_flash":
    return selective_flash.selective_flash_attention, [(1, c.T, c.heads, c.head_dim),
                                                       (1, c.T, c.kv_heads, c.head_dim),
                                                       (1, c.T, c.kv_heads, c.v_dim)], (1, c.T, c.heads, c.v_dim), dt
  # The scans run over selective attention's [B*masks, T, S] columns; the attention dtype does not reach them.
  fn = cumsum.exclusive_cumsum if c.kernel == "cumsum" else protect_attack.protect_and_attack
  n_in = 1 if c.kernel == "cumsum" else 2
  return fn, [(1, c.T, c.T)] * n_in, (1, c.T, c.T), jnp.dtype(jnp.float32)


def topology_devices(name: str) -> list:
  """libtpu's compile-only devices of the slice `name`, every host's (ConfigError for a name libtpu rejects)."""
  if importlib.util.find_spec("libtpu") is None:
    raise ConfigError("compiling for TPU needs libtpu: pip install -e '.[tpu]'")
  from jax.experimental import topologies  # lazy: libtpu topologies, loads libtpu's plugin machinery only when asked
  # v4 runs as megacore (one device per chip, as JAX uses real v4 hosts); v5p is megacore by default.
  extra = {"chip_config_name": "megacore"} if name.lower().startswith("v4") else {}
  dims = [int(x) for x in re.findall(r"\d+", name.partition(":")[2])]
  if dims and int(np.prod(dims)) < 4:  # one- and two-chip hosts (v5e-1, v6e-1, v6e-2): below the default 2x2x1
    extra["chips_per_host_bounds"] = tuple(dims + [1] * (3 - len(dims)))
  try:
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **extra).devices)
  except Exception as e:  # JaxRuntimeError INVALID_ARGUMENT for unknown chips and layouts
    raise ConfigError(f"--topology={name}: {first_line(e)}") from None


def lower(c: Case, device):
  """jit(vjp of the kernel) lowered for one TPU `device` (abstract inputs: nothing is allocated)."""
  fn, in_shapes, out_shape, dt = _fn_and_args(c)
  sharding = NamedSharding(Mesh(np.array([device]), ("d",)), P())
  args = [jax.ShapeDtypeStruct(s, dt, sharding=sharding) for s in in_shapes + [out_shape]]

  def fwd_bwd(*a):
    out, pull = jax.vjp(fn, *a[:-1])
    return out, pull(a[-1])

  return jax.jit(fwd_bwd).lower(*args)


def first_line(e: Exception) -> str:
  """The message's first line (with a VMEM overflow's size when it is further down); for a bare exception (an
  assert) the innermost frame that raised it."""
  text = str(e)
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  if not lines:
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    return f"raised at {frame.filename}:{frame.lineno} ({frame.name})" if frame else type(e).__name__
  m = re.search(r"(Ran out of memory in memory space \w+|Used [\d.]+\w? of [\d.]+\w? \w+)", text)
  return lines[0][:200] + (f" [{m.group(0)}]" if m and m.group(0) not in lines[0][:200] else "")


def compile_case(c: Case, devices=None) -> dict:
  """Compile one case; a failure is a result (ok False, the compiler's first line), not an exception."""
  device = (devices or topology_devices(CHIPS[c.chip]))[0]
  row = {"case": c.name, **dataclasses.asdict(c)}
  t0 = time.perf_counter()
  try:
    compiled = lower(c, device).compile()
  except Exception as e:  # XLA/Mosaic errors arrive as JaxRuntimeError or ValueError; all are results here
    return {**row, "ok": False, "compile_s": round(time.perf_counter() - t0, 2), "error": first_line(e)}
  mem = compiled.memory_analysis()
  return {**row, "ok": True, "compile_s": round(time.perf_counter() - t0, 2),
          "temp_bytes": int(mem.temp_size_in_bytes), "mosaic_kernels": compiled.as_text().count(MOSAIC)}


def matrix(full: bool) -> list[Case]:
  """The default-tier cases (one size per kernel, v5p: the chip with the tightest scoped VMEM seen so far) or
  issue 24's full matrix: every chip, T 2048 / 8192 / 32768, f32 and bf16, head dims 64 and 128, 12 heads, GQA
  (4 kv heads) and, for flash attention, D != E with a null prefix."""
  if not full:
    return [Case("flash_attention", "v5p", 2048, "bfloat16", kv_heads=4, v_dim=32, n_prefix=1),
            Case("selective_flash", "v5p", 2048, "bfloat16"),
            Case("cumsum", "v5p", 2048, "float32"),
            Case("protect_attack", "v5p", 2048, "float32"),
            Case("window_attention", "v5p", 8192, "bfloat16", n_prefix=8, window=512)]
  cases = []
  for chip, T, dtype, hd in itertools.product(CHIPS, (2048, 8192, 32768), ("float32", "bfloat16"), (64, 128)):
    cases += [Case("flash_attention", chip, T, dtype, head_dim=hd, v_dim=hd),
              Case("flash_attention", chip, T, dtype, kv_heads=4, head_dim=hd, v_dim=hd // 2, n_prefix=1),
              Case("selective_flash", chip, T, dtype, head_dim=hd, v_dim=hd),
              Case("selective_flash", chip, T, dtype, kv_heads=4, head_dim=hd, v_dim=hd)]
  for chip, T in itertools.product(CHIPS, (2048, 8192)):  # the scans run on materialised [T, T] columns
    cases += [Case("cumsum", chip, T, "float32"), Case("protect_attack", chip, T, "float32")]
  for chip, T in itertools.product(CHIPS, (8192, 32768)):
    cases.append(Case("window_attention", chip, T, "bfloat16", n_prefix=8, window=512))
  return cases


def run_matrix(cases: list[Case], log=print) -> list[dict]:
  devices = {chip: topology_devices(name) for chip, name in CHIPS.items() if any(c.chip == chip for c in cases)}
  rows = []
  for c in cases:
    rows.append(compile_case(c, devices[c.chip]))
    r = rows[-1]
    log(f"{r['case']:<60} {'ok' if r['ok'] else 'FAIL':<4} {r['compile_s']:>6.1f} s  "
        + (f"temp {r['temp_bytes'] / 2**20:8.1f} MiB, {r['mosaic_kernels']} Mosaic" if r["ok"] else r["error"]))
  return rows
