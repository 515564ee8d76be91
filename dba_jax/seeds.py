"""`dba-seeds`: one config's variants over many seeds, then mean, spread and a paired test of the final eval loss.

  dba-seeds run --config=configs/selective_quick.py --variants selective unselective --seeds 0 1 2 3 4 \\
      --workdir runs/seeds/quick [--jobs 2] [--config.train.steps=...]
  dba-seeds report --workdir runs/seeds/quick --baseline unselective [--out report.json]
  dba-seeds pruning runs/pruning/*.json [--out runs/pruning/summary.md]

`run` trains WORKDIR/<variant>/seed<S> with dba-train (one child process per run, `--config.train.seed=S`), so a
stopped sweep resumes with the same command: finished runs are skipped and unfinished ones resume from their last
checkpoint. A run is finished when it has trained the train.steps asked for now, so a larger --config.train.steps
trains a finished sweep further. Ctrl-C or SIGTERM: every run saves its step and stops, no new run starts, exit 0,
and the same command resumes. With --jobs N, N runs go at once, each pinned to its own core with single-threaded
XLA (on a small CPU this beats one 2-thread run at a time). Runs of the same seed share the data order and the
init key, so the seeds pair variants.

`report` lists every run (nothing is dropped), then per variant mean +- sample std of the final eval loss, and
against --baseline the paired differences over the seeds both have: mean, std, Student's t with its two-sided p,
and the exact two-sided sign-flip permutation p (all 2^n sign patterns; no normality assumed; both from
dba_jax/evals/stats.py). It writes report.json, report.md and report.png (eval loss against step, one line per run)
into the workdir, or --out.

`pruning` tabulates `dba-eval prune --target-from` results (one per seed and context): the per-layer budgets at
parity with the unselective model and the reduction factor, with mean and spread per context.

Variant names are plain names (they become directories), seeds are >= 0. Nothing a user had is overwritten: report
and pruning refuse existing outputs, the files written beside --out included, unless --force.
"""
from __future__ import annotations

# Run as a script (python -m dba_jax.seeds), the stop handler comes first: a Ctrl-C during the imports below is
# then a clean stop, not a KeyboardInterrupt traceback (the console script's launcher, dba_jax/tools.py, does the same).
from dba_jax import signals

if __name__ == "__main__":
  signals.install("dba-seeds", stops=True)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from dba_jax import plots  # noqa: E402
from dba_jax.cli import (FLAG_ERRORS, CommandError, command, entry, flag_error, int_at_least, parse_flags,  # noqa: E402
                         refuse_existing, sidecar)
from dba_jax.evals.stats import paired, summary  # noqa: E402
from dba_jax.rundir import atomic_output, nearest_existing  # noqa: E402

DONE = "eval.jsonl"


# ------------------------------------------------------------------------------------------------------ runs

PLAIN = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*")
LOCK = ".dba-seeds.lock"


def plain_name(text: str) -> str:
  """A variant name: it becomes a directory under --workdir, so nothing that could lead out of it."""
  if not PLAIN.fullmatch(text) or ".." in text:
    raise argparse.ArgumentTypeError(f"{text!r} is not a plain name (letters, digits and _ - . +; no path "
                                     "separators, no '..', not starting with '.')")
  return text


def run_dir(workdir: str, variant: str, seed: int) -> str:
  return os.path.join(workdir, variant, f"seed{seed}")


def read_jsonl(path: str, key: str | None = "step") -> list[dict]:
  """The whole JSON objects of a JSONL log (with an integer `key`, unless None); a line cut by a kill (the run
  rewrites it on resume) or a missing file reads as nothing."""
  try:
    with open(path) as f:
      lines = f.readlines()
  except FileNotFoundError:
    return []
  rows = []
  for line in lines:
    try:
      r = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(r, dict) and (key is None or isinstance(r.get(key), int)):
      rows.append(r)
  return rows


def _steps_of(config) -> int | None:
  steps = config.get("train", {}).get("steps") if isinstance(config, dict) else None
  return steps if isinstance(steps, int) else None


def target_steps(d: str) -> int | None:
  """The train.steps of the run's latest start (runs.jsonl holds each start's whole config: a sweep may have
  extended the run since config.json was written), else config.json's; None for no readable run."""
  for rec in reversed(read_jsonl(os.path.join(d, "runs.jsonl"), key=None)):
    if _steps_of(rec.get("config")) is not None:
      return _steps_of(rec["config"])
  try:
    with open(os.path.join(d, "config.json")) as f:
      return _steps_of(json.load(f))
  except (OSError, ValueError):
    return None


def last_step(d: str) -> int:
  """The last step the run logged (0 before its first log)."""
  return max((r["step"] for r in read_jsonl(os.path.join(d, "metrics.jsonl"))), default=0)


def finished(d: str, steps: int | None = None) -> dict | None:
  """The final eval record of a run that has trained `steps` steps (default: the steps of its latest start), else
  None. Asked for more steps than it has, a finished run is unfinished again: the sweep trains it further."""
  steps = target_steps(d) if steps is None else steps
  if steps is None or last_step(d) != steps:
    return None
  evals = [r for r in read_jsonl(os.path.join(d, DONE)) if r["step"] == steps and
           isinstance(r.get("eval_loss"), (int, float))]
  return evals[-1] if evals else None


def requested_steps(config: str, variants: list[str], overrides: list[str]) -> dict[str, int]:
  """Each variant's train.steps under the overrides, from its validated config: a bad variant or override is
  refused here, before any training."""
  from dba_jax.config import validate  # lazy: JAX, which report and pruning do not need
  steps = {}
  for v in variants:
    try:
      steps[v] = validate(parse_flags(["dba-seeds", f"--config={config}:{v}", *overrides]).config).train.steps
    except FLAG_ERRORS as e:
      raise CommandError(f"variant {v!r} of {config} does not load: {flag_error(e)}") from None
  return steps


def check_sweep_dir(workdir: str):
  """Refused before anything is written: a workdir that is a file, lies under a file, or is a single run."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise CommandError(f"--workdir {workdir} is a file, not a directory")
  probe = nearest_existing(os.path.dirname(os.path.abspath(workdir)))
  if not os.path.isdir(probe):
    raise CommandError(f"--workdir {workdir}: {probe} is a file, not a directory")
  if os.path.exists(os.path.join(workdir, "config.json")):
    raise CommandError(f"--workdir {workdir} holds a single run (config.json); a sweep's workdir holds one "
                       "directory per variant: use another --workdir")


def check_dry_runs(args, variants: list[str], overrides: list[str]) -> str | None:
  """dba-train --dry_run of each variant (the mesh and batch on the devices the runs will see), all at once;
  the first failure's last line, else None."""
  procs = {v: subprocess.Popen(
      [sys.executable, "-m", "dba_jax.main", f"--config={args.config}:{v}",
       f"--workdir={run_dir(args.workdir, v, args.seeds[0])}", "--dry_run", *overrides],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in variants}
  errors = {}
  for v, proc in procs.items():
    out, err = proc.communicate()
    if proc.returncode:
      errors[v] = (err.strip() or out.strip() or "no output").splitlines()[-1]
  v = next(iter(errors), None)
  return None if v is None else f"variant {v!r} of {args.config} does not load: {errors[v]}"


def lock_sweep(workdir: str, stop) -> int | None:
  """An exclusive lock on the sweep, held by this process and inherited by its runs: a second sweep on the same
  workdir (the same command again after the first was killed, while its runs still save) waits until every run
  of the first has exited. None if a stop signal came while waiting."""
  fd = os.open(os.path.join(workdir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
  said = False
  while True:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return fd
    except BlockingIOError:
      if stop.received:
        os.close(fd)
        return None
      if not said:
        print(f"dba-seeds: waiting for the runs of another dba-seeds on {workdir} to save and exit", flush=True)
        said = True
      time.sleep(0.5)


def _pin(core: int | None):
  def pre():
    os.setpgrp()  # a Ctrl-C to the sweep reaches each child once, through run_main's forwarding
    if sys.platform.startswith("linux"):  # the sweep killed, even by SIGKILL: each run saves and stops (no orphans)
      ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if core is not None and hasattr(os, "sched_setaffinity"):
      os.sched_setaffinity(0, {core})
  return pre


def run_main(args, overrides: list[str], stop) -> int:
  steps = requested_steps(args.config, args.variants, overrides)
  todo = [(v, s) for s in args.seeds for v in args.variants]  # seed-major: a stopped sweep leaves whole pairs
  for v, s in todo:
    d = run_dir(args.workdir, v, s)
    if last_step(d) > steps[v]:
      raise CommandError(f"{d} has trained {last_step(d)} steps, more than the {steps[v]} asked for; give "
                         f"--config.train.steps={last_step(d)} or more, or another --workdir")
  if stop.received:
    return stopped(stop, count_finished(args.workdir, todo, steps), len(todo))
  os.makedirs(args.workdir, exist_ok=True)
  lock = lock_sweep(args.workdir, stop)
  if lock is None:
    return stopped(stop, count_finished(args.workdir, todo, steps), len(todo))
  try:
    return _run(args, overrides, stop, steps, todo, lock)
  finally:
    os.close(lock)


def count_finished(workdir: str, todo: list, steps: dict) -> int:
  return sum(finished(run_dir(workdir, v, s), steps[v]) is not None for v, s in todo)


def stopped(stop, done: int, total: int, started: int = 0) -> int:
  """The one line of a stop by signal (exit 0: the same command goes on where this one stopped)."""
  what = ": every run it had started saved its step and stopped" if started else " before starting a run"
  print(f"dba-seeds: stopped by {stop.received}{what}; {done} of {total} runs finished; run the same command to "
        "resume", flush=True)
  return 0


def _run(args, overrides, stop, steps, todo, lock) -> int:
  pending = [(v, s) for v, s in todo if not finished(run_dir(args.workdir, v, s), steps[v])]
  error = check_dry_runs(args, sorted({v for v, _ in pending}), overrides) if pending else None
  if stop.received:
    return stopped(stop, len(todo) - len(pending), len(todo))
  if error:
    raise CommandError(error)
  print(f"dba-seeds: {len(todo)} runs, {len(todo) - len(pending)} already finished, {len(pending)} to train "
        f"with {args.jobs} at a time", flush=True)
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  env = dict(os.environ)
  if args.jobs > 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
  running: dict = {}  # slot -> (proc, variant, seed, t0, log)
  failed, durations, started, t_start = [], [], 0, time.perf_counter()

  def terminate_runs():
    for proc, *_ in list(running.values()):
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # each run saves at its step and exits 0; the same command resumes

  def forward(signum, _frame):
    name = signal.Signals(signum).name
    if stop.received:  # a second signal aborts at once, the runs too (their second signal)
      terminate_runs()
      stop.abort(name)
    stop.received = name
    terminate_runs()

  # The runs are in their own process groups (a terminal's Ctrl-C reaches only the sweep): while they train, a
  # signal is forwarded to them; the process's stop handler is back once they have exited.
  old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    while (pending and stop.received is None) or running:
      while pending and len(running) < args.jobs and stop.received is None:
        slot = next(i for i in range(args.jobs) if i not in running)
        v, s = pending.pop(0)
        d = run_dir(args.workdir, v, s)
        os.makedirs(os.path.dirname(d), exist_ok=True)
        log = open(d + ".log", "a")
        cmd = [sys.executable, "-m", "dba_jax.main", f"--config={args.config}:{v}", f"--workdir={d}",
               f"--config.train.seed={s}", *overrides]
        core = cores[slot % len(cores)] if args.jobs > 1 and cores else None
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_pin(core),
                                pass_fds=(lock,))
        running[slot] = (proc, v, s, time.perf_counter(), log)
        started += 1
        if stop.received:  # the signal came while it started: it stops too
          terminate_runs()
        print(f"  start {v} seed {s}" + (f" on core {core}" if core is not None else "") + f" (log {d}.log)",
              flush=True)
      time.sleep(1.0)
      for slot, (proc, v, s, t0, log) in list(running.items()):
        if proc.poll() is None:
          continue
        log.close()
        del running[slot]
        dt = time.perf_counter() - t0
        rec = finished(run_dir(args.workdir, v, s), steps[v])
        if rec is not None:
          durations.append(dt)
          left = len(pending) + len(running)
          eta = left * (sum(durations) / len(durations)) / args.jobs
          print(f"  done  {v} seed {s}: eval loss {rec['eval_loss']:.4f} in {dt / 60:.1f} min | {left} left, "
                f"ETA {eta / 60:.0f} min", flush=True)
        elif not (stop.received and proc.returncode in (0, -signal.SIGTERM)):  # -SIGTERM: stopped as it started
          failed.append((v, s, proc.returncode))
          print(f"  FAILED {v} seed {s} (exit {proc.returncode}); see {run_dir(args.workdir, v, s)}.log", flush=True)
  finally:
    terminate_runs()  # none left unless something raised: the runs must not train on unwatched
    for s_, h in old.items():
      signal.signal(s_, h)
  n_done = count_finished(args.workdir, todo, steps)
  if stop.received and not failed:
    return stopped(stop, n_done, len(todo), started)
  print(f"dba-seeds: {n_done} of {len(todo)} runs finished in {(time.perf_counter() - t_start) / 60:.1f} min",
        flush=True)
  return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------- report

def collect(workdir: str) -> list[dict]:
  """Every run under workdir/<variant>/seed<S>: its final eval loss (None while unfinished) and eval curve."""
  runs = []
  for v in sorted(os.listdir(workdir)):
    vdir = os.path.join(workdir, v)
    if not os.path.isdir(vdir):
      continue
    for name in sorted(os.listdir(vdir)):
      d = os.path.join(vdir, name)
      if not (name.startswith("seed") and name[4:].isdigit() and os.path.isdir(d)):
        continue
      rec = finished(d)
      metrics = read_jsonl(os.path.join(d, "metrics.jsonl"))
      starts = read_jsonl(os.path.join(d, "runs.jsonl"), key=None)
      tok_s = metrics[-1].get("tokens_per_s") if metrics else None
      runs.append({"variant": v, "seed": int(name[4:]), "dir": d,
                   "final_eval_loss": None if rec is None else rec["eval_loss"],
                   "steps": rec["step"] if rec else last_step(d),
                   "tokens_per_s": tok_s if isinstance(tok_s, (int, float)) else None,
                   "restarts": max(len(starts) - 1, 0),
                   "curve": [(r["step"], r["eval_loss"]) for r in read_jsonl(os.path.join(d, DONE))
                             if isinstance(r.get("eval_loss"), (int, float))]})
  return runs


def report(workdir: str, baseline: str | None) -> dict:
  runs = collect(workdir)
  done = [r for r in runs if r["final_eval_loss"] is not None]
  by = {}
  for r in done:
    by.setdefault(r["variant"], {})[r["seed"]] = r["final_eval_loss"]
  out = {"workdir": workdir, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs],
         "variants": {v: summary(list(s.values())) for v, s in by.items()}, "paired": {}}
  if baseline is not None:
    if baseline not in by:
      raise ValueError(f"--baseline {baseline!r} has no finished runs in {workdir} (have: {sorted(by) or 'none'})")
    for v, seeds in by.items():
      common = sorted(set(seeds) & set(by[baseline]))
      if v != baseline and common:
        out["paired"][v] = {"seeds": common, **paired([seeds[s] for s in common], [by[baseline][s] for s in common])}
  out["_curves"] = {f"{r['variant']}/seed{r['seed']}": r["curve"] for r in runs}
  return out


def markdown(rep: dict, baseline: str | None) -> str:
  lines = [f"Final eval loss per run ({rep['workdir']}, {rep['date']}); unfinished runs show their step.", "",
           "| variant | seed | final eval loss | steps | tok/s (last log) | restarts |", "|---|---|---|---|---|---|"]
  for r in rep["runs"]:
    loss = f"{r['final_eval_loss']:.4f}" if r["final_eval_loss"] is not None else "unfinished"
    tok = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else ""
    lines.append(f"| {r['variant']} | {r['seed']} | {loss} | {r['steps']} | {tok} | {r['restarts']} |")
  lines += ["", "| variant | seeds | mean | std | min | max |", "|---|---|---|---|---|---|"]
  for v, s in rep["variants"].items():
    lines.append(f"| {v} | {s['n']} | {s['mean']:.4f} | {s['std']:.4f} | {s['min']:.4f} | {s['max']:.4f} |")
  if rep["paired"]:
    lines += ["", f"Paired against {baseline} (variant - {baseline}, same seeds):", "",
              "| variant | seeds | mean diff | std diff | t | p (t) | p (sign flip, exact) | lower in |",
              "|---|---|---|---|---|---|---|---|"]
    for v, p in rep["paired"].items():
      lines.append(f"| {v} | {p['n']} | {p['mean_diff']:+.4f} | {p['std_diff']:.4f} | {p['t']:.2f} | "
                   f"{p['p_t']:.2g} | {p['p_sign_flip']:.3g} | {p['a_lower']} of {p['n']} |")
  return "\n".join(lines) + "\n"


def plot(rep: dict, path: str) -> str:
  fig = plots._new_figure((7.0, 4.5))
  ax = fig.subplots()
  variants = sorted({k.split("/")[0] for k in rep["_curves"]})
  for name, curve in sorted(rep["_curves"].items()):
    if curve:
      v = name.split("/")[0]
      first = name == min(k for k in rep["_curves"] if k.startswith(v + "/"))
      ax.plot(*zip(*curve), color=plots.colour(variants.index(v)), lw=1, alpha=0.8, marker=".",
              label=v if first else None)
  ax.set(xlabel="step", ylabel="eval loss (nats/token)", title="eval loss, one line per seed")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  plots.save(fig, path, dpi=plots.DPI)
  return path


def report_main(args) -> int:
  if not os.path.isdir(args.workdir):
    raise CommandError(f"--workdir {args.workdir} is not a directory" if os.path.exists(args.workdir) else
                       f"--workdir {args.workdir} does not exist")
  out = args.out or os.path.join(args.workdir, "report.json")
  md, png = sidecar(out, ".md"), sidecar(out, ".png")
  if out in (md, png):
    raise CommandError(f"--out {out} would be overwritten by the report's own {os.path.splitext(out)[1]}; give "
                       "the JSON a .json name (the .md and .png go beside it)")
  refuse_existing("dba-seeds report", out, args.force, also=(md, png))  # the default WORKDIR/report.* too
  try:
    rep = report(args.workdir, args.baseline)
  except ValueError as e:
    raise CommandError(str(e)) from None
  text = markdown(rep, args.baseline)
  curves = rep.pop("_curves")
  rep["plot"] = png if any(curves.values()) else None
  # All three written under temporary names and renamed at the end: a failure or a kill leaves none half-written.
  with atomic_output(out) as tmp_json, atomic_output(md) as tmp_md, \
       (atomic_output(png) if rep["plot"] else contextlib.nullcontext()) as tmp_png:
    if tmp_png:
      plot({"_curves": curves}, tmp_png)
    with open(tmp_md, "w") as f:
      f.write(text)
    with open(tmp_json, "w") as f:
      json.dump({**rep, "curves": curves}, f, indent=2)
  print(text + f"\nwrote {out}, {md}" + (f", {png}" if rep["plot"] else ""))
  return 0


def pruning_rows(paths: list[str]) -> list[dict]:
  """One row per `dba-eval prune --target-from ... [--within R]` result: the losses and the reduction factors."""
  rows = []
  for path in paths:
    try:
      with open(path) as f:
        r = json.load(f)
    except ValueError as e:
      raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(r, dict) or "search" not in r:
      raise ValueError(f"{path}: no budget search (run dba-eval prune with --target-from or --target-loss)")
    try:
      s, w = r["search"], r.get("search_within")
      par = [x["ratio"] for x in r["ratios"] if x["loss"] <= r["target_loss"]]
      rows.append({"file": path, "checkpoint": r["checkpoint"], "baseline": r.get("target_from"), "T": r["seq_len"],
                   "windows": r["windows"], "selective_loss": r["unpruned_loss"], "target_loss": r["target_loss"],
                   "met": s["met"], "budgets": s["budgets"], "reduction": s.get("reduction"),
                   "loss_at_budgets": s["loss"], "min_keep_ratio_at_parity": min(par) if par else None,
                   "within": w["within"] if w else None, "within_budgets": w["budgets"] if w else None,
                   "within_reduction": w.get("reduction") if w else None})
    except (KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{path} is not a dba-eval prune result ({type(e).__name__}: {e})") from None
  return rows


def pruning_markdown(rows: list[dict]) -> str:
  lines = ["| T | selective checkpoint | windows | selective loss | unselective loss (target) | budgets at parity | "
           "reduction | loss there | within-own budgets | reduction |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (r["T"], r["checkpoint"])):
    red = f"{r['reduction']:.1f}x" if r["met"] else "not met"
    wr = f"{r['within_reduction']:.1f}x (within {100 * r['within']:g} %)" if r["within_reduction"] else ""
    lines.append(f"| {r['T']} | {r['checkpoint']} | {r['windows']} | {r['selective_loss']:.4f} | "
                 f"{r['target_loss']:.4f} | {r['budgets']} | {red} | {r['loss_at_budgets']:.4f} | "
                 f"{r['within_budgets'] or ''} | {wr} |")
  for T in sorted({r["T"] for r in rows}):
    for key, name in (("reduction", "parity with the unselective model"), ("within_reduction", "within own loss")):
      xs = [r[key] for r in rows if r["T"] == T and r[key]]
      if xs:
        sm = summary(xs)
        lines.append(f"\nT {T}, {name}: reduction {sm['mean']:.1f}x +- {sm['std']:.1f} over {sm['n']} seeds "
                     f"(min {sm['min']:.1f}x, max {sm['max']:.1f}x)")
  return "\n".join(lines) + "\n"


def pruning_main(args) -> int:
  seen = {}
  for path in args.results:  # one file given twice (under any spelling) would count its seed twice
    if os.path.realpath(path) in seen:
      raise CommandError(f"{seen[os.path.realpath(path)]} and {path} are the same file; give each result once")
    seen[os.path.realpath(path)] = path
  js = sidecar(args.out, ".json") if args.out else ""
  if args.out and js == args.out:
    raise CommandError(f"--out {args.out} would be overwritten by the rows' .json; give the table a .md name (the "
                       ".json goes beside it)")
  refuse_existing("dba-seeds pruning", args.out, args.force, also=(js,))
  try:
    rows = pruning_rows(args.results)
    md = pruning_markdown(rows)
  except (ValueError, KeyError, TypeError) as e:
    raise CommandError(str(e)) from None
  if args.out:
    with atomic_output(js) as tmp_json, atomic_output(args.out) as tmp_md:
      with open(tmp_json, "w") as f:
        json.dump(rows, f, indent=2)
      with open(tmp_md, "w") as f:
        f.write(md)
  print(md)
  return 0


@command("dba-seeds", argv0=False)
def main(argv=None, stop: signals.StopSignals | None = None) -> int:
  p = argparse.ArgumentParser(prog="dba-seeds", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  r = sub.add_parser("run", help="train every (variant, seed) run; resumes a stopped sweep",
                     description="Extra --config.x=v overrides apply to every run.")
  r.add_argument("--config", required=True, help="configs/NAME.py (variants are its get_config arguments)")
  r.add_argument("--variants", nargs="+", type=plain_name, required=True)
  r.add_argument("--seeds", nargs="+", type=int_at_least(0), required=True)
  r.add_argument("--workdir", required=True)
  r.add_argument("--jobs", type=int_at_least(1), default=1, help="runs at once, each pinned to one core (default 1)")
  q = sub.add_parser("report", help="table, paired test and curves of a sweep")
  q.add_argument("--workdir", required=True)
  q.add_argument("--baseline", default=None, help="variant every other one is paired against")
  q.add_argument("--out", default="", help="report JSON path (default WORKDIR/report.json; .md and .png beside)")
  q.add_argument("--force", action="store_true", help="replace existing report files")
  k = sub.add_parser("pruning", help="the pruning claim over seeds: a table of dba-eval prune results")
  k.add_argument("results", nargs="+", help="dba-eval prune --target-from JSON files")
  k.add_argument("--out", default="", help="markdown table path (a .json of the rows beside it)")
  k.add_argument("--force", action="store_true", help="replace an existing --out file and its .json")
  args, extra = p.parse_known_args(argv)
  bad = [o for o in extra if not (args.command == "run" and o.startswith("--config."))]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)}")
  if args.command != "run":
    if stop is not None:  # report and pruning write no run: a signal aborts them (exit 130/143), nothing half-written
      stop.stops = False
      if stop.received:
        stop.abort(stop.received)
    return report_main(args) if args.command == "report" else pruning_main(args)
  for name, xs in (("--seeds", args.seeds), ("--variants", args.variants)):
    if len(set(xs)) != len(xs):
      p.error(f"{name} repeats an item: {' '.join(map(str, xs))}")
  if ":" in args.config:
    p.error(f"--config {args.config}: give the file only; the variants go in --variants")
  if not os.path.isfile(args.config):
    p.error(f"--config {args.config}: no such file")
  check_sweep_dir(args.workdir)
  return run_main(args, extra, stop if stop is not None else signals.StopSignals("dba-seeds"))


cli = entry(main, stops=True)


if __name__ == "__main__":
  cli()
