"""`dba-convert`: PyTorch checkpoints <-> dba_jax workdirs.

  dba-convert INPUT --out DIR [--format auto|caramba|nanogpt|addition|hope|latentwire|hf]
              [--config configs/X.py[:variant]] [--config.a.b=value ...]
  dba-convert --to-torch DIR --out FILE.pt|FILE.safetensors [--format ...]
  dba-convert --to-torch DIR --out HF_DIR --format hf

INPUT may also be a Hugging Face save_pretrained directory (config.json + safetensors; formats/hf.py): GPT-2,
Llama, Mistral and Qwen2 causal LMs. `--format hf` exports to such a directory.

Import: INPUT (.pt zip or legacy, or .safetensors; read by dba_jax.torch_io, torch never needed to read) is
unwrapped (`system_state_dict`, `model_state_dict`, `state_dict`, `model`, or a raw state dict), `_orig_mod.` and
`module.` prefixes are stripped, and the format is the one whose `detect` accepts the keys (or --format). The config
starts from --config (+ overrides), or base_config() plus overrides, and the format sets what the shapes tell. DIR
becomes a dba_jax workdir: config.json plus an Orbax checkpoint (params, the optax state of dba-train's optimizer,
meta with the source and format), so `dba_jax.load_model(DIR)`, `dba-train --config.train.init_from=DIR` and, with
the same model config, `dba-train --workdir=DIR` (resume) read it. DIR is written under a temporary name beside it
and renamed at the end: nothing is left when anything fails or Ctrl-C interrupts (exit 130), so the same command
runs again; an existing workdir is never written into. Metadata JSON cannot hold (paths, numpy scalars) is stored
as strings and numbers.

Memory: the storages are memory-mapped and converted tensor by tensor into one params tree, which Orbax writes as it
is (ckpt.Checkpointer(host_arrays=True): no defensive copy, params uncompressed); a fresh optimizer state is
zero-stride views of 0 that compress to almost nothing, so neither Adam moment is ever materialised.

Export: --to-torch loads DIR and writes the format's state dict as the original code saves it. For a nanoGPT
workdir and an output named `model_XXXXX.pt`, the training trio: {"model", "step"} plus `optimizer_XXXXX.pt`
(AdamW state_dict) when the checkpoint has taken optimizer steps and `dataloader_XXXXX.pt` when a position was
recorded (formats/nanogpt.py); no file is written when any of them exists.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager

import jax
import numpy as np
import optax
from absl import flags
from flax import nnx
from ml_collections import config_flags

from dba_jax import ckpt, conversion, formats, loading, model as model_lib, optim, rundir, signals, torch_io
from dba_jax.cli import FLAG_ERRORS, HELP, CommandError, check_config_file, command, entry, flag_error
from dba_jax.config import ConfigError, base_config, lock, validate
from dba_jax.conversion import ConversionError
from dba_jax.formats import latentwire as latentwire_format

SAVE_WRAPPER = {"caramba": "system_state_dict"}  # how the original code wraps its state dict; others save it raw
LARGE = 256 * 2**20  # bytes from which progress lines are printed
RECORD = "converted_from.json"  # in the workdir: source file and format (kept when dba-train continues the run)


def say(msg: str):
  print(f"dba-convert: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ reading


def pick_format(name: str, tensors: dict, source: str):
  known = formats.available()
  if name != "auto":
    if name not in known:
      raise ConversionError(f"--format={name}: that format is not implemented yet (have {sorted(known)})")
    return name, known[name]
  hits = [n for n, mod in known.items() if mod.detect(set(tensors))]
  if len(hits) == 1:
    return hits[0], known[hits[0]]
  sample = ", ".join(sorted(tensors)[:10])
  if not hits:
    raise ConversionError(f"{source}: no format ({', '.join(known)}) recognises its keys ({len(tensors)} keys: "
                          f"{sample}, ...); pass --format if you know it")
  raise ConversionError(f"{source}: keys fit several formats {hits}; choose one with --format")


def pick_dir_format(name: str, src: str):
  """The format that reads the directory `src` (formats with `read_dir`; --format, or the one whose `detect_dir`
  accepts it)."""
  known = {n: mod for n, mod in formats.available().items() if hasattr(mod, "read_dir")}
  if name != "auto":
    if name not in known:
      raise ConversionError(f"{src} is a directory; --format={name} reads files (directories: {sorted(known)})")
    return name, known[name]
  hits = [n for n, mod in known.items() if mod.detect_dir(src)]
  if len(hits) != 1:
    raise ConversionError(f"{src}: a directory no format reads (hf: config.json and model.safetensors, a sharded "
                          "index or pytorch_model.bin)" if not hits else
                          f"{src}: fits several formats {hits}; choose one with --format")
  return hits[0], known[hits[0]]


def _check_tree(params: dict, c):
  """The built tree must be init_params's exactly (paths and shapes), checked abstractly."""
  flat = lambda tree: {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in
                       jax.tree_util.tree_flatten_with_path(tree)[0]}
  have, want = flat(params), flat(nnx.to_pure_dict(model_lib.abstract(c.model)[1]))
  bad = [f"{k}: converted {have.get(k, 'absent')} vs model {want.get(k, 'absent')}"
         for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
  if bad:
    raise ConversionError("the converted parameters do not match the model's tree:\n  " + "\n  ".join(bad))


def optimizer_state(c, params, mu=None, nu=None, count: int = 0):
  """The optax state of dba-train's optimizer (optim.make_optimizer) for `params`: fresh, or with Adam's moments
  and every count (Adam's and the lr schedule's) taken from a converted optimizer."""
  tx = optim.make_optimizer(c, model_lib.param_axes(c.model))
  if mu is None:  # optax's fresh moments are zeros: read-only zero-stride views take no memory
    mu = nu = jax.tree.map(lambda x: np.broadcast_to(np.float32(0), np.shape(x)), params)
  # Fill the abstract state: nothing is allocated only to be replaced. Numpy counts keep the tree host-only.
  state = optax.tree_utils.tree_set(jax.eval_shape(tx.init, params), mu=mu, nu=nu, count=np.asarray(count, np.int32))
  left = [x for x in jax.tree.leaves(state) if isinstance(x, jax.ShapeDtypeStruct)]
  if left:
    raise ConversionError(f"dba-train's optimizer state has fields besides Adam's moments and counts: {left}")
  return state


def _nbytes(tensors: dict) -> int:
  """Bytes of the distinct tensors (a tied lm_head shares wte's storage)."""
  seen = {(x.__array_interface__["data"][0], x.nbytes) for x in tensors.values() if isinstance(x, np.ndarray)}
  return sum(n for _, n in seen)


@contextmanager
def _format_errors(name: str, src: str):
  """A key the format needs but the file lacks (a --format that does not fit it) is one ConversionError."""
  try:
    yield
  except KeyError as e:
    raise ConversionError(f"{src}: not a {name} checkpoint: it has no key {e} (drop --format to detect the format "
                          "from the keys)") from None


def import_checkpoint(src: str, out: str, fmt_name: str, c) -> dict:
  """Convert `src` into a new workdir `out`; returns a summary. Everything is written under a temporary name
  beside `out` and renamed at the end (rundir.atomic_output): a failure or a Ctrl-C leaves no trace of `out`, and
  the same command runs again."""
  out = os.path.normpath(out)
  conversion.refuse_existing_dir(out)
  size = os.path.getsize(src) if os.path.isfile(src) else 0
  if size > LARGE:
    say(f"reading {src} ({size / 2**20:,.0f} MiB, memory-mapped)")
  if os.path.isdir(src):  # a directory of files (a Hugging Face save_pretrained): a format that reads directories
    name, fmt = pick_dir_format(fmt_name, src)
    tensors, extras = fmt.read_dir(src)
    dir_layout = extras.pop("layout", None)  # what the format records to write the directory back
  else:
    tensors, extras = conversion.unwrap(torch_io.load(src), src)
    name, fmt = pick_format(fmt_name, tensors, src)
    dir_layout = None
  say(f"{src}: {len(tensors)} tensors, {_nbytes(tensors) / 2**20:,.1f} MiB, format {name}")
  if hasattr(fmt, "import_file"):  # a model family of its own (addition models, bridges), converted file to file
    with _format_errors(name, src), _new_dir(out) as tmp:
      summary = fmt.import_file(src, tmp, c) if getattr(fmt, "IMPORT_WITH_CONFIG", False) else \
          fmt.import_file(src, tmp)
    say(f"wrote {out} ({name} model)")
    return {**summary, "workdir": out}
  torch_step = extras.get("step")
  with _format_errors(name, src):
    if hasattr(fmt, "config_from_saved") and "config" in extras:
      c = fmt.config_from_saved(extras["config"], c, tensors)
    c = fmt.config_from(tensors, c)
    validate(c)
    params = fmt.to_params(tensors, c)
    layout = fmt.layout_of(tensors) if hasattr(fmt, "layout_of") else dir_layout
  dtype = model_lib.DTYPES[c.model.param_dtype]  # a format that fills the params in this dtype is not copied
  params = jax.tree.map(lambda x: np.asarray(x, dtype), params)
  del tensors, extras  # unmaps the file: from here on the converted params are the only copy
  _check_tree(params, c)
  extra = fmt.companion_state(src, c, torch_io.load) if hasattr(fmt, "companion_state") else {}
  step = int(extra.get("step", 0))
  opt = optimizer_state(c, params, extra.get("mu"), extra.get("nu"), step)
  key = jax.random.fold_in(jax.random.key(c.train.seed), 1)  # as Trainer.init_state derives the run's rng
  meta = {"step": step, "rng": np.asarray(jax.random.key_data(key)).tolist(), "nonfinite": 0,
          "data": {"next_index": step},  # dba_jax's own data position after `step` batches (grain's state)
          "source": os.path.abspath(src), "format": name, "layout": layout, **extra.get("meta", {})}
  if isinstance(torch_step, (int, np.integer)):
    meta["torch_step"] = int(torch_step)
  if size > LARGE:
    say(f"writing {out} (step {step})")
  _write_workdir(out, c, step, params, opt, conversion.json_safe(meta), fresh_opt="mu" not in extra)
  n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  say(f"wrote {out}: {n:,} parameters at step {step}" + (" with AdamW moments" if "mu" in extra else ""))
  return {"workdir": out, "format": name, "step": step, "config": c}


@contextmanager
def _new_dir(out: str):
  """A temporary directory name beside `out` that becomes `out` when the block succeeds (replacing an empty
  `out`), and is removed when it fails or the command is interrupted: `out` is never left half-written."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with rundir.atomic_output(out) as tmp:
    yield tmp
    conversion.refuse_existing_dir(out)  # nothing appeared there meanwhile


def _write_workdir(out: str, c, step: int, params, opt, meta: dict, fresh_opt: bool = True):
  """config.json, converted_from.json and the Orbax checkpoint, written under a temporary name (_new_dir). The
  numpy trees are written as they are (no copy in Orbax; see ckpt.py): the peak stays the params (+ converted
  moments); fresh zero moments are compressed to almost nothing."""
  with _new_dir(out) as tmp:
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      f.write(c.to_json(indent=2))
    with open(os.path.join(tmp, RECORD), "w") as f:
      json.dump({k: meta[k] for k in ("source", "format", "layout", "step")}, f, indent=2)
    ckpts = ckpt.Checkpointer(os.path.join(tmp, "checkpoints"), keep=1, async_save=False, host_arrays=True,
                              compress_opt=fresh_opt)
    try:
      ckpts.save(step, params, opt, meta)
    finally:
      ckpts.close()


# ------------------------------------------------------------------------------------------------ export


def _saved_record(workdir: str) -> dict:
  """What dba-convert recorded in the workdir: source, format, key layout ({} for dba-train's own runs)."""
  if os.path.exists(os.path.join(workdir, "params.npz")):  # an addition model directory
    return {"format": "addition"}
  path = os.path.join(loading.locate(workdir)[0], RECORD)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _native_format(workdir: str) -> str:
  """The PyTorch family a dba-train run's model belongs to: nested_learning for HOPE blocks, nanoGPT for GPT-2-shaped
  models (learned positions, LayerNorm, GELU), the caramba/DBA format otherwise."""
  if latentwire_format.is_bridge_dir(loading.locate(workdir)[0]):  # a dba-latentwire-train bridge, not an LM
    say(f"{workdir}: a LatentWire bridge; exporting its translator state dict")
    return "latentwire"
  m = loading.read_config(loading.locate(workdir)[0]).model
  if m.block.startswith("titans_"):
    raise ConversionError(f"{workdir}: model.block={m.block!r} (the Titans paper's memory) has no PyTorch original "
                          "to export to")
  if m.block.startswith("hope_"):
    name = "hope"
  else:
    name = "nanogpt" if (m.positions, m.norm, m.mlp) == ("learned", "layernorm", "gelu") else "caramba"
  say(f"{workdir}: a dba-train run; exporting in the {name} format (--format overrides)")
  return name


def _writes_dir(fmt_name: str, workdir: str) -> bool:
  """Whether the export goes to a directory: --format names a directory format (hf), or auto and the workdir was
  converted from one."""
  if fmt_name == "auto":
    try:
      fmt_name = _saved_record(workdir).get("format", "")
    except FileNotFoundError:  # not a workdir: said below, where it is read
      fmt_name = ""
  return hasattr(formats.get(fmt_name) if fmt_name else None, "write_dir")


def export_checkpoint(workdir: str, out: str, fmt_name: str) -> str:
  to_dir = _writes_dir(fmt_name, workdir)
  if to_dir and out.endswith((".pt", ".safetensors")):
    raise ConversionError(f"--out {out}: a Hugging Face export is a directory (config.json, model.safetensors)")
  if not to_dir and not out.endswith((".pt", ".safetensors")):
    raise ConversionError(f"--out {out}: write FILE.pt or FILE.safetensors (or a directory with --format hf)")
  if not to_dir and os.path.exists(out):
    raise ConversionError(f"--out {out} exists; refusing to overwrite it")
  record = _saved_record(workdir)
  name = fmt_name if fmt_name != "auto" else record.get("format") or _native_format(workdir)
  fmt = formats.get(name)
  if fmt is None:
    raise ConversionError(f"--format={name}: that format is not implemented yet")
  layout = record.get("layout") if record.get("format") == name else None
  if to_dir:  # a new directory, written whole or not at all
    conversion.refuse_existing_dir(out)
    model, c = loading.load_model(workdir)
    with _new_dir(out) as tmp:
      os.makedirs(tmp)
      arch = fmt.write_dir(tmp, model.params, c, layout)  # tensor by tensor from the restored arrays
    say(f"wrote {out}: format {name} ({arch})")
    return out
  if hasattr(fmt, "export_dir"):
    obj = fmt.export_dir(workdir, out)
    bare = out.endswith(".pt") or fmt.CONTAINER is None  # a bare state dict is the same in either file
    _save_new(out, obj if bare else obj[fmt.CONTAINER])
    say(f"wrote {out}: format {name}")
    return out
  trio = out.endswith(".pt") and bool(getattr(fmt, "trio_paths", lambda _: {})(out))
  if trio:  # a training-loop checkpoint: the optimizer state and meta too
    params, c, opt, meta = _restore_all(workdir)
  else:
    model, c = loading.load_model(workdir)
    params = jax.tree.map(np.asarray, model.params)
  state = fmt.from_params(params, c, layout=layout) if layout else fmt.from_params(params, c)
  if trio:
    adam = next(s for s in jax.tree.leaves(opt, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState))
    files = fmt.trio(out, state, c, adam.mu, adam.nu, int(adam.count), meta)
    _write_new(files)
    say(f"wrote {', '.join(files)}: {len(state)} tensors, format {name}, optimizer step {int(adam.count)}")
    return out
  wrapper = getattr(fmt, "SAVE_WRAPPER", SAVE_WRAPPER.get(name))
  obj = {wrapper: state} if wrapper and out.endswith(".pt") else state
  _save_new(out, obj)
  say(f"wrote {out}: {len(state)} tensors, {_nbytes(state) / 2**20:,.1f} MiB, format {name}")
  return out


def _restore_all(workdir: str):
  """(params, config, optax state, meta) of a workdir's checkpoint (latest, or the one `workdir` names) as
  numpy trees: the optimizer state is dba-train's (optim.make_optimizer) for the saved config."""
  root, step = loading.locate(workdir)
  c = loading.read_config(root)
  ckpts = ckpt.Checkpointer(os.path.join(root, "checkpoints"), read_only=True)
  try:
    if not ckpts.all_steps():
      raise ConversionError(f"{root}/checkpoints holds no checkpoint")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    sds = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device)
    abstract = jax.tree.map(sds, nnx.to_pure_dict(model_lib.abstract(c.model)[1]))
    tx = optim.make_optimizer(c, model_lib.param_axes(c.model))
    skipped = []
    step, params, opt, meta = ckpts.restore_first_good(
        abstract, jax.tree.map(sds, jax.eval_shape(tx.init, abstract)), step,
        on_damaged=lambda s, why: skipped.append(why))
    if skipped:
      say(f"skipped damaged checkpoint(s): {'; '.join(skipped)}; exporting step {step}")
  finally:
    ckpts.close()
  return jax.tree.map(np.asarray, params), c, jax.tree.map(np.asarray, opt), meta


def _save_new(out: str, obj):
  """torch_io.save under a temporary name renamed to `out` at the end: a failure or Ctrl-C leaves no `out`."""
  with rundir.atomic_output(out) as tmp:
    torch_io.save(tmp, obj)
    if os.path.exists(out):
      raise ConversionError(f"refusing to overwrite {out} (it appeared while writing); nothing was written")


def _write_new(files: dict):
  """Write {path: object} as .pt files (all in one folder), all or none, never over an existing file: they go to
  a temporary folder beside them first, then are hard-linked to their names (which fails if a name exists). All
  of them are in signals.pending until the last is linked, so a Ctrl-C in between leaves none."""
  taken = [p for p in files if os.path.exists(p)]
  if taken:
    raise ConversionError(f"refusing to overwrite {', '.join(taken)}; nothing was written")
  tmp = tempfile.mkdtemp(prefix=".dba-convert-", dir=os.path.dirname(os.path.abspath(next(iter(files)))))
  signals.pending.add(tmp)
  done = []
  try:
    for i, obj in enumerate(files.values()):
      torch_io.save(os.path.join(tmp, f"{i}.pt"), obj)
    for i, path in enumerate(files):
      try:
        os.link(os.path.join(tmp, f"{i}.pt"), path)
      except FileExistsError:
        raise ConversionError(f"refusing to overwrite {path} (it appeared while writing); nothing was written") \
            from None
      done.append(path)
      signals.pending.add(path)
    signals.pending.difference_update(done)
    done = []  # all linked: keep them
  finally:
    for path in done:
      os.remove(path)
      signals.pending.discard(path)
    shutil.rmtree(tmp)
    signals.pending.discard(tmp)


# --------------------------------------------------------------------------------------------------- CLI


def _parse(argv: list[str]) -> tuple[flags.FlagValues, list[str]]:
  """Flags plus the positional arguments. Without --config=FILE the config is base_config(), still open to
  --config.a.b=value overrides."""
  fv = flags.FlagValues()
  if any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/selective_gpt2.py:unselective",
                                    flag_values=fv, lock_config=True, sys_argv=list(argv))
  else:
    config_flags.DEFINE_config_dict("config", lock(base_config()), "The base config (no --config file given)",
                                    flag_values=fv, sys_argv=list(argv))
  flags.DEFINE_string("out", None, "Output workdir (import) or FILE.pt / FILE.safetensors (--to-torch)",
                      flag_values=fv)
  flags.DEFINE_enum("format", "auto", ["auto", *formats.NAMES], "Checkpoint format (auto: from the keys)",
                    flag_values=fv)
  flags.DEFINE_string("to_torch", None, "Export this dba_jax workdir to PyTorch", flag_values=fv)
  flags.DEFINE_enum("dtype", None, ["float32", "bf16"], "Import: the stored parameters' dtype (model.param_dtype; "
                    "bf16 keeps a bfloat16 file's weights as they are, at half the memory of float32)",
                    flag_values=fv)
  if any(a in HELP for a in argv[1:]):
    print(USAGE + "\n\n" + (__doc__ or "").strip() + "\n\n" + fv.get_help())
    raise SystemExit(0)
  check_config_file(argv)
  rest = fv(list(argv))
  return fv, rest[1:]


USAGE = ("usage: dba-convert INPUT|HF_DIR --out DIR [--format auto|caramba|nanogpt|addition|hope|latentwire|hf] "
         "[--dtype float32|bf16] [--config FILE.py[:variant]] [--config.a.b=value ...]\n"
         "       dba-convert --to-torch DIR --out FILE.pt|FILE.safetensors|HF_DIR [--format ...]")


@command("dba-convert", errors=(ConversionError, ConfigError, torch_io.CheckpointReadError, ValueError))
def main(argv: list[str]) -> int:
  argv = [a.replace("--to-torch", "--to_torch", 1) if a.startswith("--to-torch") else a for a in argv]
  try:
    fv, positional = _parse(argv)
  except FLAG_ERRORS as e:
    raise CommandError(f"bad flag, --config or override: {flag_error(e)}\n{USAGE}") from None
  if not fv.out:
    raise ConversionError("--out is required")
  if fv.to_torch:
    if fv.dtype:
      raise ConversionError("--dtype applies to an import; an export writes the run's own model.param_dtype")
    if positional:
      raise ConversionError(f"--to-torch takes no INPUT file; got {positional}")
    export_checkpoint(fv.to_torch, fv.out, fv.format)
    return 0
  if len(positional) != 1:
    raise ConversionError(f"expected one INPUT checkpoint, got {positional or 'none'}")
  conversion.GIVEN.clear()
  conversion.GIVEN.update(a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config."))
  if fv.dtype:
    fv.config.model.param_dtype = {"bf16": "bfloat16"}.get(fv.dtype, fv.dtype)
    conversion.GIVEN.add("model.param_dtype")
  try:
    import_checkpoint(positional[0], fv.out, fv.format, copy.deepcopy(fv.config))
  finally:
    conversion.GIVEN.clear()
  return 0


cli = entry(main)


if __name__ == "__main__":
  cli()
