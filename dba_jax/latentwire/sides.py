"""The two frozen LMs as the bridge and the harness use them: loading (a dba-train workdir or a dba-convert'ed
Hugging Face model, with its own tokenizer; params placed on the mesh by the model's logical axes), prompt encoding,
padding, batched KV-cached greedy decoding with an optional soft-token prefix, log-likelihood scoring, and the
measured KV bytes per token."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dba_jax import arith_qa, data, generate, mesh as mesh_lib, model as model_lib
from dba_jax.loading import load_model


class SideError(ValueError):
  """A source / target / bridge directory, a task file or a length is unusable; the message names it."""


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

  @property
  def open_ids(self) -> np.ndarray:
    """What opens a sequence before any text (Llama's BOS; nothing for GPT-2 or bytes): a soft-token input starts
    with it too, as the text prompt does."""
    return np.asarray(self.tok.prefix_ids, np.int32)

  @functools.cached_property
  def newline_ids(self) -> tuple:
    """Token ids whose text holds a newline (a one-line answer ends at its line)."""
    return tuple(i for i in range(self.tok.vocab_size) if "\n" in self.tok.decode([i]))

  def stop_ids_for(self, task) -> frozenset:
    """The tokenizer's own stops (EOS, generation_config's eos ids), and newline tokens for one-line answers."""
    lines = self.newline_ids if task is None or task.stops_at_newline else ()
    return frozenset(lines) | frozenset(int(i) for i in self.tok.stop_ids)

  @property
  def stop_ids(self) -> frozenset:
    return self.stop_ids_for(None)


def load_lm(path: str, role: str, mesh=None) -> LM:
  """A frozen LM from a dba-train workdir or a dba-convert output (data.tokenizer=hf:DIR: its own tokenizer.json).
  With `mesh`, its params are placed by the model's logical axes (model.param_axes, mesh.LOGICAL_RULES): a 7B model
  is split over the fsdp / tensor axes instead of sitting whole on device 0."""
  try:
    model, c = load_model(path)
    tok = data.get_tokenizer(c.data.tokenizer, c.model.vocab_size)
  except (FileNotFoundError, ValueError, data.DataError) as e:
    raise SideError(f"{role} model {path}: {e}") from None
  model_lib.check_cacheable(c.model)
  if mesh is not None:
    try:
      shardings = mesh_lib.tree_shardings(model_lib.param_axes(c.model), model.params, mesh)
    except ValueError as e:
      raise SideError(f"{role} model {path}: {e}") from None
    model.params = jax.device_put(model.params, shardings)
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


def bridge_batch(task, src: LM, tgt: LM, examples, src_len: int, tgt_len: int, prompt_len: int) -> dict:
  """Host arrays for one batch of examples.

  src_ids/src_mask [B, S]: the source's text prompt. tgt_ids [B, T]: stub + answer + its end (what follows the
  target's open ids and soft tokens); label_mask [B, T]: the answer and its end. teacher_ids [B, Q + T]: the target's
  prompt head (the prompt without its stub), then the same tgt_ids row, so teacher_off[b] + i - 1 is the position
  predicting tgt_ids[b, i]; prompt_mask marks the prompt (head + stub) for InfoNCE."""
  stub = tgt.encode(task.stub)
  src_rows = [src.encode_prompt(task.prompt(ex)) for ex in examples]
  answers = [tgt.encode(task.target_text(ex)) for ex in examples]
  heads = [tgt.encode_prompt(task.head(ex)) for ex in examples]
  src_ids, src_n = pad(src_rows, src_len, "data.src_len (source prompt)")
  tgt_ids, tgt_n = pad([np.concatenate([stub, a]) for a in answers], tgt_len, "data.tgt_len (stub + answer)")
  q_ids, q_n = pad(heads, prompt_len, "data.prompt_len (target question prompt)")
  teacher = np.zeros((len(examples), prompt_len + tgt_len), np.int32)
  for i in range(len(examples)):
    teacher[i, :q_n[i] + tgt_n[i]] = np.concatenate([q_ids[i, :q_n[i]], tgt_ids[i, :tgt_n[i]]])
  pos_T = np.arange(tgt_len)[None]
  pos_QT = np.arange(prompt_len + tgt_len)[None]
  return {"src_ids": src_ids, "src_mask": np.arange(src_len)[None] < src_n[:, None],
          "tgt_ids": tgt_ids, "label_mask": (pos_T >= len(stub)) & (pos_T < tgt_n[:, None]),
          "teacher_ids": teacher, "teacher_off": q_n, "prompt_mask": pos_QT < (q_n + len(stub))[:, None]}


def with_open(lm: LM, params, soft_BKd):
  """[embeddings of the LM's open ids ; soft tokens]: the soft-token input starts as the LM's text does. The raw
  table rows, as embed_tokens takes them before adding learned positions to every row."""
  ids = lm.open_ids
  if not len(ids):
    return soft_BKd
  rows = jnp.take(params["embed"], jnp.asarray(ids), axis=0).astype(soft_BKd.dtype)
  return jnp.concatenate([jnp.broadcast_to(rows[None], (soft_BKd.shape[0],) + rows.shape), soft_BKd], axis=1)


# --------------------------------------------------------------------------------------------------- decoding

def bucket(n: int, room: int) -> int:
  """A prefill length >= n from powers of two (from 16), at most `room` (what is left of the cache)."""
  return min(max(16, 1 << max(n - 1, 0).bit_length()), room)


class Speaker:
  """Greedy KV-cached decoding of one LM through dba_jax.generate's cache and the model's forward, `batch` rows at a
  time (an optional soft-token prefix, the same length for every row, goes in with `embeds_BPd`).

  The cache keeps one position per slot for the whole batch, so rows of different prompt lengths run as one batch
  by position: the batch prefills the tokens every row has (its shortest prompt), then each decoding step feeds
  every row the token at the next position: its next prompt token while it has one, else its last generated
  token. Every row thus sees its own tokens at their own positions, as it would alone (`tests/test_latentwire_tasks
  .py` checks the output equals batch-1 decoding token for token); rows are sorted by length so a batch's prompts
  differ little. Cache policy float32 unless told."""

  def __init__(self, lm: LM, max_len: int, cache: str = "float32", batch: int = 1):
    self.lm, self.batch = lm, int(batch)
    self.gen = generate.Generator(lm.model, cache=cache, max_len=max_len, batch=self.batch)
    graphdef, hook = lm.model.graphdef, self.gen.cache

    def prefill(params, cache_state, prefix_BPd, tokens_BT, n_valid):
      P = 0 if prefix_BPd is None else prefix_BPd.shape[1]
      positions_T = jnp.arange(P + tokens_BT.shape[1])
      hooks = model_lib.Hooks(cache=hook, valid_T=positions_T < n_valid)
      out = nnx.merge(graphdef, params).forward(tokens_BT, positions_T=positions_T, hooks=hooks,
                                                cache_state=cache_state, logits_at=n_valid - 1, embeds_BPd=prefix_BPd)
      return out.logits, out.cache_state

    def score(params, prefix_BPd, tokens_BT, lo_B, hi_B):
      """Sum over positions lo <= j < hi of log p(tokens[j] | everything before it)."""
      out = nnx.merge(graphdef, params).forward(tokens_BT, embeds_BPd=prefix_BPd)
      P = 0 if prefix_BPd is None else prefix_BPd.shape[1]
      at_T = jnp.maximum(P + jnp.arange(tokens_BT.shape[1]) - 1, 0)  # the position predicting token j (j = 0
      # with no prefix predicts nothing: lo >= 1 then)
      logp = jax.nn.log_softmax(jnp.take(out.logits, at_T, axis=1)[..., :lm.vocab].astype(jnp.float32), -1)
      got_BT = jnp.take_along_axis(logp, tokens_BT[:, :, None], axis=-1)[..., 0]
      j = jnp.arange(tokens_BT.shape[1])[None]
      return jnp.where((j >= lo_B[:, None]) & (j < hi_B[:, None]), got_BT, 0.0).sum(-1)

    self._prefill = jax.jit(prefill, donate_argnums=1)
    self._score = jax.jit(score)

  @functools.cached_property
  def kv_bytes_per_token(self) -> int:
    """Bytes one cached token takes, measured from the allocated cache arrays (every layer, K and V)."""
    g = self.gen
    return generate.cache_bytes(g.init_cache()) // (g.batch * g.max_len)

  def greedy(self, ids, max_new: int, prefix_1Pd=None, task=None) -> dict:
    """One row: {"ids": new tokens up to a stop token, "text", "cached": tokens held in the cache at the end}."""
    return self.generate([ids], max_new, None if prefix_1Pd is None else np.asarray(prefix_1Pd)[:1], task)[0]

  def generate(self, rows, max_new: int, prefix_NPd=None, task=None) -> list[dict]:
    """Greedy answers of every row (lists of ids), each with its prefix row if given; in the order given. A row
    ends at a stop token (not kept; EOS, and newline tokens for one-line tasks), when the task says the text is
    finished (gsm8k's "#### n" line), or after max_new tokens."""
    rows = [np.asarray(r, np.int32) for r in rows]
    if any(len(r) == 0 for r in rows):
      raise SideError(f"{self.lm.role}: an empty prompt (a row needs at least one token after its prefix)")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = [None] * len(rows)
    for s in range(0, len(order), self.batch):
      idx = order[s:s + self.batch]
      prefix = None if prefix_NPd is None else np.asarray(prefix_NPd)[idx]
      for i, r in zip(idx, self._run([rows[i] for i in idx], max_new, prefix, task)):
        out[i] = r
    return out

  def _run(self, rows, max_new: int, prefix, task) -> list[dict]:
    B, n_real = self.batch, len(rows)
    rows = rows + [rows[-1]] * (B - n_real)  # filler rows: the fixed batch shape compiles once
    P = 0 if prefix is None else prefix.shape[1]
    n_B = np.array([len(r) for r in rows])
    n0, longest = int(n_B.min()), int(n_B.max())
    if P + longest + max_new > self.gen.max_len:
      raise SideError(f"{self.lm.role}: {P} soft + {longest} prompt tokens + {max_new} new exceed the cache "
                      f"({self.gen.max_len})")
    padded = np.zeros((B, bucket(n0, self.gen.max_len - P)), np.int32)
    for b, r in enumerate(rows):
      padded[b, :n0] = r[:n0]
    pre = None
    if prefix is not None:
      pre = np.concatenate([prefix, np.repeat(prefix[-1:], B - n_real, 0)]) if B > n_real else prefix
      pre = jnp.asarray(pre, jnp.float32)
    logits, cache = self._prefill(self.gen.params, self.gen.init_cache(), pre, jnp.asarray(padded),
                                  jnp.int32(P + n0))
    ids = min(self.lm.vocab, self.lm.tok.vocab_size)  # greedy over ids the tokenizer can write
    nxt = np.asarray(jnp.argmax(logits[:, :ids], -1))
    stop = self.lm.stop_ids_for(task)
    multi_line = task is not None and not task.stops_at_newline
    gen = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    done[n_real:] = True
    capped = np.zeros(B, bool)  # ended without a stop token: its last token never went into the cache
    cur = np.full(B, n0)  # each row's next prompt index
    state = (cache, P + n0)
    while True:
      for b in range(B):  # the logits just read give row b's next token once its prompt is all in
        if done[b] or cur[b] < n_B[b]:
          continue
        tok = int(nxt[b])
        if tok in stop:
          done[b] = True
          continue
        gen[b].append(tok)
        if len(gen[b]) >= max_new or (multi_line and task.finished(self.lm.tok.decode(gen[b]))):
          done[b] = capped[b] = True
      if done.all():
        break
      feed = np.array([rows[b][cur[b]] if cur[b] < n_B[b] else (gen[b][-1] if gen[b] else 0) for b in range(B)],
                      np.int32)
      cur = np.where(cur < n_B, cur + 1, cur)  # rows still in their prompt step along it
      logits, state, _ = self.gen.decode(state, feed)
      nxt = np.asarray(jnp.argmax(logits[:, :ids], -1))
    return [{"ids": gen[b], "text": self.lm.tok.decode(gen[b]),
             "cached": P + int(n_B[b]) + len(gen[b]) - int(capped[b] and len(gen[b]) > 0)} for b in range(n_real)]

  def logprob(self, contexts, continuations, prefix_NPd=None) -> np.ndarray:
    """Sum of log p(continuation | [prefix ;] context) per row (float64 [N]); contexts must be non-empty when there
    is no prefix. A fixed batch and power-of-two lengths keep the compilations few."""
    N = len(contexts)
    P = 0 if prefix_NPd is None else np.asarray(prefix_NPd).shape[1]
    out = np.zeros(N)
    for s in range(0, N, self.batch):
      idx = list(range(s, min(N, s + self.batch)))
      seqs = [np.concatenate([np.asarray(contexts[i], np.int32), np.asarray(continuations[i], np.int32)]) for i in idx]
      longest = max(len(x) for x in seqs)
      if P + longest > self.gen.max_len:
        raise SideError(f"{self.lm.role}: {P} soft + {longest} tokens to score exceed the cache ({self.gen.max_len})")
      L = bucket(longest, self.gen.max_len - P)
      toks = np.zeros((self.batch, L), np.int32)
      lo, hi = np.zeros(self.batch, np.int32), np.zeros(self.batch, np.int32)
      for b, (i, x) in enumerate(zip(idx, seqs)):
        toks[b, :len(x)] = x
        lo[b], hi[b] = len(contexts[i]), len(x)
        if lo[b] == 0 and P == 0:
          raise SideError(f"{self.lm.role}: scoring needs a context or a prefix before the continuation")
      pre = None
      if prefix_NPd is not None:
        pre = np.zeros((self.batch,) + np.asarray(prefix_NPd).shape[1:], np.float32)
        pre[:len(idx)] = np.asarray(prefix_NPd)[idx]
        pre = jnp.asarray(pre)
      out[idx] = np.asarray(self._score(self.gen.params, pre, jnp.asarray(toks), jnp.asarray(lo),
                                        jnp.asarray(hi)))[:len(idx)]
    return out


def correct(text: str, answer: str) -> bool:
  """The synthetic task's strict "####" match (kept for callers that hold a (question, answer text) pair)."""
  got = arith_qa.extract(text)
  return got is not None and got == arith_qa.gold(answer)


# ------------------------------------------------------------- the bridge's soft tokens, decoded by the target

SPEAKER_LEN = 256  # KV-cache length of the synthetic task's decoders (soft tokens + prompt + answer)


def speaker_len(prompt_tokens: int, max_new: int, lm: LM | None = None) -> int:
  """A cache length for prompts up to `prompt_tokens` (soft tokens included) and max_new new tokens: at least
  SPEAKER_LEN, a multiple of 64, within a learned position table."""
  n = max(SPEAKER_LEN, -(-(prompt_tokens + max_new) // 64) * 64)
  if lm is not None and lm.m.positions == "learned":
    n = min(n, lm.m.max_seq_len)
  return n


def target_speaker(br):
  if getattr(br, "_speaker", None) is None:
    br._speaker = Speaker(br.tgt, br.speaker_len, batch=br.eval_batch)
  return br._speaker


def soft_tokens(br, params, examples) -> np.ndarray:
  """Soft tokens [N, K, target width] from the source's reading of each example's text prompt (and nothing else)."""
  src_rows = [br.src.encode_prompt(br.task.prompt(ex)) for ex in examples]
  ids, n = pad(src_rows, br.c.data.src_len, "data.src_len (source prompt)")
  mask = np.arange(ids.shape[1])[None] < n[:, None]
  out = [br._soft(params, br.frozen, jnp.asarray(ids[i:i + 64]), jnp.asarray(mask[i:i + 64]))
         for i in range(0, len(ids), 64)]
  return np.concatenate([np.asarray(o) for o in out])


def bridged_answers(br, soft_NKd, max_new: int) -> list[dict]:
  """The target's greedy answers from [open ids ; soft tokens ; stub] (the question only in the soft tokens)."""
  spk = target_speaker(br)
  prefix = np.asarray(br._open(br.frozen["tgt"], jnp.asarray(soft_NKd, jnp.float32)))
  stub = br.tgt.encode(br.task.stub)
  return spk.generate([stub] * len(soft_NKd), max_new, prefix, br.task)


def bridged_exact_match(br, params, examples, max_new: int) -> float:
  """Exact match of [soft ; stub] decoding on examples (the training loop's dev metric)."""
  if not examples:
    return float("nan")
  outs = bridged_answers(br, soft_tokens(br, params, examples), max_new)
  return float(np.mean([br.task.score(o["text"], ex)[0] for o, ex in zip(outs, examples)]))
