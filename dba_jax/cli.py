"""Flag parsing and error reporting shared by every dba_jax command line (dba-train, dba-bench, dba-convert, ...)."""
from __future__ import annotations

import os
import re
import sys

from absl import flags
from ml_collections import config_flags


HELP = ("--help", "-h", "--helpfull", "-help")


def parse_flags(argv: list[str], extra=None, doc: str = "") -> flags.FlagValues:
  """A fresh FlagValues with --config (plus its --config.a.b=... overrides) parsed from `argv`.
  `extra(fv)` may define more flags first. ml_collections finds overrides in the argv given here, not sys.argv.
  --help / -h prints `doc` and the flags and exits 0; a missing or broken config file is a ValueError in one line."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/quickstart.py:dba", flag_values=fv,
                                  lock_config=True, sys_argv=list(argv))
  if extra is not None:
    extra(fv)
  if any(a in HELP for a in argv[1:]):
    prog = os.path.basename(argv[0]) if argv else "dba"
    print(f"usage: {prog} --config=FILE.py[:variant] [--config.a.b=value ...] [flags]\n")
    if doc:
      print(doc.strip() + "\n")
    print(fv.get_help())
    raise SystemExit(0)
  check_config_file(argv)
  fv(list(argv))
  return fv


def check_config_file(argv: list[str]):
  """The --config file exists and compiles; else a ValueError naming the file (and file:line for a syntax error)."""
  value = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if value is None and "--config" in argv[:-1]:
    value = argv[argv.index("--config") + 1]
  if not value:
    return
  path = value.split(".py:", 1)[0] + ".py" if ".py:" in value else value
  if not os.path.isfile(path):
    raise ValueError(f"config file {path} does not exist")
  try:
    with open(path) as f:
      compile(f.read(), path, "exec")
  except SyntaxError as e:
    raise ValueError(f"{path}:{e.lineno}: {e.msg} (config file syntax)") from None


def flag_error(e: Exception) -> str:
  """ml_collections reports a misspelled key as AttributeError("'key'\\nDid you mean ..."), a failing
  get_config() as a whole traceback: keep the sentence that says what is wrong."""
  lines = [ln.strip() for ln in str(e).replace("\\n", "\n").splitlines() if ln.strip()]
  return re.sub(r"[\\']+", "", " ".join(lines[-1:] if "Traceback" in str(e) else lines))


def load_config(prog: str, config: str, overrides: list[str], validate):
  """`validate(config)` of --config=`config` with overrides, for argparse-based commands; a bad file, override or
  value exits 2 with one line naming it."""
  try:
    return validate(parse_flags([prog, f"--config={config}", *overrides]).config)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    print(f"{prog}: error: bad --config or override: {flag_error(e)}", file=sys.stderr)
    raise SystemExit(2) from None


def refuse_existing(prog: str, out: str, force: bool, what: str = "file"):
  """Exit 2 before any work when --out names an existing file (or a directory holding results) and --force is
  not given: nothing a user had is overwritten by accident."""
  if out and os.path.exists(out) and not force:
    print(f"{prog}: error: --out {out} exists; refusing to overwrite that {what} (pass --force to replace it)",
          file=sys.stderr)
    raise SystemExit(2)


def write_json(out: str, result) -> str:
  """The result as indented JSON: written to `out` (if given, atomically) and returned for printing."""
  import json
  text = json.dumps(result, indent=2)
  if out:
    with open(out + ".tmp", "w") as f:
      f.write(text + "\n")
    os.replace(out + ".tmp", out)
  return text
