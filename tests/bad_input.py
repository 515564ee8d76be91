"""The bad-input table's row type and runner (tests/test_bad_input.py collects the rows from tests/bad_input_*.py).

A row runs one console script's main in this process (its argv as typed, `{tmp}` the test's directory and `{name}`
each fixture the row's `setup` returns) and checks: the exit code, one line on stderr naming the problem
(`says`), no traceback, and that every file the setup made is unchanged (nothing a user had is overwritten)."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import shlex
from typing import Callable

from dba_jax.tools import TOOLS


@dataclasses.dataclass
class Case:
  id: str
  tool: str  # a key of dba_jax.tools.TOOLS
  argv: str  # as typed after the tool's name; {tmp} and the setup's names are filled in
  says: str  # a substring of stderr (case-insensitive)
  rc: int = 2
  setup: Callable[[str], dict] | None = None  # (tmp dir) -> {name: path}; the files it makes must stay unchanged
  absent: tuple = ()  # paths (formatted like argv) that must not exist afterwards
  check: Callable[[dict], None] | None = None  # more checks on the filled-in names

  def __str__(self):
    return self.id


def files(**names):
  """A setup writing each name's file (content 'mine') under the test dir: what must survive the refusal."""
  def setup(tmp):
    out = {}
    for key, rel in names.items():
      path = os.path.join(tmp, rel)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w") as f:
        f.write("mine\n")
      out[key] = path
    return out
  return setup


def snapshot(root: str) -> dict:
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def run_case(case: Case, tmp: str, capsys) -> tuple[int, str, dict]:
  names = {"tmp": tmp, **(case.setup(tmp) if case.setup else {})}
  before = snapshot(tmp)
  argv = [a.format(**names) for a in shlex.split(case.argv)]
  main = importlib.import_module(TOOLS[case.tool][0]).main
  capsys.readouterr()
  try:
    rc = main([case.tool, *argv] if main.argv0 else argv)
  except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else 2
  err = capsys.readouterr().err
  after = snapshot(tmp)
  changed = sorted(p for p in before if after.get(p) != before[p])
  assert not changed, f"{case.id}: files changed or removed: {changed}"
  return rc, err, names
