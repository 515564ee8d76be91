"""Distilling the upcycled DBA student from its teacher (docs/upcycle.md §3).

Phase 1, blockwise: one pass of the frozen teacher gives the residual stream before and after every block; each
student block (its DBA attention trained, its copied norms and MLP frozen) learns to map the teacher's input to the
teacher's output. The inputs are the teacher's, so the layers do not depend on each other: all L train at once, in
one jitted step (vmap over the stacked layers), which for a per-parameter optimizer (Adam) is L separate trainings.
Phase 2, KD: the whole student against the teacher's next-token distributions, KL(p_teacher || p_student) at
temperature tau (times tau^2), on the same data stream.

Losses reported (fixed validation batches): the next-token loss of teacher and student, the blockwise relative
error per layer sum ||out_s - out_t||^2 / sum ||out_t - in_t||^2 (over the teacher block's own update), and the KD
loss.
"""
from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dba_jax import losses, model as model_lib


def say(msg: str):
  print(f"dba-upcycle: {msg}", file=sys.stderr, flush=True)


class Net:
  """A model as the distillation uses it: its model config, the Decoder's graphdef and one Block's (the blocks'
  parameters are stacked [L, ...]: model.scan_layers)."""

  def __init__(self, m, graphdef):
    self.m, self.graphdef = m, graphdef
    self.block_def = nnx.split(nnx.eval_shape(lambda: model_lib.Decoder(m, nnx.Rngs(0))).blocks)[0]

  def decoder(self, params):
    return nnx.merge(self.graphdef, params)


def trace(net: Net, params, tokens_BT):
  """(every block's input [L, B, T, d], every block's output [L, B, T, d], logits): the forward of Decoder.forward
  with the residual stream kept between the blocks (each Block called whole: the block math stays in the model)."""
  dec = net.decoder(params)
  positions_T = jnp.arange(tokens_BT.shape[1])
  x = dec.embed_tokens(tokens_BT, positions_T)

  def body(h, p):
    out, _ = nnx.merge(net.block_def, p)(h, positions_T)
    return out, (h, out)

  x, (in_L, out_L) = jax.lax.scan(body, x, params["blocks"])
  return in_L, out_L, dec.readout(x)


def student_blocks(net: Net, blocks, in_LBTd):
  """Every student block on its own input (the teacher's residual stream there): [L, B, T, d]."""
  positions_T = jnp.arange(in_LBTd.shape[2])
  return jax.vmap(lambda p, h: nnx.merge(net.block_def, p)(h, positions_T)[0])(blocks, in_LBTd)


def layer_errors(out_s, out_t, in_t, kind: str):
  """(loss averaged over layers, relative error per layer [L]: sum ||out_s - out_t||^2 over the teacher layer's own
  update sum ||out_t - in_t||^2, so 1.0 is a layer that does nothing)."""
  d = (out_s - out_t).astype(jnp.float32)
  per_layer = jnp.mean(jnp.abs(d) if kind == "l1" else d * d, axis=(1, 2, 3))
  upd = (out_t - in_t).astype(jnp.float32)
  rel = jnp.sum(d * d, axis=(1, 2, 3)) / jnp.maximum(jnp.sum(upd * upd, axis=(1, 2, 3)), 1e-30)
  return jnp.mean(per_layer), rel


def kd_loss(logits_s, logits_t, vocab: int, tau: float):
  """tau^2 * mean over tokens of KL(softmax(t / tau) || softmax(s / tau)) over the first `vocab` logits."""
  ls = jax.nn.log_softmax(logits_s[..., :vocab].astype(jnp.float32) / tau, -1)
  lt = jax.nn.log_softmax(logits_t[..., :vocab].astype(jnp.float32) / tau, -1)
  return tau * tau * jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls), -1))


def lm_loss(logits_BTV, targets_BT, vocab: int):
  return jnp.mean(losses.nll(logits_BTV, targets_BT, vocab))


def optimizer(phase, clip_norm: float):
  """AdamW without weight decay: linear warmup, cosine to lr / 10 over the phase."""
  lr = optax.warmup_cosine_decay_schedule(0.0, phase.lr, phase.warmup_steps, max(phase.steps, phase.warmup_steps + 1),
                                          phase.lr / 10) if phase.warmup_steps else \
      optax.cosine_decay_schedule(phase.lr, max(phase.steps, 1), 0.1)
  adam = optax.adamw(lr, weight_decay=0.0)
  return optax.chain(optax.clip_by_global_norm(clip_norm), adam) if clip_norm > 0 else adam


class Distiller:
  """The teacher, the student and their jitted steps. `params` is the student's (updated by the phases)."""

  def __init__(self, teacher: Net, t_params, student: Net, s_params, u, vocab: int):
    self.t, self.s, self.u, self.vocab = teacher, student, u, vocab
    self.t_params, self.params = t_params, s_params
    self._trace = jax.jit(lambda p, x: trace(teacher, p, x))
    self._student_logits = jax.jit(lambda p, x: student.decoder(p)(x))
    self._student_blocks = jax.jit(lambda p, h: student_blocks(student, p, h))

  # ------------------------------------------------------------------------------------------------ measures

  def evaluate(self, batches) -> dict:
    """Means over the validation batches: teacher / student next-token loss, blockwise relative error (mean and
    per layer), KD loss."""
    rows = []
    for b in batches:
      x, y = jnp.asarray(b[:, :-1]), jnp.asarray(b[:, 1:])
      in_t, out_t, logits_t = self._trace(self.t_params, x)
      _, rel = layer_errors(self._student_blocks(self.params["blocks"], in_t), out_t, in_t, "mse")
      logits_s = self._student_logits(self.params, x)
      rows.append((lm_loss(logits_t, y, self.vocab), lm_loss(logits_s, y, self.vocab), rel,
                   kd_loss(logits_s, logits_t, self.vocab, 1.0)))
    t, s, rel, kd = (np.mean([np.asarray(r[i]) for r in rows], axis=0) for i in range(4))
    return {"teacher_loss": float(t), "student_loss": float(s), "blockwise_rel_err": float(np.mean(rel)),
            "blockwise_rel_err_per_layer": [float(v) for v in rel], "kd_kl": float(kd)}

  # -------------------------------------------------------------------------------------------------- phases

  def blockwise(self, batches) -> list:
    """Phase 1; returns [(step, loss)] logged every u.log_every steps."""
    u, phase = self.u, self.u.blockwise
    tx = optimizer(phase, u.clip_norm)
    attn, blocks = self.params["blocks"]["attn"], self.params["blocks"]
    opt = tx.init(attn)

    @jax.jit
    def step(state, t_params, blocks, x):  # the params are arguments, not constants baked into the program
      attn, opt = state
      in_t, out_t, _ = trace(self.t, t_params, x)
      loss_fn = lambda a: layer_errors(student_blocks(self.s, {**blocks, "attn": a}, in_t), out_t, in_t,
                                       phase.loss)[0]
      loss, g = jax.value_and_grad(loss_fn)(attn)
      upd, opt = tx.update(g, opt, attn)
      return (optax.apply_updates(attn, upd), opt), loss

    (attn, _), log = self._loop("blockwise", phase.steps, batches, lambda st, x: step(st, self.t_params, blocks, x),
                               (attn, opt))
    self.params = {**self.params, "blocks": {**self.params["blocks"], "attn": attn}}
    return log

  def kd(self, batches) -> list:
    """Phase 2; returns [(step, loss)]."""
    u, phase = self.u, self.u.kd
    tx = optimizer(phase, u.clip_norm)
    only_attn = phase.params == "attention"
    train = self.params["blocks"]["attn"] if only_attn else self.params
    opt = tx.init(train)
    frozen = self.params

    def merged(train, frozen):
      return {**frozen, "blocks": {**frozen["blocks"], "attn": train}} if only_attn else train

    @jax.jit
    def step(state, t_params, frozen, x):
      train, opt = state
      logits_t = self.t.decoder(t_params)(x)
      loss_fn = lambda p: kd_loss(self.s.decoder(merged(p, frozen))(x), logits_t, self.vocab, phase.temperature)
      loss, g = jax.value_and_grad(loss_fn)(train)
      upd, opt = tx.update(g, opt, train)
      return (optax.apply_updates(train, upd), opt), loss

    (train, _), log = self._loop("kd", phase.steps, batches, lambda st, x: step(st, self.t_params, frozen, x),
                                 (train, opt))
    self.params = merged(train, frozen)
    return log

  def _loop(self, name: str, steps: int, batches, step, state):
    """`steps` calls of the jitted step((train, opt), tokens) -> ((train, opt), loss); ((train, opt), log)."""
    log, t0 = [], time.time()
    for i in range(1, steps + 1):
      state, loss = step(state, jnp.asarray(next(batches)[:, :-1]))
      if i % self.u.log_every == 0 or i == steps:
        loss = float(loss)
        if not np.isfinite(loss):
          raise FloatingPointError(f"the {name} loss is {loss} at step {i}; lower upcycle.{name}.lr")
        log.append((i, loss))
        say(f"{name} step {i}/{steps}: loss {loss:.5g} ({time.time() - t0:.0f} s)")
    return state, log
