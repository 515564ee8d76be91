"""Stop requests: SIGTERM (preemption) and SIGINT (Ctrl-C) ask a run to stop cleanly. Standard library only, so a
command can install it before its heavy imports: a signal during start-up is then remembered, not fatal."""
from __future__ import annotations

import os
import signal
import sys
import threading


class StopSignals:
  """The first SIGTERM or SIGINT sets `received` (its name); the run saves at its current step and exits 0.
  A second SIGINT aborts at once (exit 130). Handlers are installed only from the main thread."""

  def __init__(self):
    self.received: str | None = None
    self._old: dict = {}

  def install(self) -> "StopSignals":
    if not self._old and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.received is not None and signum == signal.SIGINT:
      sys.stderr.write("\nsecond Ctrl-C: aborting now (the last checkpoint is kept)\n")
      sys.stderr.flush()
      os._exit(130)
    if self.received is None:
      self.received = signal.Signals(signum).name
      sys.stderr.write(f"\n{self.received}: stopping at the next safe point (Ctrl-C again aborts at once)\n")
      sys.stderr.flush()

  def restore(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}

  def __enter__(self):
    return self.install()

  def __exit__(self, *exc):
    self.restore()
