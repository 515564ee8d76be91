"""Checkpoints: the only module that imports Orbax.

A checkpoint is three items under <dir>/<step>/: `params` and `opt` (array trees, restored into abstract trees
that carry the target shardings) and `meta` (JSON: step, rng key data, data-iterator state). Keeping params
separate lets `load_model` read a model without its optimizer state.

Saves are asynchronous (dba-train's, from jax arrays). `host_arrays=True` is for trees of numpy arrays that stay
untouched until `save` returns (dba-convert): Orbax's default numpy handler deep-copies every array before writing
and zstd holds each compressed array until the commit, each about one more copy of the tree in memory; this mode
writes the arrays as they are, in pieces (_Piecewise), params uncompressed (weights barely compress) and opt
compressed unless told otherwise (fresh zero moments, passed as zero-stride views, shrink to almost nothing). The
files are read back the same way.

Once a save has finished, process 0 writes `dba_manifest.json` into the step directory
(every file with its size), so a later start can tell a complete checkpoint from one truncated or missing files
and fall back to the previous one.
"""
from __future__ import annotations

import asyncio
import errno
import glob
import json
import logging
import os
import re
import resource
import shutil
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from dba_jax import rundir

ITEMS = ("params", "opt", "meta")
MANIFEST = "dba_manifest.json"
log = logging.getLogger("dba_jax")


class CheckpointMismatch(ValueError):
  """The checkpoint was written by a different model; the message lists the paths and shapes."""


class CheckpointDamaged(ValueError):
  """A checkpoint's files are missing, truncated or unreadable; the message names the file or the step."""


class SaveFailed(OSError):
  """The disk refused a checkpoint (full, file too large, read-only): the unfinished step is removed, earlier ones
  are kept. An OSError with the errno, so every command reports it in one line with exit code 4."""


# errno of a failed write, as Orbax / TensorStore report it inside their own exceptions
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")


def _os_errno(e: BaseException) -> int | None:
  while e is not None:
    if isinstance(e, OSError) and e.errno:
      return e.errno
    m = _OS_ERROR_CODE.search(str(e))
    if m:
      return int(m.group(1))
    e = e.__cause__ or e.__context__
  return None


class _QuietSaveThreads(logging.Filter):
  """Orbax logs a background save's failure, with its traceback, from every thread it touched; the same error is
  raised (and reported in one line) when the save is waited for."""

  def filter(self, record):
    return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


class _Piecewise(ocp.type_handlers.NumpyHandler):
  """Orbax's numpy handler, minus the defensive deep copy, writing at most IN_FLIGHT pieces of at most PIECE bytes
  at once. tensorstore holds an encoded copy of everything a write covers until it commits, so a whole tree written
  at once costs a second tree, and one stacked [layers, ...] array a second array. Large arrays are stored in
  chunks of whole leading-axis rows, each written and committed alone; the files read back as any Orbax
  checkpoint."""

  PIECE = 32 << 20
  IN_FLIGHT = threading.Semaphore(2)  # shared: params and opt use separate event loops. 1 is ~35% slower

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)

  async def _write(self, t, value):
    await asyncio.to_thread(self.IN_FLIGHT.acquire)
    try:
      await t.write(value, can_reference_source_data_indefinitely=True)
    finally:
      self.IN_FLIGHT.release()

  async def _open_and_write(self, value, tspec, ts_context):
    rows = max(1, self.PIECE // max(1, value[:1].nbytes)) if value.ndim else 1
    if value.ndim and rows < len(value):
      tspec = {**tspec, "metadata": {**tspec["metadata"], "chunks": (rows, *value.shape[1:])}}
    t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
    if not value.ndim or rows >= len(value):
      return await self._write(t, value)
    cuts = [(i, min(i + rows, len(value))) for i in range(0, len(value), rows)]
    await asyncio.gather(*(self._write(t[i:j], value[i:j]) for i, j in cuts))


def _host_handler(compress: bool):
  """Orbax's pytree handler (the on-disk format StandardCheckpointHandler reads back) for numpy trees (_Piecewise);
  jax arrays (the counts) and scalars as usual."""
  th = ocp.type_handlers
  registry = th.create_type_handler_registry(
      (np.ndarray, _Piecewise()), (jax.Array, th.ArrayHandler()),
      (np.number, th.ScalarHandler()), (int, th.ScalarHandler()), (float, th.ScalarHandler()))
  return ocp.PyTreeCheckpointHandler(use_compression=compress, type_handler_registry=registry)


class Checkpointer:
  def __init__(self, directory: str, keep: int = 3, async_save: bool = True, read_only: bool = False,
               host_arrays: bool = False, compress_opt: bool = True):
    self.directory = os.path.abspath(directory)
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save)
    self._host = host_arrays and not read_only
    if self._host:
      handlers = {"params": _host_handler(compress=False), "opt": _host_handler(compress=compress_opt)}
    else:
      handlers = {"params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler()}
    handlers["meta"] = ocp.JsonCheckpointHandler()
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    if not read_only and not any(isinstance(f, _QuietSaveThreads) for f in logging.getLogger("absl").filters):
      logging.getLogger("absl").addFilter(_QuietSaveThreads())
    self._unsealed: int | None = None  # step whose async save may still be running

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, params, opt_state, meta: dict) -> None:
    self._seal()
    self.check_room(step, params, opt_state)
    tree = ocp.args.PyTreeSave if self._host else ocp.args.StandardSave
    args = ocp.args.Composite(params=tree(params), opt=tree(opt_state), meta=ocp.args.JsonSave(meta))
    try:
      self._mngr.save(step, args=args, force=True)
    except Exception as e:  # noqa: BLE001 - a synchronous save fails here
      self._failed(step, e)
    self._unsealed = step

  def check_room(self, step: int, params, opt_state):
    """SaveFailed before a save the disk cannot take (free space, or the process's file-size limit below one item's
    size): refused up front, Orbax never starts writing, so no half-written step and no writer-thread noise. (A disk
    that fills during the save is still caught, by `_failed`.)"""
    sizes = [sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(t)) // jax.process_count()
             for t in (params, opt_state)]
    probe = self.directory if os.path.isdir(self.directory) else os.path.dirname(self.directory)
    free = os.statvfs(probe).f_bavail * os.statvfs(probe).f_frsize
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if sum(sizes) * 1.05 > free:
      code = errno.ENOSPC
    elif limit != resource.RLIM_INFINITY and max(sizes) > limit:
      code = errno.EFBIG
    else:
      return
    kept = self.all_steps()
    raise SaveFailed(code, f"cannot write the checkpoint of step {step} ({sum(sizes) / 2**20:.1f} MiB) in "
                     f"{self.directory}: {os.strerror(code)} ({free / 2**20:.1f} MiB free"
                     + (f", file size limit {limit / 2**20:.1f} MiB" if limit != resource.RLIM_INFINITY else "")
                     + f"); the last complete checkpoint is {kept[-1] if kept else 'none'}")

  def _failed(self, step: int | None, e: Exception):
    """A failed save: a disk error becomes SaveFailed (the unfinished step removed, the older ones kept); anything
    else is re-raised."""
    code = _os_errno(e)
    if code is None:
      raise e
    self._unsealed = None
    for tmp in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
      shutil.rmtree(tmp, ignore_errors=True)
    kept = [s for s in self.all_steps() if s != step]
    raise SaveFailed(code, f"cannot write the checkpoint of step {step} in {self.directory}: "
                     f"{os.strerror(code)}; the last complete checkpoint is "
                     f"{kept[-1] if kept else 'none'}") from None

  def _seal(self):
    """Wait for the pending save, then record its files (process 0; the directory is shared)."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - Orbax re-raises a background failure in whatever type it had
      self._failed(self._unsealed, e)
    if self._unsealed is None:
      return
    step, self._unsealed = self._unsealed, None
    root = self.step_dir(step)
    if jax.process_index() != 0 or not os.path.isdir(root):  # pruned by keep-last-N already
      return
    files = {}
    for dirpath, _, names in os.walk(root):
      for name in names:
        if name != MANIFEST:
          path = os.path.join(dirpath, name)
          files[os.path.relpath(path, root)] = os.path.getsize(path)
    rundir.atomic_write(os.path.join(root, MANIFEST), json.dumps({"step": step, "files": files}))

  def verify(self, step: int) -> str | None:
    """None if the step's files match its manifest, else what is wrong (a missing or truncated file)."""
    root = self.step_dir(step)
    path = os.path.join(root, MANIFEST)
    if not os.path.exists(path):
      return None  # finished saving but killed before sealing: the restore attempt decides
    with open(path) as f:
      files = json.load(f)["files"]
    for rel, size in sorted(files.items()):
      full = os.path.join(root, rel)
      if not os.path.exists(full):
        return f"missing file {full}"
      if os.path.getsize(full) != size:
        return f"{full} has {os.path.getsize(full)} bytes, {size} were written (truncated)"
    return None

  def check_shapes(self, step: int, abstract_params) -> None:
    """Raise CheckpointMismatch listing every parameter whose path or shape differs from the model's."""
    try:
      stored = self._mngr.item_metadata(step)["params"]
    except Exception as e:  # noqa: BLE001 - whatever Orbax raises on unreadable metadata
      raise CheckpointDamaged(f"{self.step_dir(step)}/params: metadata unreadable ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not stored:
      raise CheckpointDamaged(f"{self.step_dir(step)}/params: no metadata (its _METADATA file is missing or empty)")
    # Orbax stores dict keys as strings: unrolled layers' int keys (blocks[0]) come back as '0'.
    flat = lambda tree: {"".join(f"[{str(getattr(k, 'key', k))!r}]" for k in p): tuple(x.shape) for p, x in
                         jax.tree_util.tree_flatten_with_path(tree)[0]}
    have, want = flat(stored), flat(abstract_params)
    problems = [f"{k}: checkpoint {have.get(k, 'absent')} vs model {want.get(k, 'absent')}"
                for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    if problems:
      raise CheckpointMismatch(f"{self.step_dir(step)} was written by a different model; mismatched parameters:\n  "
                               + "\n  ".join(problems))

  def restore(self, step: int, abstract_params, abstract_opt=None):
    """(params, opt_state or None, meta). Abstract trees are ShapeDtypeStructs with `.sharding` set."""
    self.check_shapes(step, abstract_params)
    items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
    if abstract_opt is not None:
      items["opt"] = ocp.args.StandardRestore(abstract_opt)
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    return out["params"], out.get("opt") if abstract_opt is not None else None, out["meta"]

  def try_restore(self, step: int, abstract_params, abstract_opt=None):
    """(params, opt, meta), or raise CheckpointDamaged naming what is broken (CheckpointMismatch for another
    model's checkpoint)."""
    problem = self.verify(step)
    if problem is not None:
      raise CheckpointDamaged(problem)
    try:
      return self.restore(step, abstract_params, abstract_opt)
    except (CheckpointMismatch, CheckpointDamaged):
      raise
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is damaged the same way
      msg = str(e).splitlines()[0][:200] if str(e) else ""
      raise CheckpointDamaged(f"{self.step_dir(step)} unreadable ({type(e).__name__}: {msg})") from None

  def restore_first_good(self, abstract_params, abstract_opt=None, step: int | None = None, on_damaged=None):
    """(step, params, opt, meta) of `step`, or of the newest checkpoint that restores; each damaged one tried first
    goes to on_damaged(step, problem). Raises CheckpointDamaged (every problem, one line) when none restores."""
    damaged = []
    for s in [step] if step is not None else reversed(self.all_steps()):
      try:
        return (s,) + self.try_restore(s, abstract_params, abstract_opt)
      except CheckpointDamaged as e:
        damaged.append(str(e))
        if on_damaged is not None:
          on_damaged(s, str(e))
    raise CheckpointDamaged("; ".join(damaged) or f"{self.directory}: no checkpoint")

  def restore_for_reading(self, abstract_params, step: int | None = None, what: str = "checkpoint"):
    """A read-only tool's load: (step, params) of `step` or the newest that restores. Every damaged one skipped is
    named in one warning with the step read instead (nothing is moved); none usable is CheckpointDamaged."""
    if not self.all_steps():
      raise CheckpointDamaged(self.nothing_saved(what))
    skipped = []
    found, params, _, _ = self.restore_first_good(
        abstract_params, step=step, on_damaged=lambda s, why: skipped.append(f"{self.step_dir(s)} ({why})"))
    if skipped:
      log.warning("skipped damaged %s(s): %s; loaded step %d instead", what, "; ".join(skipped), found)
    return found, params

  def nothing_saved(self, what: str = "checkpoint") -> str:
    """What an empty directory means: never saved, or every checkpoint set aside as broken by a resume."""
    aside = os.path.join(os.path.dirname(self.directory), "checkpoints_broken")
    n = len(os.listdir(aside)) if os.path.isdir(aside) else 0
    if n:
      return (f"{self.directory} holds no {what} ({n} set aside in checkpoints_broken as damaged): nothing usable "
              "to load; train again or restore one by hand")
    return f"{self.directory} holds no {what}: the run saved none yet"

  def restore_latest_good(self, abstract_params, abstract_opt=None):
    """Training's resume: the newest complete checkpoint, broken newer ones set aside with a warning; None when
    there is nothing usable."""
    try:
      return self.restore_first_good(abstract_params, abstract_opt, on_damaged=self._set_aside)
    except CheckpointDamaged:
      return None

  def _set_aside(self, step: int, problem: str):
    """Move a broken checkpoint out of the manager's directory (kept for inspection, never deleted), so the
    run can save that step again."""
    aside = os.path.join(os.path.dirname(self.directory), "checkpoints_broken", str(step))
    log.warning("checkpoint %s is incomplete or corrupt: %s; moved to %s, trying the previous one",
                self.step_dir(step), problem, aside)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      os.replace(self.step_dir(step), aside if not os.path.exists(aside) else f"{aside}.{os.getpid()}")
    self._mngr.reload()

  def wait(self):
    self._seal()

  def close(self):
    self._seal()
    self._mngr.close()
