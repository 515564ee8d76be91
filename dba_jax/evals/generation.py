"""`dba-eval generate`: text in, text out through the KV-cache decoder (dba_jax/generate.py), with its speed and
the cache's bytes."""
from __future__ import annotations

import sys

from dba_jax import data, generate
from dba_jax.evals.common import EvalError, load_checkpoint


def command(args) -> dict:
  """Tokenise --prompt, decode --max-new tokens with the --cache kind, and report the completion, the timings and
  the KV bytes per token (analytic) and allocated (measured)."""
  model, c = load_checkpoint(args.checkpoint)
  tok = data.get_tokenizer(c.data.tokenizer)
  prompt = tok.encode(args.prompt)
  if len(prompt) == 0:
    raise EvalError("--prompt is empty after tokenisation")
  max_len = args.max_len or len(prompt) + args.max_new
  try:
    gen = generate.Generator(model, cache=args.cache, window=args.window, max_len=max_len)
    out = gen.generate(prompt[None], args.max_new, temperature=args.temperature, seed=args.seed,
                       stop_tokens=args.stop, progress=True)
  except (ValueError, NotImplementedError) as e:
    raise EvalError(str(e)) from None
  text = tok.decode(out["tokens"][0])
  kv_bytes = generate.kv_bytes_per_token(c.model, args.cache)
  print(f"prefill {1e3 * out['prefill_s']:.1f} ms, {out['new_tokens']} new tokens, "
        f"{out['decode_tokens_per_s']:.1f} decode tok/s, cache {args.cache} ({kv_bytes:,} B/token)", file=sys.stderr)
  return {"checkpoint": args.checkpoint, "step": model.step, "prompt": args.prompt, "completion": text,
          "tokens": out["tokens"][0], "stopped": out["stopped"][0],
          "cache": args.cache, "window": args.window, "kv_bytes_per_token": kv_bytes,
          "cache_bytes": generate.cache_bytes(gen.init_cache()), "max_len": max_len, "prefill_s": out["prefill_s"],
          "decode_tokens_per_s": out["decode_tokens_per_s"]}
