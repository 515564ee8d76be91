"""The `dba-eval` command.

  dba-eval ppl --checkpoint DIR [--split val] [--seq-len N] [--overlap [--stride S]] [--vocab-limit V]
               [--max-windows N] [--batch-size B] [--out X.json]          (dba_jax.evaluate)
  dba-eval generate --checkpoint DIR --prompt TEXT [--max-new N] [--temperature T] [--seed S]
                    [--cache q4/q8/q4] [--window W] [--stop ID ...] [--max-len N]   (dba_jax.generate)
  dba-eval prune --checkpoint DIR [--ratios 1,0.5,0.25] [--budgets 64,32] [--target-loss X | --target-from DIR]
                 [--within 0.01] [--per-layer] [--rule original|per_row] [--max-windows N] [--out X.json]
  dba-eval hope passkey|niah|continual --checkpoint DIR [--lengths 256,512] [--samples N] [--plot X.png]
  dba-eval hope read --checkpoint DIR --text FILE [--state DIR] [--save-state DIR]   (dba_jax.hope.evals)
  dba-eval addition ...        (the arguments of dba-addition-eval, forwarded unchanged)
  dba-eval compare --manifest configs/compare/NAME.py [--out DIR]   (dba_jax/compare_eval.py)
  dba-eval latentwire --manifest FILE.json [--out X.json]   (dba_jax/latentwire/harness.py)
"""
from __future__ import annotations

import argparse
import sys

from dba_jax.cli import refuse_existing, write_json

PROG = "dba-eval"


# ------------------------------------------------------------------------------------------------------ CLI

class _Fail(Exception):
  pass


def _load(path):
  from dba_jax.loading import load_model
  try:
    return load_model(path)
  except (FileNotFoundError, ValueError) as e:
    raise _Fail(str(e)) from None


def ppl_main(args) -> dict:
  from dba_jax import data
  from dba_jax.evaluate import perplexity
  model, c = _load(args.checkpoint)
  try:
    splits = data.load_splits(c.data, c.model.vocab_size)
  except data.DataError as e:
    raise _Fail(str(e)) from None
  tokens = getattr(splits, args.split)
  seq_len = args.seq_len or c.data.seq_len
  r = perplexity(model, c, tokens, seq_len, overlap=args.overlap, vocab_limit=args.vocab_limit, stride=args.stride,
                 batch_size=args.batch_size, max_windows=args.max_windows, progress=True)
  r.update(checkpoint=args.checkpoint, split=args.split)
  print(f"{args.checkpoint}: {args.split} ppl {r['ppl']:.4f} (nll {r['nll']:.4f}) over {r['scored_tokens']:,} "
        f"tokens, {r['mode']}, {r['scored_tokens'] / r['seconds']:,.0f} tok/s", file=sys.stderr)
  return r


def generate_main(args) -> dict:
  from dba_jax import data, generate
  model, c = _load(args.checkpoint)
  tok = data.get_tokenizer(c.data.tokenizer)
  prompt = tok.encode(args.prompt)
  if len(prompt) == 0:
    raise _Fail("--prompt is empty after tokenisation")
  max_len = args.max_len or len(prompt) + args.max_new
  try:
    gen = generate.Generator(model, cache=args.cache, window=args.window, max_len=max_len)
  except (ValueError, NotImplementedError) as e:
    raise _Fail(str(e)) from None
  out = gen.generate(prompt[None], args.max_new, temperature=args.temperature, seed=args.seed,
                     stop_tokens=args.stop, progress=True)
  text = tok.decode(out["tokens"][0])
  print(f"prefill {1e3 * out['prefill_s']:.1f} ms, {out['new_tokens']} new tokens, "
        f"{out['decode_tokens_per_s']:.1f} decode tok/s, cache {args.cache} "
        f"({generate.kv_bytes_per_token(c.model, args.cache):,} B/token)", file=sys.stderr)
  return {"prompt": args.prompt, "completion": text, "tokens": out["tokens"][0], "stopped": out["stopped"][0],
          "cache": args.cache, "window": args.window, "kv_bytes_per_token": generate.kv_bytes_per_token(c.model, args.cache),
          "cache_bytes": generate.cache_bytes(gen.init_cache()), "max_len": max_len, "prefill_s": out["prefill_s"], "decode_tokens_per_s": out["decode_tokens_per_s"]}


def prune_main(args) -> dict:
  from dba_jax import data, pruning
  model, c = _load(args.checkpoint)
  baseline = None
  if args.target_from:
    if args.target_loss > 0:
      raise _Fail("give --target-loss or --target-from, not both")
    baseline, bc = _load(args.target_from)
    mine, theirs = (c.data.source, c.data.tokenizer, c.model.vocab_size), (bc.data.source, bc.data.tokenizer,
                                                                           bc.model.vocab_size)
    if mine != theirs:
      raise _Fail(f"--target-from {args.target_from} reads other data (source, tokenizer, vocab {theirs}) than "
                  f"{args.checkpoint} {mine}; the criterion compares losses on the same windows")
  try:
    splits = data.load_splits(c.data, c.model.vocab_size)
    args.ratios, args.budgets = pruning.parse_list(args.ratios), pruning.parse_list(args.budgets, int)
    return {"checkpoint": args.checkpoint, "split": args.split, "target_from": args.target_from or None,
            **pruning.prune_main(model, c, getattr(splits, args.split), args, baseline)}
  except (data.DataError, ValueError, NotImplementedError) as e:
    raise _Fail(str(e)) from None


def hope_main(args) -> dict:
  from dba_jax.hope import evals
  from dba_jax.hope.step import TWO_PASS_BLOCKS
  model, c = _load(args.checkpoint)
  if c.model.block not in TWO_PASS_BLOCKS and not c.model.block.startswith("titans_"):
    raise _Fail(f"{args.checkpoint}: model.block={c.model.block!r} has no memory; the memory evals need a "
                f"hope_attention / hope_selfmod / hope_hybrid / titans_* model")
  try:
    lengths = [int(x) for x in args.lengths.split(",") if x]
  except ValueError:
    raise _Fail(f"--lengths={args.lengths!r} must be comma-separated token counts") from None
  if args.task == "read":
    from dba_jax.hope import memstate
    if not args.text:
      raise _Fail("hope read needs --text FILE (the text the memory reads)")
    try:
      with open(args.text, encoding="utf-8") as f:
        text = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise _Fail(f"--text {args.text}: cannot read it ({e})") from None
    try:
      r = evals.read(model, c, text, args.state, args.save_state, args.checkpoint)
    except (memstate.MemStateError, ValueError) as e:
      raise _Fail(str(e)) from None
    print(f"read {r['tokens']} tokens ({r['tokens_before']} read before): CE with memory {r['memory_ce']:.4f}, "
          f"without {r['baseline_ce']:.4f} (delta {r['delta']:+.4f}), {r['updates_fired']} memory updates"
          + (f"; memory state saved to {args.save_state}" if args.save_state else ""), file=sys.stderr)
    return {"checkpoint": args.checkpoint, **r}
  if args.state or args.save_state or args.text:
    raise _Fail("--text, --state and --save-state belong to `dba-eval hope read`")
  if args.task == "continual":
    r = evals.continual(model, c, n_tokens=lengths[0] if lengths else 0, samples=args.samples, seed=args.seed)
    for name in ("baseline", "memory"):
      x = r[name]
      print(f"continual {name:8s}: first read " + ", ".join(f"{k} {v:.3f}" for k, v in x["first_read"].items()) +
            f"; A again at once {x['reread_after_itself']:.3f}, after B and C {x['reread_after_others']:.3f} "
            f"({x['updates_fired_per_sample']:.0f} updates)", file=sys.stderr)
  else:
    r = evals.needle_task(model, c, args.task, lengths or (c.data.seq_len,), args.samples, args.seed)
    for row in r["by_length"]:
      print(f"{args.task} {row['tokens']:5d} tokens (train {r['train_len']}, chunks of {r['chunk']}): baseline "
            f"{row['baseline_acc']:.3f}, with memory {row['memory_acc']:.3f} (delta {row['delta']:+.3f}), "
            f"{row['updates_fired_per_sample']:.0f} memory updates per sample", file=sys.stderr)
    if args.plot:
      from dba_jax import plots
      plots.memory_accuracy(r, args.plot)
  return {"checkpoint": args.checkpoint, **r}


def _parser():
  p = argparse.ArgumentParser(prog=PROG, description="Evaluate dba_jax checkpoints: perplexity and generation.")
  sub = p.add_subparsers(dest="command", required=True)
  q = sub.add_parser("ppl", help="perplexity on a split")
  q.add_argument("--checkpoint", required=True, help="a workdir or checkpoints/<step> directory")
  q.add_argument("--split", default="val", choices=("val", "train"))
  q.add_argument("--seq-len", type=int, default=0, help="window length (default: the run's data.seq_len)")
  q.add_argument("--overlap", action="store_true", help="the anchor's overlapping windows (every --stride tokens)")
  q.add_argument("--stride", type=int, default=1, help="window start spacing with --overlap")
  q.add_argument("--vocab-limit", type=int, default=0, help="softmax over the first N logits (default vocab_size)")
  q.add_argument("--max-windows", type=int, default=0, help="at most N windows, spread evenly (0: all)")
  q.add_argument("--batch-size", type=int, default=8)
  q.add_argument("--out", default="", help="also write the JSON here")
  q.add_argument("--force", action="store_true", help="replace an existing --out file")
  g = sub.add_parser("generate", help="KV-cache generation from a text prompt")
  g.add_argument("--checkpoint", required=True)
  g.add_argument("--prompt", required=True)
  g.add_argument("--max-new", type=int, default=64)
  g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--cache", default="float16", help="float32|bf16|fp16|q8_0|q4_0|nf4, or per stream: q4/q8/q4")
  g.add_argument("--window", type=int, default=0, help="keep the W most recent tokens in float32")
  g.add_argument("--stop", type=int, nargs="*", default=[], help="stop token ids (none by default)")
  g.add_argument("--max-len", type=int, default=0, help="cache length (default prompt + max-new)")
  g.add_argument("--out", default="", help="also write the JSON here")
  g.add_argument("--force", action="store_true", help="replace an existing --out file")
  r = sub.add_parser("prune", help="selective-attention context pruning: keep ratios and per-layer KV budgets")
  r.add_argument("--checkpoint", required=True)
  r.add_argument("--split", default="val", choices=("val", "train"))
  r.add_argument("--seq-len", type=int, default=0, help="window length (default: the run's data.seq_len)")
  r.add_argument("--ratios", default="1,0.5,0.25", help="comma-separated keep ratios (the full-forward simulation)")
  r.add_argument("--rule", default="original", choices=("original", "per_row"))
  r.add_argument("--budgets", default="", help="comma-separated shared KV budgets to decode with")
  r.add_argument("--target-loss", type=float, default=0.0, help="search budgets meeting this loss (e.g. a baseline's)")
  r.add_argument("--target-from", default="", help="checkpoint whose full-context loss on the same windows is the "
                 "target (the paper's criterion: an unselective model's perplexity)")
  r.add_argument("--within", type=float, default=0.0, help="also search budgets within this relative loss of the "
                 "model's own full cache (e.g. 0.01)")
  r.add_argument("--per-layer", action="store_true", help="refine the shared budget layer by layer")
  r.add_argument("--max-windows", type=int, default=8)
  r.add_argument("--batch-size", type=int, default=8)
  r.add_argument("--out", default="", help="also write the JSON here")
  r.add_argument("--force", action="store_true", help="replace an existing --out file")
  o = sub.add_parser("hope", help="memory evals (HOPE, Titans): passkey, NIAH, continual, with and without memory")
  o.add_argument("task", choices=("passkey", "niah", "continual", "read"))
  o.add_argument("--checkpoint", required=True)
  o.add_argument("--lengths", default="", help="prompt lengths in tokens, comma-separated (default: the training "
                 "length); continual: the segment length")
  o.add_argument("--samples", type=int, default=32)
  o.add_argument("--seed", type=int, default=0)
  o.add_argument("--plot", default="", help="passkey/niah: also plot accuracy against length (PNG)")
  o.add_argument("--text", default="", help="read: the text file the memory reads (and is scored on)")
  o.add_argument("--state", default="", help="read: start from this saved memory state (a --save-state directory)")
  o.add_argument("--save-state", default="", help="read: save the memory state after reading to this new directory")
  o.add_argument("--out", default="", help="also write the JSON here")
  o.add_argument("--force", action="store_true", help="replace an existing --out file")
  sub.add_parser("addition", help="dba-addition-eval's arguments, forwarded", add_help=False)
  sub.add_parser("compare", help="compare checkpoints from a manifest (dba_jax/compare_eval.py)", add_help=False)
  sub.add_parser("latentwire", help="LatentWire bridge vs baselines (dba_jax/latentwire/harness.py)", add_help=False)
  return p


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] == "compare":
    from dba_jax import compare_eval
    return compare_eval.main(argv[1:])
  if argv and argv[0] == "latentwire":
    from dba_jax.latentwire import harness
    return harness.main(argv[1:])
  if argv and argv[0] == "addition":
    from dba_jax.addition import eval as addition_eval
    return addition_eval.main(argv[1:])
  args = _parser().parse_args(argv)  # argparse exits 2 on a usage error
  checks = [(getattr(args, "seq_len", 0) < 0, "--seq-len must be positive"),
            (getattr(args, "stride", 1) < 1, "--stride must be >= 1"),
            (getattr(args, "batch_size", 1) < 1, "--batch-size must be >= 1"),
            (getattr(args, "max_new", 1) < 1, "--max-new must be >= 1"),
            (getattr(args, "temperature", 0.0) < 0, "--temperature must be >= 0"),
            (getattr(args, "window", 0) < 0, "--window must be >= 0")]
  for bad, msg in checks:
    if bad:
      print(f"{PROG}: error: {msg}", file=sys.stderr)
      return 2
  refuse_existing(PROG, args.out, args.force)
  try:
    result = {"ppl": ppl_main, "generate": generate_main, "prune": prune_main, "hope": hope_main}[args.command](args)
  except _Fail as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  print(write_json(args.out, result))
  return 0


def cli():
  sys.exit(main())


if __name__ == "__main__":
  cli()
