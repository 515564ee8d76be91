"""A run directory, as every trainer keeps one (dba-train, the LatentWire trainer, the addition trainer): the guard that
decides between a fresh start, a resume and a refusal; config.json; the runs.jsonl start record; JSONL logs cut back on
resume; resume points replaced whole; the one progress line; and atomic writes.

Standard library only (and configlib's ConfigError), so any command can use it without paying for JAX."""
from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

from dba_jax.configlib import ConfigError

# What dba-train and the LatentWire trainer write into a workdir; left empty by an interrupted start, they are no
# reason to refuse the directory.
OWN_FILES = ("config.json", "runs.jsonl", "metrics.jsonl", "eval.jsonl", "checkpoints", "checkpoints_broken", "tb")


# ------------------------------------------------------------------------------------------------ atomic writes


def atomic_write(path: str, data: str | bytes):
  """`data` into `path` through a temporary file renamed over it: a kill leaves the old file or the new one, whole."""
  tmp = path + ".tmp"
  with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)
  os.replace(tmp, path)


def replace_dir(tmp: str, final: str):
  """The finished directory `tmp` becomes `final`, replacing it by two renames: a kill leaves the old or the new
  one whole (between the renames the old one is `final`.old, which `settled_dir` finds)."""
  old = final + ".old"
  if os.path.isdir(final):
    os.replace(final, old)
  os.replace(tmp, final)
  if os.path.isdir(old):
    shutil.rmtree(old)


def settled_dir(final: str) -> str:
  """`final`, or `final`.old when a kill fell between replace_dir's two renames."""
  return final + ".old" if not os.path.isdir(final) and os.path.isdir(final + ".old") else final


# ---------------------------------------------------------------------------------------------------- the guard


def read_saved(workdir: str) -> dict:
  """config.json as written."""
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)


def read_config(workdir: str, defaults, error=ValueError):
  """config.json written over `defaults(saved)`, the tool's default config for that kind of run, so a field added
  since the run started takes its default (loading.read_config: an LM's)."""
  saved = read_saved(workdir)
  return merge_saved(defaults(saved), saved, os.path.join(workdir, "config.json"), error)


def merge_saved(c, saved: dict, path: str, error=ValueError, where: str = ""):
  """`saved` (a config.json's dict) written over the Config `c` in place (lists back to tuples); a key `c` lacks is
  an `error` naming the file."""
  for key, value in saved.items():
    if key not in c:
      raise error(f"{path}: unknown config key {where}{key}")
    if isinstance(value, dict):
      merge_saved(c[key], value, path, error, f"{where}{key}.")
    else:
      c[key] = tuple(value) if isinstance(value, list) else value
  return c


def check_workdir(c, workdir: str, read=read_saved, sections: tuple | None = ("model",), own=OWN_FILES) -> bool:
  """True when `workdir` holds an earlier run of this config to resume. Raises ConfigError before anything is
  written when it is a file, cannot be written, holds a run whose config differs in `sections` (None: anywhere), or,
  without config.json, holds anything but the tool's own empty start-up traces (`own`: names or glob patterns).
  A missing workdir is a fresh start. `read(workdir)`: the saved config, a dict or a Config (the tool's reader, e.g.
  loading.read_config over today's defaults: a field added since the run started takes its default)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file, not a directory")
  check_writable(workdir)
  if not os.path.isdir(workdir):
    return False
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    try:
      saved = read(workdir)
      saved = saved if isinstance(saved, dict) else json.loads(saved.to_json())
    except (OSError, ValueError, KeyError) as e:
      raise ConfigError(f"{path} is unreadable ({e}); it was not written by dba_jax") from None
    diff = config_diff(saved, json.loads(c.to_json()), sections)
    if diff:
      what = "model" if sections == ("model",) else "config"
      raise ConfigError(f"{workdir} holds a run of a different {what} (differs in {', '.join(diff)}); use another "
                        "--workdir")
    return True
  foreign = sorted(f for f in os.listdir(workdir) if f != "config.json.tmp" and (
      not any(fnmatch.fnmatch(f, p) for p in own) or not _empty_trace(os.path.join(workdir, f))))
  if foreign:
    raise ConfigError(f"{workdir} holds {foreign} but no config.json: not a dba_jax workdir, refusing to write "
                      "there (use a new or empty directory)")
  return False


def config_diff(saved: dict, now: dict, sections: tuple | None = None) -> list[str]:
  """'section.key: saved X vs now Y' for every field of `sections` (None: every section) that differs."""
  out = []
  for sec in sorted(set(saved) | set(now)) if sections is None else sections:
    a, b = saved.get(sec), now.get(sec)
    if isinstance(a, dict) or isinstance(b, dict):
      a, b = a if isinstance(a, dict) else {}, b if isinstance(b, dict) else {}
      out += [f"{sec}.{k}: saved {a.get(k)!r} vs now {b.get(k)!r}" for k in sorted(set(a) | set(b))
              if a.get(k) != b.get(k)]
    elif a != b:
      out.append(f"{sec}: saved {a!r} vs now {b!r}")
  return out


def check_writable(workdir: str):
  """The workdir (or the nearest existing parent it would be made in) must accept new files."""
  probe = workdir
  while not os.path.exists(probe):
    probe = os.path.dirname(probe) or "."
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir {workdir}: {probe} is not writable")


def _empty_trace(path: str) -> bool:
  """An empty file or a directory holding nothing but empty directories: what an interrupted start leaves."""
  if os.path.isdir(path):
    return all(_empty_trace(os.path.join(path, f)) for f in os.listdir(path))
  return os.path.getsize(path) == 0


# ----------------------------------------------------------------------------------------------- what a run writes


def write_config(c, workdir: str):
  """config.json, atomically: the first file a run writes (kept as it is when the run resumes)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    atomic_write(path, c.to_json(indent=2))


def git_revision() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  if rev.returncode:
    return "unknown"
  return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def record_start(c, workdir: str, resumed_from: int | None, devices: int):
  """One runs.jsonl line per start: when, which code, the command line, where, and the whole config."""
  append_jsonl(os.path.join(workdir, "runs.jsonl"), {
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_revision(), "argv": sys.argv,
      "host": socket.gethostname(), "devices": devices, "resumed_from": resumed_from,
      "config": json.loads(c.to_json())})


def append_jsonl(path: str, rec: dict):
  with open(path, "a") as f:
    f.write(json.dumps(rec) + "\n")


def truncate_jsonl(path: str, last_step: int):
  """Drop records after `last_step`: those steps are about to be run again from the resume point."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
  atomic_write(path, "".join(keep))  # a kill mid-write leaves the old file whole


class Progress:
  """One status line: step, loss, throughput and ETA; redrawn in place on a terminal, one line per update otherwise.
  `unit`/`digits`: how the rate reads (tok/s with no decimals, steps/s with one, ...)."""

  def __init__(self, total: int, quiet: bool = False, unit: str = "tok/s", digits: int = 0, stream=None):
    self.total, self.unit, self.digits = total, unit, digits
    self.stream = None if quiet else stream or sys.stderr
    self.tty = self.stream is not None and self.stream.isatty()

  def update(self, step: int, loss: float, rate: float, eta_s: float, extra: str = ""):
    if self.stream is None:
      return
    eta = time.strftime("%H:%M:%S", time.gmtime(eta_s)) if math.isfinite(eta_s) else "?"
    line = f"step {step}/{self.total} | loss {loss:.4f} | {rate:,.{self.digits}f} {self.unit} | ETA {eta}{extra}"
    self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
    self.stream.flush()

  def close(self):
    if self.tty:
      self.stream.write("\n")
