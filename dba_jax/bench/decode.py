"""`dba-bench decode`: decode tokens/s, time to first token and KV bytes/token of an MHA baseline vs DBA sem8, per
cache policy."""
from __future__ import annotations

import argparse

import jax
import numpy as np

from dba_jax import generate, model as model_lib
from dba_jax.bench.timing import add_out, check_out, write_report
from dba_jax.cli import int_at_least
from dba_jax.config import base_config, validate


def decode_models(layers: int, d_model: int, heads: int, vocab: int):
  """{name: model config}: an MHA baseline (head dim d_model / heads) and a DBA model with the sem8 paper
  model's per-head widths (semantic 8, geometric 32, value 40; dba.md §1.3), SwiGLU d_ff = 2.75 d_model."""
  out = {}
  for name in ("baseline", "dba_sem8"):
    c = base_config()
    m = c.model
    m.vocab_size, m.n_layers, m.d_model, m.n_heads, m.d_ff = vocab, layers, d_model, heads, int(2.75 * d_model)
    m.max_seq_len = 1 << 16
    if name == "dba_sem8":
      m.attn_kind, m.dba.sem_dim, m.dba.geo_dim, m.attn_dim = "dba", 8 * heads, 32 * heads, 40 * heads
    out[name] = validate(c).model
  return out


def _policy_for(m, spec: str) -> str:
  """A three-stream policy k_sem/k_geo/v on a two-stream (k, v) model: its RoPE'd keys get k_geo's kind, v v's."""
  parts = spec.split("/")
  return f"{parts[1]}/{parts[2]}" if len(model_lib.stream_names(m)) == 2 and len(parts) == 3 else spec


def main(argv) -> int:
  p = argparse.ArgumentParser(prog="dba-bench decode", description=__doc__)
  count = int_at_least(1)
  p.add_argument("--layers", type=count, default=12)
  p.add_argument("--d-model", type=count, default=256)
  p.add_argument("--heads", type=count, default=4)
  p.add_argument("--vocab", type=count, default=256)
  p.add_argument("--prompt", type=count, nargs="+", default=[512], help="prompt lengths")
  p.add_argument("--gen", type=count, default=64, help="tokens generated per run")
  p.add_argument("--caches", nargs="+", default=["fp16", "q4/q8/q4"])
  p.add_argument("--window", type=int_at_least(0), default=0)
  p.add_argument("--repeats", type=count, default=2, help="timed runs after one warm-up; the median is reported")
  add_out(p)
  args = p.parse_args(argv)
  check_out(p.prog, args)
  models = decode_models(args.layers, args.d_model, args.heads, args.vocab)  # ConfigError: impossible widths
  for m in models.values():  # every cache policy is checked before the first model is timed
    for spec in args.caches:
      try:
        generate.kv_bytes_per_token(m, _policy_for(m, spec))
      except ValueError as e:
        p.error(f"--caches {spec}: {e}")
  rows = []
  for name, m in models.items():
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
  return write_report(args.out, report)
