"""Checkpoints measured side by side: `dba-eval compare --manifest configs/compare/NAME.py [--out DIR]`.

Each checkpoint is loaded and measured: loss, a behaviour suite (evals/behavior), KV-cache memory and latency, and
last-layer attention probes (evals/attention_probes.py). For a table of training runs from their logs alone see
runs_table.py.

A manifest is a Python file whose get_config() returns an ml_collections ConfigDict (see
configs/compare/quickstart.py for every field):
  checkpoints  list of {name, path, baseline}; exactly one baseline; paths relative to the working directory
  eval         split, seq_len (0: the run's data.seq_len), max_windows (0: all), batch_size
  behavior     suite (v1 | v2), seed and per_category (v2), limit (0: all; else N probes taken round-robin over
               categories), max_new (greedy tokens per generated answer), n_resamples (bootstrap)
  latency      context_lengths, decode_tokens, repeats
  attention    probes (how many behaviour probes get attention heat-maps), max_tokens (the last N prompt tokens)
  cache        KV-cache kind for generation, KV bytes and latency (see dba_jax/generate.py)

Each checkpoint is loaded, measured and dropped before the next one, so one model is resident at a time.
Outputs in DIR (default runs/compare/<manifest name>): results.json, results.csv, results.md, results.tex,
compare.png and compare.svg (every panel, dba_jax/plots.py) and panel_<name>.png (each panel alone).
"""
from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import json
import os
import shutil
import sys
import time

import jax.numpy as jnp
import numpy as np

from dba_jax import data, generate, losses, model as model_lib, plots, signals
from dba_jax.cli import refuse_existing
from dba_jax.evals import behavior, perplexity
from dba_jax.evals.attention_probes import attention_probes, attention_record
from dba_jax.evals.common import EvalError
from dba_jax.loading import load_model

PROG = "dba-eval compare"


def log(msg: str):
  print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- manifest

DEFAULTS = {
    "eval": {"split": "val", "seq_len": 0, "max_windows": 0, "batch_size": 8},
    "behavior": {"suite": "v1", "seed": 42, "per_category": 30, "limit": 0, "max_new": 32, "n_resamples": 2000},
    "latency": {"context_lengths": (128, 512), "decode_tokens": 32, "repeats": 1},
    "attention": {"probes": 3, "max_tokens": 48},
}


# The smallest value of each numeric manifest field (0 where the module docstring gives 0 a meaning).
AT_LEAST = {"eval": {"seq_len": 0, "max_windows": 0, "batch_size": 1},
            "behavior": {"per_category": 1, "limit": 0, "max_new": 1, "n_resamples": 1, "seed": 0},
            "latency": {"context_lengths": 1, "decode_tokens": 1, "repeats": 1},
            "attention": {"probes": 0, "max_tokens": 1}}


def run_manifest(path: str) -> dict:
  """get_config() of the manifest file as a plain dict; a missing, unparsable or failing file is a ValueError in one
  line (file:line for a syntax error)."""
  if not os.path.isfile(path):
    raise ValueError(f"--manifest {path}: no such file")
  spec = importlib.util.spec_from_file_location("dba_compare_manifest", path)
  if spec is None:
    raise ValueError(f"--manifest {path}: not a Python file (configs/compare/*.py are examples)")
  mod = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  except SyntaxError as e:
    raise ValueError(f"{path}:{e.lineno}: {e.msg} (manifest syntax)") from None
  except Exception as e:  # noqa: BLE001 - the user's file: whatever it raises is reported in one line
    raise ValueError(f"--manifest {path}: get_config() failed: {type(e).__name__}: {e}") from None


def check_numbers(path: str, out: dict):
  """Every numeric field an integer at least its AT_LEAST value (the lists element by element)."""
  for section, mins in AT_LEAST.items():
    for key, lo in mins.items():
      value = out[section][key]
      many = isinstance(value, (list, tuple))
      if any(isinstance(v, bool) or not isinstance(v, int) or v < lo for v in (value if many else [value])):
        raise ValueError(f"{path}: {section}.{key}={value!r} must be {'integers' if many else 'an integer'} >= {lo}")


def load_manifest(path: str) -> dict:
  """The manifest as plain dicts with defaults filled in; raises ValueError on a malformed one."""
  cfg = run_manifest(path)
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
  if out["eval"]["split"] not in ("val", "train"):
    raise ValueError(f"{path}: eval.split must be val or train")
  check_numbers(path, out)
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
    logits = model(padded)[0, :len(inputs)]
    n = min(len(comp), len(inputs))
    return -float(losses.nll(logits[-n:], jnp.asarray(full[-n:]), m.vocab_size).sum())

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
  t0 = time.perf_counter()
  try:
    model, c = load_model(ck["path"])
  except (FileNotFoundError, ValueError) as e:  # a missing, damaged or foreign checkpoint: named, one line
    raise EvalError(f"checkpoint {ck['name']}: {e}") from None
  m = c.model
  log(f"[{ck['name']}] {ck['path']}: {m.attn_kind}, {model_lib.count_params(m):,} params, step {model.step}")
  ev = man["eval"]
  seq_len = ev["seq_len"] or c.data.seq_len
  try:
    tokens = getattr(data.load_splits(c.data, m.vocab_size), ev["split"])
    loss = perplexity.perplexity(model, c, tokens, seq_len, batch_size=ev["batch_size"],
                                 max_windows=ev["max_windows"], progress=True)
  except ValueError as e:  # data.DataError, or a split with no window of seq_len + 1 tokens
    raise EvalError(f"checkpoint {ck['name']}: {e}") from None
  log(f"[{ck['name']}] {ev['split']} loss {loss['nll']:.4f}, ppl {loss['ppl']:.3f}")
  gen_fn, lp_fn = behaviour_fns(model, c, man["behavior"]["max_new"])
  every = max(1, len(probes) // 10)
  suite_run = behavior.run_suite(probes, gen_fn, lp_fn, progress=lambda i, n, pid: (i % every == 0 or i == n) and
                                 log(f"[{ck['name']}] behaviour {i}/{n} ({pid})"))
  att = man["attention"]
  decoder, tok = model.module, data.get_tokenizer(c.data.tokenizer)
  attention, att_probes = [], attention_probes(probes, att["probes"])
  for i, p in enumerate(att_probes, 1):
    attention.append(attention_record(decoder, tok, p, att["max_tokens"]))
    log(f"[{ck['name']}] attention probe {i}/{len(att_probes)} ({p.id}): last-query mass "
        + ", ".join(f"{k} {v:.2f}" for k, v in attention[-1]["mass"].items()))
  del decoder
  log(f"[{ck['name']}] memory and latency, cache {man['cache']}")
  ctx = memory_and_latency(model, c, man["cache"], man["latency"], tokens)
  result = {**ck, "step": model.step, "attn_kind": m.attn_kind, "params": model_lib.count_params(m), "loss": loss,
            "kv_bytes_per_token_analytic": generate.kv_bytes_per_token(m, man["cache"]),
            "kv_bytes_per_token_measured": next((r["measured_bytes_per_token"] for r in reversed(ctx)
                                                 if r["measured_bytes_per_token"] is not None), None),
            "context": ctx, "records": suite_run["records"], "attention": attention,
            "seconds": time.perf_counter() - t0}
  del model
  gc.collect()
  return result


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
                     "by_difficulty_pct": behavior.by_difficulty(r["records"], base_matches)}
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


def output_files() -> list[str]:
  """Every file `write_outputs` writes into the output directory."""
  return ["results.json", "results.csv", "results.md", "results.tex", "compare.png", "compare.svg",
          *(f"panel_{name}.png" for name in plots.PANEL_TITLES)]


def write_outputs(result: dict, out_dir: str):
  """Every output file, drawn and written into a temporary directory beside `out_dir` and then renamed into it one
  by one: a kill or a failure leaves each file whole (the old one or the new one), never half-written, and files
  of out_dir that compare does not write are left alone."""
  os.makedirs(out_dir, exist_ok=True)
  stage = f"{os.path.abspath(out_dir)}.tmp{os.getpid()}"  # rundir.TMP_NAMES; removed by an abort (signals.pending)
  signals.pending.add(stage)
  try:
    shutil.rmtree(stage, ignore_errors=True)
    os.mkdir(stage)
    _write_all(result, stage)
    for name in sorted(os.listdir(stage)):
      os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
  finally:
    shutil.rmtree(stage, ignore_errors=True)
    signals.pending.discard(stage)


def _write_all(result: dict, out_dir: str):
  # The figure first, so that results.json records which panels (and axes) it drew.
  log(f"drawing the figure ({len(plots.PANEL_TITLES)} panels)")
  result["figure"] = plots.write_figures(result, out_dir)
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


# ------------------------------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog=PROG,
                              description="Compare several checkpoints (see dba_jax/evals/compare_checkpoints.py).")
  p.add_argument("--manifest", required=True, help="Python file with get_config() (configs/compare/*.py)")
  p.add_argument("--out", default="", help="output directory (default runs/compare/<manifest name>)")
  p.add_argument("--force", action="store_true", help="replace the results an existing output directory holds")
  args = p.parse_args(argv)
  try:
    man = load_manifest(args.manifest)
  except (OSError, ValueError, AttributeError) as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  out_dir = args.out or os.path.join("runs", "compare", man["name"])
  files = [os.path.join(out_dir, name) for name in output_files()]
  # Every file it writes, checked before any work: none is replaced without --force.
  refuse_existing(PROG, files[0], args.force, "comparison", also=tuple(files[1:]))
  try:
    result = run(man, out_dir)
  except EvalError as e:  # a checkpoint or its data
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  with open(os.path.join(out_dir, "results.md")) as f:
    print(f.read())
  log(f"wrote {out_dir}/results.{{json,csv,md,tex}}, compare.{{png,svg}} and {len(plots.PANEL_TITLES)} "
      f"panel_*.png ({sum(m['seconds'] for m in result['models']):.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
