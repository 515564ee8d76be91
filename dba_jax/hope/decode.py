"""Token-by-token generation for the memory blocks (hope_attention, hope_transformer, hope_selfmod, hope_hybrid,
titans_*): the attention's KV cache and the memory state carried together, equal to the model's chunked forward.

Every token is one Decoder.forward on that token alone, at its absolute position, with
cache_state = {**fast state, "decode": every layer's decode state}: a block whose state holds "decode" runs its
one-token path (blocks.py, selfmod.py, titans_blocks.py). The decode states are layer 0's
`decode_state(batch, max_len)` repeated over layers (blocks.init_decode_state); the step is jitted once, and the
prompt runs through the same step token by token.

HOPE blocks read in online chunks of C tokens. A token reads the fast state as of its chunk's start, and attention
over the chunk's keys up to it (a KV cache of C slots). When the token after a chunk's last input arrives (so all
of the chunk's targets are known), the driver runs that chunk's two passes on the buffered chunk
(dba_jax.hope.step.chunk_pass, the code training and the memory evals run), which moves the fast state. It then
zeroes the decode states for the next chunk. Cost: one one-token forward per token, plus one chunk update (a read
pass with its teach signal, then an update pass, over C tokens) every C tokens.
  C        two-pass blocks: model.hope.online_chunk, else `chunk` (the run's data.seq_len, which `dba-eval
           generate` passes), else model.max_seq_len. hope_transformer trains with the plain loss over whole
           data.seq_len windows (online_chunk plays no part), so its C is `chunk`, else model.max_seq_len.
  numbers  Hooks(training=True) and the teach scale at the end of its warmup, like the memory evals
           (evals/hope_memory.py Scorer): the logits equal hope.step.memory_forward(tokens, teach_warmup,
           training=True)'s read pass.
Titans blocks: each token is one forward (the block tracks its own segments and windows), under the hooks of
decoder.forward(tokens) (training False); the decode states are sized by max_len.

`state` (a dba_jax.hope.memstate directory, or a fast state tree with batch axis 1 or `batch`) seeds the memory. The
prompt then continues the text that state read: its first token is the input after that text's last input (the
text's last token, when the text was read with `dba-eval hope read`), and positions follow the state's
positions_read.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dba_jax import sampling
from dba_jax.hope import blocks, memstate, step as hope_step
from dba_jax.hope.config import HOPE_BLOCKS
from dba_jax.layers import Hooks


def is_memory_block(m) -> bool:
  """Blocks MemoryGenerator decodes (the ordinary KV-cache Generator refuses them)."""
  return m.block.startswith(("hope_", "titans_"))


def decode_chunk(m, chunk: int = 0) -> int:
  """C of a HOPE block (the module docstring); 0 for Titans blocks (no driver-side chunks)."""
  if m.block not in HOPE_BLOCKS:
    return 0
  online = m.hope.online_chunk if m.block in hope_step.TWO_PASS_BLOCKS else 0
  return int(online or chunk or m.max_seq_len)


class MemoryGenerator:
  """Generation for one loaded memory model (dba_jax.model.Model): the API of dba_jax.generate.Generator.

    gen = MemoryGenerator(model, max_len=512, state="runs/mem_after_doc")
    out = gen.generate([prompt_ids], max_new=64)
  max_len bounds prompt + new tokens. A state is (carry, tokens fed); prompts in a batch share one length."""

  def __init__(self, model, max_len: int | None = None, batch: int = 1, state=None, chunk: int = 0,
               start: int | None = None, training: bool | None = None, teach_step: int | None = None):
    m = model.config
    if not is_memory_block(m):
      raise ValueError(f"model.block={m.block!r} has no memory; decode it with dba_jax.generate.Generator")
    self.m, self.graphdef, self.params, self.batch = m, model.graphdef, model.params, int(batch)
    self.max_len = int(max_len or m.max_seq_len)
    self.chunk, two_pass = decode_chunk(m, chunk), m.block in hope_step.TWO_PASS_BLOCKS
    h, C, B = m.hope, self.chunk, self.batch
    training = two_pass if training is None else bool(training)
    teach_step = h.teach_warmup if teach_step is None else teach_step
    decoder = nnx.merge(self.graphdef, self.params)
    self.fast0, info = self._seed(decoder, state)
    self.start = int(info.get("positions_read", 0)) if start is None else int(start)
    self.decode0 = blocks.init_decode_state(m, decoder, B, C or self.max_len)
    self.traces = {"step": 0}

    def step(params, carry, tok_B, r, key, temperature):
      self.traces["step"] += 1
      dec_model = nnx.merge(self.graphdef, params)
      fast, dec, buf = carry["fast"], carry["decode"], carry.get("chunk")
      if C:
        j = r % C
        boundary = (j == 0) & (r > 0)  # the previous chunk's targets are all known now
        if two_pass:
          y_BC = jnp.concatenate([buf[:, 1:], tok_B[:, None]], axis=1)
          update = hope_step.chunk_pass(dec_model, teach_step, h, m.vocab_size, training)
          fast = jax.lax.cond(boundary, lambda f: update(f, (buf, y_BC))[0], lambda f: f, fast)
          buf = jnp.where(jnp.arange(C)[None] == j, tok_B[:, None], buf)
        dec = jax.tree.map(lambda a: jnp.where(boundary, jnp.zeros_like(a), a), dec)
      out = dec_model.forward(tok_B[:, None], positions_T=jnp.reshape(self.start + r, (1,)),
                              hooks=Hooks(training=training), cache_state={**fast, "decode": dec})
      new = {"fast": {k: out.cache_state[k] for k in fast}, "decode": out.cache_state["decode"]}
      if buf is not None:
        new["chunk"] = buf
      logits = out.logits[:, 0]
      return logits, new, sampling.pick(logits, key, temperature, m.vocab_size)

    self._step = jax.jit(step, donate_argnums=1)
    self._two_pass = two_pass

  def _seed(self, decoder, state) -> tuple[dict, dict]:
    """(fast state [L, B, ...], the state's state.json) to start from: zeros (two-pass blocks), none (others), or
    `state`."""
    m, B = self.m, self.batch
    if state is None:
      return (blocks.init_fast_state(m, decoder, B) if m.block in hope_step.TWO_PASS_BLOCKS else {}), {}
    if not memstate.carries_state(m):
      raise memstate.MemStateError(f"model.block={m.block!r} carries no memory state between calls "
                                   "(hope_attention / hope_selfmod / hope_hybrid / titans_mac do)")
    info = {}
    if isinstance(state, str):
      state, info = memstate.load(state, blocks.init_fast_state(m, decoder, 1), m)
    rows = {a.shape[1] for a in jax.tree.leaves(state)}
    if not rows <= {1, B}:
      raise memstate.MemStateError(f"the memory state has {sorted(rows)} rows; this generator decodes {B}")
    return jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a), a.shape[:1] + (B,) + a.shape[2:]), state), info

  def init_cache(self) -> dict:
    """A fresh carry (copies: the step donates it): fast state, decode states, the current chunk's tokens."""
    carry = {"fast": self.fast0, "decode": self.decode0}
    if self._two_pass:
      carry["chunk"] = jnp.zeros((self.batch, self.chunk), jnp.int32)
    return jax.tree.map(lambda a: jnp.array(a, copy=True), carry)

  def _feed(self, state, token_B, key, temperature):
    carry, fed = state
    if fed >= self.max_len:
      raise ValueError(f"the generation is full (max_len={self.max_len} tokens)")
    logits, carry, nxt = self._step(self.params, carry, jnp.asarray(token_B, jnp.int32).reshape(self.batch),
                                    jnp.int32(fed), key, jnp.float32(temperature))
    return logits, (carry, fed + 1), nxt

  def prefill(self, prompt_BP):
    """(logits [B, padded vocab] after the prompt, state): the prompt's tokens through the one-token step."""
    prompt = np.asarray(prompt_BP, np.int32).reshape(self.batch, -1)
    if not 0 < prompt.shape[1] <= self.max_len:
      raise ValueError(f"prompt length {prompt.shape[1]} must be in [1, max_len={self.max_len}]")
    state, key = (self.init_cache(), 0), jax.random.key(0)
    for t in range(prompt.shape[1]):
      logits, state, _ = self._feed(state, prompt[:, t], key, 0.0)
    return logits, state

  def decode(self, state, token_B, key=None, temperature: float = 0.0):
    """Feed one token per row: (logits, state, next token picked from the logits)."""
    return self._feed(state, token_B, jax.random.key(0) if key is None else key, temperature)

  def generate(self, prompt_BP, max_new: int, temperature: float = 0.0, seed: int = 0, stop_tokens=(),
               progress: bool = False) -> dict:
    """dba_jax.sampling.generate on this decoder (the dict of dba_jax.generate.Generator.generate)."""
    return sampling.generate(self, prompt_BP, max_new, temperature, seed, stop_tokens, progress)
