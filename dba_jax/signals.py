"""Stop requests, the one handler of every dba_jax console script. Standard library only, so a command installs it
before its heavy imports (dba_jax/tools.py): a signal during start-up is then handled like any other, never lost in
an import or a garbage-collector callback.

Two kinds of command:
- one that trains or sweeps (`stops=True`): the first SIGTERM (preemption) or Ctrl-C sets `received`; the run
  saves at its next safe point and exits 0, and the same command resumes. A second signal aborts at once (exit 130
  for SIGINT, 143 for SIGTERM) with a message that claims nothing about a save still being written.
- one that computes and writes a result (evals, conversion, reports, benchmarks): the first signal aborts at once,
  removing the temporary files of outputs not yet renamed into place (`pending`), so nothing half-written is left
  and the same command can run again.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time

# Temporary files and directories of outputs being written (rundir.atomic_*): removed by an abort.
pending: set[str] = set()

EXIT_CODE = {"SIGINT": 130, "SIGTERM": 143}


def discard_pending(patience_s: float = 5.0):
  """Remove every pending temporary output. A writer thread (Orbax's) may still be creating files in one: repeat
  until each stays gone, for up to `patience_s`."""
  deadline = time.monotonic() + patience_s
  while True:
    for path in list(pending):
      shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else _remove(path)
    if not any(os.path.lexists(p) for p in pending) or time.monotonic() > deadline:
      break
    time.sleep(0.05)
  pending.clear()


def _remove(path: str):
  try:
    os.remove(path)
  except OSError:
    pass


class StopSignals:
  """Handlers for SIGTERM and SIGINT. `prog` names the command in messages; `stops`: see the module doc.
  `saving`: set by a trainer while a checkpoint is being written (what an abort then says)."""

  def __init__(self, prog: str = "", stops: bool = True):
    self.prog, self.stops = prog or os.path.basename(sys.argv[0]), stops
    self.received: str | None = None
    self.saving: str | None = None
    self._old: dict = {}
    self._entered: list[bool] = []

  def install(self) -> "StopSignals":
    if not self._old and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _say(self, msg: str):
    try:
      sys.stderr.write(msg)
      sys.stderr.flush()
    except (OSError, ValueError):  # a closed or broken stderr must not keep the process alive
      pass

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.stops and self.received is None:
      self.received = name
      self._say(f"\n{self.prog}: {name}: stopping at the next safe point and saving (Ctrl-C again aborts at once)\n")
      return
    self.abort(name)

  def abort(self, name: str):
    """Exit now: one line saying what is (and is not) on disk, temporary outputs removed. Writer threads cut off
    mid-write print tracebacks of their own: stderr is closed to them once the line is out."""
    if self.stops:
      what = (f"the {self.saving} being written is incomplete and will not be used; " if self.saving else "")
      self._say(f"\n{self.prog}: second signal ({name}): aborting now; {what}the same command resumes from the last "
                "complete save\n")
    else:
      self._say(f"\n{self.prog}: interrupted ({name}); no output was left half-written\n")
    try:
      os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    except OSError:
      pass
    discard_pending()
    os._exit(EXIT_CODE.get(name, 130))

  def restore(self):
    global _installed
    if _installed is self:
      _installed = None
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}

  def __enter__(self):
    self._entered.append(not self._old)  # a `with` restores only handlers it installed itself
    return self.install()

  def __exit__(self, *exc):
    if self._entered.pop():
      self.restore()


_installed: StopSignals | None = None


def install(prog: str, stops: bool) -> StopSignals:
  """The process's handler, installed by the first call (the console script's launcher, before heavy imports);
  later calls return it."""
  global _installed
  if _installed is None:
    _installed = StopSignals(prog, stops).install()
  return _installed


def ignore():
  """SIGINT and SIGTERM ignored from here on (a finished command shutting down)."""
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, signal.SIG_IGN)
