"""A run directory, as every trainer keeps one (dba-train, the LatentWire trainer, the addition trainer): the guard that
decides between a fresh start, a resume and a refusal; config.json; the runs.jsonl start record; JSONL logs cut back on
resume; resume points replaced whole; the one progress line; and atomic writes.

Standard library only (and configlib's ConfigError), so any command can use it without paying for JAX."""
from __future__ import annotations

import fnmatch
import glob
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

from dba_jax import signals
from dba_jax.configlib import ConfigError

# What dba-train and the LatentWire trainer write into a workdir; left empty by an interrupted start, they are no
# reason to refuse the directory.
OWN_FILES = ("config.json", "runs.jsonl", "metrics.jsonl", "eval.jsonl", "checkpoints", "checkpoints_broken", "tb")
TMP_NAMES = ("*.tmp[0-9]*", "*.tmp")  # atomic_output's temporary names (and older versions'), left by a kill
# Fault injection for tests/test_fault_tools.py, "SECONDS:GLOB": an output whose name matches GLOB stays unfinished
# that long, so a signal can land while it is written.
PAUSE_IN_WRITE = os.environ.get("DBA_FAULT_PAUSE_IN_WRITE", "").partition(":")


# ------------------------------------------------------------------------------------------------ atomic writes


def atomic_write(path: str, data: str | bytes):
  """`data` into `path` through a temporary file renamed over it: a kill leaves the old file or the new one, whole."""
  with atomic_output(path) as tmp:
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
      f.write(data)


@contextmanager
def atomic_output(path: str):
  """Yields a temporary name beside `path` (same extension, so writers that go by it, e.g. savefig, still do); on
  success it is renamed to `path`, on an exception or an abort (signals.pending) removed: `path` is never left
  half-written. A directory works the same: create it at the yielded name."""
  root, ext = os.path.splitext(path)
  tmp = f"{root}.tmp{os.getpid()}{ext}"
  _remove_stale(root, ext)
  signals.pending.add(tmp)
  try:
    yield tmp
    if PAUSE_IN_WRITE[2] and fnmatch.fnmatch(os.path.basename(path), PAUSE_IN_WRITE[2]):
      time.sleep(float(PAUSE_IN_WRITE[0]))
    if os.path.isdir(tmp) and os.path.isdir(path):
      replace_dir(tmp, path)
    else:
      os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else os.remove(tmp)
    signals.pending.discard(tmp)


def _remove_stale(root: str, ext: str):
  """Temporary outputs of earlier processes (killed, SIGKILL leaves them) that are no longer running."""
  for path in glob.glob(f"{glob.escape(root)}.tmp[0-9]*{glob.escape(ext)}"):
    pid = path[len(root) + 4:len(path) - len(ext)]
    if pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


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


def check_workdir(c, workdir: str, read=read_saved, sections: tuple | None = ("model",), own=OWN_FILES,
                  tool: str = "") -> bool:
  """True when `workdir` holds an earlier run of this config to resume. Raises ConfigError before anything is
  written when it is a file, cannot be written, holds another tool's run (runs.jsonl names the tool that started
  it) or a run whose config differs in `sections` (None: anywhere), or, without config.json, holds anything but the
  tool's own empty start-up traces (`own`: names or glob patterns). A missing workdir is a fresh start.
  `read(workdir)`: the saved config, a dict or a Config (the tool's reader, e.g. loading.read_config over today's
  defaults: a field added since the run started takes its default)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file, not a directory")
  check_writable(workdir)
  if not os.path.isdir(workdir):
    return False
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    other = started_by(workdir)
    if tool and other and other != tool:
      raise ConfigError(f"{workdir} holds a {other} run; {tool} will not write into it (use another --workdir)")
    try:
      saved = read(workdir)
      saved = saved if isinstance(saved, dict) else json.loads(saved.to_json())
    except (OSError, ValueError, KeyError) as e:
      raise ConfigError(f"{path} is unreadable by {tool or 'this tool'} ({e}): another tool's run or not a dba_jax "
                        "workdir; use another --workdir") from None
    diff = config_diff(saved, json.loads(c.to_json()), sections)
    if diff:
      what = "model" if sections == ("model",) else "config"
      more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
      raise ConfigError(f"{workdir} holds a run of a different {what} (differs in {', '.join(diff[:6])}{more}); use "
                        "another --workdir")
    return True
  foreign = sorted(f for f in os.listdir(workdir) if not any(fnmatch.fnmatch(f, p) for p in TMP_NAMES) and (
      not any(fnmatch.fnmatch(f, p) for p in own) or not _empty_trace(os.path.join(workdir, f))))
  if foreign:
    raise ConfigError(f"{workdir} holds {foreign} but no config.json: not a dba_jax workdir, refusing to write "
                      "there (use a new or empty directory)")
  return False


def started_by(workdir: str) -> str:
  """The tool named by the first runs.jsonl record ('' for none, or a run from before tools were recorded)."""
  try:
    with open(os.path.join(workdir, "runs.jsonl")) as f:
      return str(json.loads(f.readline()).get("tool", ""))
  except (OSError, ValueError, AttributeError):
    return ""


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


def nearest_existing(path: str) -> str:
  """`path`, or its nearest ancestor that exists (where it would be made)."""
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe) or "."
  return probe


def check_writable(workdir: str):
  """The workdir (or the nearest existing parent it would be made in) must accept new files."""
  probe = nearest_existing(workdir)
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


def record_start(c, workdir: str, resumed_from: int | None, devices: int, tool: str):
  """One runs.jsonl line per start: which tool, when, which code, the command line, where, and the whole config."""
  append_jsonl(os.path.join(workdir, "runs.jsonl"), {
      "tool": tool, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_revision(), "argv": sys.argv,
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
    keep = [line for line in f if line.endswith("\n") and _step_of(line) <= last_step]
  atomic_write(path, "".join(keep))  # a kill mid-write leaves the old file whole


def _step_of(line: str) -> float:
  """A record's step; a line a kill cut short (or any unreadable one) counts as after every step: dropped."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return math.inf


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
