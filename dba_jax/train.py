"""Optimizer, the jitted train/eval steps, and the training loop with logging, eval and checkpoints."""
from __future__ import annotations

import functools
import json
import math
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dba_jax import ckpt, data, losses, mesh as mesh_lib, model as model_lib
from dba_jax.config import Config, ConfigError, attn_dim, padded_vocab, validate
from dba_jax.signals import StopSignals

# ------------------------------------------------------------------------------------------------- optimizer


def lr_schedule(o: Config, total_steps: int):
  """Linear warm-up (s+1)/warmup, then cosine from 1 to min_lr_ratio over the remaining steps (times o.lr)."""
  warmup = max(0, int(o.warmup_steps))
  decay_steps = max(1, total_steps - warmup)

  def fn(step):
    s = jnp.asarray(step, jnp.float32)
    warm = (s + 1.0) / max(warmup, 1)
    t = jnp.clip((s - warmup) / decay_steps, 0.0, 1.0)
    cos = o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    return o.lr * jnp.where(s < warmup, warm, cos)

  return fn


# Parameters with their own optimizer group: (lr multiplier from the model config, never weight-decayed).
OWN_GROUPS = {name: "sel_combo_lr_scale" for name in ("sel_combo_w", "sel_combo_b", "sel_latent_w", "sel_latent_b")}


def _by_path(axes_tree, fn):
  """A tree like the params with fn(parameter name, logical axes) at each leaf."""
  is_axes = lambda x: isinstance(x, tuple)
  return jax.tree_util.tree_map_with_path(lambda path, ax: fn(str(path[-1].key), ax), axes_tree, is_leaf=is_axes)


def decay_mask(o: Config, axes_tree):
  """True where weight decay applies: every parameter, or those with >= 2 non-layer axes; never own groups."""
  matrix = lambda ax: o.decay == "all" or sum(a != "layers" for a in ax) >= 2
  return _by_path(axes_tree, lambda name, ax: name not in OWN_GROUPS and matrix(ax))


def lr_multipliers(m: Config, axes_tree):
  """Per-parameter multiplier of the Adam step: own groups' lr scale; under muP, 1/width_mult for matrix-like
  parameters (MuAdamW). Weight decay is applied after it, at the base lr: MuAdamW's wd x width_mult cancels
  its lr / width_mult on the decay term."""
  width_mult = m.d_model / m.mup_base_d_model

  def fn(name, axes):
    if name in OWN_GROUPS:
      return float(m[OWN_GROUPS[name]])
    return 1.0 / width_mult if m.mup and model_lib.mup_matrix_like(axes) else 1.0

  return _by_path(axes_tree, fn)


def make_optimizer(c: Config, axes_tree):
  """clip -> Adam -> per-group lr multipliers -> decoupled weight decay -> schedule (= optax.adamw without groups)."""
  o = c.optim
  parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
  parts.append(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps))
  scales = lr_multipliers(c.model, axes_tree)
  if any(s != 1.0 for s in jax.tree.leaves(scales)):
    parts.append(optax.GradientTransformation(
        lambda _: optax.EmptyState(), lambda u, st, p=None: (jax.tree.map(lambda g, k: g * k, u, scales), st)))
  parts.append(optax.add_decayed_weights(o.weight_decay, mask=decay_mask(o, axes_tree)))
  parts.append(optax.scale_by_learning_rate(lr_schedule(o, c.train.steps)))
  return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------------- steps


def _with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs that carry their target shardings (what Orbax restores into)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


class Trainer:
  """Builds the model, shardings and jitted steps for one config on one mesh."""

  def __init__(self, c: Config, mesh):
    self.c, self.mesh = c, mesh
    m = c.model
    self.graphdef, abstract_state = model_lib.abstract(m)
    self.axes = model_lib.param_axes(m, abstract_state)
    self.abstract_params = nnx.to_pure_dict(abstract_state)
    self.param_shardings = mesh_lib.tree_shardings(self.axes, self.abstract_params, mesh)
    self.tx = make_optimizer(c, self.axes)
    self.schedule = lr_schedule(c.optim, c.train.steps)
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
      aux = out.aux
      if ce_chunk:  # the forward's logits go unused and XLA drops them
        h_BTd = model.final_norm(out.hidden)
        w_Vd = model.embed[...] if model.head is None else model.head.kernel[...].T
        ce = losses.fused_head_nll_mean(h_BTd.reshape(-1, h_BTd.shape[-1]), w_Vd, tokens_BT1[:, 1:].reshape(-1), vocab,
                                        ce_chunk)
      else:
        ce = losses.nll(out.logits, tokens_BT1[:, 1:], vocab).mean()
      loss = ce + m.memory_epsilon * aux["memory_" + m.memory_penalty] if m.memory_penalty != "none" else ce
      return loss, {"ce": ce, **aux}

    loss_fn = decoder_loss
    from dba_jax.hope import step as hope_step
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
      if m.memory_penalty != "none":
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


# ------------------------------------------------------------------------------------------------- workdir


def git_revision() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  if rev.returncode:
    return "unknown"
  return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


OWN_FILES = ("config.json", "runs.jsonl", "metrics.jsonl", "eval.jsonl", "checkpoints", "checkpoints_broken", "tb")


def _empty_trace(path: str) -> bool:
  """An empty file or a directory holding nothing but empty directories: what an interrupted start leaves."""
  if os.path.isdir(path):
    return all(_empty_trace(os.path.join(path, f)) for f in os.listdir(path))
  return os.path.getsize(path) == 0


def check_workdir(c: Config, workdir: str) -> bool:
  """True when the workdir holds an earlier run of this model to resume. Raises ConfigError before anything is
  written when it is a file, cannot be written, holds a different model, or (without config.json) holds anything
  but dba_jax's own empty start-up traces. A missing workdir is a fresh start."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file, not a directory")
  _check_writable(workdir)
  if not os.path.isdir(workdir):
    return False
  cfg_path = os.path.join(workdir, "config.json")
  if os.path.exists(cfg_path):
    from dba_jax import loading
    try:
      # Over today's defaults: a field added since the run started takes its default, so the run still resumes.
      saved = json.loads(loading.read_config(workdir).model.to_json())
    except (ValueError, KeyError) as e:
      raise ConfigError(f"{cfg_path} is unreadable ({e}); it was not written by dba_jax") from None
    now = json.loads(c.model.to_json())
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
      details = ", ".join(f"model.{k}: saved {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff)
      raise ConfigError(f"{workdir} holds a run of a different model ({details}); use another --workdir")
    return True
  foreign = sorted(f for f in os.listdir(workdir)
                   if f != "config.json.tmp" and (f not in OWN_FILES or not _empty_trace(os.path.join(workdir, f))))
  if foreign:
    raise ConfigError(f"{workdir} holds {foreign} but no config.json: not a dba_jax workdir, refusing to write "
                      "there (use a new or empty directory)")
  return False


def _check_writable(workdir: str):
  """The workdir (or the nearest existing parent it would be made in) must accept new files."""
  probe = workdir
  while not os.path.exists(probe):
    probe = os.path.dirname(probe) or "."
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir {workdir}: {probe} is not writable")


def write_config(c: Config, workdir: str):
  """config.json, atomically (temporary file, then rename): the first file a run writes."""
  os.makedirs(workdir, exist_ok=True)
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path):
    with open(cfg_path + ".tmp", "w") as f:
      f.write(c.to_json(indent=2))
    os.replace(cfg_path + ".tmp", cfg_path)


def record_start(c: Config, workdir: str, resumed_from: int | None):
  rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_revision(), "argv": sys.argv,
         "host": socket.gethostname(), "devices": jax.device_count(), "resumed_from": resumed_from,
         "config": json.loads(c.to_json())}
  with open(os.path.join(workdir, "runs.jsonl"), "a") as f:
    f.write(json.dumps(rec) + "\n")


def truncate_jsonl(path: str, last_step: int):
  """Drop records after `last_step`: those steps are about to be re-run from the checkpoint."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
  with open(path + ".tmp", "w") as f:  # a kill mid-write leaves the old file whole
    f.writelines(keep)
  os.replace(path + ".tmp", path)


class Progress:
  """One status line: step, loss, tokens/s and ETA; redrawn in place on a terminal, one line per log otherwise."""

  def __init__(self, total: int, stream=sys.stderr):
    self.total, self.stream, self.tty = total, stream, stream.isatty()

  def update(self, step: int, loss: float, tok_s: float, eta_s: float, extra: str = ""):
    eta = time.strftime("%H:%M:%S", time.gmtime(eta_s)) if math.isfinite(eta_s) else "?"
    line = f"step {step}/{self.total} | loss {loss:.4f} | {tok_s:,.0f} tok/s | ETA {eta}{extra}"
    self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
    self.stream.flush()

  def close(self):
    if self.tty:
      self.stream.write("\n")


# ---------------------------------------------------------------------------------------------------- loop


class TrainingStopped(RuntimeError):
  """The run stopped on purpose (non-finite loss under nonfinite='stop'); the message says why and where."""


def _stop_requested(stop: StopSignals, step: int) -> bool:
  """SIGTERM / SIGINT seen; with several processes, JAX's preemption sync point makes every process agree."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.reached_preemption_sync_point(step)
  return stop.received is not None


def initial_params(c: Config, trainer: Trainer):
  """train.init_from's parameters, after train.surgery, placed with this run's shardings (optimizer fresh)."""
  from dba_jax import loading, surgery
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
  return jax.device_put(params, trainer.param_shardings)


def train(c: Config, workdir: str, quiet: bool = False, stop: StopSignals | None = None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns a summary (final eval loss, params, tokens/s, and `stopped`:
  the signal that ended it early, if one did). `stop`: the command's StopSignals (installed here if not given)."""
  validate(c)
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
  resuming = check_workdir(c, workdir)
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
    write_config(c, workdir)
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
  lead = jax.process_index() == 0
  if lead:
    for name in ("metrics.jsonl", "eval.jsonl"):
      truncate_jsonl(os.path.join(workdir, name), latest or 0)
    record_start(c, workdir, latest)
  start = int(latest or 0)
  writer = None
  if lead:
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(os.path.join(workdir, "tb"))
    writer.add_text("config", "```\n" + c.to_json(indent=2) + "\n```", start)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  tokens_per_step = t.batch_size * c.data.seq_len
  progress = Progress(t.steps, open(os.devnull, "w") if quiet or not lead else sys.stderr)

  def save(step):
    meta = {"step": step, "rng": np.asarray(jax.device_get(state["rng"])).tolist(), "data": it.get_state(),
            "nonfinite": int(jax.device_get(state["nonfinite"]))}
    ckpts.save(step, state["params"], state["opt"], meta)

  def log(path, rec):
    if lead:
      with open(os.path.join(workdir, path), "a") as f:
        f.write(json.dumps(rec) + "\n")
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
