"""Bad input and impossible values, every console script: refused before any work with one line naming the problem
(`prog: error: ...`), a non-zero exit, no traceback, and nothing the user had changed. The rows live beside their
tool's area in tests/bad_input_*.py; a new tool adds its rows there."""
import glob
import importlib
import os

import pytest

from bad_input import run_case

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = [row for path in sorted(glob.glob(os.path.join(HERE, "bad_input_*.py")))
        for row in importlib.import_module(os.path.basename(path)[:-3]).CASES]


def test_row_ids_are_unique():
  ids = [r.id for r in ROWS]
  assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_refused_in_one_line(case, tmp_path, capsys):
  rc, err, names = run_case(case, str(tmp_path), capsys)
  assert "Traceback" not in err, err[-3000:]
  assert rc == case.rc, (rc, err[-2000:])
  assert case.says.lower() in err.lower(), err[-2000:]
  lines = [ln for ln in err.splitlines() if ln.strip() and "error:" in ln]
  assert len(lines) == 1, err[-2000:]
  for p in case.absent:
    assert not os.path.exists(p.format(**names)), p
  if case.check:
    case.check(names)
