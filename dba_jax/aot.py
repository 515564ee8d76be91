"""`dba-aot --config=FILE.py:VARIANT --topology=NAME [--config.a.b=v ...] [--out report.json] [--force] [--decode]`,
or `dba-aot --kernels [--full] [--out rows.json]`.

Compiles, on this host, the step a run would execute on a TPU slice that is not here: libtpu's compile-only devices
for NAME (v4:2x2x1, v5e:2x2, v5p:4x4x4, v6e:2x2, ...; every device of a multi-host slice), the config's mesh over
them by dba_jax/mesh.py's rules, abstract inputs only (nothing is allocated). The step is the one its command runs:
dba-train's Trainer step (sharded state, donation, gradient accumulation; HOPE / Titans included), the LatentWire
bridge / interlingua step of dba-latentwire-train (both frozen LMs: config.source / config.target workdirs, else the
config file's source_lm / target_lm presets, split over the config's mesh), or with --decode the KV-cache decode step of
dba_jax/generate.py (train.batch_size rows, a model.max_seq_len cache, one device).

Prints and reports per-device memory against the chip's HBM and the compiler's own cost estimate. Exit 0: compiles
and fits; 3: does not fit (one line: by how much, what to try); 2: bad input; 1: any other compile failure.
"""
from __future__ import annotations

import contextlib
import re
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from dba_jax import aot_kernels, data, generate, loading, mesh as mesh_lib, model as model_lib
from dba_jax import train
from dba_jax.aot_kernels import first_line
from dba_jax.bench.train_step import flops_per_token
from dba_jax.cli import command, entry, flag_error, parse_flags, refuse_existing, write_json
from dba_jax.config import ConfigError, validate
from dba_jax.latentwire import sides, train as lw_train

PROG = "dba-aot"
GIB = 2**30
# device_kind -> (chip, HBM GiB per chip, peak dense bf16 FLOP/s per chip)
CHIPS = {"TPU v4": ("v4", 32, 275e12), "TPU v5 lite": ("v5e", 16, 197e12), "TPU v5": ("v5p", 95, 459e12),
         "TPU v6 lite": ("v6e", 32, 918e12)}
HINT = ("try fsdp in mesh.shape (e.g. --config.mesh.shape=(1,-1,1)), a smaller train.batch_size or more "
        "train.grad_accum, or train.ce_chunk")


def _flags(fv: flags.FlagValues):
  flags.DEFINE_string("topology", None, "TPU slice to compile for, e.g. v5e:2x2, v5p:4x4x4, v4:2x2x1, v6e:2x2",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "write the JSON report here", flag_values=fv)
  flags.DEFINE_bool("force", False, "replace an existing --out", flag_values=fv)
  flags.DEFINE_bool("decode", False, "compile the KV-cache decode step instead of the train step", flag_values=fv)
  flags.DEFINE_bool("kernels", False, "instead of a config: compile every dba_kernels kernel (forward + backward) "
                    "with Mosaic for one chip of each TPU generation, one size each", flag_values=fv)
  flags.DEFINE_bool("full", False, "with --kernels: issue 24's whole matrix (208 cases, ~7 min)", flag_values=fv)


# --------------------------------------------------------------------------------------------- topology


def chip_of(device) -> tuple[str, int, float]:
  kind = device.device_kind
  if kind not in CHIPS:
    raise ConfigError(f"no HBM / peak figures for device kind {kind!r}; known: {sorted(CHIPS)}")
  return CHIPS[kind]


# --------------------------------------------------------------------------------------------- programs


class Program(NamedTuple):
  what: str                  # "train", "decode", "bridge" (or "interlingua")
  owner: object              # what a real run builds: train.Trainer, generate.Generator, latentwire Bridge
  fn: object                 # its jitted step, lowered as is
  args: tuple                # abstract arguments (ShapeDtypeStructs with shardings)
  mesh: object               # traced under this mesh (None: one device)
  tokens: int                # tokens one call processes (global)
  model_flops: float | None  # model FLOPs of one call (global); None where there is no formula


_KEY = jax.eval_shape(lambda: jax.random.key(0))  # a typed PRNG key's shape and dtype


def _on(device, tree):
  """ShapeDtypeStructs of `tree` committed to one device."""
  one = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), tree)


def train_program(c, devices) -> Program:
  """dba-train's step: the Trainer a run builds on this mesh, its jit (train.train_step wraps exactly it)."""
  mesh = mesh_lib.make_mesh(c.mesh.shape, devices, micro_batch=c.train.batch_size // c.train.grad_accum)
  train.check_batch(c.train, mesh, len({d.process_index for d in devices}))
  trainer = train.Trainer(c, mesh)
  tokens = c.train.batch_size * c.data.seq_len
  return Program("train", trainer, trainer.train_step.__wrapped__, (trainer.abstract_state(), trainer.abstract_batch()),
                 mesh, tokens, tokens * flops_per_token(c.model, c.data.seq_len))


def decode_program(c, devices) -> Program:
  """generate.Generator's decode step (one token per row into a model.max_seq_len cache) on one device, as
  dba-eval and Generator run it."""
  m, B = c.model, c.train.batch_size
  graphdef, state = model_lib.abstract(m)
  params = _on(devices[0], nnx.to_pure_dict(state))
  gen = generate.Generator(model_lib.Model(m, graphdef, params), max_len=m.max_seq_len, batch=B)
  sds = jax.ShapeDtypeStruct
  token_B, pos, temperature = sds((B,), jnp.int32), sds((), jnp.int32), sds((), jnp.float32)
  args = _on(devices[0], (params, jax.eval_shape(gen.init_cache), token_B, pos, _KEY, temperature))
  # Forward only (2N of 6N); attention over a cache filling from 0 to max_len (flops_per_token's causal half).
  return Program("decode", gen, gen._decode, args, None, B, B * flops_per_token(m, m.max_seq_len) / 3)


def _placed(tree, sharding):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sharding)


def bridge_program(c, devices, config_file: str) -> Program:
  """dba-latentwire-train's step (bridge or interlingua) as a run lays it out: both frozen LMs' abstract params
  split over the config's mesh by their logical axes (in their model.param_dtype), the translator and its optimizer
  replicated, a batch of the configured task's training examples split over the batch axes where it divides."""
  mesh = mesh_lib.make_mesh(c.get("mesh", {}).get("shape", (1, 1, 1)), devices)
  rep = mesh_lib.replicated(mesh)

  def side(role):
    path = c[role]  # a trained LM's workdir, else the config file's preset of that LM
    preset = lambda: validate(parse_flags([PROG, f"--config={config_file}:{role}_lm"]).config)
    lc = loading.read_config(path) if path else preset()
    graphdef, state = model_lib.abstract(lc.model)
    params = nnx.to_pure_dict(state)
    shardings = mesh_lib.tree_shardings(model_lib.param_axes(lc.model, state), params, mesh)
    model = model_lib.Model(lc.model, graphdef, _placed(params, shardings))
    return sides.LM(role, path, model, lc, data.get_tokenizer(lc.data.tokenizer))

  br = lw_train.make_system(c, side("source"), side("target"))
  state = jax.eval_shape(lambda: br.init_state(c.train.seed))
  state = _placed(state, jax.tree.map(lambda _: rep, state))
  examples = lw_train.task_examples(c, br.task, "train")[:c.train.batch_size]
  batch = jax.eval_shape(lambda: br.batch(examples))
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  where = mesh_lib.batch_sharding(mesh) if c.train.batch_size % rows == 0 else rep
  batch = _placed(batch, jax.tree.map(lambda _: where, batch))
  args = (state, br.frozen, batch, jax.ShapeDtypeStruct(_KEY.shape, _KEY.dtype, sharding=rep))
  return Program(c.model.kind, br, br.train_step, args, mesh, br.tokens_per_step, None)


# ---------------------------------------------------------------------------------------------- compile


class OutOfMemory(Exception):
  """The compiler refused the program for HBM; used / capacity bytes when its message says."""

  def __init__(self, line: str, used: float | None, capacity: float | None):
    super().__init__(line)
    self.used, self.capacity = used, capacity


_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"


def _bytes(num: str, unit: str) -> float:
  return float(num) * 1024 ** "_KMGT".index(unit or "_")


def compile_program(p: Program):
  """(compiled, seconds); OutOfMemory when XLA says the program exceeds HBM."""
  start = time.perf_counter()
  with jax.set_mesh(p.mesh) if p.mesh is not None else contextlib.nullcontext():
    lowered = p.fn.lower(*p.args)
  try:
    compiled = lowered.compile()
  except Exception as e:
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or re.search(r"(?i)out of memory|exceed.*hbm", text):
      # "... required for HLO temporaries (27.58G) exceeds available HBM (15.75G)" or "Used 20.5G of 15.7G hbm"
      used = (re.search(rf"\({_SIZE}\) exceeds available HBM \({_SIZE}\)", text)
              or re.search(rf"Used {_SIZE} of {_SIZE} hbm", text))
      line = next((ln.strip() for ln in text.splitlines() if "hbm" in ln.lower()), first_line(e))
      raise OutOfMemory(line, *((_bytes(*used.groups()[:2]), _bytes(*used.groups()[2:])) if used else (None, None)))
    raise
  return compiled, time.perf_counter() - start


def _while_loops(compiled) -> int:
  try:
    return len(re.findall(r"\bwhile\(", compiled.as_text()))
  except Exception:  # the HLO text is advisory
    return -1


def report(p: Program, compiled, seconds: float, topology: str, devices) -> dict:
  chip, hbm_gib, peak = chip_of(devices[0])
  used = p.mesh.devices.size if p.mesh is not None else 1
  ma = compiled.memory_analysis()
  mem = {"argument": ma.argument_size_in_bytes, "output": ma.output_size_in_bytes, "alias": ma.alias_size_in_bytes,
         "temp": ma.temp_size_in_bytes, "generated_code": ma.generated_code_size_in_bytes}
  # Live at once: inputs, outputs not written in place over a donated input, scratch, the program itself.
  total = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["generated_code"]
  ca = compiled.cost_analysis()
  ca = (ca[0] if isinstance(ca, (list, tuple)) else ca) or {}
  # cost_analysis() describes the partitioned per-device program: the same quickstart step compiled on 1 and on 4
  # v5e devices (data-parallel) gave 1.03e10 and 2.59e9 flops. It counts a while loop's body (the layer scan, the
  # grad_accum scan) once, not per trip (4 scanned layers cost what 1 unrolled layer did), and optimal_seconds < 0
  # means ops without a cost model: then no estimate is derived (model.scan_unroll=0, train.grad_accum=1 give one).
  flops, bytes_accessed, optimal = (float(ca.get(k, float("nan"))) for k in ("flops", "bytes accessed",
                                                                             "optimal_seconds"))
  loops = _while_loops(compiled)
  step_s = optimal if optimal > 0 and loops == 0 else None
  shape = dict(p.mesh.shape) if p.mesh is not None else {a: 1 for a in mesh_lib.MESH_AXES}
  return {"what": p.what, "topology": topology, "chip": chip, "device_kind": devices[0].device_kind,
          "device_count": len(devices), "hosts": len({d.process_index for d in devices}), "devices_used": used,
          "mesh_shape": shape, "compile_s": round(seconds, 2),
          "bytes_per_device": {**mem, "total": total}, "hbm_bytes_per_device": hbm_gib * GIB,
          "gib_per_device": round(total / GIB, 3), "hbm_gib": hbm_gib, "fits": total <= hbm_gib * GIB,
          "compiler_per_device": {"flops": flops, "bytes_accessed": bytes_accessed, "optimal_seconds": optimal},
          "hlo_while_loops": loops, "tokens_per_step": p.tokens,
          "model_flops_per_step": p.model_flops,
          "model_flops_formula": "6N per token + causal-halved attention (dba_jax.bench.train_step.flops_per_token)"
          + ("; forward only (/3) for decode" if p.what == "decode" else "") if p.model_flops else None,
          "peak_flops_per_chip": peak,
          "estimate_step_s_compiler": step_s,
          "estimate_tokens_per_s_compiler": p.tokens / step_s if step_s else None,
          "estimate_mfu_compiler": p.model_flops / (step_s * peak * used) if step_s and p.model_flops else None}


def _table(r: dict, config: str) -> str:
  b, g = r["bytes_per_device"], lambda x: f"{x / GIB:.2f}"
  mesh = " x ".join(f"{k} {v}" for k, v in r["mesh_shape"].items())
  est = (f"none: the compiler counts the bodies of the {r['hlo_while_loops']} while loop(s) once (a train step "
         "without: --config.model.scan_unroll=0 --config.train.grad_accum=1)" if r["hlo_while_loops"]
         else "none: optimal_seconds <= 0")
  if r["estimate_step_s_compiler"]:
    mfu = f", MFU {100 * r['estimate_mfu_compiler']:.1f}%" if r["estimate_mfu_compiler"] is not None else ""
    est = (f"{r['estimate_step_s_compiler'] * 1e3:.1f} ms/step, {r['estimate_tokens_per_s_compiler']:,.0f} tok/s"
           f"{mfu} (peak {r['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s per chip)")
  return "\n".join([
      f"{PROG}: {r['what']} step of {config} on {r['topology']}: {r['device_count']} x {r['device_kind']} "
      f"({r['hosts']} host(s)), {r['devices_used']} used, mesh {mesh}; compiled in {r['compile_s']:.1f} s",
      f"  per device GiB: arguments {g(b['argument'])}, outputs {g(b['output'])}, aliased {g(b['alias'])}, "
      f"temp {g(b['temp'])}, code {g(b['generated_code'])} -> {g(b['total'])} of {r['hbm_gib']} HBM: "
      + ("fits" if r["fits"] else "DOES NOT FIT"),
      f"  compiler per device: {r['compiler_per_device']['flops']:.3g} FLOP, "
      f"{r['compiler_per_device']['bytes_accessed']:.3g} bytes, optimal "
      f"{r['compiler_per_device']['optimal_seconds']:.3g} s; {r['hlo_while_loops']} while loop(s)",
      f"  compiler estimate: {est}"])


# --------------------------------------------------------------------------------------------------- main


def _fail(code: int, msg: str) -> int:
  print(f"{PROG}: {'error: ' if code != 3 else ''}{msg}", file=sys.stderr)
  return code


def _config_arg(argv) -> str:
  """FILE.py:VARIANT as given (--config=X or --config X)."""
  given = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  return given[0] if given else argv[argv.index("--config") + 1]


def kernels_main(fv) -> int:
  """--kernels: the kernel compile matrix (dba_jax/aot_kernels.py); exit 1 if any case fails."""
  try:
    rows = aot_kernels.run_matrix(aot_kernels.matrix(full=fv.full))
  except Exception as e:  # noqa: BLE001 (no libtpu, or a topology it cannot build)
    return _fail(2, f"cannot build the TPU topologies: {first_line(e)}; pip install -e '.[tpu]'")
  if fv.out:
    write_json(fv.out, rows)
  failed = [r["case"] for r in rows if not r["ok"]]
  print(f"{len(rows) - len(failed)} of {len(rows)} kernel cases compile with Mosaic")
  return _fail(1, f"{len(failed)} cases failed: {', '.join(failed[:5])}") if failed else 0


@command(PROG)
def main(argv) -> int:
  try:
    fv = parse_flags(argv, _flags, doc=__doc__)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    return _fail(2, f"bad --config or override: {flag_error(e)}")
  refuse_existing(PROG, fv.out, fv.force)
  if fv.kernels:
    return kernels_main(fv)
  if fv.config is None or not fv.topology:
    return _fail(2, "--config=FILE.py:VARIANT and --topology=NAME are required (see --help)")
  c = fv.config
  config_arg = _config_arg(argv)
  try:
    devices = aot_kernels.topology_devices(fv.topology)
    chip_of(devices[0])
    if "kind" in c.model:  # a LatentWire bridge / interlingua config
      p = bridge_program(lw_train.validate(c), devices, config_arg.split(":", 1)[0])
    else:
      validate(c)
      p = decode_program(c, devices) if fv.decode else train_program(c, devices)
  except (ConfigError, ValueError) as e:  # a mesh or width that does not divide is a ValueError naming it
    return _fail(2, first_line(e))
  except Exception as e:  # noqa: BLE001 (anything else building the step: one line, no traceback)
    return _fail(1, f"building the step failed: {type(e).__name__}: {first_line(e)}")
  chip, hbm_gib, _ = chip_of(devices[0])
  try:
    compiled, seconds = compile_program(p)
  except OutOfMemory as e:
    over = f"{(e.used - e.capacity) / GIB:.2f} GiB over the {e.capacity / GIB:.2f} GiB" if e.used else "over the"
    return _fail(3, f"does not fit: {over} HBM of a {chip} device ({e}); {HINT}")
  except Exception as e:  # noqa: BLE001
    return _fail(1, f"lowering or compiling the step failed: {type(e).__name__}: {first_line(e)}")
  r = report(p, compiled, seconds, fv.topology, devices)
  r["config"] = config_arg
  r["overrides"] = [a for a in argv[1:] if a.startswith("--config.")]
  print(_table(r, config_arg))
  if fv.out:
    write_json(fv.out, r)
  if not r["fits"]:
    over = (r["bytes_per_device"]["total"] - r["hbm_bytes_per_device"]) / GIB
    return _fail(3, f"does not fit: {r['gib_per_device']:.2f} GiB per device, {over:.2f} GiB over the {hbm_gib} GiB "
                 f"HBM of a {chip} device; {HINT}")
  return 0


cli = entry(main)


if __name__ == "__main__":
  cli()
