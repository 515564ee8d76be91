"""Training runs side by side, from their workdirs (no model is loaded): a Markdown table of parameters, validation
loss, KV-cache bytes per token and throughput, and a loss-curve SVG. For measuring checkpoints see
compare_checkpoints.py."""
from __future__ import annotations

import json
import math
import os

from dba_jax import model as model_lib
from dba_jax.loading import read_config
from dba_jax.plots import SVG_COLORS


def _last(path: str, key: str):
  if not os.path.exists(path):
    return float("nan")
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return rows[-1][key] if rows else float("nan")


def summarize(workdir: str, kv_bytes_per_elem: int = 2) -> dict:
  c = read_config(workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    tok_s = sorted(r["tokens_per_s"] for r in map(json.loads, f) if r.get("tokens_per_s") == r.get("tokens_per_s"))
  return {"run": os.path.basename(workdir.rstrip("/")), "attn": c.model.attn_kind,
          "params": model_lib.count_params(c.model),
          "val_loss": _last(os.path.join(workdir, "eval.jsonl"), "eval_loss"),
          "kv_bytes_per_token": model_lib.kv_elems_per_token(c.model) * kv_bytes_per_elem,
          "tokens_per_s": tok_s[len(tok_s) // 2] if tok_s else float("nan")}


def table(rows: list[dict]) -> str:
  """A Markdown table; deltas are relative to the first row."""
  head = "| run | attention | params | val loss | val ppl | KV bytes/token (16-bit) | train tok/s |"
  lines = [head, "|" + "---|" * 7]
  base = rows[0]
  for r in rows:
    kv = f"{r['kv_bytes_per_token']:,}"
    if r is not base:
      kv += f" ({100 * (r['kv_bytes_per_token'] / base['kv_bytes_per_token'] - 1):+.1f}%)"
    lines.append(f"| {r['run']} | {r['attn']} | {r['params']:,} | {r['val_loss']:.4f} | "
                 f"{math.exp(min(r['val_loss'], 50)):.2f} | {kv} | {r['tokens_per_s']:,.0f} |")
  return "\n".join(lines)


def loss_curves_svg(workdirs: list[str], path: str, width: int = 720, height: int = 420):
  """Train (thin) and validation (thick, dotted) loss against step for each run, as a dependency-free SVG."""
  series = []
  for w in workdirs:
    def rows(name, key):
      p = os.path.join(w, name)
      if not os.path.exists(p):
        return []
      with open(p) as f:
        return [(r["step"], r[key]) for r in map(json.loads, f) if math.isfinite(r.get(key, float("nan")))]
    series.append((os.path.basename(w.rstrip("/")), rows("metrics.jsonl", "loss"), rows("eval.jsonl", "eval_loss")))
  points = [p for _, tr, ev in series for p in tr + ev]
  if not points:
    return
  left, right, top, bottom = 60, 150, 20, 40
  x_max = max(s for s, _ in points)
  y_lo, y_hi = min(v for _, v in points), max(v for _, v in points)
  y_hi = y_lo + 1e-9 if y_hi <= y_lo else y_hi
  sx = lambda s: left + (width - left - right) * s / max(x_max, 1)
  sy = lambda v: top + (height - top - bottom) * (y_hi - v) / (y_hi - y_lo)
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
         f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
         f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
         f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
         f'<text x="{(width - right + left) / 2}" y="{height - 8}" text-anchor="middle">step</text>',
         f'<text x="14" y="{(height - bottom + top) / 2}" transform="rotate(-90 14 {(height - bottom + top) / 2})" '
         f'text-anchor="middle">loss (nats/token)</text>']
  for i in range(5):
    v = y_lo + (y_hi - y_lo) * i / 4
    out.append(f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    s = x_max * i / 4
    out.append(f'<text x="{sx(s):.1f}" y="{height - bottom + 16}" text-anchor="middle">{s:.0f}</text>')
  for k, (name, train_pts, eval_pts) in enumerate(series):
    color = SVG_COLORS[k % len(SVG_COLORS)]
    for pts, style in ((train_pts, 'stroke-width="1.2"'), (eval_pts, 'stroke-width="2.5" stroke-dasharray="4 3"')):
      if pts:
        line = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in pts)
        out.append(f'<polyline points="{line}" fill="none" stroke="{color}" {style}/>')
    y = top + 18 * k + 10
    out.append(f'<line x1="{width - right + 10}" y1="{y}" x2="{width - right + 30}" y2="{y}" stroke="{color}" '
               f'stroke-width="2.5"/><text x="{width - right + 36}" y="{y + 4}">{name}</text>')
  out.append(f'<text x="{width - right + 10}" y="{top + 18 * len(series) + 14}" fill="#555">thin: train</text>')
  out.append(f'<text x="{width - right + 10}" y="{top + 18 * len(series) + 30}" fill="#555">dashed: val</text>')
  out.append("</svg>")
  with open(path, "w") as f:
    f.write("\n".join(out))
