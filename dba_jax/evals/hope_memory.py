"""Memory evals for every memory block (`dba-eval hope passkey|niah|continual|read --checkpoint DIR`: `command`;
others.md B.7).

Every number comes three times, on the same prompts: "memory" runs the model as trained; "writes_off" the same
weights with model.hope.writes off (nothing is stored, the forgetting α still acts); "baseline" with model.hope.memory
off (no fast weight moves: CMS levels, self-modifying and Titans memories stay at their meta weights). Needle tasks
report each arm's accuracy with its Wilson interval and exact binomial p against chance, and exact McNemar tests of
the memory against both baselines (paired: the same prompts); prompts are drawn from (seed, the checkpoint's step,
length), so each checkpoint is scored on fresh ones. Scoring:
  two-pass blocks (hope_attention / selfmod / hybrid)  the online loop of dba_jax.hope.step in chunks of the training
                                                       chunk (hope.online_chunk, else data.seq_len): each token is
                                                       scored in its chunk's read pass, before that chunk's update;
                                                       attention sees only its own chunk
  titans_* blocks                                      one forward; the memory updates inside it every titans chunk
Prompts are left-padded with spaces to whole chunks, and can be longer than the training length: beyond it only the
memory carries information across chunks.

  passkey    "The pass key is KEY-dddd. Remember it." first, filler sentences, "What is the pass key? The pass key is
             KEY-": right when log p(true key) > log p(a distractor key); chance 0.5
  niah       the same 2-way choice, "Remember that the secret key is KEY-dddd." at a random depth among filler
  Both keep the needle outside the answer's attention span (`attention_span`: the MAC segment, the MAG / MAL
  window, the online chunk): only the memory can carry it to the question.
  continual  segments from three domains A, B, C read as [A B C A]: the CE of each on first reading, and of A read
             again after B and C (memorise, interfere, rescore); [A A] gives the rescore without interference; means
             with 95% t intervals over samples, and the paired memory − baseline difference with its interval
  read       a user's text: CE with and without memory; the memory can start from a saved state and be saved after
             (dba_jax.hope.memstate), so a later call continues where this one stopped
"""
from __future__ import annotations

import hashlib
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dba_jax import cli, config as config_lib, data, losses, model as model_lib, plots
from dba_jax.evals import hope_recall
from dba_jax.evals.common import EvalError, load_checkpoint, read_checkpoint_config
from dba_jax.evals import stats
from dba_jax.hope import blocks, memstate, step as hope_step, synthetic

FILLER = "This is filler sentence number {}. "
TASKS = {  # needle, question (the answer's digits follow the question)
    "passkey": ("The pass key is KEY-{}. Remember it. ", "What is the pass key? The pass key is KEY-"),
    "niah": ("Remember that the secret key is KEY-{}. ", "What is the secret key? The secret key is KEY-"),
}


class Scorer:
  """score(ids) -> (NLL of every next token [len(ids) - 1], memory updates fired) for one memory setting;
  read(ids, state) also starts from and returns the memory state (blocks that carry one, dba_jax.hope.memstate)."""

  def __init__(self, model, config, memory: bool, writes: bool = True):
    m = config.model.copy_and_resolve_references()
    m.hope.memory, m.hope.writes = memory and m.hope.memory, writes and m.hope.writes
    graphdef = model_lib.abstract(m)[0]
    self.m, self.params, vocab, L = m, model.params, m.vocab_size, m.n_layers
    self.zero_state = (lambda: blocks.init_fast_state(m, nnx.merge(graphdef, self.params), 1)) \
        if memstate.carries_state(m) else (lambda: None)
    if m.block in hope_step.TWO_PASS_BLOCKS:
      h = m.hope
      h.online_chunk = self.chunk = h.online_chunk or config.data.seq_len
      # The teach schedule at the end of its warmup: the full teach scale (before any decay). CMS outputs clipped
      # as in training: the original's evals ran its eval mode (no clip), a different function from the one trained
      # (a hope_attention model trained 200 steps reads CE 3.55 unclipped vs 0.99 clipped on its own data).
      def fn(p, t, fast, start):
        del start  # HOPE blocks have no positions
        r = hope_step.memory_forward(nnx.merge(graphdef, p), t, h.teach_warmup, h, vocab, training=True, fast0=fast)
        return r.token_nll[0], r.fired.sum(), r.fast
    else:
      self.chunk = int(m.hope.get("titans_chunk", 1)) if m.block.startswith("titans_") else 1
      if m.block == "titans_mac":  # a call continues the previous one's memory at a whole segment
        self.chunk = math.lcm(self.chunk, int(m.hope.titans_window))
      per_call = L if m.block.startswith("titans_") and m.hope.memory else 0

      def fn(p, t, fast, start):
        T = t.shape[1] - 1
        out = nnx.merge(graphdef, p).forward(t[:, :-1], positions_T=start + jnp.arange(T), cache_state=fast)
        return losses.nll(out.logits, t[:, 1:], vocab)[0], jnp.asarray(per_call * -(-T // self.chunk)), \
            out.cache_state

    self._fn = jax.jit(fn)

  def pad(self, ids, pad_id: int) -> np.ndarray:
    """Left-pad so that the inputs (all but the last token) fill whole chunks."""
    n = (-(len(ids) - 1)) % self.chunk
    return np.concatenate([np.full(n, pad_id, np.int32), np.asarray(ids, np.int32)])

  def read(self, ids, state=None, start: int = 0):
    """(NLL [len(ids) - 1], updates fired, memory state after): the memory starts from `state` (default: the meta
    weights), the inputs at position `start` (the inputs read before). The inputs must fill whole chunks (see pad)
    for a later call to continue exactly."""
    state = self.zero_state() if state is None else state
    nll, fired, state = self._fn(self.params, jnp.asarray(ids, jnp.int32)[None], state, start)
    return np.asarray(nll, np.float64), int(fired), state

  def __call__(self, ids) -> tuple[np.ndarray, int]:
    return self.read(ids)[:2]


def scorers(model, config) -> dict:
  return {"memory": Scorer(model, config, True), "writes_off": Scorer(model, config, True, writes=False),
          "baseline": Scorer(model, config, False)}


def attention_span(m, chunk: int) -> int:
  """How many tokens back (itself included) attention or a conv can reach from a position: the MAC segment, the
  MAG / MAL window, the conv taps of a memory-only block, else the scorer's chunk (two-pass blocks: the online
  chunk)."""
  h = m.hope
  if m.block in ("titans_mac", "titans_mag", "titans_mal"):
    return int(h.titans_window)
  if m.block.startswith("titans_"):
    return max(1, int(h.titans_conv))
  return chunk


def needle_prompt(rng, task: str, n_tokens: int, tokenizer, depth: float | None = None, span: int = 0):
  """(true text, distractor text, key): a prompt of about n_tokens tokens (at least the needle and the question).
  passkey puts the needle first; niah at `depth` (a fraction; random when None) among shuffled filler. At least
  `span` tokens follow the needle up to the question's end, so that no answer token's attention reaches it (the
  prompt grows past n_tokens when it must)."""
  needle, question = TASKS[task]
  key, other = (int(x) for x in rng.choice(9000, size=2, replace=False) + 1000)
  n = lambda text: len(tokenizer.encode(text))
  fixed, after_q = n(needle.format(key) + question), n(question)
  filler, size, sizes = [], fixed, []
  while size < n_tokens or sum(sizes) + after_q < span + 2:  # + 2: a BPE may merge across pieces
    filler.append(FILLER.format(len(filler)))
    sizes.append(n(filler[-1]))
    size += sizes[-1]
  if task == "niah":
    order = rng.permutation(len(filler))
    filler, sizes = [filler[i] for i in order], [sizes[i] for i in order]
  # The latest needle slot that leaves >= span tokens after it.
  last = max(i for i in range(len(filler) + 1) if sum(sizes[i:]) + after_q >= span + 2)
  at = 0 if task == "passkey" else int(round((rng.random() if depth is None else depth) * last))
  text = "".join(filler[:at]) + needle.format(key) + "".join(filler[at:]) + question
  return text + str(key), text + str(other), key


def needle_task(model, config, task: str = "passkey", lengths=(256, 512), samples: int = 512, seed: int = 0,
                runs: dict | None = None) -> dict:
  """Accuracy of the 2-way key choice per prompt length for every arm (memory, writes off, memory off) on the same
  prompts, drawn from (seed, checkpoint step, length); paired McNemar tests of the memory against each other arm."""
  tok = data.get_tokenizer(config.data.tokenizer)
  runs = runs or scorers(model, config)
  space = int(tok.encode(" ")[0])
  some = next(iter(runs.values()))
  span = attention_span(some.m, some.chunk)
  rows = []
  for n_tokens in lengths:
    rng = np.random.default_rng([seed, int(getattr(model, "step", 0) or 0), n_tokens])
    right = {name: np.zeros(samples, bool) for name in runs}
    fired, real = [], 0
    for i in range(samples):
      true_text, other_text, key = needle_prompt(rng, task, n_tokens, tok, span=span)
      k = len(tok.encode(str(key)))
      ids = [tok.encode(t) for t in (true_text, other_text)]
      real = max(real, len(ids[0]))
      for name, score in runs.items():
        lp = []
        for x in ids:
          nll, n_fired = score(score.pad(x, space))
          lp.append(-nll[-k:].sum())
          if name == "memory" and x is ids[0]:
            fired.append(n_fired)
        right[name][i] = lp[0] > lp[1]
    row = {"length": n_tokens, "tokens": real, "samples": samples}
    for name, r in right.items():
      row[f"{name}_acc"] = float(r.mean())
      row[f"{name}_ci95"] = stats.wilson_interval(int(r.sum()), samples)
      row[f"{name}_p_chance"] = stats.binomial_greater(int(r.sum()), samples, 0.5)
    for name in right:
      if name != "memory":
        row[f"memory_vs_{name}"] = stats.mcnemar_exact(right["memory"], right[name])
    row["delta"] = row["memory_acc"] - row["baseline_acc"]
    row["updates_fired_per_sample"] = float(np.mean(fired))
    rows.append(row)
  return {"task": task, "chance": 0.5, "chunk": some.chunk, "attention_span": span, "step": getattr(model, "step", 0),
          "seed": seed, "train_len": config.data.seq_len, "by_length": rows}


def continual_segments(config, n_tokens: int, samples: int, seed: int) -> dict:
  """Three domains, `samples` segments of n_tokens tokens each: {"code": stdlib val windows, "prose": filler and
  keys, "arith": arithmetic lines}."""
  tok = data.get_tokenizer(config.data.tokenizer)
  rng = np.random.default_rng(seed)
  code = data.stdlib_corpus(config.data.val_fraction)[1] if config.data.tokenizer == "byte" else \
      tok.encode(synthetic.passkey_text(200 * n_tokens, seed + 1))
  out = {"code": [], "prose": [], "arith": []}
  for _ in range(samples):
    at = int(rng.integers(0, len(code) - n_tokens))
    out["code"].append(np.asarray(code[at:at + n_tokens], np.int32))
    prose = tok.encode(synthetic.passkey_text(4 * n_tokens, int(rng.integers(1 << 30))))
    out["prose"].append(np.asarray(prose[:n_tokens], np.int32))
    lines = "".join(f"{a} + {b} = {a + b}\n" for a, b in rng.integers(0, 1000, size=(n_tokens, 2)))
    out["arith"].append(np.asarray(tok.encode(lines)[:n_tokens], np.int32))
  return out


def continual(model, config, n_tokens: int = 0, samples: int = 64, seed: int = 0, runs: dict | None = None) -> dict:
  """Mean CE per segment on first reading, and of segment A re-read right after itself ([A A]) and after B and C
  ([A B C A]), with memory and without. n_tokens defaults to the training length."""
  runs = runs or scorers(model, config)
  chunk = next(iter(runs.values())).chunk
  S = n_tokens or config.data.seq_len
  S = max(chunk, S // chunk * chunk)  # whole chunks, so every segment starts its own chunk
  segs = continual_segments(config, S + 1, samples, seed)
  names = list(segs)
  out = {"task": "continual", "segment_tokens": S, "samples": samples, "chunk": chunk, "order": names + [names[0]]}
  per_sample = {}
  for run_name, score in runs.items():
    first = {n: [] for n in names}
    again, again_now, fired = [], [], []
    for i in range(samples):
      a, b, cc = (segs[n][i] for n in names)
      # [A B C A]: positions are segment-aligned; the first token of each segment is predicted from the previous one.
      seq = np.concatenate([a[:S], b[:S], cc[:S], a[:S + 1]])
      nll, n_fired = score(seq)
      for j, n in enumerate(names):
        first[n].append(nll[j * S:(j + 1) * S].mean())
      again.append(nll[3 * S:4 * S].mean())
      again_now.append(score(np.concatenate([a[:S], a[:S + 1]]))[0][S:2 * S].mean())
      fired.append(n_fired)
    per_sample[run_name] = {"reread_after_itself": again_now, "reread_after_others": again}
    out[run_name] = {"first_read": {n: float(np.mean(v)) for n, v in first.items()},
                     "reread_after_itself": float(np.mean(again_now)),
                     "reread_after_others": float(np.mean(again)), "updates_fired_per_sample": float(np.mean(fired)),
                     "ci95": {"first_read": {n: stats.mean_interval(v)["ci"] for n, v in first.items()},
                              "reread_after_itself": stats.mean_interval(again_now)["ci"],
                              "reread_after_others": stats.mean_interval(again)["ci"]}}
  # Paired over samples (the same segments): memory − baseline CE, its 95% t interval and p.
  out["delta"], out["delta_ci95"], out["delta_p"] = {}, {}, {}
  for k in ("reread_after_itself", "reread_after_others"):
    d = stats.mean_interval(np.asarray(per_sample["memory"][k]) - np.asarray(per_sample["baseline"][k]))
    out["delta"][k], out["delta_ci95"][k], out["delta_p"][k] = d["mean"], d["ci"], d["p"]
  return out


def passkey(model, config, samples: int = 32, n_filler: int = 12, seed: int = 0) -> dict:
  """The previous single-length passkey report (kept for its CLI flags): n_filler sentences after the needle."""
  tok = data.get_tokenizer(config.data.tokenizer)
  needle, question = TASKS["passkey"]
  n_tokens = len(tok.encode(needle.format(1000) + question)) + n_filler * len(tok.encode(FILLER.format(10)))
  return needle_task(model, config, "passkey", (n_tokens,), samples, seed)


def read(model, config, text: str, state_dir: str = "", save_dir: str = "", source: str = "",
         force: bool = False) -> dict:
  """CE of `text` read with memory (starting from the memory state in state_dir, else the meta weights) and without;
  save_dir: write the memory state after reading (dba_jax.hope.memstate; `source` names the checkpoint in it), an
  existing one replaced only with `force`."""
  if (state_dir or save_dir) and not memstate.carries_state(config.model):
    raise memstate.MemStateError(f"model.block={config.model.block!r} carries no memory state between calls "
                                 "(hope_attention / hope_selfmod / hope_hybrid / titans_mac do)")
  if save_dir and os.path.exists(save_dir) and not force:  # before any compute: nothing a user has is overwritten
    raise memstate.MemStateError(f"{save_dir}: exists; the memory state goes to a new directory (or pass --force "
                                 "to replace it)")
  tok = data.get_tokenizer(config.data.tokenizer)
  ids = tok.encode(text)
  if len(ids) < 2:
    raise ValueError(f"the text has {len(ids)} token(s); reading needs at least 2")
  runs = scorers(model, config)
  mem = runs["memory"]
  ids = mem.pad(ids, int(tok.encode(" ")[0]))
  state, info = None, {}
  if state_dir:
    state, info = memstate.load(state_dir, mem.zero_state(), config.model)
  start = int(info.get("positions_read", 0))
  nll, fired, after = mem.read(ids, state, start)
  base = runs["baseline"].read(ids, None, start)[0]
  out = {"task": "read", "tokens": len(ids), "chunk": mem.chunk, "memory_ce": float(nll.mean()),
         "baseline_ce": float(base.mean()), "delta": float(nll.mean() - base.mean()), "updates_fired": fired,
         "state_in": state_dir or None, "tokens_before": int(info.get("tokens_read", 0))}
  if save_dir:
    memstate.save(save_dir, after, config.model, {
        "checkpoint": source, "tokens_read": out["tokens_before"] + len(ids), "positions_read": start + len(ids) - 1,
        "continued_from": state_dir or None,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest()}, force=force)
    out["state_out"] = save_dir
  return out


def check_args(args):
  """What `dba-eval hope` can refuse before loading anything: flags of another task, a --save-state that is a file."""
  if (args.task == "recall") == bool(args.checkpoint):
    raise EvalError("hope recall trains its own model from --config (no --checkpoint)" if args.checkpoint else
                    f"hope {args.task} needs --checkpoint DIR (a trained memory model)")
  if args.task != "recall" and (args.set or args.steps or args.carry):
    raise EvalError("--set, --steps and --carry belong to `dba-eval hope recall`")
  if args.task == "read":
    if not args.text:
      raise EvalError("hope read needs --text FILE (the text the memory reads)")
    if args.save_state and os.path.exists(args.save_state) and not os.path.isdir(args.save_state):
      raise EvalError(f"--save-state {args.save_state} is a file; a memory state is a directory")
  elif args.state or args.save_state or args.text:
    raise EvalError("--text, --state and --save-state belong to `dba-eval hope read`")
  if args.plot and args.task not in TASKS:
    raise EvalError(f"--plot belongs to `dba-eval hope passkey` and `niah` (accuracy against length), not {args.task}")
  if args.task == "continual" and len(args.lengths) > 1:
    raise EvalError(f"continual reads segments of one length; give one --lengths value, not {len(args.lengths)}")


def command(args) -> dict:
  """`dba-eval hope TASK`: load a memory model, run TASK (passkey, niah, continual or read) and print a summary."""
  check_args(args)
  if args.task == "recall":
    args.samples = args.samples or 512
    c = cli.load_config("dba-eval", args.config, [f"--config.{s}" for s in args.set], config_lib.validate)
    if not c.model.block.startswith("titans_"):
      raise EvalError(f"hope recall trains titans_* blocks (model.block={c.model.block!r}: the two-pass HOPE "
                      "blocks learn their memory from a teach signal, not the answer-only loss)")
    return hope_recall.command(args, c)
  c = read_checkpoint_config(args.checkpoint)  # what can be refused is, before the model loads
  if c.model.block not in hope_step.TWO_PASS_BLOCKS and not c.model.block.startswith("titans_"):
    raise EvalError(f"{args.checkpoint}: model.block={c.model.block!r} has no memory; the memory evals need a "
                    f"hope_attention / hope_selfmod / hope_hybrid / titans_* model")
  lengths = list(args.lengths)  # token counts >= 1 (checked by dba-eval's argument types)
  samples = args.samples or (64 if args.task == "continual" else 512)
  if args.task == "read":
    try:
      with open(args.text, encoding="utf-8") as f:
        text = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise EvalError(f"--text {args.text}: cannot read it ({e})") from None
    if args.state:  # a state that does not fit or is cut short: refused before the model loads
      try:
        memstate.read(args.state, c.model)
      except memstate.MemStateError as e:
        raise EvalError(str(e)) from None
  model, c = load_checkpoint(args.checkpoint)
  if args.task == "read":
    try:
      r = read(model, c, text, args.state, args.save_state, args.checkpoint, force=args.force)
    except (memstate.MemStateError, ValueError) as e:
      raise EvalError(str(e)) from None
    print(f"read {r['tokens']} tokens ({r['tokens_before']} read before): CE with memory {r['memory_ce']:.4f}, "
          f"without {r['baseline_ce']:.4f} (delta {r['delta']:+.4f}), {r['updates_fired']} memory updates"
          + (f"; memory state saved to {args.save_state}" if args.save_state else ""), file=sys.stderr)
    return {"checkpoint": args.checkpoint, **r}
  if args.task == "continual":
    r = continual(model, c, n_tokens=lengths[0] if lengths else 0, samples=samples, seed=args.seed)
    for name in ("baseline", "writes_off", "memory"):
      x = r[name]
      print(f"continual {name:8s}: first read " + ", ".join(f"{k} {v:.3f}" for k, v in x["first_read"].items()) +
            f"; A again at once {x['reread_after_itself']:.3f}, after B and C {x['reread_after_others']:.3f} "
            f"({x['updates_fired_per_sample']:.0f} updates)", file=sys.stderr)
  else:
    r = needle_task(model, c, args.task, lengths or (c.data.seq_len,), samples, args.seed)
    for row in r["by_length"]:
      print(f"{args.task} {row['tokens']:5d} tokens (train {r['train_len']}, chunks of {r['chunk']}): memory off "
            f"{row['baseline_acc']:.3f}, writes off {row['writes_off_acc']:.3f}, with memory {row['memory_acc']:.3f} "
            f"(vs chance p {row['memory_p_chance']:.2g}, vs memory off McNemar p {row['memory_vs_baseline']['p']:.2g})"
            f", {row['updates_fired_per_sample']:.0f} memory updates per sample", file=sys.stderr)
    if args.plot:  # plots.save: drawn under a temporary name and renamed, a kill never leaves half a PNG
      plots.memory_accuracy(r, args.plot)
  return {"checkpoint": args.checkpoint, **r}
