"""Side-by-side summary of finished runs: parameters, validation loss, KV-cache bytes per token, throughput."""
from __future__ import annotations

import json
import math
import os

from dba_jax import model as model_lib
from dba_jax.loading import read_config


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
          "params": model_lib.count_params(c.model), "val_loss": _last(os.path.join(workdir, "eval.jsonl"), "eval_loss"),
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
