"""Training (others.md A.5), N seeds at once.

  python -m dba_jax.addition.train --config=configs/addition.py:456p --workdir=DIR [--config.train.num_models=8]

`train.num_models=N` stacks N models on a leading axis and runs one jitted AdamW step over all of them
(`train.model_batching`: vmap, or map, a loop inside the program, which is faster on CPU; auto picks;
`train.steps_per_call` K > 1 scans K steps per call). The loss is computed from the first labelled position only:
the same loss, with ~2.3x less work. Model i uses seed `train.seed + i` for its initialisation, its held-out splits
and (seed + i + 1337) its training stream, so model i of a sweep is the same run as a single-model run with that
seed. Each model gets its own directory `DIR/model_<i>/` with metrics.jsonl, tb/ (TensorBoard), best/ (highest
validation exact match, strictly improving, as the original) and last/. DIR/summary.json has every model's best/last
validation and its test-split result; DIR/curves.png plots every model's training loss and validation exact match.

After every evaluation but the last, DIR/resume/ holds the parameters, optimizer state, data-stream RNG states and
bests. A run killed at any point restarts with the same command from its last evaluation, bitwise as if never
stopped; a different config is refused, and a finished run (summary.json) is never trained again.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags

from dba_jax import rundir
from dba_jax.addition import checkpoint, data, shrink
from dba_jax.addition import config as config_lib
from dba_jax.addition.model import Arch, count_params, forward, greedy_decode, init_params, loss_fn
from dba_jax.cli import CommandError, command, entry, flags_of
from dba_jax.configlib import ConfigError
from dba_jax.signals import StopSignals
from dba_jax.conversion import ConversionError
from dba_jax.optim import lr_schedule  # dba-train's warmup (s+1)/W, then cosine to min_lr_ratio, flat after


def make_optimizer(o, total_steps: int):
  """Global-norm clip, then AdamW with decoupled decay on every leaf (torch AdamW's update, no mask)."""
  adamw = optax.adamw(lr_schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm > 0 else adamw


def init_models(a: Arch, opt, seeds, init_from: str = "") -> tuple[dict, object]:
  """Stacked params and optimizer states: model i from jax.random.key(seeds[i]), or every model from the
  checkpoint `init_from` mapped onto `a` (shrink.shrink: ranks and position basis may differ)."""
  if init_from:
    src = checkpoint.load(init_from)[0]
    one = shrink.shrink(src.arch, src.params, a)
    params = jax.tree.map(lambda x: jnp.asarray(np.stack([x] * len(seeds))), one)
  else:
    keys = jnp.stack([jax.random.key(int(s)) for s in seeds])
    params = jax.vmap(functools.partial(init_params, a))(keys)
  return params, jax.vmap(opt.init)(params)


def _over_models(fn, batching: str):
  """fn over a leading model axis: `vmap` (one batched program: best on accelerators) or `map` (a loop inside
  the one jitted program: on XLA:CPU, vmap's batched tiny matmuls run ~2x slower than N plain ones)."""
  if batching == "vmap":
    return jax.vmap(fn)
  return lambda *args: jax.lax.map(lambda xs: fn(*xs), args)


def resolve_batching(batching: str) -> str:
  return ("map" if jax.default_backend() == "cpu" else "vmap") if batching == "auto" else batching


def make_train_step(a: Arch, opt, batching: str = "vmap", steps_per_call: int = 1,
                    loss_from: int = data.PROMPT_LEN - 1):
  """jit of the step over N models: (params_N, opt_N, x (N, B, 33), y (N, B, 33)) -> (params_N, opt_N, metrics_N).

  steps_per_call K > 1: x and y are (K, N, B, 33), the K steps run in one lax.scan (one dispatch, one host
  round trip per K steps) and metrics are (K, N). Each scanned step is the single step's computation.
  The loss is computed from position `loss_from` = PROMPT_LEN - 1 on (loss_fn's label_start): the training
  labels before it are always IGNORE, so this is the same loss and gradient with ~2.3x less work (0: every
  position, the step as it was before; dba-bench times both)."""
  start = loss_from

  def one(params, opt_state, x_BT, y_BT):
    loss, grads = jax.value_and_grad(functools.partial(loss_fn, a, label_start=start))(params, x_BT, y_BT)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  step = _over_models(one, batching)
  if steps_per_call == 1:
    return jax.jit(step, donate_argnums=(0, 1))

  def scanned(params, opt_state, x_KNBT, y_KNBT):
    def body(carry, xy):
      p, s, m = step(*carry, *xy)
      return (p, s), m
    (params, opt_state), metrics = jax.lax.scan(body, (params, opt_state), (x_KNBT, y_KNBT))
    return params, opt_state, metrics

  return jax.jit(scanned, donate_argnums=(0, 1))


def make_batched_decoder(a: Arch, batching: str = "vmap"):
  """jit of decode over N models: (params_N, prompt (N, B, 22)) -> tokens (N, B, 12)."""
  one = lambda params, prompt_BP: greedy_decode(lambda ids: forward(a, params, ids), prompt_BP)
  return jax.jit(_over_models(one, batching))


def exact_match_all(decode, params, a_NM: np.ndarray, b_NM: np.ndarray, batch_size: int):
  """Per-model (exact match, per-digit accuracy) of each model on its own M problems (EOS unchecked)."""
  N, M = a_NM.shape
  prompts = data.encode(a_NM.reshape(-1), b_NM.reshape(-1)).reshape(N, M, data.FULL_LEN)
  want = prompts[:, :, data.PROMPT_LEN:data.PROMPT_LEN + data.SUM_DIGITS]
  prompts = prompts[:, :, :data.PROMPT_LEN]
  got = []
  for i in range(0, M, batch_size):
    chunk = prompts[:, i:i + batch_size]
    pad = batch_size - chunk.shape[1]
    if pad:  # one compiled shape for every chunk
      chunk = np.concatenate([chunk, np.repeat(chunk[:, -1:], pad, 1)], 1)
    got.append(np.asarray(decode(params, jnp.asarray(chunk)))[:, :batch_size - pad, :data.SUM_DIGITS])
  ok = np.concatenate(got, 1) == want
  return ok.all(-1).mean(-1), ok.mean((-1, -2))


@functools.lru_cache(maxsize=8)
def _compiled(a: Arch, optim_items: tuple, steps: int, batching: str, steps_per_call: int):
  """(optimizer, train step, K-step scanned train step or None, batched decoder), cached so runs of one shape
  share compilations."""
  opt = make_optimizer(ml_collections.ConfigDict(dict(optim_items)), steps)
  multi = make_train_step(a, opt, batching, steps_per_call) if steps_per_call > 1 else None
  return opt, make_train_step(a, opt, batching), multi, make_batched_decoder(a, batching)


def _next_stop(step: int, t) -> int:
  """The first step >= `step` after which the host has work (log, eval or the end): a scanned call stops there."""
  ev = -(-step // t.eval_interval) * t.eval_interval  # eval after steps with step % eval_interval == 0
  lg = -(-(step + 1) // t.log_every) * t.log_every - 1  # log after steps with (step + 1) % log_every == 0
  return min(ev, lg, t.steps - 1)


def _slice(tree, i: int):
  return jax.tree.map(lambda x: np.asarray(x[i]), tree)


TOOL = "dba-addition-train"
RESUME = "resume"  # workdir/resume/{state.npz, meta.json}: params, optimizer state and bests after an eval
OWN_FILES = ("config.json", "runs.jsonl", "model_*", RESUME, RESUME + ".old", "summary.json", "curves.png")


def _resume_point(workdir: str, c) -> dict | None:
  """The saved resume metadata of an unfinished run in workdir (None for a new run, or one killed before its first
  resume point: it starts again from step 0). Refused before anything is written: what rundir's guard refuses (a
  file, an unwritable or foreign directory, another tool's run, a run whose config differs anywhere from `c`)."""
  rundir.check_workdir(c, workdir, sections=None, own=OWN_FILES, tool=TOOL)
  meta_path = os.path.join(_resume_dir(workdir), "meta.json")
  if not os.path.exists(meta_path):
    return None
  with open(meta_path) as f:
    return json.load(f)


def _resume_dir(workdir: str) -> str:
  return rundir.settled_dir(os.path.join(workdir, RESUME))


def _save_resume(workdir: str, params, opt_state, best, best_step, last_val, step: int, samplers):
  """Atomically: the state after `step` steps, the samplers' RNG states included. The directory is replaced by
  rename, so a kill leaves the old or the new point, never half of one."""
  leaves = jax.tree.leaves((params, opt_state))
  with rundir.atomic_output(os.path.join(workdir, RESUME)) as tmp:
    os.makedirs(tmp)
    np.savez(os.path.join(tmp, "state.npz"), *[np.asarray(x) for x in jax.device_get(leaves)])
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump({"step": step, "best": best.tolist(), "best_step": best_step.tolist(),
                 "last_val": last_val.tolist(), "sampler_rng": [s.rng.bit_generator.state for s in samplers]}, f)


def _load_resume(workdir: str, params, opt_state, samplers):
  d = _resume_dir(workdir)
  with open(os.path.join(d, "meta.json")) as f:
    meta = json.load(f)
  arrays = np.load(os.path.join(d, "state.npz"))
  ref, treedef = jax.tree.flatten((params, opt_state))
  loaded = [arrays[f"arr_{i}"] for i in range(len(ref))]
  bad = [i for i, (a, b) in enumerate(zip(ref, loaded)) if np.shape(a) != b.shape]
  if len(arrays.files) != len(ref) or bad:
    raise ConfigError(f"{d}: the saved state does not fit this model ({len(arrays.files)} arrays for {len(ref)})")
  params, opt_state = jax.tree.unflatten(treedef, [jnp.asarray(x, dtype=np.asarray(r).dtype)
                                                    for x, r in zip(loaded, ref)])
  for s, state in zip(samplers, meta["sampler_rng"]):
    s.rng.bit_generator.state = state
  return (params, opt_state, np.asarray(meta["best"]), np.asarray(meta["best_step"]), np.asarray(meta["last_val"]),
          int(meta["step"]))


def train(c, workdir: str, quiet: bool = False, stop: StopSignals | None = None) -> dict:
  """Trains train.num_models models; returns the summary (also written to workdir/summary.json), or, stopped by a
  signal (`stop`: the command's handler; installed here if not given), {"stopped": signal, "step": saved step}."""
  stop = stop if stop is not None else StopSignals()
  with stop:
    return _train(c, workdir, quiet, stop)


def _train(c, workdir: str, quiet: bool, stop: StopSignals) -> dict:
  config_lib.validate(c)
  a, o, t = Arch.from_config(c.model), c.optim, c.train
  N = t.num_models
  seeds = [t.seed + i for i in range(N)]
  workdir = os.path.abspath(workdir)
  if os.path.exists(os.path.join(workdir, "summary.json")):
    raise ConfigError(f"--workdir={workdir} holds a finished run (summary.json); choose a new one")
  resume = _resume_point(workdir, c)
  phases = data.parse_curriculum(t.curriculum)
  splits = [data.holdout_splits(t.val_size, t.test_size, s) for s in seeds]
  samplers = [data.Sampler(t.batch_size, s + 1337, data.reserved_hashes(sp), phases) for s, sp in zip(seeds, splits)]
  val_a, val_b = np.stack([sp["val_a"] for sp in splits]), np.stack([sp["val_b"] for sp in splits])

  K = int(t.get("steps_per_call", 1))
  opt, step_fn, multi_fn, decode = _compiled(a, tuple(sorted(o.items())), t.steps, resolve_batching(t.model_batching),
                                             K)
  sched = lr_schedule(o, t.steps)
  params, opt_state = init_models(a, opt, seeds, t.init_from)

  if stop.received:
    print(f"{stop.received} during start-up: nothing was written; start again with the same command",
          file=sys.stderr)
    return {"workdir": workdir, "stopped": stop.received, "step": 0}
  os.makedirs(workdir, exist_ok=True)
  dirs = [os.path.join(workdir, f"model_{i}") for i in range(N)]
  best, best_step, last_val, start = np.full(N, -1.0), np.full(N, -1), np.zeros(N), 0
  if resume is not None:
    params, opt_state, best, best_step, last_val, start = _load_resume(workdir, params, opt_state, samplers)
  for d in dirs:  # records after the saved step (all of them, without one) are written again by this run
    rundir.truncate_jsonl(os.path.join(d, "metrics.jsonl"), start - 1)
  rundir.write_config(c, workdir)
  rundir.record_start(c, workdir, start or None, jax.device_count(), TOOL)
  from tensorboardX import SummaryWriter  # lazy: TensorBoard (and protobuf) only where a run logs
  writers = [SummaryWriter(os.path.join(d, "tb")) for d in dirs]
  progress = rundir.Progress(t.steps, quiet=quiet, unit="steps/s", digits=1)
  n_params = count_params(a)

  def log(i: int, rec: dict):
    rundir.append_jsonl(os.path.join(dirs[i], "metrics.jsonl"), rec)
    for k, v in rec.items():
      if k != "step":
        writers[i].add_scalar(k, v, rec["step"])

  def save(kind: str, i: int, step: int, val: float):
    checkpoint.save(os.path.join(dirs[i], kind), _slice(params, i), a,
                    {"step": step, "val_exact": val, "seed": seeds[i], "total_steps": t.steps, "params": n_params,
                     "config": json.loads(c.to_json())})

  t_mark, step_mark, train_s, speeds = None, 0, 0.0, []
  loss_N = np.zeros(N)
  try:
    step = start
    while step < t.steps:  # 0-based like the original: eval at step % interval == 0 and the last step
      # K steps in one scanned call where no log or eval falls inside them, else one step
      n = K if multi_fn is not None and _next_stop(step, t) - step + 1 >= K else 1
      xy = [[s.batch(step + k) for s in samplers] for k in range(n)]
      x, y = (np.stack([np.stack([b[j] for b in st]) for st in xy]) for j in (0, 1))
      if n == 1:
        params, opt_state, metrics = step_fn(params, opt_state, jnp.asarray(x[0]), jnp.asarray(y[0]))
      else:
        params, opt_state, metrics = multi_fn(params, opt_state, jnp.asarray(x), jnp.asarray(y))
      scanned, step = n > 1, step + n - 1  # `step`: the last step this call ran
      if t_mark is None:  # the first call includes compilation
        jax.block_until_ready(metrics)
        t_mark, step_mark = time.perf_counter(), step + 1
      done = step + 1
      if done % t.log_every == 0 or done == t.steps:
        m = jax.device_get(metrics)
        if scanned:  # (K, N): the last step's
          m = {k: v[-1] for k, v in m.items()}
        loss_N = np.asarray(m["loss"])
        now = time.perf_counter()
        train_s += now - t_mark
        sps = (done - step_mark) / train_s if done > step_mark and train_s > 0 else float("nan")
        if math.isfinite(sps):
          speeds.append(sps)
        lr = float(sched(step))
        for i in range(N):
          log(i, {"step": step, "loss": float(m["loss"][i]), "grad_norm": float(m["grad_norm"][i]), "lr": lr,
                  "steps_per_s": sps})
        eta = (t.steps - done) / sps if sps == sps and sps > 0 else float("inf")
        solved = int((last_val >= 0.99).sum())
        progress.update(done, float(loss_N.mean()), sps, eta,
                        f" | val best {best.max():.4f} | {solved}/{N} models >= 0.99")
        t_mark, step_mark, train_s = time.perf_counter(), done, 0.0
      if step % t.eval_interval == 0 or done == t.steps:
        t_eval = time.perf_counter()
        exact_N, digit_N = exact_match_all(decode, params, val_a, val_b, t.eval_batch_size)
        last_val = exact_N
        for i in range(N):
          log(i, {"step": step, "val/exact_match": float(exact_N[i]), "val/digit_acc": float(digit_N[i])})
          if exact_N[i] > best[i]:
            best[i], best_step[i] = exact_N[i], step
            save("best", i, step, float(exact_N[i]))
        if done < t.steps:  # a killed run restarts from here with the same command
          _save_resume(workdir, params, opt_state, best, best_step, last_val, done, samplers)
        if t_mark is not None:  # keep evaluation time out of steps/s
          t_mark += time.perf_counter() - t_eval
      step += 1
      if stop.received and step < t.steps:
        stop.saving = f"resume point of step {step}"
        _save_resume(workdir, params, opt_state, best, best_step, last_val, step, samplers)
        stop.saving = None
        print(f"\n{stop.received}: saved a resume point at step {step}; exiting. Start again with the same command "
              "to resume.", file=sys.stderr)
        return {"workdir": workdir, "stopped": stop.received, "step": step}
  finally:
    progress.close()
    for w in writers:
      w.close()
  for i in range(N):
    save("last", i, t.steps - 1, float(last_val[i]))

  # each model's best checkpoint on its own test split (never seen in training)
  best_params = [checkpoint.load(os.path.join(d, "best"))[0].params for d in dirs]
  stacked = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *best_params)
  test_N, _ = exact_match_all(decode, stacked, np.stack([sp["test_a"] for sp in splits]),
                              np.stack([sp["test_b"] for sp in splits]), t.eval_batch_size)
  summary = {"workdir": workdir, "params": n_params, "num_models": N, "steps": t.steps,
             "steps_per_s": float(np.median(speeds)) if speeds else float("nan"),
             "models": [{"model": i, "seed": seeds[i], "best_val_exact": float(best[i]), "best_step": int(best_step[i]),
                         "last_val_exact": float(last_val[i]), "best_test_exact": float(test_N[i]),
                         "final_loss": float(loss_N[i]), **grok_steps(dirs[i])} for i in range(N)]}
  rundir.atomic_write(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
  from dba_jax import plots  # lazy: matplotlib, only once a run has finished
  plots.addition_curves(dirs, os.path.join(workdir, "curves.png"), f"{n_params} params, {N} model(s), "
                        f"lr {o.lr}, {t.steps} steps")
  return summary


GROK_LEVELS = (0.5, 0.99, 1.0)


def grok_steps(model_dir: str) -> dict:
  """The first evaluation step at which validation exact match reached each of GROK_LEVELS (None: never), from
  the model's metrics.jsonl, so a resumed run counts the same as one never stopped."""
  val = [(r["step"], r["val/exact_match"]) for r in map(json.loads, open(os.path.join(model_dir, "metrics.jsonl")))
         if "val/exact_match" in r]
  return {f"grok_step_{level:g}": next((s for s, v in val if v >= level), None) for level in GROK_LEVELS}


def _flags(fv):
  flags.DEFINE_string("workdir", None, "Run directory: config, per-model metrics, TensorBoard, checkpoints",
                      flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Print the parameter count and exit", flag_values=fv)


@command(TOOL, errors=(ConfigError, ConversionError))
def main(argv, stop: StopSignals | None = None) -> int:
  fv = flags_of(argv, _flags, doc=__doc__)
  if fv.config is None:
    raise CommandError("--config=configs/addition.py:VARIANT is required")
  c = config_lib.validate(fv.config)
  if fv.dry_run:
    print(f"params: {count_params(Arch.from_config(c.model))}")
    return 0
  if not fv.workdir:
    raise ConfigError("--workdir is required (where config, metrics and checkpoints go)")
  s = train(c, fv.workdir, stop=stop)
  if s.get("stopped"):
    print(f"stopped by {s['stopped']} at step {s['step']} -> {s['workdir']}; the same command resumes")
    return 0
  for m in s["models"]:
    print(f"model {m['model']} (seed {m['seed']}): best val {m['best_val_exact']:.5f} at step {m['best_step']}, "
          f"test {m['best_test_exact']:.5f}")
  print(f"done: {s['num_models']} x {s['params']} params, {s['steps']} steps, {s['steps_per_s']:.1f} steps/s "
        f"-> {s['workdir']}")
  return 0


cli = entry(main, stops=True)


if __name__ == "__main__":
  cli()
