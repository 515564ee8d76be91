"""HOPE's training loss: two passes per online chunk inside the one jitted step (others.md B.6, fixed).

For each batch row (context) the fast state starts at zero and is carried through a lax.scan over the sequence's
online chunks. Per chunk:
  read    logits with meta + fast weights (differentiable in the meta weights; the fast state is stop-gradient);
          CE of the chunk's next tokens → the outer loss;
  teach   δ (teach_norm "row": of each row's mean CE; "batch": of the batch mean, as the original): "global" =
          the closed form (softmax − onehot) · mask / N at the logits, pulled back through the model's readout
          (head and final norm) to the last block's output (every layer gets it); "per_layer" = ∂CE/∂(block ℓ
          output) by autograd; scaled by the schedule, clipped per token; a row whose surprise (hope.surprise_metric) is
          below the threshold skips;
  update  the same forward with the teach signal: every CMS level steps when its period has passed → new fast
          state for the next chunk (stop-gradient, unless hope.grad_through_write: then the next chunks' CE reaches
          whatever shaped the write that is not cut inside a block, e.g. the hybrid's SelfModifier).
Attention sees only its own chunk, so information crosses chunks only through the memory. No host syncs.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dba_jax import losses
from dba_jax.hope import blocks, teach as teach_lib
from dba_jax.layers import Hooks


def chunks_of(c) -> int:
  T, C = c.data.seq_len, c.model.hope.online_chunk or c.data.seq_len
  if T % C:
    raise ValueError(f"hope.online_chunk={C} must divide data.seq_len={T}")
  return T // C


class MemoryPass(NamedTuple):
  ce: jax.Array           # mean CE over the chunks (the outer loss)
  ce_chunks: jax.Array    # [n] mean CE per chunk
  fired: jax.Array        # [n, L, memories]: updates applied per CMS level (then the Titan level), summed over rows
  token_nll: jax.Array    # [B, T] NLL of every next token, read before that chunk's own update
  fast: dict              # the fast state after the last chunk's update (what a later call can start from)


def memory_forward(decoder, tokens_BT1, step, h, vocab: int, training: bool = True, fast0=None) -> MemoryPass:
  """One batch through the two-pass online loop (the module docstring); `training` False: the original's eval mode
  (CMS outputs unclipped), as its memorise-then-score evals run. fast0: the fast state to start from (default zero:
  the meta weights), e.g. one saved after reading an earlier text (dba_jax.hope.memstate)."""
  B, T1 = tokens_BT1.shape
  n = (T1 - 1) // (h.online_chunk or T1 - 1)
  C = (T1 - 1) // n
  inputs = tokens_BT1[:, :-1].reshape(B, n, C).swapaxes(0, 1)
  targets = tokens_BT1[:, 1:].reshape(B, n, C).swapaxes(0, 1)
  chunk = chunk_pass(decoder, step, h, vocab, training)
  fast0 = blocks.init_fast_state(decoder.m, decoder, B) if fast0 is None else fast0
  fast, (ce_n, fired, nll_nBC) = jax.lax.scan(chunk, fast0, (inputs, targets))
  return MemoryPass(ce_n.mean(), ce_n, fired, nll_nBC.swapaxes(0, 1).reshape(B, n * C), fast)


def chunk_pass(decoder, step, h, vocab: int, training: bool = True):
  """chunk(fast, (x_BC, y_BC)) -> (fast after the chunk's update, (ce, fired, nll [B, C])): one online chunk's two
  passes (the module docstring), as memory_forward scans them and as dba_jax.hope.decode runs them at each chunk
  boundary while generating."""
  m = decoder.m
  scale = teach_lib.schedule(step, h.teach_scale, h.teach_warmup, h.teach_decay_start, h.teach_decay_duration)
  hooks = Hooks(training=training)

  def chunk(fast, xs):
    x_BC, y_BC = xs
    B, C = x_BC.shape
    state = fast if h.grad_through_write else jax.lax.stop_gradient(fast)
    mask = jnp.ones(y_BC.shape, bool)
    if h.teach == "per_layer":
      def ce_of(probe):
        out = decoder.forward(x_BC, hooks=hooks, cache_state={**state, "probe": probe})
        nll = losses.nll(out.logits, y_BC, vocab)
        return nll.mean(), (nll, out.logits)
      probe = jnp.zeros((m.n_layers, B, C, m.d_model), jnp.float32)
      (ce, (nll, logits)), delta = jax.value_and_grad(ce_of, has_aux=True)(probe)
    else:
      out = decoder.forward(x_BC, hooks=hooks, cache_state=state)
      logits = out.logits
      nll = losses.nll(out.logits, y_BC, vocab)
      ce = nll.mean()
      d_logits = teach_lib.closed_form(out.logits, y_BC, mask, vocab)
      _, pull = jax.vjp(decoder.readout, out.hidden)  # back through the model's own head and final norm
      delta = jnp.broadcast_to(pull(d_logits.astype(out.logits.dtype))[0], (m.n_layers,) + out.hidden.shape)
    if h.teach_norm == "row":  # each row's memory learns from its own mean CE, not 1/B of it
      delta = delta * B
    s = teach_lib.scale_and_clip(jax.lax.stop_gradient(delta), scale, h.teach_clip)
    gate = teach_lib.gate(h.surprise_metric, h.surprise_threshold, s, mask, nll, logits, vocab)  # [L, B]
    upd = decoder.forward(x_BC, hooks=hooks, cache_state={**state, "teach": s, "gate": gate}).cache_state
    upd = {k: upd[k] for k in fast}  # drop the pass's inputs (teach, gate)
    fired = _updates(upd) - _updates(fast)
    return (upd if h.grad_through_write else jax.lax.stop_gradient(upd)), (ce, fired, nll)

  return chunk


def _updates(state) -> jax.Array:
  """[L, memories] update counts summed over rows: each CMS level, then the hybrid's Titan level if present."""
  counts = [lv["updates"] for lv in state["cms"]] + ([state["titan"]["updates"]] if "titan" in state else [])
  return jnp.stack([c.sum(1) for c in counts], axis=-1)


# Blocks whose memory learns from the teach signal: trained by this two-pass loop. (Titans blocks learn inside their
# own forward and train with the plain next-token loss.)
TWO_PASS_BLOCKS = ("hope_attention", "hope_selfmod", "hope_hybrid")


def make_loss(c, graphdef):
  """loss_fn(params, tokens [B, T + 1], key, step) -> (loss, parts) for train.Trainer."""
  h, vocab = c.model.hope, c.model.vocab_size

  def loss_fn(params, tokens_BT1, key, step=0):
    del key  # no dropout in HOPE blocks
    ce = memory_forward(nnx.merge(graphdef, params), tokens_BT1, step, h, vocab).ce
    zero = jnp.zeros((), jnp.float32)
    return ce, {"ce": ce, "memory_paper": zero, "memory_repo": zero}

  return loss_fn
