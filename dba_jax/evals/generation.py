"""`dba-eval generate`: text in, text out through the KV-cache decoder (dba_jax/generate.py), with its speed and
the cache's bytes. Memory blocks (hope_*, titans_*) decode through dba_jax.hope.decode.MemoryGenerator: the KV cache
and the memory state together, optionally seeded with a saved memory state (--state, a `dba-eval hope read
--save-state` directory; the prompt continues the text that state read)."""
from __future__ import annotations

import sys

import numpy as np

from dba_jax import data, generate
from dba_jax.evals.common import EvalError, load_checkpoint, read_checkpoint_config
from dba_jax.hope import decode, memstate

DEFAULT_CACHE = "float16"


def _check_memory_flags(args, m):
  """What a model's block refuses before it loads: --state without a memory state, --cache / --window for memory
  blocks (their KV cache is per chunk, in the compute dtype), a state that does not fit."""
  if args.state and not memstate.carries_state(m):
    raise EvalError(f"--state: model.block={m.block!r} carries no memory state between calls (hope_attention / "
                    "hope_selfmod / hope_hybrid / titans_mac do)")
  if decode.is_memory_block(m):
    if args.cache is not None or args.window:
      raise EvalError(f"--cache / --window: model.block={m.block!r} decodes with its memory generator, whose KV cache "
                      "is per chunk in the compute dtype (leave them out)")
    if args.state:
      try:
        memstate.read(args.state, m)
      except memstate.MemStateError as e:
        raise EvalError(str(e)) from None


def command(args) -> dict:
  """Tokenise --prompt, decode --max-new tokens with the --cache kind (stopping at --stop ids, by default at the
  tokenizer's own stop ids: EOS of an hf: tokenizer), and report the completion, the timings and the KV bytes per
  token (analytic) and allocated (measured)."""
  c = read_checkpoint_config(args.checkpoint)
  _check_memory_flags(args, c.model)
  try:  # the tokenizer first: a missing or unfitting one is refused before the model loads
    tok = data.get_tokenizer(c.data.tokenizer, c.model.vocab_size)
  except data.DataError as e:
    raise EvalError(str(e)) from None
  model, c = load_checkpoint(args.checkpoint)
  if args.prompt_ids is not None:
    bad = [i for i in args.prompt_ids if not 0 <= i < c.model.vocab_size]
    if bad:
      raise EvalError(f"--prompt-ids {bad[0]} is not a token id of this model (0 to {c.model.vocab_size - 1})")
    prompt = np.asarray(args.prompt_ids, np.int32)
  else:
    prompt = tok.encode_document(args.prompt, end=False)  # with the BOS the tokenizer opens a text with (if any)
  if len(prompt) == 0:
    raise EvalError("--prompt is empty after tokenisation")
  stop = args.stop or list(tok.stop_ids)  # default: where the tokenizer's files say a generation ends (EOS)
  max_len = args.max_len or len(prompt) + args.max_new
  memory = decode.is_memory_block(c.model)
  cache = DEFAULT_CACHE if args.cache is None else args.cache
  try:
    if memory:  # chunk: the training length, where the block has no online chunk of its own
      gen = decode.MemoryGenerator(model, max_len=max_len, state=args.state or None, chunk=c.data.seq_len)
    else:
      gen = generate.Generator(model, cache=cache, window=args.window, max_len=max_len)
    out = gen.generate(prompt[None], args.max_new, temperature=args.temperature, seed=args.seed,
                       stop_tokens=stop, progress=True)
  except (ValueError, NotImplementedError) as e:  # memstate.MemStateError is a ValueError
    raise EvalError(str(e)) from None
  text = tok.decode(out["tokens"][0])
  cache_bytes = generate.cache_bytes(gen.init_cache())
  result = {"checkpoint": args.checkpoint, "step": model.step, "prompt": args.prompt,
            "prompt_tokens": [int(i) for i in prompt], "completion": text,
            "tokens": out["tokens"][0], "stopped": out["stopped"][0], "stop_tokens": [int(i) for i in stop]}
  if memory:
    print(f"prefill {1e3 * out['prefill_s']:.1f} ms, {out['new_tokens']} new tokens, "
          f"{out['decode_tokens_per_s']:.1f} decode tok/s, memory generator (chunk {gen.chunk or '-'}, "
          f"state {cache_bytes:,} B)" + (f", memory from {args.state}" if args.state else ""), file=sys.stderr)
    return {**result, "decoder": "memory", "chunk": gen.chunk, "state": args.state or None,
            "start_position": gen.start, "cache_bytes": cache_bytes, "max_len": max_len,
            "prefill_s": out["prefill_s"], "decode_tokens_per_s": out["decode_tokens_per_s"]}
  kv_bytes = generate.kv_bytes_per_token(c.model, cache)
  print(f"prefill {1e3 * out['prefill_s']:.1f} ms, {out['new_tokens']} new tokens, "
        f"{out['decode_tokens_per_s']:.1f} decode tok/s, cache {cache} ({kv_bytes:,} B/token)", file=sys.stderr)
  return {**result, "cache": cache, "window": args.window, "kv_bytes_per_token": kv_bytes, "cache_bytes": cache_bytes,
          "max_len": max_len, "prefill_s": out["prefill_s"], "decode_tokens_per_s": out["decode_tokens_per_s"]}
