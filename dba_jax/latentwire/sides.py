"""The two frozen LMs as the bridge and the harness use them: loading, prompt encoding, padding, KV-cached greedy
decoding with an optional soft-token prefix, and the measured KV bytes per token."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dba_jax import arith_qa, data, generate, model as model_lib
from dba_jax.loading import load_model


class SideError(ValueError):
  """A source / target / bridge directory or a length is unusable; the message names it."""


@dataclasses.dataclass
class LM:
  role: str
  path: str
  model: model_lib.Model
  config: object
  tok: object

  @property
  def m(self):
    return self.config.model

  @property
  def vocab(self) -> int:
    return self.m.vocab_size

  @property
  def width(self) -> int:
    return self.m.d_model

  @property
  def module(self):
    return self.model.module

  def encode(self, text: str) -> np.ndarray:
    """The text alone: a piece that continues a sequence."""
    return np.asarray(self.tok.encode(text), np.int32)

  def encode_prompt(self, text: str) -> np.ndarray:
    """The text opening a sequence, with the BOS its tokenizer opens one with (an hf: Llama's; none for bytes)."""
    return np.asarray(self.tok.encode_document(text, end=False), np.int32)

  @functools.cached_property
  def stop_ids(self) -> tuple:
    """Token ids whose text holds a newline (an answer ends at its line), and the tokenizer's own (EOS)."""
    lines = [i for i in range(self.tok.vocab_size) if "\n" in self.tok.decode([i])]
    return tuple(dict.fromkeys(lines + list(self.tok.stop_ids)))


def load_lm(path: str, role: str) -> LM:
  try:
    model, c = load_model(path)
    tok = data.get_tokenizer(c.data.tokenizer, c.model.vocab_size)
  except (FileNotFoundError, ValueError, data.DataError) as e:
    raise SideError(f"{role} model {path}: {e}") from None
  model_lib.check_cacheable(c.model)
  return LM(role, path, model, c, tok)


def pad(rows, length: int, what: str):
  """int32 [B, length] (right-padded with 0) and the lengths [B]; a row longer than `length` is an error."""
  n = np.array([len(r) for r in rows], np.int32)
  if n.max(initial=0) > length:
    raise SideError(f"{what}: a row has {n.max()} tokens, more than the configured {length}")
  out = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out, n


def bridge_batch(src: LM, tgt: LM, pairs, src_len: int, tgt_len: int, prompt_len: int) -> dict:
  """Host arrays for one batch of (question, answer) pairs.

  src_ids/src_mask [B, S]: the source's text prompt. tgt_ids [B, T]: stub + answer + "\\n\\n" (what follows the soft
  tokens); label_mask [B, T]: the answer tokens only. teacher_ids [B, Q + T]: the target's question prompt, then the
  same tgt_ids row, so teacher_off[b] + i - 1 is the position predicting tgt_ids[b, i]; prompt_mask marks the prompt
  (question + stub) for InfoNCE."""
  stub = tgt.encode(arith_qa.STUB)
  src_rows = [src.encode_prompt(arith_qa.PROMPT.format(q=q)) for q, _ in pairs]
  answers = [tgt.encode(a + "\n\n") for _, a in pairs]
  questions = [tgt.encode_prompt("Q: " + q) for q, _ in pairs]
  src_ids, src_n = pad(src_rows, src_len, "data.src_len (source prompt)")
  tgt_ids, tgt_n = pad([np.concatenate([stub, a]) for a in answers], tgt_len, "data.tgt_len (stub + answer)")
  q_ids, q_n = pad(questions, prompt_len, "data.prompt_len (target question prompt)")
  teacher = np.zeros((len(pairs), prompt_len + tgt_len), np.int32)
  for i in range(len(pairs)):
    teacher[i, :q_n[i] + tgt_n[i]] = np.concatenate([q_ids[i, :q_n[i]], tgt_ids[i, :tgt_n[i]]])
  pos_T = np.arange(tgt_len)[None]
  pos_QT = np.arange(prompt_len + tgt_len)[None]
  return {"src_ids": src_ids, "src_mask": np.arange(src_len)[None] < src_n[:, None],
          "tgt_ids": tgt_ids, "label_mask": (pos_T >= len(stub)) & (pos_T < tgt_n[:, None]),
          "teacher_ids": teacher, "teacher_off": q_n, "prompt_mask": pos_QT < (q_n + len(stub))[:, None]}


# --------------------------------------------------------------------------------------------------- decoding

class Speaker:
  """Greedy KV-cached decoding of one LM, batch 1, through dba_jax.generate's cache and the model's forward (an
  optional soft-token prefix goes in with `embeds_BPd`). Cache policy float32 unless told."""

  def __init__(self, lm: LM, max_len: int, cache: str = "float32"):
    self.lm = lm
    self.gen = generate.Generator(lm.model, cache=cache, max_len=max_len)
    graphdef, hook = lm.model.graphdef, self.gen.cache

    def prefill(params, cache_state, prefix_BPd, tokens_BT, n_valid):
      P = 0 if prefix_BPd is None else prefix_BPd.shape[1]
      positions_T = jnp.arange(P + tokens_BT.shape[1])
      hooks = model_lib.Hooks(cache=hook, valid_T=positions_T < n_valid)
      out = nnx.merge(graphdef, params).forward(tokens_BT, positions_T=positions_T, hooks=hooks,
                                                cache_state=cache_state, logits_at=n_valid - 1, embeds_BPd=prefix_BPd)
      return out.logits, out.cache_state

    self._prefill = jax.jit(prefill, donate_argnums=1)

  @functools.cached_property
  def kv_bytes_per_token(self) -> int:
    """Bytes one cached token takes, measured from the allocated cache arrays (every layer, K and V)."""
    g = self.gen
    return generate.cache_bytes(g.init_cache()) // (g.batch * g.max_len)

  def greedy(self, ids, max_new: int, prefix_1Pd=None) -> dict:
    """{"ids": new tokens up to a stop token, "text", "cached": tokens held in the cache at the end}."""
    ids = np.asarray(ids, np.int32)
    P = 0 if prefix_1Pd is None else prefix_1Pd.shape[1]
    n = len(ids)
    bucket = max(16, 1 << (n - 1).bit_length())
    if P + bucket + max_new > self.gen.max_len:
      raise SideError(f"{self.lm.role}: {P} soft + {n} prompt tokens + {max_new} new exceed the cache "
                      f"({self.gen.max_len})")
    padded = np.zeros((1, bucket), np.int32)
    padded[0, :n] = ids
    prefix = None if prefix_1Pd is None else jnp.asarray(prefix_1Pd, jnp.float32)
    logits, cache = self._prefill(self.gen.params, self.gen.init_cache(), prefix, jnp.asarray(padded),
                                  jnp.int32(P + n))
    tok = int(jnp.argmax(logits[0, :self.lm.vocab]))
    state, out = (cache, P + n), []
    for i in range(max_new):
      if tok in self.lm.stop_ids:
        break
      out.append(tok)
      if i == max_new - 1:
        break
      _, state, nxt = self.gen.decode(state, np.array([tok], np.int32))
      tok = int(nxt[0])
    return {"ids": out, "text": self.lm.tok.decode(out), "cached": state[1]}


def correct(text: str, answer: str) -> bool:
  got = arith_qa.extract(text)
  return got is not None and got == arith_qa.gold(answer)


# ------------------------------------------------------------- the bridge's soft tokens, decoded by the target

SPEAKER_LEN = 256  # KV-cache length of the decoders (soft tokens + prompt + answer)

def target_speaker(br):
  if getattr(br, "_speaker", None) is None:
    br._speaker = Speaker(br.tgt, SPEAKER_LEN)
  return br._speaker


def soft_tokens(br, params, questions) -> np.ndarray:
  """Soft tokens [N, K, target width] from the source's reading of each question's text prompt (and nothing else)."""
  src_rows = [br.src.encode_prompt(arith_qa.PROMPT.format(q=q)) for q in questions]
  ids, n = pad(src_rows, br.c.data.src_len, "data.src_len (source prompt)")
  mask = np.arange(ids.shape[1])[None] < n[:, None]
  out = [br._soft(params, br.frozen, jnp.asarray(ids[i:i + 64]), jnp.asarray(mask[i:i + 64]))
         for i in range(0, len(ids), 64)]
  return np.concatenate([np.asarray(o) for o in out])


def bridged_exact_match(br, params, pairs, max_new: int) -> float:
  """Exact match of [soft ; stub] decoding on (question, answer) pairs (the training loop's dev metric)."""
  spk = target_speaker(br)
  stub = br.tgt.encode(arith_qa.STUB)
  soft = soft_tokens(br, params, [q for q, _ in pairs])
  hits = [correct(spk.greedy(stub, max_new, soft[i][None])["text"], a) for i, (_, a) in enumerate(pairs)]
  return float(np.mean(hits)) if hits else float("nan")
