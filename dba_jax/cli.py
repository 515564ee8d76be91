"""The one command-line prologue of every dba_jax console script (dba-train, dba-bench, dba-convert, ...).

`@command(prog, errors)` wraps a `main(argv) -> exit code`: an input error is one line `prog: error: ...` and exit
code 2, never a traceback; `entry(main, stops)` is the console script itself, under the process's one stop handler
(signals.py). `flags_of` parses --config, its overrides and a command's absl flags, with --help; the argparse types
below range-check numbers before any work starts.

Exit codes, the same for every tool (README "Exit codes"):
  0    done; or stopped by a first SIGTERM / Ctrl-C after saving (a training tool: the same command resumes)
  1    dba-seeds run: one of its runs failed (its log says why)
  2    refused: bad input, a workdir or --out it will not write into; nothing was written
  3    training stopped on purpose (a non-finite loss under train.nonfinite='stop', no usable checkpoint)
  4    the disk refused a write (full, file too large, read-only); the last complete save is kept
  130  aborted by Ctrl-C (143: SIGTERM) in a tool that does not train, or by a second signal; nothing half-written
"""
from __future__ import annotations

import argparse
import errno
import functools
import json
import math
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from dba_jax import rundir, signals

HELP = ("--help", "-h", "--helpfull", "-help")
FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError)  # what parsing a flag or override raises
EXIT_REFUSED, EXIT_STOPPED, EXIT_DISK = 2, 3, 4
DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}


class CommandError(Exception):
  """Stops a command with one line `prog: error: <message>` and exit code 2."""


def command(prog: str, errors: tuple = (), argv0: bool = True):
  """Decorates a console script's `main(argv, ...) -> exit code`. argv None is the process's own: sys.argv, program
  name first, when `argv0` (absl parsing), else sys.argv[1:] (argparse). A CommandError, or an exception of a type in
  `errors` (the command's input errors: a bad config, data file, checkpoint or workdir), prints `prog: error: <it>`
  on stderr and returns 2; an OSError, one line naming the file (4 when the disk refused a write, else 2)."""
  def wrap(main):
    @functools.wraps(main)
    def run(argv=None, *args, **kwargs):
      argv = list(sys.argv if argv0 else sys.argv[1:]) if argv is None else argv
      try:
        return main(argv, *args, **kwargs)
      except (CommandError, *errors) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_REFUSED
      except OSError as e:
        disk = disk_error(e)
        print(f"{prog}: error: {os_error(e)}" + ("; free space and run the same command again" if disk else ""),
              file=sys.stderr)
        return EXIT_DISK if disk else EXIT_REFUSED
    run.prog, run.argv0 = prog, argv0
    return run
  return wrap


def disk_error(e: BaseException) -> bool:
  """`e`, or an exception it was raised from, is the disk refusing a write (full, file too large, read-only)."""
  while e is not None:
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
      return True
    e = e.__cause__ or e.__context__
  return False


def os_error(e: OSError) -> str:
  """'<strerror>: <file>' in one line."""
  where = f": {e.filename}" if getattr(e, "filename", None) else ""
  return f"{e.strerror or e}{where}"


def entry(main, stops: bool = False):
  """The console script of a main: exits with its code, under the process's stop handler (signals.install; the
  launcher in tools.py installs it before the heavy imports). `stops`: main(None, stop) trains, and the first
  SIGTERM / Ctrl-C is its clean stop; otherwise the first signal aborts (exit 130 / 143), nothing half-written."""
  def cli():
    prog = getattr(main, "prog", os.path.basename(sys.argv[0]))
    stop = signals.install(prog, stops)
    code = main(None, stop) if stops else main(None)
    signals.ignore()  # the exit code is decided: a signal during interpreter shutdown must not turn it into -2
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


def refuse_existing(prog: str, out: str, force: bool, what: str = "file", also: tuple = (), flag: str = "--out"):
  """Exit 2 before any work when `flag`'s path `out` (or a file written beside it, `also`) exists and --force is not
  given: nothing a user had is overwritten by accident. It must not be a directory unless `what` is one."""
  if out and os.path.isdir(out) and what == "file":
    print(f"{prog}: error: {flag} {out} is a directory; give a file name", file=sys.stderr)
    raise SystemExit(EXIT_REFUSED)
  taken = [p for p in (out, *also) if p and os.path.exists(p)] if out else []
  if taken and not force:
    names = " and ".join(taken)
    print(f"{prog}: error: {names} exist{'s' if len(taken) == 1 else ''}; refusing to overwrite (pass --force to "
          "replace)", file=sys.stderr)
    raise SystemExit(EXIT_REFUSED)
  parent = os.path.dirname(os.path.abspath(out)) if out else ""
  if parent and os.path.exists(parent) and not os.path.isdir(parent):
    print(f"{prog}: error: {flag} {out}: {parent} is a file, not a directory", file=sys.stderr)
    raise SystemExit(EXIT_REFUSED)


def sidecar(out: str, ext: str) -> str:
  """The file written beside `out` with extension `ext` (r.json -> r.md)."""
  return os.path.splitext(out)[0] + ext


# ------------------------------------------------------------------------- argparse types: checked before any work


def _number(parse, ok, want: str):
  def convert(text: str):
    try:
      x = parse(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not ok(x):
      raise argparse.ArgumentTypeError(f"{text} is out of range: must be {want}")
    return x
  convert.__name__ = want
  return convert


def int_at_least(lo: int):
  return _number(int, lambda x: x >= lo, f"an integer >= {lo}")


def float_at_least(lo: float):
  return _number(float, lambda x: math.isfinite(x) and x >= lo, f"a finite number >= {lo:g}")


ratio = _number(float, lambda x: 0 < x <= 1, "in (0, 1]")


def listed(item):
  """A comma-separated list of `item`s (at least one)."""
  def convert(text: str):
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
      raise argparse.ArgumentTypeError("an empty list")
    return [item(p.strip()) for p in parts]
  convert.__name__ = f"comma-separated list of {item.__name__}"
  return convert


def write_json(out: str, result) -> str:
  """The result as indented JSON: written to `out` (if given, atomically) and returned for printing."""
  text = json.dumps(result, indent=2)
  if out:
    rundir.atomic_write(out, text + "\n")
  return text
