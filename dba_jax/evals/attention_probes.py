"""Attention probes of the `dba-eval compare` figure: where a checkpoint's last layer looks while it answers.

For probes whose answer is written in the prompt (copying, recall, distractors), the last prompt token (the one
that predicts the answer) is asked how much attention mass it puts on the answer's tokens, on the first token
(the usual attention sink) and on DBA's null token. The probabilities come from the model's own forward
(`Hooks(return_probs=True)`), every mask applied, so any attention kind is probed the same way.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dba_jax import model as model_lib


def attention_probes(probes, n: int) -> list:
  """Up to n probes whose answer is written in the prompt (copying, recall, distractors), one per category
  first: for those the attention-mass panel can ask whether the answering position looks at the answer."""
  fits = [p for p in probes if str(p.answer).strip() and str(p.answer).strip() in p.prompt] or list(probes)
  first = list({p.category: p for p in reversed(fits)}.values())[::-1]  # each category's first probe, in order
  ids = {p.id for p in first}
  return (first + [p for p in fits if p.id not in ids])[:n]


def last_layer_probs(decoder, tokens_BT):
  """(probs [B, H, T, S], n_prefix): the last layer's attention probabilities from the model's own forward
  (every mask applied: causal, selective attention's F; DBA's null token as the first n_prefix key columns)."""
  probs = decoder.forward(tokens_BT, hooks=model_lib.Hooks(return_probs=True)).probs[-1]
  return probs, probs.shape[-1] - tokens_BT.shape[1]


def answer_span(pieces: list[str], answer: str) -> list[int]:
  """Token indices overlapping the last occurrence of `answer` in the concatenated token texts ([] if absent)."""
  text = "".join(pieces)
  start = text.rfind(answer.strip()) if answer.strip() else -1
  if start < 0:
    return []
  end, ends = start + len(answer.strip()), np.cumsum([len(p) for p in pieces])
  return [i for i, e in enumerate(ends) if e > start and e - len(pieces[i]) < end]


def attention_record(decoder, tok, probe, max_tokens: int) -> dict:
  """Last-layer attention of one probe's last `max_tokens` prompt tokens, averaged over heads, and where the last
  prompt token (the one that predicts the answer) puts its attention mass."""
  m = decoder.m
  ids = np.asarray(tok.encode(probe.prompt), np.int32)[-min(max_tokens, m.max_seq_len):]
  probs_BHTS, n_prefix = last_layer_probs(decoder, jnp.asarray(ids)[None])
  probs_TS = np.asarray(probs_BHTS[0].astype(jnp.float32).mean(0), np.float64)
  pieces = [tok.decode([int(i)]) for i in ids]
  span = answer_span(pieces, str(probe.answer))
  last_S = probs_TS[-1]
  keys = last_S[n_prefix:]
  first = 0.0 if 0 in span else float(keys[0])  # the first position is the usual attention sink
  on_span, null = float(keys[span].sum()), float(last_S[:n_prefix].sum())
  return {"id": probe.id, "category": probe.category, "answer": str(probe.answer), "layer": m.n_layers - 1,
          "heads": int(probs_BHTS.shape[1]), "n_prefix": n_prefix, "query_tokens": pieces,
          "key_tokens": ["<null>"] * n_prefix + pieces, "span": span,
          "probs_TS": np.round(probs_TS, 6).tolist(),
          "mass": {"answer span": on_span, "first token": first, "null token": null,
                   "other": max(0.0, 1.0 - on_span - first - null)}}
