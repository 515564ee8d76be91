"""The jitted train/eval steps and the training loop with logging, eval and checkpoints (optimizer: optim.py)."""
from __future__ import annotations

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from dba_jax import (attention, ckpt, data, loading, losses, mesh as mesh_lib, model as model_lib, optim, rundir,
                     surgery)
from dba_jax.config import Config, ConfigError, attn_dim, padded_vocab, validate
from dba_jax.hope import step as hope_step
from dba_jax.signals import StopSignals

# ---------------------------------------------------------------------------------------------------- steps


def _with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs that carry their target shardings (what Orbax restores into)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def check_trainable(c: Config):
  if c.model.param_dtype != "float32":
    raise ConfigError(f"model.param_dtype={c.model.param_dtype!r}: dba-train trains float32 parameters (drop it; "
                      "train.init_from reads a bfloat16 run and widens it)")


class Trainer:
  """Builds the model, shardings and jitted steps for one config on one mesh."""

  def __init__(self, c: Config, mesh):
    check_trainable(c)
    self.c, self.mesh = c, mesh
    m = c.model
    self.graphdef, abstract_state = model_lib.abstract(m)
    self.axes = model_lib.param_axes(m, abstract_state)
    self.abstract_params = nnx.to_pure_dict(abstract_state)
    self.param_shardings = mesh_lib.tree_shardings(self.axes, self.abstract_params, mesh)
    self.tx = optim.make_optimizer(c, self.axes)
    self.schedule = optim.lr_schedule(c.optim, c.train.steps)
    abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
    # Optimizer moments mirror the params' sharding; scalars (counts) are replicated.
    self.opt_shardings = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt, self.param_shardings,
                                               transform_non_params=lambda _: mesh_lib.replicated(mesh))
    self.abstract_opt = _with_shardings(abstract_opt, self.opt_shardings)
    self.batch_sharding = mesh_lib.batch_sharding(mesh)
    rep = mesh_lib.replicated(mesh)
    self.state_shardings = {"params": self.param_shardings, "opt": self.opt_shardings, "step": rep, "rng": rep,
                            "nonfinite": rep}
    vocab = m.vocab_size
    ce_chunk = int(c.train.get("ce_chunk", 0))

    def decoder_loss(params, tokens_BT1, key, step=0):
      """(training loss, {"ce", "memory_paper", "memory_repo"}) of one (micro-)batch; the loss adds the configured
      memory penalty, and both forms are logged."""
      del step  # (the HOPE loss's teach schedule reads it)
      model = nnx.merge(self.graphdef, params)
      out = model.forward(tokens_BT1[:, :-1], key if m.dropout > 0 else None)
      aux = dict(out.aux)
      penalty = aux.pop("penalty", None)  # the attention kind's configured memory penalty, a loss term
      if ce_chunk:  # the forward's logits go unused and XLA drops them
        ce = model.readout_nll_mean(out.hidden, tokens_BT1[:, 1:], vocab, ce_chunk)
      else:
        ce = losses.nll(out.logits, tokens_BT1[:, 1:], vocab).mean()
      loss = ce if penalty is None else ce + penalty
      return loss, {"ce": ce, **aux}

    loss_fn = decoder_loss
    penalised = attention.get(m).penalty(m) is not None  # log the loss parts beside the total
    if m.block in hope_step.TWO_PASS_BLOCKS:  # two passes per online chunk, fast state per row
      loss_fn = hope_step.make_loss(c, self.graphdef)

    def train_step(state, tokens_ABT1):
      params = state["params"]
      key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

      def micro(carry, xs):
        tokens, i = xs
        (loss, parts), g = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens, jax.random.fold_in(key, i),
                                                                     state["step"])
        return jax.tree.map(jnp.add, carry, (g, loss, parts)), None

      zero = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
              {k: jnp.zeros((), jnp.float32) for k in ("ce", "memory_paper", "memory_repo")})
      A = tokens_ABT1.shape[0]
      (grads, loss, parts), _ = jax.lax.scan(micro, zero, (tokens_ABT1, jnp.arange(A)))
      grads, loss, parts = jax.tree.map(lambda g: g / A, (grads, loss, parts))
      grad_norm = optax.tree.norm(grads)
      updates, opt = self.tx.update(grads, state["opt"], params)
      # A non-finite loss or gradient leaves params and optimizer untouched; the host reacts per policy.
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      keep = lambda new_, old_: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_, old_)
      new = {"params": keep(optax.apply_updates(params, updates), params), "opt": keep(opt, state["opt"]),
             "step": state["step"] + 1, "rng": state["rng"], "nonfinite": state["nonfinite"] + (~ok).astype(jnp.int32)}
      metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.schedule(state["step"])}
      if penalised:
        metrics.update(parts)
      return new, metrics

    self.loss_fn = loss_fn
    # Batches arrive as [grad_accum, batch, T + 1]: the micro-batch axis is not sharded.
    self.accum_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *self.batch_sharding.spec))
    self.train_step_jit = jax.jit(train_step, in_shardings=(self.state_shardings, self.accum_sharding),
                                  out_shardings=(self.state_shardings, rep), donate_argnums=0)
    self.train_step = self._under_mesh(self.train_step_jit)
    eval_ce = lambda *args: loss_fn(*args)[1]["ce"]
    self.eval_step = self._under_mesh(jax.jit(eval_ce, in_shardings=(self.param_shardings, self.batch_sharding, None),
                                              out_shardings=rep))

  def _under_mesh(self, fn):
    """Trace and run under the mesh so the model's activation constraints (mesh.constrain) take effect."""
    @functools.wraps(fn)  # .__wrapped__ is the jit itself: dba-aot lowers that one
    def wrapped(*args):
      with jax.set_mesh(self.mesh):
        return fn(*args)
    return wrapped

  def init_state(self, seed: int) -> dict:
    m = self.c.model
    key = jax.random.key(seed)
    params = jax.jit(lambda k: model_lib.init_params(m, k), out_shardings=self.param_shardings)(key)
    opt = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
    return {"params": params, "opt": opt, **self.counters(0, jax.random.key_data(jax.random.fold_in(key, 1)), 0)}

  def counters(self, step, rng, nonfinite) -> dict:
    """step, rng key data and non-finite count, committed to the mesh: uncommitted scalars would make the
    second train step recompile."""
    rep = mesh_lib.replicated(self.mesh)
    return {"step": jax.device_put(jnp.asarray(step, jnp.int32), rep),
            "rng": jax.device_put(jnp.asarray(rng, jnp.uint32), rep),
            "nonfinite": jax.device_put(jnp.asarray(nonfinite, jnp.int32), rep)}

  def abstract_params_sharded(self):
    return _with_shardings(self.abstract_params, self.param_shardings)

  def abstract_state(self) -> dict:
    """What init_state returns as ShapeDtypeStructs with their shardings, allocating nothing (dba-aot)."""
    rep = mesh_lib.replicated(self.mesh)
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    scalar = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
    return {"params": self.abstract_params_sharded(), "opt": self.abstract_opt, "step": scalar((), jnp.int32),
            "rng": scalar(rng.shape, jnp.uint32), "nonfinite": scalar((), jnp.int32)}

  def abstract_batch(self) -> jax.ShapeDtypeStruct:
    """The train step's token batch [grad_accum, batch / grad_accum, seq_len + 1] (dba-aot)."""
    t = self.c.train
    return jax.ShapeDtypeStruct((t.grad_accum, t.batch_size // t.grad_accum, self.c.data.seq_len + 1), jnp.int32,
                                sharding=self.accum_sharding)

  def evaluate(self, params, batches_NBT1) -> float:
    key = jax.random.key(0)
    losses = [self.eval_step(params, mesh_lib.global_batch(b, self.batch_sharding), key) for b in batches_NBT1]
    return float(np.mean(jax.device_get(losses)))


# ---------------------------------------------------------------------------------------------------- loop


TOOL = "dba-train"


class TrainingStopped(RuntimeError):
  """The run stopped on purpose (non-finite loss under nonfinite='stop'); the message says why and where."""


def _stop_requested(stop: StopSignals, step: int) -> bool:
  """SIGTERM / SIGINT seen; with several processes, JAX's preemption sync point makes every process agree."""
  if jax.process_count() > 1:
    return multihost_utils.reached_preemption_sync_point(step)
  return stop.received is not None


def initial_params(c: Config, trainer: Trainer):
  """train.init_from's parameters, after train.surgery, placed with this run's shardings (optimizer fresh)."""
  t = c.train
  params = loading.load_model(t.init_from)[0].params
  if t.surgery != "none":
    head_dim = attn_dim(c.model) // c.model.n_heads
    params = surgery.add_head(params, head_dim, at=t.surgery.removeprefix("add_head_"), init=t.surgery_init,
                              key=jax.random.fold_in(jax.random.key(t.seed), 2))
  have = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  want = {jax.tree_util.keystr(p): x.shape for p, x in
          jax.tree_util.tree_flatten_with_path(trainer.abstract_params)[0]}
  bad = [f"{k}: init_from {have.get(k, 'absent')} vs model {want.get(k, 'absent')}"
         for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
  if bad:
    raise ckpt.CheckpointMismatch(f"train.init_from={t.init_from} does not fit this model:\n  " + "\n  ".join(bad))
  params = jax.tree.map(lambda x, a: x.astype(a.dtype), params, trainer.abstract_params)  # a bf16 model widened
  return jax.device_put(params, trainer.param_shardings)


def train(c: Config, workdir: str, quiet: bool = False, stop: StopSignals | None = None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns a summary (final eval loss, params, tokens/s, and `stopped`:
  the signal that ended it early, if one did). `stop`: the command's StopSignals (installed here if not given)."""
  validate(c)
  check_trainable(c)  # before the workdir is touched
  stop = stop if stop is not None else StopSignals()
  with stop:
    return _train(c, workdir, quiet, stop)


def check_batch(t: Config, mesh, processes: int):
  """ConfigError unless the batch splits into micro-batches over the mesh's data-parallel shards and processes."""
  n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
  if t.batch_size % (t.grad_accum * n_batch) or t.batch_size % processes:
    raise ConfigError(f"train.batch_size={t.batch_size} must split into grad_accum={t.grad_accum} micro-batches "
                      f"divisible by the {n_batch} data-parallel shards and by {processes} processes")


def _train(c: Config, workdir: str, quiet: bool, stop: StopSignals) -> dict:
  t = c.train
  workdir = os.path.abspath(workdir)
  # Everything is validated (workdir, data, mesh, model) before the first file is written.
  resuming = rundir.check_workdir(c, workdir, loading.read_config, tool=TOOL)
  splits = data.load_splits(c.data, c.model.vocab_size)
  mesh = mesh_lib.make_mesh(c.mesh.shape, micro_batch=t.batch_size // t.grad_accum)
  check_batch(t, mesh, jax.process_count())
  trainer = Trainer(c, mesh)
  it = data.train_iterator(splits, c.data, t.batch_size, jax.process_index(), jax.process_count())
  local_batch = t.batch_size // jax.process_count()
  evals = data.eval_batches(splits, c.data.seq_len, t.batch_size, t.eval_batches)
  evals = evals[:, jax.process_index() * local_batch:(jax.process_index() + 1) * local_batch]
  lead = jax.process_index() == 0
  say = (lambda msg: None) if quiet or not lead else (lambda msg: print(msg, file=sys.stderr, flush=True))
  summary = {"workdir": workdir, "eval_loss": float("nan"), "tokens_per_s": float("nan"),
             "padded_vocab": padded_vocab(c.model)}
  if stop.received:
    say(f"{stop.received} during start-up: nothing was written; start again with the same command")
    return {**summary, "params": None, "steps": 0, "stopped": stop.received}
  if lead:
    rundir.write_config(c, workdir)
  ckpts = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), t.keep_ckpts, t.async_ckpt)
  broken_dir = os.path.join(workdir, "checkpoints_broken")
  had_checkpoints = resuming and (bool(ckpts.all_steps()) or os.path.isdir(broken_dir))

  restored = ckpts.restore_latest_good(trainer.abstract_params_sharded(), trainer.abstract_opt) if resuming else None
  if restored is None and had_checkpoints:
    if t.on_no_good_checkpoint == "stop":
      ckpts.close()
      raise TrainingStopped(f"no usable checkpoint in {workdir}/checkpoints: every one is broken (kept in "
                            f"{broken_dir}). Set --config.train.on_no_good_checkpoint=restart to train again from "
                            "step 0, discarding what they held")
    say(f"warning: every checkpoint is broken (kept in {broken_dir}); restarting from step 0 "
        "(train.on_no_good_checkpoint=restart)")
  if restored is not None:
    latest, params, opt, meta = restored
    state = {"params": params, "opt": opt, **trainer.counters(meta["step"], meta["rng"], meta["nonfinite"])}
    it.set_state(meta["data"])
  else:
    latest, state = None, trainer.init_state(t.seed)
    if t.init_from:
      state["params"] = initial_params(c, trainer)
  start = int(latest or 0)
  ckpts.check_room(start, state["params"], state["opt"])  # a disk that cannot take a checkpoint: before training
  lead = jax.process_index() == 0
  if lead:
    for name in ("metrics.jsonl", "eval.jsonl"):
      rundir.truncate_jsonl(os.path.join(workdir, name), latest or 0)
    rundir.record_start(c, workdir, latest, jax.device_count(), TOOL)
  writer = None
  if lead:
    from tensorboardX import SummaryWriter  # lazy: TensorBoard (and protobuf) only where the lead process logs
    writer = SummaryWriter(os.path.join(workdir, "tb"))
    writer.add_text("config", "```\n" + c.to_json(indent=2) + "\n```", start)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  tokens_per_step = t.batch_size * c.data.seq_len
  progress = rundir.Progress(t.steps, quiet=quiet or not lead)

  def save(step):
    meta = {"step": step, "rng": np.asarray(jax.device_get(state["rng"])).tolist(), "data": it.get_state(),
            "nonfinite": int(jax.device_get(state["nonfinite"]))}
    ckpts.save(step, state["params"], state["opt"], meta)

  def log(path, rec):
    if lead:
      rundir.append_jsonl(os.path.join(workdir, path), rec)
      for k, v in rec.items():
        if k != "step":
          writer.add_scalar(k, v, rec["step"])

  def check_finite(step):
    """Host check of the in-jit non-finite counter (at log and save points only: no per-step sync)."""
    nonlocal seen_nonfinite
    count = int(jax.device_get(state["nonfinite"]))
    if count == seen_nonfinite:
      return
    new, seen_nonfinite = count - seen_nonfinite, count
    where = f"{new} non-finite loss/gradient step(s) between steps {last_check + 1} and {step}"
    if t.nonfinite == "stop":
      good = ckpts.all_steps()
      raise TrainingStopped(f"{where}; stopping without saving (train.nonfinite='stop'). Last good checkpoint: "
                            f"{ckpts.step_dir(good[-1]) if good else 'none'}")
    say(f"warning: skipped {where} (train.nonfinite='skip'); {count} skipped in total")

  last_eval, tok_s_hist = float("nan"), []
  t_mark, step_mark = None, start
  seen_nonfinite, last_check = int(jax.device_get(state["nonfinite"])), start
  done = start
  try:
    in_flight = None
    for step in range(start, t.steps):
      local = next(it).reshape(t.grad_accum, -1, c.data.seq_len + 1)
      if in_flight is not None:
        # At most two steps queued: without this the host runs up to log_every steps ahead of the device, and a
        # SIGTERM / Ctrl-C then waits for all of them before it can save (minutes on a CPU; a preempted VM has ~30 s).
        jax.block_until_ready(in_flight)
      state, metrics = trainer.train_step(state, mesh_lib.global_batch(local, trainer.accum_sharding, 1))
      in_flight = metrics["loss"]
      done = step + 1
      if t_mark is None:  # the first step includes compilation: time from its end
        jax.block_until_ready(metrics)
        t_mark, step_mark = time.perf_counter(), done
      if done % t.log_every == 0 or done == t.steps:
        check_finite(done)
        last_check = done
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        tok_s = (done - step_mark) * tokens_per_step / (now - t_mark) if done > step_mark else float("nan")
        if done > step_mark:
          tok_s_hist.append(tok_s)
        rec = {"step": done, **{k: float(v) for k, v in metrics.items()}, "tokens_per_s": tok_s}
        log("metrics.jsonl", rec)
        eta = (t.steps - done) * (now - t_mark) / (done - step_mark) if done > step_mark else float("inf")
        progress.update(done, rec["loss"], tok_s, eta, f" | eval {last_eval:.4f}" if last_eval == last_eval else "")
        t_mark, step_mark = now, done
      if done % t.eval_every == 0 or done == t.steps:
        last_eval = trainer.evaluate(state["params"], evals)
        log("eval.jsonl", {"step": done, "eval_loss": last_eval})
      preempted = _stop_requested(stop, done)
      if done % t.ckpt_every == 0 or done == t.steps or preempted:
        check_finite(done)
        last_check = done
        save(done)
      if preempted:
        stop.saving = f"checkpoint of step {done}"
        ckpts.wait()  # the message below is true only once the save is complete
        stop.saving = None
        say(f"\n{stop.received or 'SIGTERM'}: saved a checkpoint at step {done}; exiting. Start again with the "
            "same command to resume.")
        break
  finally:
    progress.close()
    ckpts.close()
    if writer is not None:
      writer.close()
  if start >= t.steps and last_eval != last_eval:
    last_eval = trainer.evaluate(state["params"], evals)
  return {**summary, "params": n_params, "eval_loss": last_eval, "steps": done,
          "tokens_per_s": float(np.median(tok_s_hist)) if tok_s_hist else float("nan"),
          "stopped": stop.received if done < t.steps else None}
