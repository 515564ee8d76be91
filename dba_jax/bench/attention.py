"""`dba-bench attention`: forward+backward time and scratch memory of standard, selective and DBA attention per
impl, and of the F scans (cumsum, protect-and-attack) in fp32 and fp64."""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from dba_jax import ops
from dba_jax.bench.timing import add_out, check_out, timed, write_report
from dba_jax.cli import int_at_least
from dba_jax.ops import selective
from dba_kernels import cumsum as kcumsum, flash_attention as kflash, protect_attack as kpa


def main(argv) -> int:
  p = argparse.ArgumentParser(prog="dba-bench attention", description=__doc__)
  count = int_at_least(1)
  p.add_argument("--seq", type=count, nargs="+", default=[256, 512, 1024, 2048, 4096])
  p.add_argument("--heads", type=count, default=4)
  p.add_argument("--head-dim", type=count, default=64)
  p.add_argument("--dba-qk", type=count, default=40, help="DBA q/k head dim (semantic + geometric, e.g. 8 + 32)")
  p.add_argument("--dba-v", type=count, default=40, help="DBA value head dim")
  p.add_argument("--repeats", type=count, default=3)
  add_out(p)
  args = p.parse_args(argv)
  check_out(p.prog, args)
  rows = []

  def record(name, T, fn, *xs):
    sec, temp = timed(fn, *xs, repeats=args.repeats)
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
  return write_report(args.out, report)
