"""`dba-eval generate`: text in, text out through the KV-cache decoder (dba_jax/generate.py), with its speed and
the cache's bytes."""
from __future__ import annotations

import sys

import numpy as np

from dba_jax import data, generate
from dba_jax.evals.common import EvalError, load_checkpoint, read_checkpoint_config


def command(args) -> dict:
  """Tokenise --prompt, decode --max-new tokens with the --cache kind (stopping at --stop ids, by default at the
  tokenizer's own stop ids: EOS of an hf: tokenizer), and report the completion, the timings and the KV bytes per
  token (analytic) and allocated (measured)."""
  c = read_checkpoint_config(args.checkpoint)
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
  try:
    gen = generate.Generator(model, cache=args.cache, window=args.window, max_len=max_len)
    out = gen.generate(prompt[None], args.max_new, temperature=args.temperature, seed=args.seed,
                       stop_tokens=stop, progress=True)
  except (ValueError, NotImplementedError) as e:
    raise EvalError(str(e)) from None
  text = tok.decode(out["tokens"][0])
  kv_bytes = generate.kv_bytes_per_token(c.model, args.cache)
  print(f"prefill {1e3 * out['prefill_s']:.1f} ms, {out['new_tokens']} new tokens, "
        f"{out['decode_tokens_per_s']:.1f} decode tok/s, cache {args.cache} ({kv_bytes:,} B/token)", file=sys.stderr)
  return {"checkpoint": args.checkpoint, "step": model.step, "prompt": args.prompt,
          "prompt_tokens": [int(i) for i in prompt], "completion": text,
          "tokens": out["tokens"][0], "stopped": out["stopped"][0], "stop_tokens": [int(i) for i in stop],
          "cache": args.cache, "window": args.window, "kv_bytes_per_token": kv_bytes,
          "cache_bytes": generate.cache_bytes(gen.init_cache()), "max_len": max_len, "prefill_s": out["prefill_s"],
          "decode_tokens_per_s": out["decode_tokens_per_s"]}
