"""`dba-bench gpt --torch`: train-step tokens/s of dba_jax's GPT against the same GPT in eager PyTorch
(dba_jax.torch_gpt), optionally broken down into the pieces of the step."""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dba_jax import losses, mesh as mesh_lib, model as model_lib, train
from dba_jax.bench.timing import add_out, check_out, cost_gflop, median_ms, steps_per_s, write_report
from dba_jax.cli import int_at_least, load_config
from dba_jax.config import validate


# name: (layers, d_model, heads, seq_len, batch, vocab). The first three are issue 16's shapes.
GPT_SHAPES = {
    "d256_v50k": (4, 256, 4, 256, 8, 50304),   # GPT-2 vocab, small body: the vocab projection dominates
    "d128_v256": (4, 128, 4, 128, 16, 256),    # quickstart-sized, byte vocab: per-op overhead dominates
    "d512_v50k": (4, 512, 8, 256, 8, 50304),
}


def gpt_shape(spec: str) -> tuple[str, tuple]:
  """A preset name or 'L:d:H:T:B:V' (e.g. 2:32:2:16:2:64); an argparse type."""
  if spec in GPT_SHAPES:
    return spec, GPT_SHAPES[spec]
  parts = spec.split(":")
  if len(parts) != 6 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise argparse.ArgumentTypeError(f"{spec!r} is neither a preset ({', '.join(GPT_SHAPES)}) nor L:d:H:T:B:V "
                                     "with positive integers")
  return spec, tuple(int(p) for p in parts)


def gpt_config(attn: str, shape: tuple, overrides: list[str]):
  """configs/selective_gpt2.py's GPT (tied head, learned positions, LayerNorm, GELU) at `shape`, float32, the
  layer scan unrolled (model.scan_unroll=0, as in the small CPU configs), one micro-batch, no warm-up (the
  learning rate is the peak from step 0), then the user's overrides."""
  L, d, H, T, B, V = shape
  variant = {"standard": "unselective", "selective": "selective"}[attn]
  sized = [f"--config.model.n_layers={L}", f"--config.model.d_model={d}", f"--config.model.n_heads={H}",
           f"--config.model.attn_dim={d}", f"--config.model.d_ff={4 * d}", f"--config.model.max_seq_len={T}",
           f"--config.model.vocab_size={V}", "--config.model.compute_dtype=float32", f"--config.data.seq_len={T}",
           f"--config.train.batch_size={B}", "--config.train.grad_accum=1", "--config.optim.warmup_steps=0",
           "--config.model.scan_unroll=0",
           "--config.train.steps=100000", "--config.mesh.shape=(1,1,1)"]
  return load_config("dba-bench gpt", f"configs/selective_gpt2.py:{variant}", sized + list(overrides), validate)


def gpt_breakdown(trainer, state, batch_BT1, torch_model, torch_opt, tokens_BT1, repeats: int) -> list[dict]:
  """Median ms of separately compiled pieces of the step (JAX) and the same pieces run eagerly (torch):
  forward (loss), forward+backward, the optimizer update alone, and the final norm + vocab projection +
  softmax-CE (fwd+bwd) alone. The pieces overlap (forward is inside forward+backward), so they do not sum to
  the step."""
  import torch  # lazy: optional heavy dependency, the model this mode compares against
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
      ms = median_ms(lambda i: jax.block_until_ready(compiled(*args)), repeats)
    gf = cost_gflop(compiled)
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
    rows.append({"impl": "torch", "piece": name, "ms": median_ms(fn, repeats), "gflop": None})
  tm.load_state_dict(saved)  # the breakdown's optimizer steps must not move the timed model
  torch_opt.load_state_dict(opt_saved)
  return rows


def main(argv) -> int:
  """Train-step tokens/s of dba_jax's GPT against the same GPT in eager PyTorch (dba_jax.torch_gpt), both
  starting from the same parameters, timed in alternating rounds in one process."""
  p = argparse.ArgumentParser(prog="dba-bench gpt", description=main.__doc__ + (
      " Shapes are presets or L:d:H:T:B:V; extra --config.x=... overrides apply to the dba_jax model (and the torch "
      "model where it has the field). Presets: " +
      ", ".join(f"{k} (L,d,H,T,B,V={v})" for k, v in GPT_SHAPES.items())))
  p.add_argument("--torch", action="store_true", required=True, help="time the eager-PyTorch GPT too (required)")
  p.add_argument("--attn", nargs="+", default=["standard", "selective"], choices=["standard", "selective"])
  count = int_at_least(1)
  p.add_argument("--shapes", nargs="+", type=gpt_shape, default=[gpt_shape(s) for s in GPT_SHAPES])
  p.add_argument("--steps", type=count, default=4, help="timed steps per implementation per round")
  p.add_argument("--rounds", type=count, default=3, help="alternating rounds (jax then torch); the median is reported")
  p.add_argument("--warmup", type=int_at_least(0), default=2,
                 help="untimed steps of each first (JAX compiles on the first)")
  p.add_argument("--torch-threads", type=int_at_least(0), default=0, help="torch intra-op threads (0: torch's default)")
  p.add_argument("--breakdown", action="store_true", help="also time the pieces of the step (forward, backward, ...)")
  p.add_argument("--repeats", type=count, default=3, help="timed runs per breakdown piece")
  p.add_argument("--seed", type=int_at_least(0), default=0)
  add_out(p)
  args, overrides = p.parse_known_args(argv)
  check_out(p.prog, args)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)}")
  shapes = args.shapes
  import torch  # lazy: optional heavy dependency, the model this mode compares against

  from dba_jax import torch_gpt  # lazy: imports torch
  for name, shape in shapes:  # every shape and layout checked before the first is timed
    for attn in args.attn:
      try:
        torch_gpt.check_config(gpt_config(attn, shape, overrides).model)
      except ValueError as e:
        p.error(str(e))
  torch_default = torch.get_num_threads()
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  threads = torch.get_num_threads()
  rows, breakdown = [], []
  try:
    for name, shape in shapes:
      for attn in args.attn:
        c = gpt_config(attn, shape, overrides)
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
        steps_per_s(jax_step, args.warmup, max(args.warmup, 1), jsync)
        steps_per_s(torch_step, args.warmup, max(args.warmup, 1))
        jr, tr = [], []
        for _ in range(args.rounds):  # alternating, so load from other jobs hits both alike
          jr.append(steps_per_s(jax_step, args.steps, args.steps, jsync)[0])
          tr.append(steps_per_s(torch_step, args.steps, args.steps)[0])
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
  return write_report(args.out, report)
