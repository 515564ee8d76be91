"""`dba-eval latentwire --manifest FILE [--out X.json] [--force]`: every baseline on the same held-out questions.

The task (dba_jax/latentwire/tasks.py: synthetic arithmetic, or local GSM8K / SQuAD jsonl) is the manifest's "task"
(data fields: {"task": "gsm8k", "test_path": ..., "prompt": ...}), else the first bridge's data section, else
synthetic; every bridge must have been trained on the same task and prompt. Decoding is greedy with a KV cache,
batch_size rows at a time (sides.Speaker: equal to one-at-a-time decoding token for token); an answer ends at EOS,
at a newline for one-line tasks, after its "#### n" line for gsm8k. Scoring is the task's: the strict "####" match
(synthetic, gsm8k), normalised exact match and token F1 (squad).

Methods:
  target_text       the target with the text prompt
  source_text       the source with the same prompt (its own tokeniser)
  cascade           the source's answer (its working, cut before "####"; squad: its answer line) appended to the
                    target's text prompt; the target writes the final answer
  joint_text        joint two-model rescoring (the original's "2-LLM joint", latentwire/eval.py): each model's
                    answer is a candidate, scored by the sum over both models of log p(candidate + its end | that
                    model's input); the higher sum wins (the target's on a tie). Also reported: the oracle (either
                    candidate correct) and the agreement rate (both give the same extracted answer).
  bridge_k{K}_{fmt} the bridge: target input [open ids ; K soft tokens ; stub] only (the question reaches the target
                    only through the soft tokens); fmt = the soft tokens as sent: fp32, fp16, q8 (q8_0), q4 (q4_0)
  budget_k{K}       token budget: the target's prompt head cut to its first K tokens (after its open ids), then
                    the stub
  text_soft_k{K}    [open ids ; soft tokens ; full text prompt]
  joint_bridge_k{K} joint rescoring of the source's text answer and the bridged target's (fp32) answer, the target
                    scoring from [open ; soft ; stub], the source from its text prompt
                    (two bridges with the same K: k{K}-<directory name> in these names)
  interlingua_m{M}_{lm}_{fmt}  an interlingua (a "bridges" entry trained with configs/latentwire.py:interlingua): Z
                    [M, d_z] from the question's bytes is what is sent (fmt as above); the receiving LM (source or
                    target) decodes [adapter(Z) ; stub]. No source LM runs (source KV bytes 0); its "target KV bytes"
                    are the receiving LM's. With both receivers, joint_interlingua_m{M}: the original's joint
                    rescoring exactly (each receiver's fp32 answer scored by both receivers from their prefixes).
Per method: exact match with a Wilson 95% interval (and mean F1 for squad; oracle and agreement for joint rows), and
per question the bytes of the source's KV cache (prefill and any decoding), the bytes sent to the target (text as
UTF-8; soft tokens counted from the arrays, q8/q4 with their float16 block scales) and the bytes of the target's KV
cache (soft + prompt + generated tokens; rescoring passes are not counted). KV bytes per token are measured from the
allocated cache arrays (dba_jax.generate), = 2 * layers * kv_heads * head_dim * bytes.

The manifest is JSON: {"source": DIR, "target": DIR, "bridges": [DIR, ...], "questions": 500, "seed": 12345,
"max_new": 24, "source_max_new": 40, "cache": "float32", "wire_formats": ["fp32", "fp16", "q8", "q4"],
"batch_size": 16, "task": {...}}. DIRs: dba-train workdirs or dba-convert outputs (relative to the manifest).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax.numpy as jnp
import numpy as np

from dba_jax import generate, rundir
from dba_jax.cli import refuse_existing, sidecar, write_json
from dba_jax.configlib import Config, ConfigError
from dba_jax.evals.stats import mcnemar_exact, wilson_interval
from dba_jax.latentwire import sides, tasks as tasks_lib
from dba_jax.latentwire.sides import soft_tokens
from dba_jax.latentwire.train import load_bridge, make_mesh

PROG = "dba-eval latentwire"
DEFAULTS = {"bridges": [], "questions": 500, "seed": 12345, "max_new": 24, "source_max_new": 40, "cache": "float32",
            "wire_formats": ["fp32", "fp16", "q8", "q4"], "batch_size": 16, "task": None}
TASK_KEYS = ("task", "split", "prompt", "stub", "test_path")
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
  for key in ("questions", "max_new", "source_max_new", "batch_size"):
    if not isinstance(out[key], int) or out[key] < 1:
      raise sides.SideError(f"--manifest {path}: {key}={out[key]!r} must be a positive integer")
  base = os.path.dirname(os.path.abspath(path))  # relative directories are relative to the manifest
  for key in ("source", "target"):
    out[key] = os.path.join(base, out[key])
  out["bridges"] = [os.path.join(base, b) for b in out["bridges"]]
  if out["task"] is not None:
    t = out["task"]
    if not isinstance(t, dict) or set(t) - set(TASK_KEYS):
      raise sides.SideError(f"--manifest {path}: task must be an object with keys from {list(TASK_KEYS)}")
    if t.get("test_path"):
      t["test_path"] = os.path.join(base, t["test_path"])
  return out


def task_of(man: dict, bridge_configs) -> tasks_lib.Task:
  """The manifest's task, else the first bridge's, else synthetic; the bridges must share its prompt."""
  d = Config()
  tasks_lib.add_fields(d)
  src = man["task"] if man["task"] is not None else bridge_configs[0].data if bridge_configs else {}
  for k in TASK_KEYS:
    if k in src:
      d[k] = src[k]
  try:
    task = tasks_lib.from_config(d)
    for bc in bridge_configs:
      other = tasks_lib.from_config(bc.data)
      if (other.name, other.template, other.stub) != (task.name, task.template, task.stub):
        raise tasks_lib.TaskError(f"a bridge was trained on task {other.name!r} with prompt {other.template!r}, "
                                  f"not {task.name!r} with {task.template!r}")
    return task
  except tasks_lib.TaskError as e:
    raise sides.SideError(str(e)) from None


class Tally:
  """Per-method scores and byte counts, one row per question."""

  def __init__(self, has_f1: bool):
    self.rows: dict[str, list] = {}
    self.has_f1 = has_f1

  def add(self, method, score, source_kv, wire, target_kv, target_tokens, text, **extra):
    ok, f1 = score
    self.rows.setdefault(method, []).append({"ok": bool(ok), "f1": float(f1), "source_kv": source_kv, "wire": wire,
                                             "target_kv": target_kv, "tokens": target_tokens, "text": text, **extra})

  def summary(self) -> dict:
    out = {}
    for method, rows in self.rows.items():
      k, n = sum(r["ok"] for r in rows), len(rows)
      lo, hi = wilson_interval(k, n)
      mean = lambda key: float(np.mean([r[key] for r in rows]))
      out[method] = {"exact_match": k / n, "correct": k, "n": n, "wilson95": [lo, hi],
                     "source_kv_bytes": mean("source_kv"), "wire_bytes": mean("wire"),
                     "target_kv_bytes": mean("target_kv"), "target_input_tokens": mean("tokens"),
                     "examples": [r["text"] for r in rows[:3]],
                     "correct_by_question": "".join("1" if r["ok"] else "0" for r in rows)}
      if self.has_f1:
        out[method]["f1"] = mean("f1")
      if "oracle" in rows[0]:
        out[method].update(oracle_exact_match=mean("oracle"), agreement=mean("agree"))
        if self.has_f1:
          out[method]["oracle_f1"] = mean("oracle_f1")
    return out


def scored_text(task, text: str) -> str:
  """A candidate as rescoring reads it: the answer and its end, so an empty answer is not free."""
  return text.rstrip("\n") + task.end


def joint_rows(tally, name, task, examples, cands, scorers, bytes_of):
  """The joint two-model rescoring rows: cands = (answers A, answers B) (texts per question, A wins a tie);
  scorers = functions (texts) -> log-likelihood per question, one per model, summed; bytes_of(i) -> the byte fields."""
  total = [sum(f(c) for f in scorers) for c in cands]
  for i, ex in enumerate(examples):
    a, b = cands[0][i], cands[1][i]
    pick = a if total[0][i] >= total[1][i] else b
    sa, sb = task.score(a, ex), task.score(b, ex)
    ea = task.extract(a)
    tally.add(name, task.score(pick, ex), *bytes_of(i), f"{'A' if pick is a else 'B'}|{pick}",
              oracle=float(sa[0] or sb[0]), oracle_f1=max(sa[1], sb[1]),
              agree=float(ea is not None and ea != "" and ea == task.extract(b)))


def evaluate(man: dict, progress: bool = True) -> dict:
  t0 = time.perf_counter()
  say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
  first = load_bridge(man["bridges"][0]) if man["bridges"] else None
  mesh = make_mesh(first[2]) if first else None
  src = first[0].src if first else sides.load_lm(man["source"], "source", mesh)
  tgt = first[0].tgt if first else sides.load_lm(man["target"], "target", mesh)
  for role, lm in (("source", src), ("target", tgt)):
    if os.path.abspath(lm.path) != os.path.abspath(man[role]):
      raise sides.SideError(f"bridge {man['bridges'][0]} was trained with {role} {lm.path}, not {man[role]}")
  bridges = ([first] if first else []) + [load_bridge(d, src, tgt) for d in man["bridges"][1:]]
  task = task_of(man, [bc for _, _, bc in bridges])
  try:
    examples = task.examples("test", man["questions"], man["seed"])
  except tasks_lib.TaskError as e:
    raise sides.SideError(str(e)) from None
  N, B, cache = len(examples), man["batch_size"], man["cache"]
  max_new, src_new = man["max_new"], man["source_max_new"]
  prompts = [task.prompt(ex) for ex in examples]
  s_prompts = [src.encode_prompt(p) for p in prompts]
  t_prompts = [tgt.encode_prompt(p) for p in prompts]
  n_open = len(tgt.open_ids)
  stub = tgt.encode(task.stub)
  tally = Tally(task.has_f1)
  say(f"{N} {task.name} questions; decoding {B} at a time")

  # -- the source alone (its answers feed the cascade and the joint rows)
  s_len = max(len(x) for x in s_prompts) + 1
  s_spk = sides.Speaker(src, sides.speaker_len(s_len, max(src_new, max_new) + 8, src), cache, B)
  s_out = s_spk.generate(s_prompts, src_new, None, task)
  sb = s_spk.kv_bytes_per_token
  s_answers = [o["text"] for o in s_out]
  for ex, o in zip(examples, s_out):
    tally.add("source_text", task.score(o["text"], ex), sb * o["cached"], 0, 0, 0, o["text"])
  workings = [task.working(t) for t in s_answers]
  c_prompts = [np.concatenate([tp, tgt.encode(w)]) if w else tp for tp, w in zip(t_prompts, workings)]
  softs = [soft_tokens(br, params, examples) if bc.model.kind == "bridge" else br.z_of(params, examples)
           for br, params, bc in bridges]
  K_max = max([bc.model.get("K", bc.model.get("M", 0)) for _, _, bc in bridges], default=0)
  cand = max([len(tgt.encode(scored_text(task, t))) for t in s_answers] + [max_new + 8])  # rescored answers
  longest = max(max(len(x) for x in c_prompts), max(len(x) for x in t_prompts) + max(K_max + n_open, cand),
                n_open + K_max + len(stub) + cand)
  t_spk = sides.Speaker(tgt, sides.speaker_len(longest, max_new + 1, tgt), cache, B)
  tb = t_spk.kv_bytes_per_token
  say(f"  source answered ({time.perf_counter() - t0:.1f} s)")

  # -- the target alone, the cascade, and their joint rescoring
  t_out = t_spk.generate(t_prompts, max_new, None, task)
  for p, tp, ex, o in zip(prompts, t_prompts, examples, t_out):
    tally.add("target_text", task.score(o["text"], ex), 0, utf8(p), tb * o["cached"], len(tp), o["text"])
  c_out = t_spk.generate(c_prompts, max_new, None, task)
  for i, (ex, o) in enumerate(zip(examples, c_out)):
    final = (workings[i] + " " + o["text"]) if task.name == "squad" else o["text"]
    tally.add("cascade", task.score(final, ex), sb * s_out[i]["cached"], utf8(prompts[i]) + utf8(workings[i]),
              tb * o["cached"], len(c_prompts[i]), workings[i] + "|" + o["text"])
  t_answers = [o["text"] for o in t_out]

  def src_scorer(texts):
    return s_spk.logprob(s_prompts, [src.encode(scored_text(task, t)) for t in texts])

  def tgt_text_scorer(texts):
    return t_spk.logprob(t_prompts, [tgt.encode(scored_text(task, t)) for t in texts])

  joint_rows(tally, "joint_text", task, examples, (t_answers, s_answers), (src_scorer, tgt_text_scorer),
             lambda i: (sb * s_out[i]["cached"], utf8(prompts[i]) + utf8(s_answers[i]), tb * t_out[i]["cached"],
                        len(t_prompts[i])))
  say(f"  text baselines done ({time.perf_counter() - t0:.1f} s)")

  # -- each bridge and interlingua
  tags = method_tags(man["bridges"], [bc for _, _, bc in bridges])
  src_prefill = [sb * len(x) for x in s_prompts]
  for (br, params, bc), soft, tag in zip(bridges, softs, tags):
    if bc.model.kind == "interlingua":
      interlingua_rows(tally, br, params, bc, soft, examples, task, man, tag)
      continue
    K = bc.model.K
    open_ = lambda x: np.asarray(br._open(br.frozen["tgt"], jnp.asarray(x, jnp.float32)))
    for fmt in man["wire_formats"]:
      sent = [on_wire(soft[i], fmt) for i in range(N)]
      prefix = open_(np.stack([r for _, r in sent]))
      outs = t_spk.generate([stub] * N, max_new, prefix, task)
      for i, (ex, o) in enumerate(zip(examples, outs)):
        tally.add(f"bridge_{tag}_{fmt}", task.score(o["text"], ex), src_prefill[i], sent[i][0], tb * o["cached"],
                  prefix.shape[1] + len(stub), o["text"])
      if fmt == "fp32" or (fmt == man["wire_formats"][0] and "fp32" not in man["wire_formats"]):
        bridged, bridged_prefix = outs, prefix
    cuts = [tgt.encode_prompt(task.head(ex))[:n_open + K] for ex in examples]
    outs = t_spk.generate([np.concatenate([c, stub]) for c in cuts], max_new, None, task)
    for i, (ex, o) in enumerate(zip(examples, outs)):
      tally.add(f"budget_{tag}", task.score(o["text"], ex), 0, utf8(tgt.tok.decode(cuts[i][n_open:]) + task.stub),
                tb * o["cached"], len(cuts[i]) + len(stub), o["text"])
    prefix32 = open_(soft)
    outs = t_spk.generate([tp[n_open:] for tp in t_prompts], max_new, prefix32, task)
    for i, (ex, o) in enumerate(zip(examples, outs)):
      tally.add(f"text_soft_{tag}", task.score(o["text"], ex), src_prefill[i], on_wire(soft[i], "fp32")[0]
                + utf8(prompts[i]), tb * o["cached"], prefix32.shape[1] + len(t_prompts[i]) - n_open, o["text"])

    def tgt_bridged_scorer(texts, prefix=bridged_prefix):
      return t_spk.logprob([stub] * N, [tgt.encode(scored_text(task, t)) for t in texts], prefix)

    joint_rows(tally, f"joint_bridge_{tag}", task, examples, ([o["text"] for o in bridged], s_answers),
               (src_scorer, tgt_bridged_scorer),
               lambda i: (sb * s_out[i]["cached"], on_wire(soft[i], "fp32")[0] + utf8(s_answers[i]),
                          tb * bridged[i]["cached"], bridged_prefix.shape[1] + len(stub)))
    say(f"  bridge {tag} done ({time.perf_counter() - t0:.1f} s)")

  def kv_formula(lm):
    m = lm.m
    return 2 * m.n_layers * (m.n_kv_heads or m.n_heads) * (m.d_model // m.n_heads)

  itemsize = generate.stream_bytes_per_token(generate.parse_policy(man["cache"], src.m)["k"], 1)
  return {"manifest": man, "questions": N, "task": task.name, "split": "test",
          "seconds": time.perf_counter() - t0,
          "kv_bytes_per_token": {"source": sb, "target": tb, "cache": man["cache"],
                                 "source_formula": kv_formula(src) * itemsize,
                                 "target_formula": kv_formula(tgt) * itemsize},
          "bridges": [{"dir": d, "K": bc.model.K, "b": bc.model.b, "depth": bc.model.depth,
                       "step": br.loaded["step"], "best": br.loaded["best"]}
                      if bc.model.kind == "bridge" else
                      {"dir": d, "kind": "interlingua", "M": bc.model.M, "d_z": bc.model.d_z,
                       "receivers": list(bc.model.receivers), "step": br.loaded["step"]}
                      for d, (br, _, bc) in zip(man["bridges"], bridges)],
          "methods": (methods := tally.summary()), "paired": paired_tests(methods)}


def paired_tests(methods: dict) -> list[dict]:
  """Exact McNemar tests on the same questions: each bridge (fp32 on the wire) against the target reading the
  question and against its own token budget (the first K tokens of the question as text)."""
  out = []
  for name in methods:
    if not (name.startswith("bridge_") and name.endswith("_fp32")):
      continue
    tag = name[len("bridge_"):-len("_fp32")]
    for other in ("target_text", f"budget_{tag}"):
      if other in methods:
        a, b = (np.frombuffer(methods[m]["correct_by_question"].encode(), np.uint8) == ord("1") for m in (name, other))
        out.append({"a": name, "b": other, **mcnemar_exact(a, b)})
  return out


def method_tags(dirs, configs) -> list[str]:
  """k{K} per bridge, m{M} per interlingua; two entries with the same tag get their directory's name appended, so
  no two systems share a method name."""
  base = [f"k{c.model.K}" if c.model.kind == "bridge" else f"m{c.model.M}" for c in configs]
  return [t if base.count(t) == 1 else f"{t}-{os.path.basename(os.path.normpath(d))}" for t, d in zip(base, dirs)]


def interlingua_rows(tally, il, params, c, z_NMz, examples, task, man, tag):
  """Every question through an interlingua: Z on the wire in each format, decoded by each receiving LM; with two
  receivers, the original's joint rescoring of their fp32 answers."""
  M, N = c.model.M, len(examples)
  answers = {}
  for r in c.model.receivers:
    lm = il.lms[r]
    spk, stub = il.speaker(r), lm.encode(task.stub)
    for fmt in man["wire_formats"]:
      sent = [on_wire(z_NMz[i], fmt) for i in range(N)]
      outs = il.decode(params, np.stack([x for _, x in sent]), r, man["max_new"], task)
      for i, (ex, o) in enumerate(zip(examples, outs)):
        tally.add(f"interlingua_{tag}_{r}_{fmt}", task.score(o["text"], ex), 0, sent[i][0],
                  spk.kv_bytes_per_token * o["cached"], M + len(stub), o["text"])
      if fmt == "fp32" or r not in answers:
        answers[r] = [o["text"] for o in outs]
  if len(answers) < 2:
    return
  z_bytes = [on_wire(z_NMz[i], "fp32")[0] for i in range(N)]

  def scorer(r):
    lm, prefix = il.lms[r], np.asarray(il._prefix(params, jnp.asarray(z_NMz, jnp.float32), r))
    stub = lm.encode(task.stub)
    return lambda texts: il.speaker(r).logprob([stub] * N, [lm.encode(scored_text(task, t)) for t in texts], prefix)

  joint_rows(tally, f"joint_interlingua_{tag}", task, examples, (answers["target"], answers["source"]),
             (scorer("source"), scorer("target")), lambda i: (0, z_bytes[i], 0, M))


def markdown(result: dict) -> str:
  kv = result["kv_bytes_per_token"]
  f1 = any("f1" in r for r in result["methods"].values())
  lines = [f"{result['questions']} held-out {result.get('task', 'synthetic')} questions; KV bytes/token "
           f"({kv['cache']}): source {kv['source']:,}, target {kv['target']:,} (measured from the cache arrays)", "",
           "| method | exact match | Wilson 95% |" + (" F1 |" if f1 else "") + " oracle | agreement | source KV bytes"
           " | wire bytes | target KV bytes | target input tok |",
           "|---|---|---|" + ("---|" if f1 else "") + "---|---|---|---|---|---|"]
  opt = lambda r, k: f"{r[k]:.3f}" if k in r else ""
  for name, r in result["methods"].items():
    lo, hi = r["wilson95"]
    lines.append(f"| {name} | {r['exact_match']:.3f} ({r['correct']}/{r['n']}) | [{lo:.3f}, {hi:.3f}] | "
                 + (f"{opt(r, 'f1')} | " if f1 else "") + f"{opt(r, 'oracle_exact_match')} | {opt(r, 'agreement')} | "
                 f"{r['source_kv_bytes']:,.0f} | {r['wire_bytes']:,.0f} | {r['target_kv_bytes']:,.0f} | "
                 f"{r['target_input_tokens']:.1f} |")
  if result.get("paired"):
    lines += ["", "| paired (exact McNemar) | right only in a | right only in b | p |", "|---|---|---|---|"]
    lines += [f"| {t['a']} vs {t['b']} | {t['only_a']} | {t['only_b']} | {t['p']:.3g} |" for t in result["paired"]]
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
  except (sides.SideError, ConfigError) as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  table = markdown(result)
  print(table, file=sys.stderr)
  print(write_json(args.out, result))
  if args.out:
    rundir.atomic_write(table_path, table + "\n")
  return 0
