"""`dba-seeds`: one config's variants over many seeds, then mean, spread and a paired test of the final eval loss.

  dba-seeds run --config=configs/selective_quick.py --variants selective unselective --seeds 0 1 2 3 4 \\
      --workdir runs/seeds/quick [--jobs 2] [--config.train.steps=...]
  dba-seeds report --workdir runs/seeds/quick --baseline unselective [--out report.json]
  dba-seeds pruning runs/pruning/*.json [--out runs/pruning/summary.md]

`run` trains WORKDIR/<variant>/seed<S> with dba-train (one child process per run, `--config.train.seed=S`), so a
stopped sweep resumes with the same command: finished runs are skipped and unfinished ones resume from their last
checkpoint. With --jobs N, N runs go at once, each pinned to its own core with single-threaded XLA (on a small
CPU this beats one 2-thread run at a time). Runs of the same seed share the data order and the init key, so the
seeds pair variants.

`report` lists every run (nothing is dropped), then per variant mean +- sample std of the final eval loss, and
against --baseline the paired differences over the seeds both have: mean, std, Student's t with its two-sided p,
and the exact two-sided sign-flip permutation p (all 2^n sign patterns; no normality assumed; both from
dba_jax/evals/stats.py). It writes report.json, report.md and report.png (eval loss against step, one line per run)
into the workdir, or --out.

`pruning` tabulates `dba-eval prune --target-from` results (one per seed and context): the per-layer budgets at
parity with the unselective model and the reduction factor, with mean and spread per context.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time

from dba_jax import plots
from dba_jax.cli import command, entry, refuse_existing
from dba_jax.evals.stats import paired, summary

DONE = "eval.jsonl"


# ------------------------------------------------------------------------------------------------------ runs

def run_dir(workdir: str, variant: str, seed: int) -> str:
  return os.path.join(workdir, variant, f"seed{seed}")


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: the run rewrites it on resume
          pass
  return rows


def finished(d: str) -> dict | None:
  """The final eval record of a finished run (its last step == the config's train.steps), else None."""
  cfg = os.path.join(d, "config.json")
  if not os.path.exists(cfg):
    return None
  with open(cfg) as f:
    steps = json.load(f)["train"]["steps"]
  evals = [r for r in read_jsonl(os.path.join(d, DONE)) if r.get("step") == steps]
  return evals[-1] if evals else None


def _pin(core: int | None):
  def pre():
    os.setpgrp()  # a Ctrl-C to the sweep reaches each child once, through run_main's forwarding
    if sys.platform.startswith("linux"):  # the sweep killed, even by SIGKILL: each run saves and stops (no orphans)
      ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if core is not None and hasattr(os, "sched_setaffinity"):
      os.sched_setaffinity(0, {core})
  return pre


def run_main(args, overrides: list[str]) -> int:
  todo = [(v, s) for s in args.seeds for v in args.variants]  # seed-major: a stopped sweep leaves whole pairs
  for v in args.variants:  # fail fast on a bad variant or override, before any training
    cmd = [sys.executable, "-m", "dba_jax.main", f"--config={args.config}:{v}",
           f"--workdir={run_dir(args.workdir, v, args.seeds[0])}", "--dry_run", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
      err = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
      print(f"dba-seeds: error: variant {v!r} of {args.config} does not load: {err}", file=sys.stderr)
      return 2
  pending = [(v, s) for v, s in todo if not finished(run_dir(args.workdir, v, s))]
  print(f"dba-seeds: {len(todo)} runs, {len(todo) - len(pending)} already finished, {len(pending)} to train "
        f"with {args.jobs} at a time", flush=True)
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  env = dict(os.environ)
  if args.jobs > 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
  running: dict = {}  # slot -> (proc, variant, seed, t0, log)
  failed, durations, t_start = [], [], time.perf_counter()
  stop = {"sig": None}

  def forward(signum, _frame):
    stop["sig"] = signum
    for proc, *_ in running.values():
      proc.send_signal(signal.SIGTERM)  # each run saves at its step and exits 0; the same command resumes

  old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    while (pending and stop["sig"] is None) or running:
      while pending and len(running) < args.jobs and stop["sig"] is None:
        slot = next(i for i in range(args.jobs) if i not in running)
        v, s = pending.pop(0)
        d = run_dir(args.workdir, v, s)
        os.makedirs(os.path.dirname(d), exist_ok=True)
        log = open(d + ".log", "a")
        cmd = [sys.executable, "-m", "dba_jax.main", f"--config={args.config}:{v}", f"--workdir={d}",
               f"--config.train.seed={s}", *overrides]
        core = cores[slot % len(cores)] if args.jobs > 1 and cores else None
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_pin(core))
        running[slot] = (proc, v, s, time.perf_counter(), log)
        print(f"  start {v} seed {s}" + (f" on core {core}" if core is not None else "") + f" (log {d}.log)",
              flush=True)
      time.sleep(1.0)
      for slot, (proc, v, s, t0, log) in list(running.items()):
        if proc.poll() is None:
          continue
        log.close()
        del running[slot]
        dt = time.perf_counter() - t0
        rec = finished(run_dir(args.workdir, v, s))
        if rec is not None:
          durations.append(dt)
          left = len(pending) + len(running)
          eta = left * (sum(durations) / len(durations)) / args.jobs
          print(f"  done  {v} seed {s}: eval loss {rec['eval_loss']:.4f} in {dt / 60:.1f} min | {left} left, "
                f"ETA {eta / 60:.0f} min", flush=True)
        elif stop["sig"] is None:
          failed.append((v, s, proc.returncode))
          print(f"  FAILED {v} seed {s} (exit {proc.returncode}); see {run_dir(args.workdir, v, s)}.log", flush=True)
  finally:
    for s_, h in old.items():
      signal.signal(s_, h)
  if stop["sig"] is not None:
    print("dba-seeds: stopped; every run saved its step. Run the same command to resume.", flush=True)
    return 0
  print(f"dba-seeds: {len(todo) - len(failed)} of {len(todo)} runs finished in "
        f"{(time.perf_counter() - t_start) / 60:.1f} min", flush=True)
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
      starts = read_jsonl(os.path.join(d, "runs.jsonl"))
      runs.append({"variant": v, "seed": int(name[4:]), "dir": d,
                   "final_eval_loss": None if rec is None else rec["eval_loss"],
                   "steps": rec["step"] if rec else max((r["step"] for r in metrics), default=0),
                   "tokens_per_s": metrics[-1].get("tokens_per_s") if metrics else None,
                   "restarts": max(len(starts) - 1, 0),
                   "curve": [(r["step"], r["eval_loss"]) for r in read_jsonl(os.path.join(d, DONE))]})
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
  fig.savefig(path, dpi=plots.DPI)
  return path


def report_main(args) -> int:
  if not os.path.isdir(args.workdir):
    print(f"dba-seeds report: error: --workdir {args.workdir} is not a directory", file=sys.stderr)
    return 2
  try:
    rep = report(args.workdir, args.baseline)
  except ValueError as e:
    print(f"dba-seeds report: error: {e}", file=sys.stderr)
    return 2
  refuse_existing("dba-seeds report", args.out, args.force)  # the default WORKDIR/report.json is the sweep's own
  out = args.out or os.path.join(args.workdir, "report.json")
  base = os.path.splitext(out)[0]
  md = markdown(rep, args.baseline)
  rep["plot"] = plot(rep, base + ".png") if any(rep["_curves"].values()) else None
  curves = rep.pop("_curves")
  with open(out + ".tmp", "w") as f:
    json.dump({**rep, "curves": curves}, f, indent=2)
  os.replace(out + ".tmp", out)
  with open(base + ".md", "w") as f:
    f.write(md)
  print(md + f"\nwrote {out}, {base}.md" + (f", {rep['plot']}" if rep["plot"] else ""))
  return 0


def pruning_rows(paths: list[str]) -> list[dict]:
  """One row per `dba-eval prune --target-from ... [--within R]` result: the losses and the reduction factors."""
  rows = []
  for path in paths:
    with open(path) as f:
      r = json.load(f)
    if "search" not in r:
      raise ValueError(f"{path}: no budget search (run dba-eval prune with --target-from or --target-loss)")
    s, w = r["search"], r.get("search_within")
    par = [x["ratio"] for x in r["ratios"] if x["loss"] <= r["target_loss"]]
    rows.append({"file": path, "checkpoint": r["checkpoint"], "baseline": r.get("target_from"), "T": r["seq_len"],
                 "windows": r["windows"], "selective_loss": r["unpruned_loss"], "target_loss": r["target_loss"],
                 "met": s["met"], "budgets": s["budgets"], "reduction": s.get("reduction"),
                 "loss_at_budgets": s["loss"], "min_keep_ratio_at_parity": min(par) if par else None,
                 "within": w["within"] if w else None, "within_budgets": w["budgets"] if w else None,
                 "within_reduction": w.get("reduction") if w else None})
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
  refuse_existing("dba-seeds pruning", args.out, args.force)
  try:
    rows = pruning_rows(args.results)
  except (OSError, ValueError, KeyError) as e:
    print(f"dba-seeds pruning: error: {e}", file=sys.stderr)
    return 2
  md = pruning_markdown(rows)
  if args.out:
    with open(args.out, "w") as f:
      f.write(md)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
      json.dump(rows, f, indent=2)
  print(md)
  return 0


@command("dba-seeds", argv0=False)
def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(prog="dba-seeds", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  r = sub.add_parser("run", help="train every (variant, seed) run; resumes a stopped sweep",
                     description="Extra --config.x=v overrides apply to every run.")
  r.add_argument("--config", required=True, help="configs/NAME.py (variants are its get_config arguments)")
  r.add_argument("--variants", nargs="+", required=True)
  r.add_argument("--seeds", nargs="+", type=int, required=True)
  r.add_argument("--workdir", required=True)
  r.add_argument("--jobs", type=int, default=1, help="runs at once, each pinned to one core (default 1)")
  q = sub.add_parser("report", help="table, paired test and curves of a sweep")
  q.add_argument("--workdir", required=True)
  q.add_argument("--baseline", default=None, help="variant every other one is paired against")
  q.add_argument("--out", default="", help="report JSON path (default WORKDIR/report.json; .md and .png beside)")
  q.add_argument("--force", action="store_true", help="replace an existing --out file")
  k = sub.add_parser("pruning", help="the pruning claim over seeds: a table of dba-eval prune results")
  k.add_argument("results", nargs="+", help="dba-eval prune --target-from JSON files")
  k.add_argument("--out", default="", help="markdown table path (a .json of the rows beside it)")
  k.add_argument("--force", action="store_true", help="replace an existing --out file")
  args, extra = p.parse_known_args(argv)
  bad = [o for o in extra if not (args.command == "run" and o.startswith("--config."))]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)}")
  if args.command == "run":
    if args.jobs < 1:
      p.error("--jobs must be >= 1")
    if len(set(args.seeds)) != len(args.seeds):
      p.error(f"--seeds repeats a seed: {args.seeds}")
    if not os.path.exists(args.config.split(":")[0]):
      p.error(f"--config {args.config}: no such file")
    return run_main(args, extra)
  return report_main(args) if args.command == "report" else pruning_main(args)


cli = entry(main)


if __name__ == "__main__":
  cli()
