"""dba-seeds rows of the bad-input table (tests/test_bad_input.py): refused with one line before anything is
written. The sweeps and results are written by hand (a run is its config.json and JSONL logs), never trained."""
import json
import os

from bad_input import Case

RUN = "run --config=configs/selective_quick.py --workdir {tmp}/w"


def _write(path: str, text: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return path


def _run(d: str, steps: int, logged: int | None = None):
  """A dba-train run directory that has trained `logged` steps (default `steps`: finished) of `steps`."""
  logged = steps if logged is None else logged
  _write(os.path.join(d, "config.json"), json.dumps({"train": {"steps": steps}}))
  _write(os.path.join(d, "metrics.jsonl"), json.dumps({"step": logged, "loss": 5.0, "tokens_per_s": 100.0}) + "\n")
  _write(os.path.join(d, "eval.jsonl"), json.dumps({"step": logged, "eval_loss": 5.0}) + "\n")


def sweep(*extra):
  """A finished 2-step sweep in tmp/w (one run), plus `extra` files (relative to tmp) that already exist."""
  def setup(tmp):
    _run(os.path.join(tmp, "w", "selective", "seed0"), 2)
    return {"w": os.path.join(tmp, "w"), **{os.path.basename(e).replace(".", "_"): _write(os.path.join(tmp, e), "mine")
                                           for e in extra}}
  return setup


def trained_beyond(tmp):
  _run(os.path.join(tmp, "w", "selective", "seed0"), 5)
  return {}


def a_file(name):
  return lambda tmp: {"f": _write(os.path.join(tmp, name), "mine")}


PRUNE = {"checkpoint": "c", "seq_len": 32, "windows": 2, "unpruned_loss": 1.0, "target_loss": 1.1,
         "ratios": [{"ratio": 1.0, "loss": 1.0}],
         "search": {"met": True, "budgets": [8], "reduction": 4.0, "loss": 1.05}}


def prune_results(*extra, content=None):
  def setup(tmp):
    p = _write(os.path.join(tmp, "p.json"), json.dumps(PRUNE if content is None else content))
    os.makedirs(os.path.join(tmp, "sub"))
    return {"p": p, **{os.path.basename(e).replace(".", "_"): _write(os.path.join(tmp, e), "mine") for e in extra}}
  return setup


CASES = [
    # run: every argument checked before the first file is written
    Case("seeds-negative-seed", "dba-seeds", f"{RUN} --variants selective --seeds -1", "--seeds: -1 is out of range",
         absent=("{tmp}/w",)),
    Case("seeds-negative-seed-equals", "dba-seeds", f"{RUN} --variants selective --seeds=0 --seeds=-3",
         "out of range", absent=("{tmp}/w",)),
    Case("seeds-not-a-seed", "dba-seeds", f"{RUN} --variants selective --seeds x", "'x' is not a number",
         absent=("{tmp}/w",)),
    Case("seeds-repeated-seed", "dba-seeds", f"{RUN} --variants selective --seeds 1 1", "--seeds repeats",
         absent=("{tmp}/w",)),
    Case("seeds-jobs-zero", "dba-seeds", f"{RUN} --variants selective --seeds 0 --jobs 0", "--jobs: 0 is out of range",
         absent=("{tmp}/w",)),
    Case("seeds-variant-escapes", "dba-seeds", f"{RUN} --variants ../../escaped --seeds 0", "not a plain name",
         absent=("{tmp}/w", "{tmp}/escaped", "{tmp}/../escaped")),
    Case("seeds-variant-path", "dba-seeds", f"{RUN} --variants selective a/b --seeds 0", "not a plain name",
         absent=("{tmp}/w",)),
    Case("seeds-variant-absolute", "dba-seeds", f"{RUN} --variants {{tmp}}/abs --seeds 0", "not a plain name",
         absent=("{tmp}/w", "{tmp}/abs")),
    Case("seeds-variant-hidden", "dba-seeds", f"{RUN} --variants .hidden --seeds 0", "not a plain name",
         absent=("{tmp}/w",)),
    Case("seeds-variant-dots", "dba-seeds", f"{RUN} --variants a..b --seeds 0", "not a plain name",
         absent=("{tmp}/w",)),
    Case("seeds-repeated-variant", "dba-seeds", f"{RUN} --variants selective selective --seeds 0",
         "--variants repeats", absent=("{tmp}/w",)),
    Case("seeds-unknown-variant", "dba-seeds", f"{RUN} --variants selective nosuch --seeds 0",
         "variant 'nosuch' of configs/selective_quick.py does not load", absent=("{tmp}/w",)),
    Case("seeds-bad-override", "dba-seeds", f"{RUN} --variants selective --seeds 0 --config.train.stepz=3",
         "does not load", absent=("{tmp}/w",)),
    Case("seeds-impossible-override", "dba-seeds", f"{RUN} --variants selective --seeds 0 --config.train.steps=-3",
         "does not load", absent=("{tmp}/w",)),
    Case("seeds-config-missing", "dba-seeds", "run --config=configs/nosuch.py --variants a --seeds 0 --workdir "
         "{tmp}/w", "no such file", absent=("{tmp}/w",)),
    Case("seeds-config-with-variant", "dba-seeds", "run --config=configs/selective_quick.py:selective --variants a "
         "--seeds 0 --workdir {tmp}/w", "give the file only", absent=("{tmp}/w",)),
    Case("seeds-workdir-is-file", "dba-seeds", "run --config=configs/selective_quick.py --variants selective "
         "--seeds 0 --workdir {f}", "is a file", setup=a_file("thesis.txt")),
    Case("seeds-workdir-under-file", "dba-seeds", "run --config=configs/selective_quick.py --variants selective "
         "--seeds 0 --workdir {f}/w", "is a file", setup=a_file("thesis.txt")),
    Case("seeds-workdir-is-a-run", "dba-seeds", "run --config=configs/selective_quick.py --variants selective "
         "--seeds 0 --workdir {f}", "holds a single run",
         setup=lambda tmp: {"f": os.path.dirname(_write(os.path.join(tmp, "run", "config.json"), "{}"))},
         absent=("{tmp}/run/selective",)),
    Case("seeds-trained-beyond-steps", "dba-seeds", f"{RUN} --variants selective --seeds 0 --config.train.steps=3",
         "has trained 5 steps, more than the 3 asked for", setup=trained_beyond, absent=("{tmp}/w/.dba-seeds.lock",)),
    # report: every file it writes (json, md, png) is refused when it exists, the default WORKDIR/report.* too
    Case("seeds-report-md-exists", "dba-seeds", "report --workdir {w} --out {tmp}/r.json", "r.md exists",
         setup=sweep("r.md"), absent=("{tmp}/r.json", "{tmp}/r.png")),
    Case("seeds-report-png-exists", "dba-seeds", "report --workdir {w} --out {tmp}/r.json", "r.png exists",
         setup=sweep("r.png"), absent=("{tmp}/r.json", "{tmp}/r.md")),
    Case("seeds-report-json-exists", "dba-seeds", "report --workdir {w} --out {tmp}/r.json", "r.json exists",
         setup=sweep("r.json"), absent=("{tmp}/r.md", "{tmp}/r.png")),
    Case("seeds-report-default-md-exists", "dba-seeds", "report --workdir {w}", "report.md exists",
         setup=sweep("w/report.md"), absent=("{tmp}/w/report.json", "{tmp}/w/report.png")),
    Case("seeds-report-default-png-exists", "dba-seeds", "report --workdir {w} --baseline selective",
         "report.png exists", setup=sweep("w/report.png"), absent=("{tmp}/w/report.json", "{tmp}/w/report.md")),
    Case("seeds-report-out-is-md", "dba-seeds", "report --workdir {w} --out {tmp}/r.md", "would be overwritten",
         setup=sweep(), absent=("{tmp}/r.md", "{tmp}/r.png")),
    Case("seeds-report-out-is-dir", "dba-seeds", "report --workdir {w} --out {w}", "is a directory", setup=sweep()),
    Case("seeds-report-workdir-is-file", "dba-seeds", "report --workdir {f}", "is not a directory",
         setup=a_file("thesis.txt")),
    Case("seeds-report-workdir-missing", "dba-seeds", "report --workdir {tmp}/nosuch", "does not exist"),
    Case("seeds-report-unknown-baseline", "dba-seeds", "report --workdir {w} --baseline nope",
         "--baseline 'nope' has no finished runs", setup=sweep(), absent=("{tmp}/w/report.json",)),
    # pruning: the .json beside --out is protected too; one result file given twice is refused
    Case("seeds-pruning-json-exists", "dba-seeds", "pruning {p} --out {tmp}/s.md", "s.json exists",
         setup=prune_results("s.json"), absent=("{tmp}/s.md",)),
    Case("seeds-pruning-md-exists", "dba-seeds", "pruning {p} --out {tmp}/s.md", "s.md exists",
         setup=prune_results("s.md"), absent=("{tmp}/s.json",)),
    Case("seeds-pruning-out-is-json", "dba-seeds", "pruning {p} --out {tmp}/s.json", "would be overwritten",
         setup=prune_results(), absent=("{tmp}/s.json",)),
    Case("seeds-pruning-same-file", "dba-seeds", "pruning {p} {p}", "are the same file", setup=prune_results()),
    Case("seeds-pruning-same-file-respelled", "dba-seeds", "pruning {p} {tmp}/sub/../p.json --out {tmp}/s.md",
         "are the same file", setup=prune_results(), absent=("{tmp}/s.md", "{tmp}/s.json")),
    Case("seeds-pruning-missing", "dba-seeds", "pruning {tmp}/nosuch.json", "nosuch.json"),
    Case("seeds-pruning-not-json", "dba-seeds", "pruning {p} --out {tmp}/s.md", "p.json is not JSON",
         setup=lambda tmp: {"p": _write(os.path.join(tmp, "p.json"), "{cut")}, absent=("{tmp}/s.md",)),
    Case("seeds-pruning-no-search", "dba-seeds", "pruning {p}", "no budget search", setup=prune_results(content={})),
    Case("seeds-pruning-wrong-shape", "dba-seeds", "pruning {p}", "not a dba-eval prune result",
         setup=prune_results(content={"search": {}})),
]
