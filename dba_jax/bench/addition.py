"""`dba-bench addition`: training steps/s of addition models against the original-style PyTorch loops, all timed
in one process with the contenders interleaved."""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from dba_jax.addition import config as config_lib, data
from dba_jax.addition import train as add_train
from dba_jax.addition.model import Arch, _is_spec, count_params, param_spec
from dba_jax.bench.timing import add_out, check_out, median_ms, write_report
from dba_jax.cli import int_at_least, load_config


def addition_params(a, seeds) -> dict:
  """Stacked (N, ...) float32 parameters of model.param_spec's shapes and init distributions, drawn by numpy.
  It is not init_params' stream, but step time does not depend on the values, and init_models' eager per-leaf
  draws take 5-10 s on the shared 2-core machine, which a smoke test cannot afford."""

  def one(seed):
    rng = np.random.default_rng(seed)
    draw = lambda spec: (np.full(spec[0], {"ones": 1.0, "zeros": 0.0}[spec[1]], np.float32) if isinstance(spec[1], str)
                         else (spec[1] * rng.standard_normal(spec[0])).astype(np.float32))
    return jax.tree.map(draw, param_spec(a), is_leaf=_is_spec)

  return jax.tree.map(lambda *xs: np.stack(xs), *[one(s) for s in seeds])


def main(argv) -> int:
  """Training steps/s of addition models, all timed in one process with the contenders interleaved: each round
  times one chunk of every row in turn, and a row's steps/s is its median chunk, so load changes on a shared
  machine hit every row alike. Rows: our jitted step over N models with the numpy sampler (the step train()
  runs; `--steps-per-call` K > 1 scans K steps per call, `--full-positions` adds the step that computes all 33
  positions, as before the loss started at the first labelled one), the original-style single-model PyTorch loop
  (torch_ref with its Python per-example sampler, and with a vectorised sampler), and `--torch-batched`: the
  original's HEAD trainer for N > 1 (torch_ref.BatchedTinyDecoderLM: stacked params, one AdamW, a vectorised
  torch sampler per model). Model 0 of every row starts from the same parameters."""
  p = argparse.ArgumentParser(prog="dba-bench addition")
  count, at_least_0 = int_at_least(1), int_at_least(0)
  p.add_argument("--config", default="configs/addition.py:456p", help="configs/addition.py:VARIANT")
  p.add_argument("--steps", type=count, default=300, help="timed steps per row (rounded up to whole chunks)")
  p.add_argument("--warmup", type=at_least_0, default=20, help="untimed steps first (JAX compiles on the first)")
  p.add_argument("--chunk", type=count, default=10, help="steps per timing chunk; the median chunk is reported")
  p.add_argument("--num-models", type=count, nargs="+", default=[1, 8], help="JAX rows: models per step")
  p.add_argument("--batching", nargs="*", default=[], choices=["vmap", "map"],
                 help="JAX rows with N > 1: vmap and/or map over the models (default: train.model_batching's pick)")
  p.add_argument("--steps-per-call", type=count, nargs="+", default=[1], help="JAX rows: steps scanned per call")
  p.add_argument("--full-positions", action="store_true",
                 help="also a JAX row per N with the loss over all 33 positions, one step per call (the old step)")
  p.add_argument("--torch-samplers", nargs="*", default=["loop", "vectorised"], choices=["loop", "vectorised"])
  p.add_argument("--torch-batched", action="store_true",
                 help="torch rows of the original's batched trainer for every N > 1 in --num-models")
  p.add_argument("--torch-threads", type=at_least_0, nargs="+", default=[0],
                 help="torch rows for each intra-op thread count (0: torch's default)")
  p.add_argument("--start-step", type=at_least_0, default=7000,
                 help="curriculum step of the first batch (7000: 1-10 digits, the phase most of a run is spent in)")
  add_out(p)
  args, overrides = p.parse_known_args(argv)
  check_out(p.prog, args)
  import torch  # lazy: optional heavy dependency, only for the torch rows' comparison

  from dba_jax.addition import torch_ref  # lazy: imports torch
  c = load_config("dba-bench", args.config, overrides, config_lib.validate)
  a, o, t = Arch.from_config(c.model), c.optim, c.train
  phases = data.parse_curriculum(t.curriculum)
  B, s0 = t.batch_size, args.start_step
  opt = add_train.make_optimizer(o, t.steps)
  default = add_train.resolve_batching(t.get("model_batching", "auto"))  # what train() would run
  torch_default = torch.get_num_threads()
  seeds_of = lambda N: [t.seed + i for i in range(N)]
  splits_of = lambda N: [data.holdout_splits(t.val_size, t.test_size, s) for s in seeds_of(N)]
  # Model 0's initial parameters (seed t.seed): every JAX row's model 0 and every torch row start from these.
  init0 = jax.tree.map(lambda x: x[0], addition_params(a, [t.seed]))
  rows = []  # (row dict, step(i) -> None running step i, sync, sampler(i), steps per call, torch threads)

  jobs = [(N, b, K, start) for N in args.num_models for b in ((args.batching or [default]) if N > 1 else [default])
          for K, start in [(k, data.PROMPT_LEN - 1) for k in args.steps_per_call] + ([(1, 0)] if args.full_positions
                                                                                    else [])]
  for N, batching, K, start in jobs:
    step_fn = add_train.make_train_step(a, opt, batching, K, loss_from=start)
    samplers = [data.Sampler(B, s + 1337, data.reserved_hashes(sp), phases) for s, sp in zip(seeds_of(N), splits_of(N))]
    params = jax.device_put(addition_params(a, seeds_of(N)))  # donated by the step. jnp.asarray compiles per shape
    state = {"params": params, "opt": jax.jit(jax.vmap(opt.init))(params)}  # one compile, not one per leaf

    def sample(i, samplers=samplers, K=K):  # (K, N, B, 33) for steps i..i+K-1 (K = 1: (N, B, 33))
      xy = [[s.batch(s0 + i + k) for s in samplers] for k in range(K)]
      x, y = (np.stack([np.stack([b[j] for b in step]) for step in xy]) for j in (0, 1))
      return (x[0], y[0]) if K == 1 else (x, y)

    def jax_step(i, state=state, step_fn=step_fn, sample=sample):
      state["params"], state["opt"], state["metrics"] = step_fn(state["params"], state["opt"], *sample(i))

    rows.append(({"impl": "jax", "sampler": "numpy", "num_models": N, "batching": batching, "threads": None,
                  "steps_per_call": K, "loss_from": start},
                 jax_step, lambda state=state: jax.block_until_ready(state["params"]), sample, K, None,
                 lambda state=state: float(np.mean(jax.device_get(state["metrics"]["loss"])))))

  split0 = data.holdout_splits(t.val_size, t.test_size, t.seed)
  torch_jobs = [(n, k, 1) for n in args.torch_threads for k in args.torch_samplers]
  if args.torch_batched:
    torch_jobs += [(n, "vectorised", N) for n in args.torch_threads for N in args.num_models if N > 1]
  for threads, kind, N in torch_jobs:
    if N == 1:
      cls = torch_ref.LoopSampler if kind == "loop" else torch_ref.VectorSampler
      sampler = cls(B, t.seed + 1337, split0, phases)
      model = torch_ref.load_params(torch_ref.TinyDecoderLM(a), init0)
      tstep, tsample = torch_ref.train_step, lambda i, sampler=sampler: sampler.batch(s0 + i)
    else:
      samplers = [torch_ref.VectorSampler(B, s + 1337, sp, phases) for s, sp in zip(seeds_of(N), splits_of(N))]
      model = torch_ref.load_params_batched(torch_ref.BatchedTinyDecoderLM(a, N), addition_params(a, seeds_of(N)))
      tstep = torch_ref.batched_train_step

      def tsample(i, samplers=samplers):
        xy = [s.batch(s0 + i) for s in samplers]
        return torch.stack([b[0] for b in xy]), torch.stack([b[1] for b in xy])
    topt, sched = torch_ref.make_optimizer(model, o, t.steps)
    loss = [None]

    def torch_step(i, model=model, topt=topt, sched=sched, tstep=tstep, tsample=tsample, loss=loss):
      loss[0] = tstep(model, topt, sched, *tsample(i), o.clip_norm)

    rows.append(({"impl": "torch", "sampler": kind, "num_models": N, "batching": "batched" if N > 1 else "-",
                  "threads": threads or torch_default, "steps_per_call": 1, "loss_from": 0},
                 torch_step, lambda: None, tsample, 1, threads or torch_default,
                 lambda loss=loss: float(loss[0].float().mean())))

  def run_chunk(r, first: int, n: int) -> float:  # seconds for steps first..first+n-1 (n a multiple of K)
    _, step, sync, _, K, threads, _ = r
    if threads:
      torch.set_num_threads(threads)  # process-wide: restored below
    t0 = time.perf_counter()
    for i in range(first, first + n, K):
      step(i)
    sync()
    return time.perf_counter() - t0

  try:
    for r in rows:
      K = r[4]
      run_chunk(r, 0, K)  # compile
      run_chunk(r, K, max(K, args.warmup // K * K))
    rates = [[] for _ in rows]
    n_rounds = max(1, -(-args.steps // args.chunk))
    for rnd in range(n_rounds):
      for j, r in enumerate(rows):
        n = max(r[4], -(-args.chunk // r[4]) * r[4])  # whole calls
        rates[j].append(n / run_chunk(r, args.warmup + args.chunk * rnd * 2, n))
    out = []
    for j, (row, _, _, sample, K, threads, final_loss) in enumerate(rows):
      if threads:
        torch.set_num_threads(threads)
      sps = float(np.median(rates[j]))
      row = dict(row, steps_per_s=sps, steps_per_s_mean=float(np.mean(rates[j])),
                 model_steps_per_s=row["num_models"] * sps,
                 sampler_ms=median_ms(lambda i, sample=sample: sample(i), 20) / K, final_loss=final_loss())
      out.append(row)
      print(f"{row['impl']:<5} {row['sampler']:<10} models {row['num_models']} {row['batching']:<7} "
            f"K {K:<3} from {row['loss_from']:<2} threads {row['threads'] or '-'} | "
            f"{row['steps_per_s']:8.1f} steps/s (median) | {row['model_steps_per_s']:8.1f} model-steps/s | "
            f"sampler {row['sampler_ms']:6.2f} ms/step", flush=True)
  finally:
    torch.set_num_threads(torch_default)

  report = {"config": args.config, "overrides": overrides, "params": count_params(a), "batch_size": B,
            "steps": args.steps, "warmup": args.warmup, "chunk": args.chunk, "start_step": s0, "interleaved": True,
            "jax_devices": [str(d) for d in jax.devices()], "torch": torch.__version__,
            "torch_num_threads": torch_default, "cpu_count": os.cpu_count(), "rows": out}
  return write_report(args.out, report)
