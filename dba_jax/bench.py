"""`dba-bench`: train-step time, with and without async checkpointing, on chosen meshes; tokens/s and MFU.

  dba-bench --config=configs/quickstart.py:dba [--config.x=...] [--steps 20] [--ckpt-every 5]
            [--devices 8 --meshes 8,1,1 2,4,1 2,2,2 1,1,8] [--peak-tflops 989] [--out bench.json]

  dba-bench attention [--seq 256 512 1024 2048 4096] [--heads 4] [--head-dim 64] [--out attn.json]

  dba-bench decode [--layers 12] [--d-model 256] [--heads 4] [--prompt 512] [--gen 64] [--caches fp16 q4/q8/q4]

  dba-bench addition --config=configs/addition.py:456p [--config.x=...] [--steps 300] [--num-models 1 8]
                     [--batching vmap map] [--torch-threads 0 1] [--out add.json]

  dba-bench gpt --torch [--attn standard selective] [--shapes d256_v50k d128_v256 d512_v50k] [--config.x=...]
                [--steps 4] [--rounds 3] [--breakdown] [--out gpt.json]

`--devices N` simulates N CPU devices (it sets XLA_FLAGS before JAX starts). Model FLOPs count 6 x (matmul
parameters) per token plus attention, causal-halved as MaxText does; MFU = model FLOP/s / peak (given, or
known for H100/H200: 989 TFLOP/s dense bf16).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def flops_per_token(m, seq_len: int) -> float:
  """Training FLOPs per token: 6 x matmul params (embedding lookup excluded, head included) + attention."""
  from dba_jax import model as model_lib
  from dba_jax.config import attn_dim, padded_vocab
  n = model_lib.count_params(m) - padded_vocab(m) * m.d_model * (0 if m.tie_embeddings else 1)
  if m.positions == "learned":
    n -= m.max_seq_len * m.d_model
  qk = (m.sem_dim + m.geo_dim) if m.attn_kind == "dba" else attn_dim(m)
  attention = 6 * m.n_layers * seq_len * (qk + attn_dim(m)) * 0.5  # scores and p.v, causal half
  return 6 * n + attention


def time_steps(c, mesh_shape, steps: int, ckpt_every: int, devices=None) -> dict:
  import jax
  import numpy as np

  from dba_jax import ckpt, mesh as mesh_lib, train
  mesh = mesh_lib.make_mesh(mesh_shape, devices)
  trainer = train.Trainer(c, mesh)
  state = trainer.init_state(0)
  t = c.train
  rng = np.random.default_rng(0)
  batch = rng.integers(0, c.model.vocab_size, (t.grad_accum, t.batch_size // t.grad_accum, c.data.seq_len + 1))
  batch = mesh_lib.global_batch(batch.astype(np.int32), trainer.accum_sharding, 1)
  state, _ = trainer.train_step(state, batch)  # compile
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory() as d:
    ckpts = ckpt.Checkpointer(d, keep=2) if ckpt_every else None
    times = []
    for i in range(1, steps + 1):
      start = time.perf_counter()
      state, metrics = trainer.train_step(state, batch)
      if ckpts and i % ckpt_every == 0:
        ckpts.save(i, state["params"], state["opt"], {"step": i})
      jax.block_until_ready(state)
      times.append(time.perf_counter() - start)
    if ckpts:
      ckpts.close()
  # Mean, not median: a save's cost lands on the steps that carry it, and those must count.
  step_s = float(np.mean(times))
  return {"mesh": "x".join(map(str, mesh.devices.shape)), "ckpt_every": ckpt_every, "step_ms": 1e3 * step_s,
          "tokens_per_s": t.batch_size * c.data.seq_len / step_s}


def _timed(fn, *args, repeats=3):
  """(median seconds after compilation, compiled temp bytes: XLA's scratch-buffer high-water mark)."""
  import jax
  import numpy as np
  jitted = jax.jit(fn)
  compiled = jitted.lower(*args).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)), temp


def attention_main(argv) -> int:
  """Forward+backward time and scratch memory of standard, selective and DBA attention per impl, and of the
  F scans (cumsum, protect-and-attack) in fp32 and fp64."""
  p = argparse.ArgumentParser(prog="dba-bench attention")
  p.add_argument("--seq", type=int, nargs="*", default=[256, 512, 1024, 2048, 4096])
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--dba-qk", type=int, default=40, help="DBA q/k head dim (semantic + geometric, e.g. 8 + 32)")
  p.add_argument("--dba-v", type=int, default=40, help="DBA value head dim")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  import jax
  import jax.numpy as jnp

  from dba_jax import ops
  from dba_jax.ops import selective
  from dba_kernels import cumsum as kcumsum, flash_attention as kflash, protect_attack as kpa
  rows = []

  def record(name, T, fn, *xs):
    sec, temp = _timed(fn, *xs, repeats=args.repeats)
    rows.append({"op": name, "T": T, "ms": 1e3 * sec, "temp_bytes": temp})
    mib = f"{temp / 2**20:10.1f} MiB" if temp is not None else "       n/a"
    print(f"{name:<34} T={T:<5} {1e3 * sec:10.1f} ms  scratch {mib}", flush=True)

  H, D = args.heads, args.head_dim
  for T in args.seq:
    key = jax.random.key(T)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    q, k, v = (jax.random.normal(kk, (1, T, H, D), jnp.float32) for kk in (k1, k2, k3))
    grad = lambda f: jax.grad(lambda q_, k_, v_: f(q_, k_, v_).sum(), argnums=(0, 1, 2))
    for impl in ("xla", "pallas"):
      record(f"standard {impl} fwd+bwd", T, grad(lambda *a, i=impl: ops.attention(*a, impl=i)), q, k, v)
    for impl in ("xla", "pallas_scan", "pallas"):
      record(f"selective {impl} fwd+bwd", T, grad(lambda *a, i=impl: ops.selective_attention(*a, impl=i)), q, k, v)
    # DBA: q/k [sem | geo] narrower or wider than v; the scale is folded into q (scale 1).
    qd, kd = (jax.random.normal(kk, (1, T, H, args.dba_qk), jnp.float32) for kk in (k4, k5))
    vd = v[..., :args.dba_v] if args.dba_v <= D else jnp.tile(v, (1, 1, 1, -(-args.dba_v // D)))[..., :args.dba_v]
    for impl in ("xla", "pallas"):
      record(f"dba {impl} fwd+bwd", T, grad(lambda *a, i=impl: ops.attention(*a, scale=1.0, impl=i)), qd, kd, vd)
    record("dba padded dot_product_attention", T,
           grad(lambda *a: kflash.padded_dot_product_attention(*a, scale=1.0)), qd, kd, vd)
    s = jax.nn.relu(jax.random.normal(key, (1, T, T), jnp.float32))
    scan_grad = lambda f: jax.grad(lambda x: (f(x) * x).sum())
    record("cumsum xla fp32 fwd+bwd", T, scan_grad(lambda x: selective.exclusive_cumsum(x, impl="xla")), s)
    record("cumsum pallas fp32 fwd+bwd", T, scan_grad(kcumsum.exclusive_cumsum), s)
    record("protect-attack xla fp32 fwd+bwd", T, scan_grad(lambda x: selective.protect_and_attack(x, 0.5 * x)), s)
    record("protect-attack pallas fp32 fwd+bwd", T, scan_grad(lambda x: kpa.protect_and_attack(x, 0.5 * x)), s)
    with jax.enable_x64(True):
      s64 = s.astype(jnp.float64)
      record("cumsum xla fp64 fwd+bwd", T, scan_grad(lambda x: selective.exclusive_cumsum(x, impl="xla")), s64)
      record("protect-attack xla fp64 fwd+bwd", T,
             scan_grad(lambda x: selective.protect_and_attack(x, 0.5 * x)), s64)
  report = {"device": jax.devices()[0].device_kind,
            "heads": args.heads, "head_dim": args.head_dim, "dba_qk": args.dba_qk, "dba_v": args.dba_v, "rows": rows}
  return _write_report(args.out, report)


def _write_report(path: str, report: dict) -> int:
  """Every dba-bench mode's JSON output (when --out is given), stamped with the date and JAX version."""
  import jax
  report = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, **report}
  if path:
    with open(path, "w") as f:
      json.dump(report, f, indent=2)
  return 0


def _child_run(cmd: list[str]) -> tuple[float, int]:
  """(seconds, peak RSS bytes) of a child process; ru_maxrss of the children is the max over those waited for,
  so each measurement runs in its own fresh child that runs the command."""
  import subprocess
  probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); "
           "dt = time.perf_counter() - t; print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
           "sys.exit(r.returncode)")
  out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True)
  sec, kib = out.stdout.split()[-2:]
  return float(sec), int(kib) * 1024


def convert_main(argv) -> int:
  """Time and peak RAM of dba-convert on a synthetic caramba checkpoint of a preset's shapes, both directions."""
  p = argparse.ArgumentParser(prog="dba-bench convert")
  p.add_argument("--config", default="configs/dba_paper_12l.py:decoupled")
  p.add_argument("--dir", default="", help="scratch directory (default: a temporary one, removed after)")
  p.add_argument("--out", default="")
  args, overrides = p.parse_known_args(argv)
  import shutil

  import jax
  import numpy as np

  from dba_jax import model as model_lib, torch_io
  from dba_jax.config import validate
  from dba_jax.formats import caramba
  from dba_jax.cli import load_config
  c = load_config("dba-bench", args.config, overrides, validate)
  work = args.dir or tempfile.mkdtemp(prefix="dba-bench-convert-")
  os.makedirs(work, exist_ok=True)
  src, wd, back = (os.path.join(work, n) for n in ("synthetic.pt", "converted", "back.pt"))
  rng = np.random.default_rng(0)
  shapes = jax.tree.map(lambda a: a.shape, model_lib.nnx.to_pure_dict(model_lib.abstract(c.model)[1]))
  params = jax.tree.map(lambda s: rng.standard_normal(s, dtype=np.float32), shapes, is_leaf=lambda x: isinstance(x, tuple))
  n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  torch_io.save(src, {"system_state_dict": caramba.from_params(params, c), "step": 0})
  del params
  size = os.path.getsize(src)
  overrides_cli = [f"--config={args.config}", *overrides]
  t_in, rss_in = _child_run([sys.executable, "-m", "dba_jax.convert", src, "--out", wd, *overrides_cli])
  t_out, rss_out = _child_run([sys.executable, "-m", "dba_jax.convert", "--to-torch", wd, "--out", back])
  base_t, base_rss = _child_run([sys.executable, "-c", "import jax, jax.numpy as jnp; jnp.zeros(1).block_until_ready()"])
  report = {"config": args.config, "overrides": overrides, "params": n_params, "file_bytes": size,
            "import_s": t_in, "import_peak_rss": rss_in, "export_s": t_out, "export_peak_rss": rss_out,
            "runtime_rss": base_rss}
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  print(f"{args.config}: {n_params:,} params, file {gib(size)}; JAX runtime alone {gib(base_rss)}")
  print(f"  import  {t_in:6.1f} s, peak RSS {gib(rss_in)} ({(rss_in - base_rss) / size:.2f}x the file beyond the runtime)")
  print(f"  export  {t_out:6.1f} s, peak RSS {gib(rss_out)} ({(rss_out - base_rss) / size:.2f}x the file beyond the runtime)")
  if not args.dir:
    shutil.rmtree(work)
  return _write_report(args.out, report)


def decode_models(layers: int, d_model: int, heads: int, vocab: int):
  """{name: model config}: an MHA baseline (head dim d_model / heads) and a DBA model with the sem8 paper
  model's per-head widths (semantic 8, geometric 32, value 40; dba.md §1.3), SwiGLU d_ff = 2.75 d_model."""
  from dba_jax.config import base_config, validate
  out = {}
  for name in ("baseline", "dba_sem8"):
    c = base_config()
    m = c.model
    m.vocab_size, m.n_layers, m.d_model, m.n_heads, m.d_ff = vocab, layers, d_model, heads, int(2.75 * d_model)
    m.max_seq_len = 1 << 16
    if name == "dba_sem8":
      m.attn_kind, m.sem_dim, m.geo_dim, m.attn_dim = "dba", 8 * heads, 32 * heads, 40 * heads
    out[name] = validate(c).model
  return out


def _policy_for(m, spec: str) -> str:
  """A DBA per-stream policy k_sem/k_geo/v on a standard model: its RoPE'd keys get k_geo's kind, v v's."""
  parts = spec.split("/")
  return f"{parts[1]}/{parts[2]}" if m.attn_kind != "dba" and len(parts) == 3 else spec


def decode_main(argv) -> int:
  """Decode tokens/s, time to first token and KV bytes/token of the baseline vs DBA sem8 per cache policy."""
  p = argparse.ArgumentParser(prog="dba-bench decode")
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--vocab", type=int, default=256)
  p.add_argument("--prompt", type=int, nargs="*", default=[512], help="prompt lengths")
  p.add_argument("--gen", type=int, default=64, help="tokens generated per run")
  p.add_argument("--caches", nargs="*", default=["fp16", "q4/q8/q4"])
  p.add_argument("--window", type=int, default=0)
  p.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up; the median is reported")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  import jax
  import numpy as np

  from dba_jax import generate, model as model_lib
  rows = []
  for name, m in decode_models(args.layers, args.d_model, args.heads, args.vocab).items():
    graphdef, _ = model_lib.abstract(m)
    model = model_lib.Model(m, graphdef, model_lib.init_params(m, jax.random.key(0)))
    for spec in args.caches:
      policy = _policy_for(m, spec)
      for P in args.prompt:
        gen = generate.Generator(model, cache=policy, window=args.window, max_len=P + args.gen)
        prompt = np.random.default_rng(P).integers(0, m.vocab_size, (1, P))
        runs = [gen.generate(prompt, args.gen) for _ in range(1 + args.repeats)][1:]  # first run compiles
        tps = float(np.median([r["decode_tokens_per_s"] for r in runs]))
        ttft = float(np.median([r["prefill_s"] for r in runs]))
        row = {"model": name, "cache": policy, "prompt": P, "gen": args.gen, "decode_tokens_per_s": tps,
               "ttft_ms": 1e3 * ttft, "kv_bytes_per_token": generate.kv_bytes_per_token(m, policy),
               "cache_bytes": generate.cache_bytes(gen.init_cache()), "params": model_lib.count_params(m)}
        rows.append(row)
        print(f"{name:<9} cache {policy:<9} prompt {P:<5} {tps:8.1f} decode tok/s  TTFT {row['ttft_ms']:8.1f} ms  "
              f"KV {row['kv_bytes_per_token']:>7,} B/token  cache {row['cache_bytes']:>11,} B", flush=True)
  report = {"device": jax.devices()[0].device_kind,
            "layers": args.layers, "d_model": args.d_model, "heads": args.heads, "vocab": args.vocab, "rows": rows}
  return _write_report(args.out, report)


def _steps_per_s(step, steps: int, chunk: int, sync=lambda: None) -> tuple[float, float]:
  """(median over chunks of `chunk` steps, overall) steps/s of `step(i)`. Timing whole chunks and syncing at
  the end lets JAX's async dispatch overlap the next batch's sampling with the running step, as a training loop
  does; torch on CPU runs synchronously, so there `sync` has nothing to wait for."""
  import numpy as np
  rates, total = [], 0.0
  for start in range(0, steps, chunk):
    n = min(chunk, steps - start)
    t0 = time.perf_counter()
    for i in range(start, start + n):
      step(i)
    sync()
    dt = time.perf_counter() - t0
    rates.append(n / dt)
    total += dt
  return float(np.median(rates)), steps / total


def _median_ms(fn, repeats: int) -> float:
  import numpy as np
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    fn(i)
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def addition_params(a, seeds) -> dict:
  """Stacked (N, ...) float32 parameters of model.param_spec's shapes and init distributions, drawn by numpy.
  It is not init_params' stream, but step time does not depend on the values, and init_models' eager per-leaf
  draws take 5-10 s on the shared 2-core machine, which a smoke test cannot afford."""
  import jax
  import numpy as np

  from dba_jax.addition.model import _is_spec, param_spec

  def one(seed):
    rng = np.random.default_rng(seed)
    draw = lambda spec: (np.full(spec[0], {"ones": 1.0, "zeros": 0.0}[spec[1]], np.float32) if isinstance(spec[1], str)
                         else (spec[1] * rng.standard_normal(spec[0])).astype(np.float32))
    return jax.tree.map(draw, param_spec(a), is_leaf=_is_spec)

  return jax.tree.map(lambda *xs: np.stack(xs), *[one(s) for s in seeds])


def addition_main(argv) -> int:
  """Training steps/s of addition models, all timed in one process with the contenders interleaved: each round
  times one chunk of every row in turn, and a row's steps/s is its median chunk, so load changes on a shared
  machine hit every row alike. Rows: our jitted step over N models with the numpy sampler (the step train()
  runs; `--steps-per-call` K > 1 scans K steps per call, `--full-positions` adds the step that computes all 33
  positions, as before the loss started at the first labelled one), the original-style single-model PyTorch loop
  (torch_ref with its Python per-example sampler, and with a vectorised sampler), and `--torch-batched`: the
  original's HEAD trainer for N > 1 (torch_ref.BatchedTinyDecoderLM: stacked params, one AdamW, a vectorised
  torch sampler per model). Model 0 of every row starts from the same parameters."""
  p = argparse.ArgumentParser(prog="dba-bench addition")
  p.add_argument("--config", default="configs/addition.py:456p", help="configs/addition.py:VARIANT")
  p.add_argument("--steps", type=int, default=300, help="timed steps per row (rounded up to whole chunks)")
  p.add_argument("--warmup", type=int, default=20, help="untimed steps first (JAX compiles on the first)")
  p.add_argument("--chunk", type=int, default=10, help="steps per timing chunk; the median chunk is reported")
  p.add_argument("--num-models", type=int, nargs="*", default=[1, 8], help="JAX rows: models per step")
  p.add_argument("--batching", nargs="*", default=[],
                 help="JAX rows with N > 1: vmap and/or map over the models (default: train.model_batching's pick)")
  p.add_argument("--steps-per-call", type=int, nargs="*", default=[1], help="JAX rows: steps scanned per call")
  p.add_argument("--full-positions", action="store_true",
                 help="also a JAX row per N with the loss over all 33 positions, one step per call (the old step)")
  p.add_argument("--torch-samplers", nargs="*", default=["loop", "vectorised"], choices=["loop", "vectorised"])
  p.add_argument("--torch-batched", action="store_true",
                 help="torch rows of the original's batched trainer for every N > 1 in --num-models")
  p.add_argument("--torch-threads", type=int, nargs="*", default=[0],
                 help="torch rows for each intra-op thread count (0: torch's default)")
  p.add_argument("--start-step", type=int, default=7000,
                 help="curriculum step of the first batch (7000: 1-10 digits, the phase most of a run is spent in)")
  p.add_argument("--out", default="")
  args, overrides = p.parse_known_args(argv)
  import jax
  import numpy as np
  import torch

  from dba_jax.addition import config as config_lib, data, torch_ref
  from dba_jax.addition import train as add_train
  from dba_jax.addition.model import Arch, count_params
  from dba_jax.cli import load_config
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
                 sampler_ms=_median_ms(lambda i, sample=sample: sample(i), 20) / K, final_loss=final_loss())
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
  return _write_report(args.out, report)

# name: (layers, d_model, heads, seq_len, batch, vocab). The first three are issue 16's shapes.
GPT_SHAPES = {
    "d256_v50k": (4, 256, 4, 256, 8, 50304),   # GPT-2 vocab, small body: the vocab projection dominates
    "d128_v256": (4, 128, 4, 128, 16, 256),    # quickstart-sized, byte vocab: per-op overhead dominates
    "d512_v50k": (4, 512, 8, 256, 8, 50304),
}


def gpt_shape(spec: str) -> tuple[str, tuple]:
  """A preset name or 'L:d:H:T:B:V' (e.g. 2:32:2:16:2:64)."""
  if spec in GPT_SHAPES:
    return spec, GPT_SHAPES[spec]
  parts = spec.split(":")
  if len(parts) != 6 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise SystemExit(f"dba-bench gpt: error: --shapes {spec!r} is neither a preset ({', '.join(GPT_SHAPES)}) "
                     "nor L:d:H:T:B:V with positive integers")
  return spec, tuple(int(p) for p in parts)


def gpt_config(attn: str, shape: tuple, overrides: list[str]):
  """configs/selective_gpt2.py's GPT (tied head, learned positions, LayerNorm, GELU) at `shape`, float32, the
  layer scan unrolled (model.scan_unroll=0, as in the small CPU configs), one micro-batch, no warm-up (the
  learning rate is the peak from step 0), then the user's overrides."""
  from dba_jax.cli import load_config
  from dba_jax.config import validate
  L, d, H, T, B, V = shape
  variant = {"standard": "unselective", "selective": "selective"}[attn]
  sized = [f"--config.model.n_layers={L}", f"--config.model.d_model={d}", f"--config.model.n_heads={H}",
           f"--config.model.attn_dim={d}", f"--config.model.d_ff={4 * d}", f"--config.model.max_seq_len={T}",
           f"--config.model.vocab_size={V}", "--config.model.compute_dtype=float32", f"--config.data.seq_len={T}",
           f"--config.train.batch_size={B}", "--config.train.grad_accum=1", "--config.optim.warmup_steps=0",
           "--config.model.scan_unroll=0",
           "--config.train.steps=100000", "--config.mesh.shape=(1,1,1)"]
  return load_config("dba-bench gpt", f"configs/selective_gpt2.py:{variant}", sized + list(overrides), validate)


def _cost_gflop(compiled) -> float | None:
  """XLA's FLOP count of a compiled function (None where the backend gives none)."""
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca["flops"]) / 1e9 if ca and "flops" in ca else None
  except Exception:  # cost analysis is advisory; some backends raise instead of returning nothing
    return None


def gpt_breakdown(trainer, state, batch_BT1, torch_model, torch_opt, tokens_BT1, repeats: int) -> list[dict]:
  """Median ms of separately compiled pieces of the step (JAX) and the same pieces run eagerly (torch):
  forward (loss), forward+backward, the optimizer update alone, and the final norm + vocab projection +
  softmax-CE (fwd+bwd) alone. The pieces overlap (forward is inside forward+backward), so they do not sum to
  the step."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import torch

  from dba_jax import losses, model as model_lib
  m = trainer.c.model
  params, opt = state["params"], state["opt"]
  key = jax.random.key(0)
  tokens = batch_BT1[0]
  B, T = tokens.shape[0], tokens.shape[1] - 1
  h_BTd = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, m.d_model)), jnp.float32)
  targets = tokens[:, 1:]

  def head_ce(p, h):
    mod = model_lib.nnx.merge(trainer.graphdef, p)
    return losses.nll(mod.readout(h), targets, m.vocab_size).mean()

  loss = lambda p, t: trainer.loss_fn(p, t, key)[0]
  grads = jax.jit(jax.grad(loss))(params, tokens)

  def update(g, o, p):
    u, o = trainer.tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  pieces = {"forward (loss)": (loss, (params, tokens)),
            "forward+backward": (jax.value_and_grad(loss), (params, tokens)),
            "optimizer update": (update, (grads, opt, params)),
            "norm + vocab proj + CE fwd+bwd": (jax.value_and_grad(head_ce, argnums=(0, 1)), (params, h_BTd))}
  rows = []
  for name, (fn, args) in pieces.items():
    with jax.set_mesh(trainer.mesh):
      compiled = jax.jit(fn).lower(*args).compile()
      jax.block_until_ready(compiled(*args))
      ms = _median_ms(lambda i: jax.block_until_ready(compiled(*args)), repeats)
    gf = _cost_gflop(compiled)
    rows.append({"impl": "jax", "piece": name, "ms": ms, "gflop": gf})

  # torch: the same pieces, eagerly.
  tm, th = torch_model, torch.as_tensor(np.array(h_BTd))
  ttgt = tokens_BT1[:, 1:].reshape(-1)
  V = m.vocab_size

  def t_head(_):
    tm.zero_grad(set_to_none=True)
    hh = th.clone().requires_grad_(True)
    logits = tm.lm_head(tm.transformer.ln_f(hh))[..., :V]
    torch.nn.functional.cross_entropy(logits.reshape(-1, V), ttgt).backward()

  def t_fwd(_):
    with torch.no_grad():
      tm.loss(tokens_BT1)

  def t_fwdbwd(_):
    tm.zero_grad(set_to_none=True)
    tm.loss(tokens_BT1).backward()

  t_fwdbwd(0)  # gradients for the optimizer timing
  saved = {k: v.clone() for k, v in tm.state_dict().items()}
  opt_saved = torch_opt.state_dict()
  torch_pieces = {"forward (loss)": t_fwd, "forward+backward": t_fwdbwd, "optimizer update": lambda _: torch_opt.step(),
                  "norm + vocab proj + CE fwd+bwd": t_head}
  for name, fn in torch_pieces.items():
    if name == "optimizer update":
      t_fwdbwd(0)
    fn(0)
    rows.append({"impl": "torch", "piece": name, "ms": _median_ms(fn, repeats), "gflop": None})
  tm.load_state_dict(saved)  # the breakdown's optimizer steps must not move the timed model
  torch_opt.load_state_dict(opt_saved)
  return rows


def gpt_main(argv) -> int:
  """Train-step tokens/s of dba_jax's GPT against the same GPT in eager PyTorch (dba_jax.torch_gpt), both
  starting from the same parameters, timed in alternating rounds in one process."""
  p = argparse.ArgumentParser(prog="dba-bench gpt", description=gpt_main.__doc__ + (
      " Shapes are presets or L:d:H:T:B:V; extra --config.x=... overrides apply to the dba_jax model (and the torch "
      "model where it has the field). Presets: " +
      ", ".join(f"{k} (L,d,H,T,B,V={v})" for k, v in GPT_SHAPES.items())))
  p.add_argument("--torch", action="store_true", required=True, help="time the eager-PyTorch GPT too (required)")
  p.add_argument("--attn", nargs="+", default=["standard", "selective"], choices=["standard", "selective"])
  p.add_argument("--shapes", nargs="+", default=list(GPT_SHAPES))
  p.add_argument("--steps", type=int, default=4, help="timed steps per implementation per round")
  p.add_argument("--rounds", type=int, default=3, help="alternating rounds (jax then torch); the median is reported")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps of each first (JAX compiles on the first)")
  p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
  p.add_argument("--breakdown", action="store_true", help="also time the pieces of the step (forward, backward, ...)")
  p.add_argument("--repeats", type=int, default=3, help="timed runs per breakdown piece")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="")
  args, overrides = p.parse_known_args(argv)
  if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
    p.error("--steps and --rounds must be >= 1, --warmup >= 0")
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)}")
  shapes = [gpt_shape(s) for s in args.shapes]
  import jax
  import numpy as np
  import torch

  from dba_jax import mesh as mesh_lib, torch_gpt, train
  torch_default = torch.get_num_threads()
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  threads = torch.get_num_threads()
  rows, breakdown = [], []
  try:
    for name, shape in shapes:
      for attn in args.attn:
        c = gpt_config(attn, shape, overrides)
        try:
          torch_gpt.check_config(c.model)
        except ValueError as e:
          p.error(str(e))
        L, d, H, T, B, V = shape
        mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
        trainer = train.Trainer(c, mesh)
        state = trainer.init_state(args.seed)
        tm = torch_gpt.from_jax(state["params"], c)
        topt = torch_gpt.make_optimizer(tm, c.optim)
        tokens = np.random.default_rng(args.seed).integers(0, V, (B, T + 1)).astype(np.int32)
        batch = mesh_lib.global_batch(tokens[None], trainer.accum_sharding, 1)
        ttokens = torch.as_tensor(tokens, dtype=torch.long)
        box = {"state": state, "jax_loss": [], "torch_loss": []}

        def jax_step(i):
          box["state"], metrics = trainer.train_step(box["state"], batch)
          box["jax_loss"].append(metrics["loss"])

        def torch_step(i):
          lr = float(trainer.schedule(len(box["torch_loss"])))
          box["torch_loss"].append(torch_gpt.train_step(tm, topt, ttokens, lr, c.optim.clip_norm))

        jsync = lambda: jax.block_until_ready(box["state"])
        t0 = time.perf_counter()
        jax_step(0)
        jsync()
        compile_s = time.perf_counter() - t0
        torch_step(0)
        _steps_per_s(jax_step, args.warmup, max(args.warmup, 1), jsync)
        _steps_per_s(torch_step, args.warmup, max(args.warmup, 1))
        jr, tr = [], []
        for _ in range(args.rounds):  # alternating, so load from other jobs hits both alike
          jr.append(_steps_per_s(jax_step, args.steps, args.steps, jsync)[0])
          tr.append(_steps_per_s(torch_step, args.steps, args.steps)[0])
        jl = [float(x) for x in jax.device_get(box["jax_loss"])]
        tl = box["torch_loss"]
        tok = B * T
        row = {"shape": name, "attn": attn, "layers": L, "d_model": d, "heads": H, "seq_len": T, "batch": B,
               "vocab": V, "params": int(sum(x.numel() for x in tm.parameters())),
               "jax_tokens_per_s": tok * float(np.median(jr)), "torch_tokens_per_s": tok * float(np.median(tr)),
               "jax_rounds_tokens_per_s": [tok * r for r in jr], "torch_rounds_tokens_per_s": [tok * r for r in tr],
               "jax_compile_s": compile_s, "first_loss": {"jax": jl[0], "torch": tl[0]},
               "loss_after_same_steps": {"steps": min(len(jl), len(tl)) - 1, "jax": jl[min(len(jl), len(tl)) - 1],
                                         "torch": tl[min(len(jl), len(tl)) - 1]}}
        row["ratio_jax_over_torch"] = row["jax_tokens_per_s"] / row["torch_tokens_per_s"]
        rows.append(row)
        print(f"{name:<10} {attn:<9} L{L} d{d} H{H} T{T} B{B} V{V} | jax {row['jax_tokens_per_s']:9,.0f} tok/s | "
              f"torch {row['torch_tokens_per_s']:9,.0f} tok/s ({threads} threads) | jax/torch "
              f"{row['ratio_jax_over_torch']:.2f}x | first loss {jl[0]:.5f} / {tl[0]:.5f}", flush=True)
        if args.breakdown:
          for r in gpt_breakdown(trainer, box["state"], batch, tm, topt, ttokens, args.repeats):
            r.update(shape=name, attn=attn)
            breakdown.append(r)
            gf = f"{r['gflop']:8.2f} GFLOP ({1e3 * r['gflop'] / r['ms']:6.1f} GFLOP/s)" if r["gflop"] else ""
            print(f"    {r['impl']:<5} {r['piece']:<32} {r['ms']:9.1f} ms {gf}", flush=True)
  finally:
    torch.set_num_threads(torch_default)
  report = {"torch": torch.__version__, "torch_num_threads": threads, "cpu_count": os.cpu_count(),
            "device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "overrides": overrides, "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
            "rows": rows, "breakdown": breakdown}
  return _write_report(args.out, report)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == "decode":
    return decode_main(argv[1:])
  if argv and argv[0] == "attention":
    return attention_main(argv[1:])
  if argv and argv[0] == "convert":
    return convert_main(argv[1:])
  if argv and argv[0] == "addition":
    return addition_main(argv[1:])
  if argv and argv[0] == "gpt":
    return gpt_main(argv[1:])
  p = argparse.ArgumentParser(prog="dba-bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--ckpt-every", type=int, default=5, help="also time with an async save every N steps (0: skip)")
  p.add_argument("--devices", type=int, default=0, help="simulate this many CPU devices")
  p.add_argument("--meshes", nargs="*", default=[], help="mesh shapes like 2,2,2 (default: the config's)")
  p.add_argument("--peak-tflops", type=float, default=0.0)
  p.add_argument("--out", default="")
  args, overrides = p.parse_known_args(argv)
  if args.devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  from dba_jax.config import validate
  from dba_jax.cli import load_config
  c = load_config("dba-bench", args.config, overrides, validate)
  kind = jax.devices()[0].device_kind
  peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in kind), 0.0)
  fpt = flops_per_token(c.model, c.data.seq_len)
  rows = []
  meshes = [tuple(int(x) for x in m.split(",")) for m in args.meshes] or [tuple(c.mesh.shape)]
  for shape in meshes:
    for every in ([0, args.ckpt_every] if args.ckpt_every else [0]):
      n = math.prod(shape) if -1 not in shape else jax.device_count()
      r = time_steps(c, shape, args.steps, every, jax.devices()[:n])
      r["mfu"] = fpt * r["tokens_per_s"] / (peak * 1e12 * n) if peak else None
      rows.append(r)
      mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
      print(f"mesh {r['mesh']:>7} | ckpt every {every or '-':>3} | {r['step_ms']:8.1f} ms/step | "
            f"{r['tokens_per_s']:12,.0f} tok/s | MFU {mfu}", flush=True)
  report = {"config": args.config, "overrides": overrides, "device": kind, "devices": jax.device_count(),
            "flops_per_token": fpt, "rows": rows}
  return _write_report(args.out, report)


def cli():
  sys.exit(main())


if __name__ == "__main__":
  cli()
