"""muP coordinate check: train a few steps at several widths and record mean |activation| per layer type.

  dba-coord-check --config=configs/selective_mup.py [--config.model.mup=False] --heads=1,2,4,8 --steps=10 --out=DIR
                  [--force]

Width grows through the head count at a fixed head dim (d_model = heads x head_dim, d_ff keeps its ratio), as in
the original's sweeps. Layers are unrolled so every site can be tapped. Writes `coords.csv` (heads, d_model, step,
site, mean_abs) and `coords.svg` (one panel per site: mean |activation| against width, one line per step). Under
muP the lines are flat in width; under the standard parametrisation logits and attention outputs grow with it.
Every width's config and the output files are checked before the first width trains; both files are written
atomically, and existing ones are replaced only with --force.
"""
from __future__ import annotations

import csv
import math
import os
import sys

import jax
from absl import flags
from flax import nnx

from dba_jax import data, layers, mesh as mesh_lib, rundir, train
from dba_jax.cli import FLAG_ERRORS, CommandError, command, entry, flag_error, parse_flags, refuse_existing
from dba_jax.config import ConfigError, attn_dim, validate


def width_config(c, n_heads: int):
  """A copy of `c` at `n_heads` heads of the same head dim, unrolled layers, one device."""
  c = c.copy_and_resolve_references()
  m = c.model
  head_dim = attn_dim(m) // m.n_heads
  ratio = m.d_ff / m.d_model
  for key in ("sem_dim", "geo_dim"):  # DBA's path widths scale with the heads
    if m.dba[key]:
      m.dba[key] = m.dba[key] // m.n_heads * n_heads
  m.n_heads, m.n_kv_heads, m.attn_dim = n_heads, 0, 0
  m.d_model = n_heads * head_dim
  m.d_ff = int(round(ratio * m.d_model))
  m.scan_layers = False
  c.mesh.shape = (1, 1, 1)
  return validate(c)


def run(c, heads: list[int], steps: int, seed: int = 0) -> list[dict]:
  """Rows {heads, d_model, step, site, mean_abs}: each site's mean over layers, on each step's training batch
  before that step's update (step 0 = initialisation). Every width's config is validated before the first trains."""
  rows = []
  widths = [width_config(c, h) for h in heads]
  for h, cw in zip(heads, widths):
    trainer = train.Trainer(cw, mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]))
    state = trainer.init_state(seed)
    splits = data.load_splits(cw.data, cw.model.vocab_size)
    it = data.train_iterator(splits, cw.data, cw.train.batch_size)

    @jax.jit
    def coords(params, tokens_BT):
      with layers.record_taps() as taps:
        nnx.merge(trainer.graphdef, params)(tokens_BT)
      sums: dict = {}
      for name, v in taps:
        sums.setdefault(name, []).append(v)
      return {name: sum(vs) / len(vs) for name, vs in sums.items()}

    for step in range(steps + 1):
      batch = next(it)
      for site, v in sorted(jax.device_get(coords(state["params"], batch[:, :-1])).items()):
        rows.append({"heads": h, "d_model": cw.model.d_model, "step": step, "site": site, "mean_abs": float(v)})
      if step < steps:
        local = batch.reshape(cw.train.grad_accum, -1, cw.data.seq_len + 1)
        state, _ = trainer.train_step(state, mesh_lib.global_batch(local, trainer.accum_sharding, 1))
    print(f"coord check: {h} heads (d_model {cw.model.d_model}) done", file=sys.stderr)
  return rows


def growth(rows: list[dict], site: str, step: int) -> float:
  """max / min over widths of a site's mean |activation| at one step: ~1 when flat in width."""
  vals = [r["mean_abs"] for r in rows if r["site"] == site and r["step"] == step]
  return max(vals) / max(min(vals), 1e-30)


def write_csv(rows: list[dict], path: str):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["heads", "d_model", "step", "site", "mean_abs"])
    w.writeheader()
    w.writerows(rows)


def write_svg(rows: list[dict], path: str, panel_w: int = 260, panel_h: int = 190):
  """Small multiples: per site, log2(d_model) on x, log10(mean |x|) on y, one polyline per step."""
  from dba_jax.plots import SVG_COLORS as COLORS  # lazy: dba_jax.plots imports matplotlib
  sites = sorted({r["site"] for r in rows})
  steps = sorted({r["step"] for r in rows})
  cols = 4
  n_rows = -(-len(sites) // cols)
  W, H = cols * panel_w, n_rows * panel_h + 30
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
         f'font-size="11"><rect width="100%" height="100%" fill="white"/>']
  for k, site in enumerate(sites):
    x0, y0 = (k % cols) * panel_w + 45, (k // cols) * panel_h + 20
    pw, ph = panel_w - 60, panel_h - 50
    pts = [(math.log2(r["d_model"]), math.log10(max(r["mean_abs"], 1e-30)), r["step"]) for r in rows
           if r["site"] == site]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xl, xh = min(xs), max(max(xs), min(xs) + 1e-9)
    yl, yh = min(ys), max(max(ys), min(ys) + 1e-9)
    sx = lambda x: x0 + pw * (x - xl) / (xh - xl)
    sy = lambda y: y0 + ph * (yh - y) / (yh - yl)
    out.append(f'<text x="{x0 + pw / 2}" y="{y0 - 6}" text-anchor="middle" font-weight="bold">{site}</text>')
    out.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    out.append(f'<text x="{x0 - 4}" y="{y0 + 8}" text-anchor="end">{10 ** yh:.2g}</text>')
    out.append(f'<text x="{x0 - 4}" y="{y0 + ph}" text-anchor="end">{10 ** yl:.2g}</text>')
    out.append(f'<text x="{x0}" y="{y0 + ph + 14}">{2 ** xl:.0f}</text>')
    out.append(f'<text x="{x0 + pw}" y="{y0 + ph + 14}" text-anchor="end">d_model {2 ** xh:.0f}</text>')
    for j, step in enumerate(steps):
      line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, s in sorted(pts) if s == step)
      out.append(f'<polyline points="{line}" fill="none" stroke="{COLORS[j % len(COLORS)]}" stroke-width="1.5"/>')
  legend = ", ".join(f'<tspan fill="{COLORS[j % len(COLORS)]}">step {s}</tspan>' for j, s in enumerate(steps))
  out.append(f'<text x="10" y="{H - 8}">{legend} (log-log axes)</text></svg>')
  with open(path, "w") as f:
    f.write("\n".join(out))


def _flags(fv):
  flags.DEFINE_list("heads", ["1", "2", "4", "8"], "head counts (widths) to check", flag_values=fv)
  flags.DEFINE_integer("steps", 10, "training steps per width (0: the coordinates at initialisation only)",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_string("out", "coord_check", "output directory for coords.csv and coords.svg", flag_values=fv)
  flags.DEFINE_bool("force", False, "replace coords.csv and coords.svg in an existing --out", flag_values=fv)


def _heads(given: list[str]) -> list[int]:
  try:
    heads = [int(h) for h in given]
  except ValueError:
    raise ConfigError(f"--heads={','.join(given)}: give comma-separated head counts, e.g. 1,2,4,8") from None
  if any(h <= 0 for h in heads) or len(set(heads)) < 2 or len(set(heads)) != len(heads):
    raise ConfigError(f"--heads={','.join(given)} needs at least two different positive head counts, each once")
  return heads


def _check_out(out: str):
  """--out is (or can become) a writable directory: checked before the training, not found out after it."""
  probe = os.path.abspath(out)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise CommandError(f"--out {out}: {probe} is a file; give a directory (coords.csv and coords.svg are written "
                       "into it)")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise CommandError(f"--out {out}: {probe} is not writable")


@command("dba-coord-check", errors=(ConfigError,))
def main(argv) -> int:
  try:
    fv = parse_flags(argv, _flags, doc=__doc__)
  except FLAG_ERRORS as e:
    raise CommandError(flag_error(e)) from None
  if fv.config is None:
    raise ConfigError("--config=configs/NAME.py[:variant] is required")
  heads = _heads(fv.heads)
  out = fv.out
  csv_path, svg_path = os.path.join(out, "coords.csv"), os.path.join(out, "coords.svg")
  _check_out(out)
  refuse_existing("dba-coord-check", csv_path, fv.force, also=(svg_path,))  # before any training
  try:
    rows = run(fv.config, heads, fv.steps)
  except ConfigError:
    raise
  except FLAG_ERRORS as e:
    raise CommandError(flag_error(e)) from None
  os.makedirs(out, exist_ok=True)
  # Both files are written under temporary names first and renamed together at the end: an interrupted run
  # leaves neither, so the same command runs again.
  with rundir.atomic_output(svg_path) as svg_tmp, rundir.atomic_output(csv_path) as csv_tmp:
    write_csv(rows, csv_tmp)
    write_svg(rows, svg_tmp)
  last = max(r["step"] for r in rows)
  for site in sorted({r["site"] for r in rows}):
    print(f"{site:>10}: max/min over widths at step {last} = {growth(rows, site, last):.2f}")
  print(f"wrote {csv_path} and {svg_path}")
  return 0


cli = entry(main)


if __name__ == "__main__":
  cli()
