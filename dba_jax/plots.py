"""The `dba-eval compare` figure, drawn with matplotlib from a compare result (dba_jax/evals/compare_checkpoints.py).

Every panel is drawn by one function into a Figure or SubFigure, so the aggregate (compare.png, compare.svg)
and the per-panel PNGs come from the same code. Checkpoint i is drawn in PALETTE[i % 4] in every panel; where a
bar also splits into parts (match types, attention mass), the parts are shades and hatches of that colour.
Figures are built on the Agg canvas directly, never through pyplot: no display, no global figure state.
Both colour palettes live here: PALETTE (matplotlib figures) and SVG_COLORS (the dependency-free SVG charts).
Every file is written atomically (`save`): a failure or a Ctrl-C never leaves a truncated image.
"""
from __future__ import annotations

import json
import os

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap, PowerNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from dba_jax import rundir

PALETTE = ("#0DB6AE", "#F68512", "#FFC600", "#DE3D82")
# Line colours of the dependency-free SVG charts (evals/runs_table.py loss curves, dba-coord-check).
SVG_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
PANEL_TITLES = {
    "scores": "Behaviour scores per model", "difficulty": "Score by baseline difficulty",
    "match_types": "Match types", "category_deltas": "Per-category weighted delta vs baseline",
    "memory": "KV-cache memory vs context", "decode": "Decode throughput vs context",
    "ttft": "Time to first token vs context",
    "attention_mass": "Last-query attention mass (last layer)",
    "attention_heatmaps": "Last-layer attention (mean over heads)"}
PANEL_SIZE = (6.0, 4.0)  # inches, one small panel
# Parts of a split bar: (alpha, hatch) over the checkpoint's colour, in stacking order.
SHADES = ((1.0, ""), (0.55, ""), (0.55, "///"), (0.18, ""))
MASS_PARTS = ("answer span", "first token", "null token", "other")
DPI = 120


def _tok(piece: str) -> str:
  """A token as a tick label: escapes visible, spaces as middle dots."""
  return repr(piece)[1:-1].replace(" ", "\u00b7")


def colour(i: int) -> str:
  return PALETTE[i % len(PALETTE)]


def _label(m: dict) -> str:
  return f"{m['name']} (baseline)" if m["baseline"] else m["name"]


def _num(v) -> float:
  return np.nan if v is None else float(v)


def _grouped_bars(ax, groups: list[str], models: list[dict], values, index: list[int]):
  """values[g][j] for model j (drawn in colour index[j]); NaN draws no bar."""
  n = max(1, len(models))
  w = 0.8 / n
  x = np.arange(len(groups))
  for j, m in enumerate(models):
    ax.bar(x - 0.4 + (j + 0.5) * w, [_num(v[j]) for v in values], w, color=colour(index[j]), label=_label(m))
  ax.set_xticks(x, groups)
  ax.axhline(0, color="black", lw=0.8)
  ax.legend(fontsize=8)


def _stacked_bars(ax, groups: list[str], models: list[dict], parts: list[str], values_GMP):
  """One bar per (group, model), its parts stacked as SHADES of the model's colour; legend of the parts in grey."""
  n = max(1, len(models))
  w = 0.8 / n
  for g in range(len(groups)):
    for j in range(len(models)):
      bottom = 0.0
      for p, (alpha, hatch) in enumerate(SHADES[:len(parts)]):
        v = _num(values_GMP[g][j][p])
        ax.bar(g - 0.4 + (j + 0.5) * w, v, w, bottom=bottom, color=colour(j), alpha=alpha, hatch=hatch,
               edgecolor=colour(j), lw=0.6)
        bottom += 0.0 if np.isnan(v) else v
  ax.set_xticks(np.arange(len(groups)), groups)
  handles = [Patch(facecolor="grey", alpha=a, hatch=h, edgecolor="grey", label=p) for p, (a, h) in zip(parts, SHADES)]
  handles += [Patch(color=colour(j), label=_label(m)) for j, m in enumerate(models)]
  ax.legend(handles=handles, fontsize=7, ncol=2)


def draw_scores(fig, r):
  ax = fig.subplots()
  aggs = [m["behavior"]["aggregates"] for m in r["models"]]
  keys = ("hard_pct", "soft_pct", "weighted_pct")
  _grouped_bars(ax, ["hard", "soft", "weighted"], r["models"], [[a[k] for a in aggs] for k in keys],
                list(range(len(aggs))))
  ax.set(title=PANEL_TITLES["scores"], ylabel="% of probes")


def draw_difficulty(fig, r):
  ax = fig.subplots()
  diff = ("easy", "medium", "hard")
  _grouped_bars(ax, [f"{d}\n(baseline {k})" for d, k in zip(diff, ("exact", "contained", "none"))], r["models"],
                [[m["behavior"]["by_difficulty_pct"][d] for m in r["models"]] for d in diff],
                list(range(len(r["models"]))))
  ax.set(title=PANEL_TITLES["difficulty"], ylabel="partial score %")


def draw_match_types(fig, r):
  ax = fig.subplots()
  aggs = [m["behavior"]["aggregates"] for m in r["models"]]
  _stacked_bars(ax, ["all probes"], r["models"], ["exact", "contained", "none"],
                [[[a["exact"], a["contained"], a["none"]] for a in aggs]])
  ax.set(title=PANEL_TITLES["match_types"], ylabel="probes")


def draw_category_deltas(fig, r):
  ax = fig.subplots()
  models = r["models"]
  # Non-baseline models keep their global index (and so their colour); a lone baseline still draws zero bars.
  idx = [i for i, m in enumerate(models) if not m["baseline"]] or [0]
  cats = list(models[0]["behavior"]["per_category_delta_pp"])
  n = len(idx)
  h = 0.8 / n
  y = np.arange(len(cats))
  for j, i in enumerate(idx):
    d = models[i]["behavior"]["per_category_delta_pp"]
    ax.barh(y - 0.4 + (j + 0.5) * h, [d[c]["weighted"] for c in cats], h, color=colour(i), label=_label(models[i]))
  ax.set_yticks(y, cats, fontsize=7)
  ax.invert_yaxis()
  ax.axvline(0, color="black", lw=0.8)
  ax.legend(fontsize=8)
  ax.set(title=PANEL_TITLES["category_deltas"], xlabel="weighted score, percentage points")


def _context_lines(fig, r, name: str, key: str, scale: float, ylabel: str):
  ax = fig.subplots()
  for i, m in enumerate(r["models"]):
    pts = [(c["context"], scale * c[key]) for c in m["context"] if c[key] is not None]
    if pts:
      ax.plot(*zip(*pts), "o-", color=colour(i), label=_label(m))
  ax.set_xscale("log", base=2)
  ctxs = sorted({c["context"] for m in r["models"] for c in m["context"]})
  ax.set_xticks(ctxs, [str(c) for c in ctxs])
  ax.set(title=PANEL_TITLES[name], xlabel="context (tokens)", ylabel=ylabel)
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def draw_memory(fig, r):
  _context_lines(fig, r, "memory", "cache_bytes", 1 / 2 ** 20, f"KV cache (MiB, {r['manifest']['cache']})")


def draw_decode(fig, r):
  _context_lines(fig, r, "decode", "decode_tokens_per_s", 1.0, "decode tokens/s")


def draw_ttft(fig, r):
  _context_lines(fig, r, "ttft", "ttft_s", 1e3, "time to first token (ms)")


def _empty(fig, name: str):
  ax = fig.subplots()
  ax.set_title(PANEL_TITLES[name])
  ax.text(0.5, 0.5, "no attention probes (manifest attention.probes = 0)", ha="center", transform=ax.transAxes)
  ax.set_axis_off()


def draw_attention_mass(fig, r):
  probes = [a["id"] for a in r["models"][0]["attention"]]
  if not probes:
    return _empty(fig, "attention_mass")
  ax = fig.subplots()
  values = [[[m_att["mass"][p] for p in MASS_PARTS] for m_att in (m["attention"][g] for m in r["models"])]
            for g in range(len(probes))]
  _stacked_bars(ax, probes, r["models"], list(MASS_PARTS), values)
  ax.set_ylim(0, 1.45)  # room for the legend above the bars, which sum to 1
  ax.set_yticks(np.linspace(0, 1, 6))
  ax.set(title=PANEL_TITLES["attention_mass"], ylabel="share of the last prompt token's attention")


def draw_attention_heatmaps(fig, r):
  """Rows: checkpoints; columns: probes. Colour: sqrt scale from 0 to 1 (shared, so models compare), white to the
  checkpoint's colour."""
  models = r["models"]
  n_probes = len(models[0]["attention"])
  if not n_probes:
    return _empty(fig, "attention_heatmaps")
  axes = fig.subplots(len(models), n_probes, squeeze=False)
  norm = PowerNorm(0.5, vmin=0.0, vmax=1.0)
  for i, m in enumerate(models):
    cmap = LinearSegmentedColormap.from_list(f"c{i}", ["#FFFFFF", colour(i)])
    for j, a in enumerate(m["attention"]):
      ax = axes[i, j]
      probs_TS = np.asarray(a["probs_TS"])
      im = ax.imshow(probs_TS, cmap=cmap, norm=norm, interpolation="nearest", aspect="auto")
      T, S = probs_TS.shape
      step = max(1, -(-T // 24))  # at most ~24 labelled tokens per axis, counted back from the last
      ax.set_yticks(range(T - 1, -1, -step), [_tok(a["query_tokens"][t]) for t in range(T - 1, -1, -step)],
                    fontsize=6)
      ax.set_xticks(range(S - 1, -1, -step), [_tok(a["key_tokens"][s]) for s in range(S - 1, -1, -step)],
                    fontsize=6, rotation=90)
      if a["span"]:  # the answer span on the last query row: where the attention-mass panel's first part comes from
        lo = min(a["span"]) + a["n_prefix"]
        ax.add_patch(Rectangle((lo - 0.5, T - 1.5), max(a["span"]) - min(a["span"]) + 1, 1, fill=False, lw=1.5,
                               ec="black"))
      ax.set_title(f"{m['name']}: {a['id']}", fontsize=8)
      if j == 0:
        ax.set_ylabel("query", fontsize=7)
      if i == len(models) - 1:
        ax.set_xlabel("key", fontsize=7)
    fig.colorbar(im, ax=list(axes[i]), shrink=0.8, label="p (sqrt scale)")
  fig.suptitle(f"{PANEL_TITLES['attention_heatmaps']}, layer {models[0]['attention'][0]['layer']}; "
               "black box: answer span seen from the last prompt token", fontsize=11)


DRAW = {"scores": draw_scores, "difficulty": draw_difficulty, "match_types": draw_match_types,
        "category_deltas": draw_category_deltas, "memory": draw_memory, "decode": draw_decode, "ttft": draw_ttft,
        "attention_mass": draw_attention_mass, "attention_heatmaps": draw_attention_heatmaps}
assert set(DRAW) == set(PANEL_TITLES)


def _heatmap_size(r) -> tuple[float, float]:
  n_probes = max(1, len(r["models"][0]["attention"]))
  return 3.2 * n_probes + 1.5, 3.0 * len(r["models"]) + 0.6


def _new_figure(size) -> Figure:
  fig = Figure(figsize=size, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def save(fig, path: str, **kwargs) -> str:
  """fig.savefig under a temporary name (same extension: the format) renamed to `path` when complete."""
  with rundir.atomic_output(path) as tmp:
    fig.savefig(tmp, **kwargs)
  return path


def _describe(fig) -> dict:
  """What a panel holds, read back from matplotlib: its axes' titles and how many images (heat-maps) it has."""
  axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
  return {"axes_titles": [ax.get_title() for ax in axes], "images": sum(len(ax.images) for ax in axes)}


def write_figures(result: dict, out_dir: str, cols: int = 2) -> dict:
  """panel_<name>.png per panel and compare.png / compare.svg with all of them; returns
  {"files": [...], "panels": {name: {"title", "file", "axes_titles", "images"}}} read from the aggregate figure."""
  small = [k for k in DRAW if k != "attention_heatmaps"]
  files, panels = [], {}
  for name, draw in DRAW.items():
    fig = _new_figure(_heatmap_size(result) if name == "attention_heatmaps" else PANEL_SIZE)
    draw(fig, result)
    save(fig, os.path.join(out_dir, f"panel_{name}.png"), dpi=DPI)
    files.append(f"panel_{name}.png")
  rows = -(-len(small) // cols)
  hm_w, hm_h = _heatmap_size(result)
  W, H = cols * PANEL_SIZE[0], rows * PANEL_SIZE[1]
  fig = _new_figure((max(W, hm_w), H + hm_h + 0.4))
  top, bottom = fig.subfigures(2, 1, height_ratios=[H, hm_h])
  subs = dict(zip(small, top.subfigures(rows, cols).ravel()))
  subs["attention_heatmaps"] = bottom
  for name in DRAW:
    DRAW[name](subs[name], result)
    panels[name] = {"title": PANEL_TITLES[name], "file": f"panel_{name}.png", **_describe(subs[name])}
  fig.suptitle(f"{result['name']}: baseline {result['baseline']}, cache {result['manifest']['cache']}",
               fontsize=14, fontweight="bold")
  save(fig, os.path.join(out_dir, "compare.png"), dpi=DPI)
  # Text stays text in the SVG (searchable, small); no date, so reruns give the same file.
  with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "dba-eval-compare"}):
    save(fig, os.path.join(out_dir, "compare.svg"), metadata={"Date": None})
  files += ["compare.png", "compare.svg"]
  return {"files": files, "panels": panels}


def addition_curves(model_dirs: list[str], out_path: str, title: str) -> str:
  """Training loss and validation exact match against step for each model of a dba-addition-train run (from
  its metrics.jsonl), grokking jumps visible at a glance; one colour per model (cycling the palette, a new line
  style on each cycle so that 8-seed sweeps stay apart)."""
  fig = _new_figure((11.0, 4.0))
  ax_loss, ax_val = fig.subplots(1, 2)
  for i, d in enumerate(model_dirs):
    with open(os.path.join(d, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val/exact_match"]) for r in rows if "val/exact_match" in r]
    label = os.path.basename(d.rstrip(os.sep))
    style = dict(color=colour(i), ls=("-", "--", ":", "-.")[(i // len(PALETTE)) % 4], label=label)
    if train:
      ax_loss.plot(*zip(*train), lw=1, **style)
    if val:
      ax_val.plot(*zip(*val), lw=1.2, **style)
  ax_loss.set(title="training loss (12 target positions)", xlabel="step", yscale="log")
  ax_val.set(title="validation exact match (greedy)", xlabel="step", ylim=(-0.02, 1.02))
  for ax in (ax_loss, ax_val):
    ax.grid(alpha=0.3)
  if len(model_dirs) <= 16:
    ax_val.legend(fontsize=7, ncol=2)
  fig.suptitle(title)
  return save(fig, out_path, dpi=DPI)


def memory_accuracy(results, out_path: str) -> str:
  """Needle accuracy against prompt length, with and without memory (95% Wilson bands), one panel per result
  (dba_jax.evals.hope_memory.needle_task); chance and the training length marked."""
  results = results if isinstance(results, list) else [results]
  cols = min(4, len(results))
  rows = -(-len(results) // cols)
  fig = _new_figure((4.5 * cols, 3.4 * rows))
  for ax, r in zip(np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel()), results):
    x = [row["tokens"] for row in r["by_length"]]
    for i, name in enumerate(("baseline", "memory")):
      lo, hi = zip(*[row[f"{name}_ci95"] for row in r["by_length"]])
      ax.plot(x, [row[f"{name}_acc"] for row in r["by_length"]], "o-", color=colour(i), label=name)
      ax.fill_between(x, lo, hi, color=colour(i), alpha=0.15)
    ax.axhline(r["chance"], color="grey", ls=":", lw=1, label="chance")
    ax.axvline(r["train_len"], color="black", ls="--", lw=0.8, label="training length")
    ax.set(title=r.get("title", r["task"]), xlabel="prompt tokens", ylabel="accuracy", ylim=(-0.02, 1.02), xscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return save(fig, out_path, dpi=DPI)
