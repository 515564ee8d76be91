"""Flag parsing and error reporting shared by every dba_jax command line (dba-train, dba-bench, dba-convert, ...)."""
from __future__ import annotations

import re

from absl import flags
from ml_collections import config_flags


def parse_flags(argv: list[str], extra=None) -> flags.FlagValues:
  """A fresh FlagValues with --config (plus its --config.a.b=... overrides) parsed from `argv`.
  `extra(fv)` may define more flags first. ml_collections finds overrides in the argv given here, not sys.argv."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/quickstart.py:dba", flag_values=fv,
                                  lock_config=True, sys_argv=list(argv))
  if extra is not None:
    extra(fv)
  fv(list(argv))
  return fv


def flag_error(e: Exception) -> str:
  """ml_collections reports a misspelled key as AttributeError("'key'\\nDid you mean ..."), a failing
  get_config() as a whole traceback: keep the sentence that says what is wrong."""
  lines = [ln.strip() for ln in str(e).replace("\\n", "\n").splitlines() if ln.strip()]
  return re.sub(r"[\\']+", "", " ".join(lines[-1:] if "Traceback" in str(e) else lines))
