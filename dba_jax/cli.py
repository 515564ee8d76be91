"""The one command-line prologue of every dba_jax console script (dba-train, dba-bench, dba-convert, ...).

`@command(prog, errors)` wraps a `main(argv) -> exit code`: an input error is one line `prog: error: ...` and exit
code 2, never a traceback; `entry(main)` is the console script itself (pyproject's `cli`), which also turns Ctrl-C
into exit 130 with one line. `flags_of` parses --config, its overrides and a command's absl flags, with --help."""
from __future__ import annotations

import functools
import json
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from dba_jax import rundir
from dba_jax.signals import StopSignals

HELP = ("--help", "-h", "--helpfull", "-help")
FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError)  # what parsing a flag or override raises


class CommandError(Exception):
  """Stops a command with one line `prog: error: <message>` and exit code 2."""


def command(prog: str, errors: tuple = (), argv0: bool = True):
  """Decorates a console script's `main(argv, ...) -> exit code`. argv None is the process's own: sys.argv, program
  name first, when `argv0` (absl parsing), else sys.argv[1:] (argparse). A CommandError, or an exception of a type in
  `errors` (the command's input errors: a bad config, data file, checkpoint or workdir), prints `prog: error: <it>`
  on stderr and returns 2."""
  def wrap(main):
    @functools.wraps(main)
    def run(argv=None, *args, **kwargs):
      argv = list(sys.argv if argv0 else sys.argv[1:]) if argv is None else argv
      try:
        return main(argv, *args, **kwargs)
      except (CommandError, *errors) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    run.prog = prog
    return run
  return wrap


def entry(main, stop: StopSignals | None = None):
  """The console script of a main: exits with its code. Given `stop` (installed before the command's heavy imports),
  main(None, stop) runs under those handlers: the first Ctrl-C or SIGTERM is the command's clean stop. Otherwise a
  Ctrl-C ends the command with one line and exit code 130, not a traceback."""
  def cli():
    try:
      if stop is None:
        code = main()
      else:
        with stop:
          code = main(None, stop)
    except KeyboardInterrupt:
      print(f"\n{getattr(main, 'prog', os.path.basename(sys.argv[0]))}: interrupted", file=sys.stderr)
      code = 130
    sys.exit(code)
  return cli


def flags_of(argv: list[str], extra=None, doc: str = "", bad: str = "bad --config or override") -> flags.FlagValues:
  """parse_flags for a command: a bad flag, override or config file is a CommandError `<bad>: <what is wrong>`."""
  try:
    return parse_flags(argv, extra, doc)
  except FLAG_ERRORS as e:
    raise CommandError(f"{bad}: {flag_error(e)}" if bad else flag_error(e)) from None


def parse_flags(argv: list[str], extra=None, doc: str = "") -> flags.FlagValues:
  """A fresh FlagValues with --config (plus its --config.a.b=... overrides) parsed from `argv`.
  `extra(fv)` may define more flags first; `--dry-run` reaches the flag dry_run. ml_collections finds overrides in
  the argv given here, not sys.argv. --help / -h prints `doc` and the flags and exits 0; a missing or broken config
  file is a ValueError in one line."""
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
  fv([a if i == 0 else _underscored(a, fv) for i, a in enumerate(argv)])
  return fv


def _underscored(arg: str, fv: flags.FlagValues) -> str:
  """--dry-run as --dry_run when the command has that flag (absl spells flags with underscores)."""
  name, eq, value = arg[2:].partition("=")
  if arg.startswith("--") and "-" in name and name.replace("-", "_") in fv:
    return "--" + name.replace("-", "_") + eq + value
  return arg


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
  except FLAG_ERRORS as e:
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
  text = json.dumps(result, indent=2)
  if out:
    rundir.atomic_write(out, text + "\n")
  return text
