"""`dba-eval latentwire --manifest FILE [--out X.json] [--force]`: every baseline on the same held-out questions.

Methods (greedy decoding with a KV cache, the answer read strictly after "####"; no last-number fallback):
  target_text       the target with the text prompt "Q: ...\\nA:"
  source_text       the source with the same prompt (its own tokeniser)
  cascade           the source's answer (its working, cut before "####") appended to the target's text prompt; the
                    target writes the final "#### n"
  bridge_k{K}_{fmt} the bridge: target input [K soft tokens ; stub "\\nA:"] only (the question reaches the target
                    only through the soft tokens); fmt = the soft tokens as sent: fp32, fp16, q8 (q8_0), q4 (q4_0)
  budget_k{K}       token budget: the target's prompt cut to its first K tokens, then the stub
  text_soft_k{K}    [soft tokens ; full text prompt]
                    (two bridges with the same K: k{K}-<directory name> in these names)
  interlingua_m{M}_{lm}_{fmt}  an interlingua (a "bridges" entry trained with configs/latentwire.py:interlingua): Z
                    [M, d_z] from the question's bytes is what is sent (fmt as above); the receiving LM (source or
                    target) decodes [adapter(Z) ; stub]. No source LM runs (source KV bytes 0); its "target KV bytes"
                    are the receiving LM's.
Per method: exact match with a Wilson 95% interval, and per question the bytes of the source's KV cache (prefill and
any decoding), the bytes sent to the target (text as UTF-8; soft tokens counted from the arrays, q8/q4 with their
float16 block scales) and the bytes of the target's KV cache (soft + prompt + generated tokens). KV bytes per token
are measured from the allocated cache arrays (dba_jax.generate), = 2 * layers * kv_heads * head_dim * bytes.

The manifest is JSON: {"source": DIR, "target": DIR, "bridges": [DIR, ...], "questions": 500, "seed": 12345,
"max_new": 24, "source_max_new": 40, "cache": "float32", "wire_formats": ["fp32", "fp16", "q8", "q4"]}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax.numpy as jnp
import numpy as np

from dba_jax import arith_qa as synthetic, generate, rundir
from dba_jax.cli import refuse_existing, sidecar, write_json
from dba_jax.evals.stats import wilson_interval
from dba_jax.latentwire import sides
from dba_jax.latentwire.sides import correct, soft_tokens
from dba_jax.latentwire.train import load_bridge

PROG = "dba-eval latentwire"
DEFAULTS = {"bridges": [], "questions": 500, "seed": 12345, "max_new": 24, "source_max_new": 40, "cache": "float32",
            "wire_formats": ["fp32", "fp16", "q8", "q4"]}
WIRE = {"fp32": "float32", "fp16": "float16", "q8": "q8_0", "q4": "q4_0"}


def on_wire(soft_Kd, fmt: str) -> tuple[int, np.ndarray]:
  """(bytes sent, what the target receives) for soft tokens in a wire format; bytes from the arrays themselves."""
  kind = WIRE[fmt]
  x = jnp.asarray(soft_Kd, jnp.float32)
  if kind in generate.FLOAT_KINDS:
    sent = x.astype(generate.FLOAT_KINDS[kind])
    return int(sent.nbytes), np.asarray(sent.astype(jnp.float32))
  store = generate.quantize(x, kind)
  return int(sum(a.nbytes for a in store.values())), np.asarray(generate.dequantize(store, kind, x.shape[-1]))


def utf8(text: str) -> int:
  return len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------- evaluation

def read_manifest(path: str) -> dict:
  try:
    with open(path) as f:
      m = json.load(f)
  except (OSError, ValueError) as e:
    raise sides.SideError(f"--manifest {path}: {e}") from None
  if not isinstance(m, dict):
    raise sides.SideError(f"--manifest {path}: expected a JSON object")
  unknown = sorted(set(m) - set(DEFAULTS) - {"source", "target"})
  if unknown:
    raise sides.SideError(f"--manifest {path}: unknown key(s) {unknown}; known: source, target, {', '.join(DEFAULTS)}")
  for key in ("source", "target"):
    if not m.get(key):
      raise sides.SideError(f"--manifest {path}: {key!r} (a dba-train workdir) is required")
  out = {**DEFAULTS, **m}
  if isinstance(out["bridges"], str):
    out["bridges"] = [out["bridges"]]
  bad = [f for f in out["wire_formats"] if f not in WIRE]
  if bad:
    raise sides.SideError(f"--manifest {path}: wire_formats {bad} not in {sorted(WIRE)}")
  for key in ("questions", "max_new", "source_max_new"):
    if not isinstance(out[key], int) or out[key] < 1:
      raise sides.SideError(f"--manifest {path}: {key}={out[key]!r} must be a positive integer")
  base = os.path.dirname(os.path.abspath(path))  # relative directories are relative to the manifest
  for key in ("source", "target"):
    out[key] = os.path.join(base, out[key])
  out["bridges"] = [os.path.join(base, b) for b in out["bridges"]]
  return out


class Tally:
  """Per-method correctness and byte counts, one row per question."""

  def __init__(self):
    self.rows: dict[str, list] = {}

  def add(self, method, ok, source_kv, wire, target_kv, target_tokens, text):
    self.rows.setdefault(method, []).append((bool(ok), source_kv, wire, target_kv, target_tokens, text))

  def summary(self) -> dict:
    out = {}
    for method, rows in self.rows.items():
      k, n = sum(r[0] for r in rows), len(rows)
      lo, hi = wilson_interval(k, n)
      mean = lambda i: float(np.mean([r[i] for r in rows]))
      out[method] = {"exact_match": k / n, "correct": k, "n": n, "wilson95": [lo, hi],
                     "source_kv_bytes": mean(1), "wire_bytes": mean(2), "target_kv_bytes": mean(3),
                     "target_input_tokens": mean(4), "examples": [r[5] for r in rows[:3]]}
    return out


def evaluate(man: dict, progress: bool = True) -> dict:
  src, tgt = sides.load_lm(man["source"], "source"), sides.load_lm(man["target"], "target")
  bridges = [load_bridge(d, src, tgt) for d in man["bridges"]]
  s_spk = sides.Speaker(src, sides.SPEAKER_LEN, man["cache"])
  t_spk = sides.Speaker(tgt, sides.SPEAKER_LEN, man["cache"])
  pairs = synthetic.qa_pairs(man["questions"], man["seed"], "test")
  questions = [q for q, _ in pairs]
  softs = [soft_tokens(br, params, questions) if bc.model.kind == "bridge" else br.z_of(params, questions)
           for br, params, bc in bridges]
  tags = method_tags(man["bridges"], [bc for _, _, bc in bridges])
  stub = tgt.encode(synthetic.STUB)
  sb, tb = s_spk.kv_bytes_per_token, t_spk.kv_bytes_per_token
  tally, t0 = Tally(), time.perf_counter()
  max_new, src_new = man["max_new"], man["source_max_new"]
  for i, (q, a) in enumerate(pairs):
    prompt = synthetic.PROMPT.format(q=q)
    t_prompt = tgt.encode_prompt(prompt)  # a sequence's start: the tokenizer's BOS where it has one
    r = t_spk.greedy(t_prompt, max_new)
    tally.add("target_text", correct(r["text"], a), 0, utf8(prompt), tb * r["cached"], len(t_prompt), r["text"])
    s = s_spk.greedy(src.encode_prompt(prompt), src_new)
    tally.add("source_text", correct(s["text"], a), sb * s["cached"], 0, 0, 0, s["text"])
    working = s["text"].split("####")[0]
    c_ids = np.concatenate([t_prompt, tgt.encode(working)]) if working else t_prompt
    r = t_spk.greedy(c_ids, max_new)
    tally.add("cascade", correct(r["text"], a), sb * s["cached"], utf8(prompt) + utf8(working), tb * r["cached"],
              len(c_ids), working + "|" + r["text"])
    src_prefill = sb * len(src.encode_prompt(prompt))
    for (br, params, bc), soft, tag in zip(bridges, softs, tags):
      if bc.model.kind == "interlingua":
        interlingua_rows(tally, br, params, bc, soft[i], a, man, {"source": s_spk, "target": t_spk}, tag)
        continue
      K = bc.model.K
      for fmt in man["wire_formats"]:
        nbytes, received = on_wire(soft[i], fmt)
        r = t_spk.greedy(stub, max_new, received[None])
        tally.add(f"bridge_{tag}_{fmt}", correct(r["text"], a), src_prefill, nbytes, tb * r["cached"], K + len(stub),
                  r["text"])
      cut = tgt.encode_prompt("Q: " + q)[:K]
      ids = np.concatenate([cut, stub])
      r = t_spk.greedy(ids, max_new)
      tally.add(f"budget_{tag}", correct(r["text"], a), 0, utf8(tgt.tok.decode(cut) + synthetic.STUB), tb * r["cached"],
                len(ids), r["text"])
      nbytes, _ = on_wire(soft[i], "fp32")
      r = t_spk.greedy(t_prompt, max_new, soft[i][None])
      tally.add(f"text_soft_{tag}", correct(r["text"], a), src_prefill, nbytes + utf8(prompt), tb * r["cached"],
                K + len(t_prompt), r["text"])
    if progress and (i + 1) % 50 == 0:
      print(f"  {i + 1}/{len(pairs)} questions, {(i + 1) / (time.perf_counter() - t0):.1f} q/s", file=sys.stderr,
            flush=True)

  def kv_formula(lm):
    m = lm.m
    return 2 * m.n_layers * (m.n_kv_heads or m.n_heads) * (m.d_model // m.n_heads)

  itemsize = generate.stream_bytes_per_token(generate.parse_policy(man["cache"], src.m)["k"], 1)
  return {"manifest": man, "questions": len(pairs), "split": "test", "seconds": time.perf_counter() - t0,
          "kv_bytes_per_token": {"source": sb, "target": tb, "cache": man["cache"],
                                 "source_formula": kv_formula(src) * itemsize,
                                 "target_formula": kv_formula(tgt) * itemsize},
          "bridges": [{"dir": d, "K": bc.model.K, "b": bc.model.b, "depth": bc.model.depth}
                      if bc.model.kind == "bridge" else
                      {"dir": d, "kind": "interlingua", "M": bc.model.M, "d_z": bc.model.d_z,
                       "receivers": list(bc.model.receivers)} for d, (_, _, bc) in zip(man["bridges"], bridges)],
          "methods": tally.summary()}


def method_tags(dirs, configs) -> list[str]:
  """k{K} per bridge, m{M} per interlingua; two entries with the same tag get their directory's name appended, so
  no two systems share a method name."""
  base = [f"k{c.model.K}" if c.model.kind == "bridge" else f"m{c.model.M}" for c in configs]
  return [t if base.count(t) == 1 else f"{t}-{os.path.basename(os.path.normpath(d))}" for t, d in zip(base, dirs)]


def interlingua_rows(tally, il, params, c, z_Mz, answer, man, speakers, tag):
  """One question through an interlingua: Z on the wire in each format, decoded by each receiving LM."""
  M = c.model.M
  for r in c.model.receivers:
    spk, stub = speakers[r], il.lms[r].encode(synthetic.STUB)
    for fmt in man["wire_formats"]:
      nbytes, received_Mz = on_wire(z_Mz, fmt)
      prefix = np.asarray(il._prefix(params, jnp.asarray(received_Mz)[None], r))
      out = spk.greedy(stub, man["max_new"], prefix)
      tally.add(f"interlingua_{tag}_{r}_{fmt}", correct(out["text"], answer), 0, nbytes,
                spk.kv_bytes_per_token * out["cached"], M + len(stub), out["text"])


def markdown(result: dict) -> str:
  kv = result["kv_bytes_per_token"]
  lines = [f"{result['questions']} held-out questions; KV bytes/token ({kv['cache']}): source {kv['source']:,}, "
           f"target {kv['target']:,} (measured from the cache arrays)", "",
           "| method | exact match | Wilson 95% | source KV bytes | wire bytes | target KV bytes | target input tok |",
           "|---|---|---|---|---|---|---|"]
  for name, r in result["methods"].items():
    lo, hi = r["wilson95"]
    lines.append(f"| {name} | {r['exact_match']:.3f} ({r['correct']}/{r['n']}) | [{lo:.3f}, {hi:.3f}] | "
                 f"{r['source_kv_bytes']:,.0f} | {r['wire_bytes']:,.0f} | {r['target_kv_bytes']:,.0f} | "
                 f"{r['target_input_tokens']:.1f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--manifest", required=True, help="JSON naming the source, target and bridge directories")
  p.add_argument("--out", default="", help="also write the JSON here (and the table to OUT with .md)")
  p.add_argument("--force", action="store_true", help="replace an existing --out file and its .md table")
  args = p.parse_args(argv)
  table_path = sidecar(args.out, ".md") if args.out else ""
  if args.out and table_path == args.out:
    print(f"{PROG}: error: --out {args.out}: the table goes to OUT with .md; give the JSON another extension "
          "(e.g. .json)", file=sys.stderr)
    return 2
  refuse_existing(PROG, args.out, args.force, also=(table_path,))  # the table beside it is protected too
  try:
    result = evaluate(read_manifest(args.manifest))
  except sides.SideError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  table = markdown(result)
  print(table, file=sys.stderr)
  print(write_json(args.out, result))
  if args.out:
    rundir.atomic_write(table_path, table + "\n")
  return 0
