"""Multi-checkpoint comparison: `dba-eval compare --manifest configs/compare/NAME.py [--out DIR]`.

A manifest is a Python file whose get_config() returns an ml_collections ConfigDict (see
configs/compare/quickstart.py for every field):
  checkpoints  list of {name, path, baseline}; exactly one baseline; paths relative to the working directory
  eval         split, seq_len (0: the run's data.seq_len), max_windows (0: all), batch_size
  behavior     suite (v1 | v2), seed and per_category (v2), limit (0: all; else N probes taken round-robin over
               categories), max_new (greedy tokens per generated answer), n_resamples (bootstrap)
  latency      context_lengths, decode_tokens, repeats
  cache        KV-cache kind for generation, KV bytes and latency (see dba_jax/generate.py)

Each checkpoint is loaded, measured and dropped before the next one, so one model is resident at a time.
Outputs in DIR (default runs/compare/<manifest name>): results.json, results.csv, results.md, results.tex,
compare.svg (every panel) and panel_<name>.svg (each panel alone). PNG copies of the panels are not written:
rasterising text needs a plotting library the project does not depend on.
"""
from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import json
import math
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dba_jax import behavior, data, generate, model as model_lib
from dba_jax.loading import load_model

PROG = "dba-eval compare"
PALETTE = ("#0DB6AE", "#F68512", "#FFC600", "#DE3D82")


def log(msg: str):
  print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- manifest

DEFAULTS = {
    "eval": {"split": "val", "seq_len": 0, "max_windows": 0, "batch_size": 8},
    "behavior": {"suite": "v1", "seed": 42, "per_category": 30, "limit": 0, "max_new": 32, "n_resamples": 2000},
    "latency": {"context_lengths": (128, 512), "decode_tokens": 32, "repeats": 1},
}


def load_manifest(path: str) -> dict:
  """The manifest as plain dicts with defaults filled in; raises ValueError on a malformed one."""
  spec = importlib.util.spec_from_file_location("dba_compare_manifest", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  out = {"name": cfg.get("name") or os.path.splitext(os.path.basename(path))[0],
         "cache": cfg.get("cache", "float16"), "path": os.path.abspath(path)}
  for section, defaults in DEFAULTS.items():
    given = dict(cfg.get(section) or {})
    unknown = set(given) - set(defaults)
    if unknown:
      raise ValueError(f"{path}: unknown {section} keys {sorted(unknown)}")
    out[section] = {**defaults, **given}
  cks = [dict(c) for c in cfg.get("checkpoints") or ()]
  names = [c.get("name") for c in cks]
  if not cks or not all(names) or len(set(names)) != len(names):
    raise ValueError(f"{path}: checkpoints must be a non-empty list of entries with unique names, got {names}")
  if any(not c.get("path") for c in cks):
    raise ValueError(f"{path}: every checkpoint needs a path")
  if sum(bool(c.get("baseline")) for c in cks) != 1:
    raise ValueError(f"{path}: exactly one checkpoint must have baseline=True")
  out["checkpoints"] = [{"name": c["name"], "path": c["path"], "baseline": bool(c.get("baseline"))} for c in cks]
  if out["behavior"]["suite"] not in ("v1", "v2"):
    raise ValueError(f"{path}: behavior.suite must be v1 or v2")
  return out


def suite(b: dict) -> list:
  probes = behavior.behavior_v1() if b["suite"] == "v1" else behavior.behavior_v2(b["seed"], b["per_category"])
  if not b["limit"] or b["limit"] >= len(probes):
    return probes
  # Round-robin over categories so that a quick run still covers several of them.
  by_cat: dict = {}
  for p in probes:
    by_cat.setdefault(p.category, []).append(p)
  picked, i = [], 0
  while len(picked) < b["limit"]:
    picked += [ps[i] for ps in by_cat.values() if i < len(ps)][:b["limit"] - len(picked)]
    i += 1
  return picked


# ------------------------------------------------------------------------------------------------- measuring

def _bucket(n: int, cap: int) -> int:
  return min(cap, max(16, 1 << (n - 1).bit_length()))


def behaviour_fns(model, c, max_new: int):
  """(generate_fn, logprob_fn) for run_suite. Prompts longer than the model's context keep their end."""
  m = c.model
  tok = data.get_tokenizer(c.data.tokenizer)
  max_len = m.max_seq_len
  max_new = min(max_new, max_len // 2)  # leave room for the prompt
  gen = generate.Generator(model, cache="float32", max_len=max_len)  # scores should not depend on cache error
  # Every token whose text holds a newline ends an answer (behaviour answers are one line).
  stops = [i for i in range(m.vocab_size) if "\n" in tok.decode([i])]

  def generate_fn(prompt: str) -> str:
    ids = np.asarray(tok.encode(prompt), np.int32)[-(max_len - max_new):]
    out = gen.generate(ids[None], max_new, stop_tokens=stops)
    return tok.decode(out["tokens"][0])

  def logprob_fn(prompt: str, completion: str) -> float:
    p, comp = np.asarray(tok.encode(prompt), np.int32), np.asarray(tok.encode(completion), np.int32)
    full = np.concatenate([p, comp])[-(max_len + 1):]
    inputs = full[:-1]
    # Right-pad to a power-of-two bucket: causal attention leaves earlier positions unchanged, and the
    # jitted forward compiles once per bucket instead of once per prompt length.
    padded = np.zeros((1, _bucket(len(inputs), max_len)), np.int32)
    padded[0, :len(inputs)] = inputs
    logits = model(padded)[0, :len(inputs), :m.vocab_size].astype(jnp.float32)
    lp = jax.nn.log_softmax(logits, -1)
    n = min(len(comp), len(inputs))
    return float(jnp.take_along_axis(lp[-n:], jnp.asarray(full[-n:])[:, None], -1).sum())

  return generate_fn, logprob_fn


def memory_and_latency(model, c, cache: str, lat: dict, tokens) -> list[dict]:
  """Per context length: measured cache bytes (allocated for exactly that many tokens), time to first token
  (prefill of a real-text prompt plus picking its first token) and decode tokens/s; the best of `repeats`
  timed runs after one untimed run that compiles."""
  rows = []
  flat = np.concatenate([np.asarray(s).ravel() for s in tokens]) if np.ndim(tokens[0]) else np.asarray(tokens)
  for L in lat["context_lengths"]:
    row = {"context": int(L)}
    try:
      row["cache_bytes"] = generate.cache_bytes(generate.Generator(model, cache=cache, max_len=L).init_cache())
      row["measured_bytes_per_token"] = row["cache_bytes"] / L
      gen = generate.Generator(model, cache=cache, max_len=L + lat["decode_tokens"])
      prompt = np.resize(flat, L).astype(np.int32)[None]  # repeats the text if the split is shorter
      gen.generate(prompt, lat["decode_tokens"])
      runs = [gen.generate(prompt, lat["decode_tokens"]) for _ in range(max(1, lat["repeats"]))]
      row["ttft_s"] = min(r["prefill_s"] for r in runs)
      row["decode_tokens_per_s"] = max(r["decode_tokens_per_s"] for r in runs)
    except ValueError as e:  # e.g. a learned position table shorter than the context
      log(f"  context {L}: skipped ({e})")
      row.update(cache_bytes=None, measured_bytes_per_token=None, ttft_s=None, decode_tokens_per_s=None)
    rows.append(row)
    log(f"  context {L}: cache {row['cache_bytes']} B, ttft {row['ttft_s']}, decode tok/s {row['decode_tokens_per_s']}")
  return rows


def measure(ck: dict, man: dict, probes) -> dict:
  """Everything for one checkpoint; the model is dropped when this returns."""
  from dba_jax.evaluate import perplexity
  t0 = time.perf_counter()
  model, c = load_model(ck["path"])
  m = c.model
  log(f"[{ck['name']}] {ck['path']}: {m.attn_kind}, {model_lib.count_params(m):,} params")
  ev = man["eval"]
  tokens = getattr(data.load_splits(c.data, m.vocab_size), ev["split"])
  seq_len = ev["seq_len"] or c.data.seq_len
  loss = perplexity(model, c, tokens, seq_len, batch_size=ev["batch_size"], max_windows=ev["max_windows"],
                    progress=True)
  log(f"[{ck['name']}] {ev['split']} loss {loss['nll']:.4f}, ppl {loss['ppl']:.3f}")
  gen_fn, lp_fn = behaviour_fns(model, c, man["behavior"]["max_new"])
  every = max(1, len(probes) // 10)
  suite_run = behavior.run_suite(probes, gen_fn, lp_fn, progress=lambda i, n, pid: (i % every == 0 or i == n) and
                                 log(f"[{ck['name']}] behaviour {i}/{n} ({pid})"))
  log(f"[{ck['name']}] memory and latency, cache {man['cache']}")
  ctx = memory_and_latency(model, c, man["cache"], man["latency"], tokens)
  result = {**ck, "attn_kind": m.attn_kind, "params": model_lib.count_params(m), "loss": loss,
            "kv_bytes_per_token_analytic": generate.kv_bytes_per_token(m, man["cache"]),
            "kv_bytes_per_token_measured": next((r["measured_bytes_per_token"] for r in reversed(ctx)
                                                 if r["measured_bytes_per_token"] is not None), None),
            "context": ctx, "records": suite_run["records"], "seconds": time.perf_counter() - t0}
  del model
  gc.collect()
  return result


def by_difficulty(records, base_matches) -> dict:
  """Partial score (%) within each baseline-difficulty bucket (easy: baseline exact, medium: contained, hard: none)."""
  out = {}
  for m, name in behavior.DIFFICULTY_NAME.items():
    s = [r["score"] for r in records if base_matches[r["id"]] == m]
    out[name] = 100.0 * float(np.mean(s)) if s else None
  return out


def run(man: dict, out_dir: str) -> dict:
  probes = suite(man["behavior"])
  log(f"compare {man['name']}: {len(man['checkpoints'])} checkpoints, {len(probes)} probes -> {out_dir}")
  models = [measure(ck, man, probes) for ck in man["checkpoints"]]
  base = next(r for r in models if r["baseline"])
  cmp = behavior.compare_runs({r["name"]: {"records": r["records"]} for r in models}, base["name"],
                              n_resamples=man["behavior"]["n_resamples"])
  base_matches = {r["id"]: r["match"] for r in base["records"]}
  base_cat = cmp["models"][base["name"]]["aggregates"]["per_category"]
  for r in models:
    entry = cmp["models"][r["name"]]
    r["behavior"] = {"aggregates": entry["aggregates"], "vs_baseline": entry.get("vs_baseline"),
                     "by_difficulty_pct": by_difficulty(r["records"], base_matches)}
    # Same subtraction for every model (the baseline included, which therefore gets exact zeros).
    cat = entry["aggregates"]["per_category"]
    r["behavior"]["per_category_delta_pp"] = {
        k: {"weighted": cat[k]["weighted_pct"] - base_cat[k]["weighted_pct"],
            "hard": cat[k]["hard_pct"] - base_cat[k]["hard_pct"]} for k in cat}
  result = {"name": man["name"], "manifest": man, "baseline": base["name"], "n_probes": len(probes),
            "suite_sha256": behavior.suite_sha256(probes), "models": models}
  write_outputs(result, out_dir)
  return result


# ------------------------------------------------------------------------------------------------- tables

def summary_rows(result: dict) -> tuple[list[str], list[list]]:
  ctxs = [r["context"] for r in result["models"][0]["context"]]
  head = ["model", "baseline", "attention", "params", "loss", "ppl", "KV B/token (analytic)", "KV B/token (measured)",
          "hard %", "soft %", "weighted %", "weighted delta pp"]
  head += [f"decode tok/s @{L}" for L in ctxs] + [f"TTFT ms @{L}" for L in ctxs]
  rows = []
  for r in result["models"]:
    agg, vs = r["behavior"]["aggregates"], r["behavior"]["vs_baseline"]
    row = [r["name"], "yes" if r["baseline"] else "", r["attn_kind"], r["params"], r["loss"]["nll"], r["loss"]["ppl"],
           r["kv_bytes_per_token_analytic"], r["kv_bytes_per_token_measured"], agg["hard_pct"], agg["soft_pct"],
           agg["weighted_pct"], vs["weighted"]["delta_pp"] if vs else 0.0]
    row += [x["decode_tokens_per_s"] for x in r["context"]]
    row += [None if x["ttft_s"] is None else 1e3 * x["ttft_s"] for x in r["context"]]
    rows.append(row)
  return head, rows


def _fmt(v) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, int):
    return f"{v:,}"
  if isinstance(v, float):
    return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"
  return str(v)


def _tex(s: str) -> str:
  for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("@", "at ")):
    s = s.replace(a, b)
  return s


def write_outputs(result: dict, out_dir: str):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(result, f, indent=1, default=float)
  head, rows = summary_rows(result)
  with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(head)
    w.writerows([["" if v is None else v for v in row] for row in rows])
  md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  md += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(f"Compare `{result['name']}`: {result['n_probes']} behaviour probes, baseline `{result['baseline']}`, "
            f"cache {result['manifest']['cache']}.\n\n" + "\n".join(md) + "\n")
  tex = [r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\toprule",
         " & ".join(_tex(h) for h in head) + r" \\", r"\midrule"]
  tex += [" & ".join(_tex(_fmt(v)) for v in row) + r" \\" for row in rows]
  tex += [r"\bottomrule", r"\end{tabular}"]
  with open(os.path.join(out_dir, "results.tex"), "w") as f:
    f.write("% needs \\usepackage{booktabs}\n" + "\n".join(tex) + "\n")
  write_figures(result, out_dir)


# ------------------------------------------------------------------------------------------------- figures

W, H = 480, 320
L_PAD, R_PAD, T_PAD, B_PAD = 60, 20, 56, 70  # room for the title + legend above and rotated labels below


def _esc(s) -> str:
  return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _nice_range(values) -> tuple[float, float]:
  vals = [v for v in values if v is not None and math.isfinite(v)] or [0.0]
  lo, hi = min(0.0, min(vals)), max(0.0, max(vals))
  return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _frame(title: str, ylabel: str, legend: list[str], lo: float, hi: float) -> tuple[list, Callable]:
  """Title, legend, y axis with 5 ticks; returns (elements, y -> pixel)."""
  sy = lambda v: T_PAD + (H - T_PAD - B_PAD) * (hi - v) / (hi - lo)
  out = [f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14" font-weight="bold">{_esc(title)}</text>',
         f'<line x1="{L_PAD}" y1="{T_PAD}" x2="{L_PAD}" y2="{H - B_PAD}" stroke="black"/>',
         f'<text x="14" y="{(H - B_PAD + T_PAD) / 2}" transform="rotate(-90 14 {(H - B_PAD + T_PAD) / 2})" '
         f'text-anchor="middle">{_esc(ylabel)}</text>']
  for i in range(5):
    v = lo + (hi - lo) * i / 4
    out.append(f'<line x1="{L_PAD}" y1="{sy(v):.1f}" x2="{W - R_PAD}" y2="{sy(v):.1f}" stroke="#ddd"/>'
               f'<text x="{L_PAD - 5}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
  x = L_PAD
  for k, name in enumerate(legend):
    out.append(f'<rect x="{x}" y="28" width="10" height="10" fill="{PALETTE[k % len(PALETTE)]}"/>'
               f'<text x="{x + 14}" y="37">{_esc(name)}</text>')
    x += 24 + 7 * len(str(name))
  return out, sy


def bar_panel(title: str, ylabel: str, groups: list[str], series: list[str], values, stacked: bool = False) -> str:
  """Grouped (or stacked) bars: values[g][s]; None draws nothing."""
  tops = [sum(v or 0 for v in row) for row in values] if stacked else [v for row in values for v in row]
  lo, hi = _nice_range(tops)
  out, sy = _frame(title, ylabel, series, lo, hi)
  gw = (W - L_PAD - R_PAD) / max(1, len(groups))
  bw = gw * 0.8 / (1 if stacked else max(1, len(series)))
  for g, (name, row) in enumerate(zip(groups, values)):
    x0, base = L_PAD + g * gw + gw * 0.1, 0.0
    for s, v in enumerate(row):
      if v is None:
        continue
      a, b = (base, base + v) if stacked else (0.0, v)
      x = x0 if stacked else x0 + s * bw
      out.append(f'<rect x="{x:.1f}" y="{min(sy(a), sy(b)):.1f}" width="{bw:.1f}" height="{abs(sy(a) - sy(b)):.1f}" '
                 f'fill="{PALETTE[s % len(PALETTE)]}"><title>{_esc(name)} {_esc(series[s])}: {v:.3g}</title></rect>')
      base = base + v if stacked else base
    cx, ly = L_PAD + (g + 0.5) * gw, H - B_PAD + 12
    out.append(f'<text x="{cx:.1f}" y="{ly}" text-anchor="end" transform="rotate(-35 {cx:.1f} {ly})">'
               f'{_esc(name)}</text>')
  out.append(f'<line x1="{L_PAD}" y1="{sy(0):.1f}" x2="{W - R_PAD}" y2="{sy(0):.1f}" stroke="black"/>')
  return "\n".join(out)


def line_panel(title: str, xlabel: str, ylabel: str, series: dict) -> str:
  """One polyline with markers per series; series[name] = [(x, y)], points with y None are dropped."""
  pts = {k: [(x, y) for x, y in v if y is not None] for k, v in series.items()}
  xs = [x for v in pts.values() for x, _ in v] or [0, 1]
  x_lo, x_hi = min(xs), max(xs)
  x_hi = x_hi if x_hi > x_lo else x_lo + 1
  lo, hi = _nice_range([y for v in pts.values() for _, y in v])
  out, sy = _frame(title, ylabel, list(series), lo, hi)
  pad = 20  # keep a single context length off the axis
  sx = lambda x: L_PAD + pad + (W - L_PAD - R_PAD - 2 * pad) * (x - x_lo) / (x_hi - x_lo)
  out.append(f'<line x1="{L_PAD}" y1="{H - B_PAD}" x2="{W - R_PAD}" y2="{H - B_PAD}" stroke="black"/>'
             f'<text x="{(W + L_PAD) / 2}" y="{H - B_PAD + 36}" text-anchor="middle">{_esc(xlabel)}</text>')
  for x in sorted(set(xs)):
    out.append(f'<text x="{sx(x):.1f}" y="{H - B_PAD + 16}" text-anchor="middle">{x:g}</text>')
  for k, (name, p) in enumerate(pts.items()):
    color = PALETTE[k % len(PALETTE)]
    if len(p) > 1:
      out.append(f'<polyline points="{" ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in p)}" fill="none" '
                 f'stroke="{color}" stroke-width="2"/>')
    out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}"><title>{_esc(name)} {x:g}: {y:.4g}'
            f'</title></circle>' for x, y in p]
  return "\n".join(out)


PANEL_TITLES = {
    "scores": "Behaviour scores per model", "difficulty": "Score by baseline difficulty",
    "match_types": "Match types", "category_deltas": "Per-category weighted delta vs baseline",
    "memory": "KV-cache memory vs context", "decode": "Decode throughput vs context",
    "ttft": "Time to first token vs context"}


def panels(result: dict) -> dict:
  models = result["models"]
  names = [m["name"] for m in models]
  aggs = [m["behavior"]["aggregates"] for m in models]
  cats = list(aggs[0]["per_category"])
  diff = ("easy", "medium", "hard")
  others = [m for m in models if not m["baseline"]] or models  # a lone baseline still draws (zero) bars
  ctx = lambda key, scale=1.0: {m["name"]: [(r["context"], None if r[key] is None else scale * r[key])
                                            for r in m["context"]] for m in models}
  return {
      "scores": bar_panel(PANEL_TITLES["scores"], "% of probes", names, ["hard", "soft", "weighted"],
                          [[a["hard_pct"], a["soft_pct"], a["weighted_pct"]] for a in aggs]),
      "difficulty": bar_panel(PANEL_TITLES["difficulty"], "partial score %", names, list(diff),
                              [[m["behavior"]["by_difficulty_pct"][d] for d in diff] for m in models]),
      "match_types": bar_panel(PANEL_TITLES["match_types"], "probes", names, ["exact", "contained", "none"],
                               [[a["exact"], a["contained"], a["none"]] for a in aggs], stacked=True),
      "category_deltas": bar_panel(PANEL_TITLES["category_deltas"], "percentage points", cats,
                                   [m["name"] for m in others],
                                   [[m["behavior"]["per_category_delta_pp"][c]["weighted"] for m in others]
                                    for c in cats]),
      "memory": line_panel(PANEL_TITLES["memory"], "context (tokens)", "KV cache (MiB)",
                           ctx("cache_bytes", 1 / 2 ** 20)),
      "decode": line_panel(PANEL_TITLES["decode"], "context (tokens)", "decode tokens/s", ctx("decode_tokens_per_s")),
      "ttft": line_panel(PANEL_TITLES["ttft"], "context (tokens)", "time to first token (ms)", ctx("ttft_s", 1e3)),
  }


def _svg(body: str, width: int, height: int, x: int | None = None, y: int | None = None) -> str:
  at = "" if x is None else f' x="{x}" y="{y}"'
  return (f'<svg xmlns="http://www.w3.org/2000/svg"{at} width="{width}" height="{height}" font-family="sans-serif" '
          f'font-size="11"><rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>')


def write_figures(result: dict, out_dir: str, cols: int = 2):
  parts = panels(result)
  for name, body in parts.items():
    with open(os.path.join(out_dir, f"panel_{name}.svg"), "w") as f:
      f.write(_svg(body, W, H) + "\n")
  rows = -(-len(parts) // cols)
  title_h = 30
  nested = [_svg(body, W, H, (i % cols) * W, title_h + (i // cols) * H) for i, body in enumerate(parts.values())]
  head = (f'<text x="{cols * W / 2}" y="20" text-anchor="middle" font-size="16" font-weight="bold">'
          f'{_esc(result["name"])}: baseline {_esc(result["baseline"])}, cache {_esc(result["manifest"]["cache"])}'
          f'</text>')
  with open(os.path.join(out_dir, "compare.svg"), "w") as f:
    f.write(_svg(head + "\n" + "\n".join(nested), cols * W, title_h + rows * H) + "\n")


# ------------------------------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog=PROG, description="Compare several checkpoints (see dba_jax/compare_eval.py).")
  p.add_argument("--manifest", required=True, help="Python file with get_config() (configs/compare/*.py)")
  p.add_argument("--out", default="", help="output directory (default runs/compare/<manifest name>)")
  args = p.parse_args(argv)
  try:
    man = load_manifest(args.manifest)
  except (OSError, ValueError, AttributeError) as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  out_dir = args.out or os.path.join("runs", "compare", man["name"])
  try:
    result = run(man, out_dir)
  except (FileNotFoundError, data.DataError) as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  with open(os.path.join(out_dir, "results.md")) as f:
    print(f.read())
  log(f"wrote {out_dir}/results.{{json,csv,md,tex}}, compare.svg and {len(PANEL_TITLES)} panel_*.svg "
      f"({sum(m['seconds'] for m in result['models']):.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
