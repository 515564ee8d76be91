"""The `dba-eval` command: the argparse front end; each subcommand's body lives in dba_jax/evals/.

  dba-eval ppl --checkpoint DIR [--split val] [--seq-len N] [--overlap [--stride S]] [--vocab-limit V]
               [--max-windows N] [--batch-size B] [--out X.json]          (evals/perplexity.py)
  dba-eval generate --checkpoint DIR --prompt TEXT|--prompt-ids 1,2,3 [--max-new N] [--temperature T] [--seed S]
                    [--cache q4/q8/q4] [--window W] [--stop ID ...] [--max-len N] [--state MEMSTATE_DIR]
                                                                            (evals/generation.py)
  dba-eval prune --checkpoint DIR [--ratios 1,0.5,0.25] [--budgets 64,32] [--target-loss X | --target-from DIR]
                 [--within 0.01] [--per-layer] [--rule original|per_row] [--max-windows N] [--out X.json]
                                                                            (evals/pruning.py)
  dba-eval hope passkey|niah|continual --checkpoint DIR [--lengths 256,512] [--samples N] [--plot X.png]
  dba-eval hope read --checkpoint DIR --text FILE [--state DIR] [--save-state DIR]   (evals/hope_memory.py)
  dba-eval hope recall [--config configs/hope.py:recall] [--set model.block=titans_mag] [--steps N] [--lengths 32,64]
                                                                            (evals/hope_recall.py: trains, then scores)
  dba-eval addition ...        (the arguments of dba-addition-eval, forwarded unchanged; evals/addition.py)
  dba-eval compare --manifest configs/compare/NAME.py [--out DIR]   (evals/compare_checkpoints.py)
  dba-eval latentwire --manifest FILE.json [--out X.json]   (evals/latentwire.py)

Numbers are range-checked by their argument types before any checkpoint is read (counts >= 1, ratios in (0, 1],
finite temperatures >= 0; a 0 documented as "default" or "all" means that). Every file a subcommand writes (--out,
hope's --plot and --save-state, latentwire's .md table, compare's directory) is refused when it exists, unless
--force, and is written under a temporary name and renamed: a kill leaves the old file or the new one, whole.
"""
from __future__ import annotations

import argparse
import os
import sys

from dba_jax.cli import command, entry, float_at_least, int_at_least, listed, ratio, refuse_existing, write_json
from dba_jax.evals import addition, compare_checkpoints, generation, hope_memory, latentwire, perplexity, pruning
from dba_jax.evals.common import EvalError

PROG = "dba-eval"
# Subcommands that parse their own arguments: everything after the name is forwarded to their main(argv).
FORWARDED = {"compare": compare_checkpoints.main, "latentwire": latentwire.main, "addition": addition.main}


COMMANDS = {"ppl": perplexity.command, "generate": generation.command, "prune": pruning.command,
            "hope": hope_memory.command}


# Range-checked argparse types: an impossible value is refused before any checkpoint is loaded.
COUNT, SIZE = int_at_least(1), int_at_least(0)  # SIZE: 0 means the documented default


def _parser():
  p = argparse.ArgumentParser(prog=PROG, description="Evaluate dba_jax checkpoints: perplexity and generation.")
  sub = p.add_subparsers(dest="command", required=True)
  q = sub.add_parser("ppl", help="perplexity on a split")
  q.add_argument("--checkpoint", required=True, help="a workdir or checkpoints/<step> directory")
  q.add_argument("--split", default="val", choices=("val", "train"))
  q.add_argument("--seq-len", type=SIZE, default=0, help="window length (default: the run's data.seq_len)")
  q.add_argument("--overlap", action="store_true", help="the anchor's overlapping windows (every --stride tokens)")
  q.add_argument("--stride", type=COUNT, default=1, help="window start spacing with --overlap")
  q.add_argument("--vocab-limit", type=SIZE, default=0, help="softmax over the first N logits (default vocab_size)")
  q.add_argument("--max-windows", type=SIZE, default=0, help="at most N windows, spread evenly (0: all)")
  q.add_argument("--batch-size", type=COUNT, default=8)
  q.add_argument("--out", default="", help="also write the JSON here")
  q.add_argument("--force", action="store_true", help="replace an existing --out file")
  g = sub.add_parser("generate", help="KV-cache generation from a text prompt (memory blocks: with their memory)")
  g.add_argument("--checkpoint", required=True)
  which = g.add_mutually_exclusive_group(required=True)
  which.add_argument("--prompt", help="text, read by the run's tokenizer (with its BOS)")
  which.add_argument("--prompt-ids", type=listed(int), help="token ids as they are, comma-separated (e.g. a "
                     "prompt another framework tokenised)")
  g.add_argument("--max-new", type=COUNT, default=64)
  g.add_argument("--temperature", type=float_at_least(0), default=0.0, help="0: greedy")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--cache", default=None, help="float32|bf16|fp16|q8_0|q4_0|nf4, or per stream: q4/q8/q4 (default "
                 "float16; not for memory blocks)")
  g.add_argument("--window", type=SIZE, default=0, help="keep the W most recent tokens in float32")
  g.add_argument("--state", default="", help="memory blocks: start from this saved memory state (a `dba-eval hope "
                 "read --save-state` directory); the prompt continues the text it read")
  g.add_argument("--stop", type=SIZE, nargs="*", default=[],
                 help="stop token ids (default: the tokenizer's own, e.g. an hf: tokenizer's EOS; none for byte)")
  g.add_argument("--max-len", type=SIZE, default=0, help="cache length (default prompt + max-new)")
  g.add_argument("--out", default="", help="also write the JSON here")
  g.add_argument("--force", action="store_true", help="replace an existing --out file")
  r = sub.add_parser("prune", help="selective-attention context pruning: keep ratios and per-layer KV budgets")
  r.add_argument("--checkpoint", required=True)
  r.add_argument("--split", default="val", choices=("val", "train"))
  r.add_argument("--seq-len", type=SIZE, default=0, help="window length (default: the run's data.seq_len)")
  r.add_argument("--ratios", type=listed(ratio), default=[1, 0.5, 0.25],
                 help="comma-separated keep ratios in (0, 1] (the full-forward simulation)")
  r.add_argument("--rule", default="original", choices=("original", "per_row"))
  r.add_argument("--budgets", type=listed(int_at_least(2)), default=[],
                 help="comma-separated shared KV budgets to decode with, from 2 (BOS and the current token) to the "
                 "window length")
  r.add_argument("--target-loss", type=float_at_least(0), default=0.0,
                 help="search budgets meeting this loss (e.g. a baseline's)")
  r.add_argument("--target-from", default="", help="checkpoint whose full-context loss on the same windows is the "
                 "target (the paper's criterion: an unselective model's perplexity)")
  r.add_argument("--within", type=float_at_least(0), default=0.0,
                 help="also search budgets within this relative loss of the model's own full cache (e.g. 0.01)")
  r.add_argument("--per-layer", action="store_true", help="refine the shared budget layer by layer")
  r.add_argument("--max-windows", type=COUNT, default=8)
  r.add_argument("--batch-size", type=COUNT, default=8)
  r.add_argument("--out", default="", help="also write the JSON here")
  r.add_argument("--force", action="store_true", help="replace an existing --out file")
  o = sub.add_parser("hope", help="memory evals (HOPE, Titans): passkey, NIAH, continual, with and without memory")
  o.add_argument("task", choices=("passkey", "niah", "continual", "read", "recall"))
  o.add_argument("--checkpoint", default="", help="the trained memory model (every task but recall)")
  o.add_argument("--config", default="configs/hope.py:recall", help="recall: the config it trains")
  o.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="recall: a config override, e.g. model.block=titans_mag (repeatable)")
  o.add_argument("--steps", type=SIZE, default=0, help="recall: training steps (0: the config's train.steps)")
  o.add_argument("--keys", type=COUNT, default=8, help="recall: how many key ids the needle draws from")
  o.add_argument("--carry", type=SIZE, default=0, help="recall (titans_mac): carry each row's memory across N "
                 "batches before it restarts (truncated BPTT; 0: none)")
  o.add_argument("--lengths", type=listed(COUNT), default=[],
                 help="prompt lengths in tokens, comma-separated (default: the training length); continual: the "
                 "segment length")
  o.add_argument("--samples", type=SIZE, default=0, help="prompts per length (0: 512; continual: 64 segments)")
  o.add_argument("--seed", type=SIZE, default=0)
  o.add_argument("--plot", default="", help="passkey/niah: also plot accuracy against length (PNG)")
  o.add_argument("--text", default="", help="read: the text file the memory reads (and is scored on)")
  o.add_argument("--state", default="", help="read: start from this saved memory state (a --save-state directory)")
  o.add_argument("--save-state", default="", help="read: save the memory state after reading to this directory "
                 "(an existing one only with --force)")
  o.add_argument("--out", default="", help="also write the JSON here")
  o.add_argument("--force", action="store_true", help="replace an existing --out, --plot or --save-state")
  sub.add_parser("addition", help="dba-addition-eval's arguments, forwarded", add_help=False)
  sub.add_parser("compare", help="compare checkpoints from a manifest (dba_jax/evals/compare_checkpoints.py)",
                 add_help=False)
  sub.add_parser("latentwire", help="LatentWire bridge vs baselines (dba_jax/evals/latentwire.py)", add_help=False)
  return p


@command(PROG, argv0=False)
def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in FORWARDED:
    return FORWARDED[argv[0]](argv[1:])
  args = _parser().parse_args(argv)  # argparse exits 2 on a usage error or an out-of-range number
  # Every file the subcommand writes is checked before any work: nothing a user has is overwritten without --force.
  outputs = [("--out", args.out)] + ([("--plot", args.plot)] if args.command == "hope" else [])
  for flag, path in outputs:
    refuse_existing(PROG, path, args.force, flag=flag)
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
      print(f"{PROG}: error: {flag} {path}: its directory does not exist; create it first", file=sys.stderr)
      return 2
  if args.command == "hope":
    refuse_existing(PROG, args.save_state, args.force, what="memory state directory", flag="--save-state")
  try:
    result = COMMANDS[args.command](args)
  except EvalError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  print(write_json(args.out, result))
  return 0


cli = entry(main)


if __name__ == "__main__":
  cli()
