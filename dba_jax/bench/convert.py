"""`dba-bench convert`: time and peak RAM of dba-convert on a synthetic caramba checkpoint of a preset's shapes,
both directions, each in a fresh child process."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import jax
import numpy as np

from dba_jax import model as model_lib, torch_io
from dba_jax.bench.timing import add_out, check_out, child_run, write_report
from dba_jax.cli import load_config
from dba_jax.config import validate
from dba_jax.formats import caramba


def main(argv) -> int:
  p = argparse.ArgumentParser(prog="dba-bench convert", description=__doc__)
  p.add_argument("--config", default="configs/dba_paper_12l.py:decoupled")
  p.add_argument("--dir", default="", help="scratch directory, new or empty (default: a temporary one, removed "
                 "after)")
  add_out(p)
  args, overrides = p.parse_known_args(argv)
  check_out(p.prog, args)
  if args.dir and os.path.exists(args.dir) and not os.path.isdir(args.dir):
    p.error(f"--dir {args.dir} is a file; give a new or empty directory")
  if args.dir and os.path.isdir(args.dir) and os.listdir(args.dir):
    p.error(f"--dir {args.dir} is not empty; give a new or empty directory (it receives synthetic.pt, converted/ "
            "and back.pt)")
  c = load_config("dba-bench", args.config, overrides, validate)
  work = args.dir or tempfile.mkdtemp(prefix="dba-bench-convert-")
  os.makedirs(work, exist_ok=True)
  try:
    src, wd, back = (os.path.join(work, n) for n in ("synthetic.pt", "converted", "back.pt"))
    rng = np.random.default_rng(0)
    shapes = jax.tree.map(lambda a: a.shape, model_lib.nnx.to_pure_dict(model_lib.abstract(c.model)[1]))
    params = jax.tree.map(lambda s: rng.standard_normal(s, dtype=np.float32), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    torch_io.save(src, {"system_state_dict": caramba.from_params(params, c), "step": 0})
    del params
    size = os.path.getsize(src)
    overrides_cli = [f"--config={args.config}", *overrides]
    t_in, rss_in = child_run([sys.executable, "-m", "dba_jax.convert", src, "--out", wd, *overrides_cli])
    t_out, rss_out = child_run([sys.executable, "-m", "dba_jax.convert", "--to-torch", wd, "--out", back])
    _, base_rss = child_run([sys.executable, "-c", "import jax, jax.numpy as jnp; jnp.zeros(1).block_until_ready()"])
  finally:
    if not args.dir:  # our own scratch directory, whatever happened
      shutil.rmtree(work, ignore_errors=True)
  report = {"config": args.config, "overrides": overrides, "params": n_params, "file_bytes": size,
            "import_s": t_in, "import_peak_rss": rss_in, "export_s": t_out, "export_peak_rss": rss_out,
            "runtime_rss": base_rss}
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  print(f"{args.config}: {n_params:,} params, file {gib(size)}; JAX runtime alone {gib(base_rss)}")
  for name, t, rss in (("import", t_in, rss_in), ("export", t_out, rss_out)):
    print(f"  {name}  {t:6.1f} s, peak RSS {gib(rss)} ({(rss - base_rss) / size:.2f}x the file beyond the runtime)")
  return write_report(args.out, report)
