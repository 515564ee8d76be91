"""`dba-latentwire-train --config=configs/latentwire.py:bridge_k8 --source DIR --target DIR --workdir DIR`.

Trains the translator between two frozen LMs (dba-train workdirs or dba-convert'ed Hugging Face models, each with
its own tokenizer; dba_jax/latentwire/bridge.py) on the configured task's training split (data.task: synthetic
arithmetic, or local GSM8K / SQuAD jsonl files, dba_jax/latentwire/tasks.py): target input [open ids ; soft tokens ;
stub ; answer] (open ids: the BOS the target's tokenizer opens a text with, if any), loss = answer NLL + kl_weight·KL (after warmup) +
nce_weight·InfoNCE (after warmup / 2) (dba_jax/latentwire/losses.py). AdamW (0.9, 0.98) in three groups: matrices
and queries with weight decay, biases and norms without, the tanh gates at gate_lr_mult x lr without; linear warmup
then linear decay to 0; global-norm clipping; float32 weights and compute. The frozen LMs' params are placed on the
mesh (mesh.shape, default all devices on fsdp) by their logical axes; the translator is replicated.

Every train.eval_every steps the bridged target answers the dev questions (exact match; the original's early
stopping): the best state so far is kept in DIR/best (the bridge dba-eval latentwire reads), and with
train.patience > 0 training stops after that many evaluations without improvement. The workdir works as dba-train's:
a new or empty directory starts a run, one holding this bridge resumes from its latest good checkpoint (the early-
stopping state is rebuilt from eval.jsonl), anything else is refused (exit 2). Logs step, losses, gates and tokens/s
to stderr and metrics.jsonl; dev exact match to eval.jsonl.

With --config=configs/latentwire.py:interlingua (model.kind="interlingua") the same loop trains the interlingua
instead: byte encoder -> M latents -> one adapter per receiving LM (dba_jax/latentwire/interlingua.py); --source and
--target still name the two LMs, which both receive.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx

from dba_jax import ckpt, mesh as mesh_lib, rundir
from dba_jax.cli import CommandError, command, entry, flags_of
from dba_jax.configlib import Config, ConfigError, lock
from dba_jax.latentwire import bridge as bridge_lib, interlingua, losses as lw_losses, sides, tasks as tasks_lib
from dba_jax.latentwire.optim import make_optimizer
from dba_jax.signals import StopSignals

# ------------------------------------------------------------------------------------------------- config

SHAPES = {"bridge_k4": 4, "bridge_k8": 8, "bridge_k16": 16, "cpu": 4, "gsm8k_32": 32}


def bridge_config(variant: str = "bridge_k8") -> Config:
  c = Config()
  c.model = m = Config()  # the translator (the workdir guard compares this section)
  m.kind = "bridge"  # bridge | interlingua (dba_jax/latentwire/interlingua.py, its own config)
  m.K = SHAPES[variant]  # soft tokens
  m.b = 64  # bottleneck width
  m.depth = 2
  m.heads = 4
  m.ffn_mult = 4
  m.dropout = 0.1  # on the cross-attention output and the FFN hidden layer, as the original
  m.source_state = "final_norm"  # final_norm (HF hidden_states[-1], what the original read) | pre_norm
  m.rms_clamp = (0.25, 4.0)
  c.loss = ls = Config()
  ls.kl_weight = 0.03
  ls.kl_direction = "student_teacher"  # KL(bridged ‖ text teacher), the original's stated intent | teacher_student
  ls.nce_weight = 0.05
  ls.tau = 0.07
  c.optim = o = Config()
  o.lr = 1e-3
  o.b1, o.b2, o.eps = 0.9, 0.98, 1e-8
  o.weight_decay = 0.01
  o.gate_lr_mult = 3.0
  o.warmup_steps = 100
  o.clip_norm = 1.0
  c.data = d = Config()
  tasks_lib.add_fields(d)  # task, split, prompt, stub, train/dev/test paths (dba_jax/latentwire/tasks.py)
  d.train_seed = 0  # synthetic: draws of train-split problems
  d.train_pairs = 20_000  # synthetic: pool size (a file task's pool is its whole train file)
  d.dev_seed = 1  # synthetic: dev questions (dev facts, another seed than the harness's test draws)
  d.dev_questions = 32  # a file task: the dev file's first rows
  d.src_len, d.tgt_len, d.prompt_len = 128, 32, 64  # padded lengths (source prompt, stub + answer, target prompt)
  d.max_new = 24  # dev decoding budget (target tokens)
  d.eval_batch = 16  # rows decoded at once in the dev evaluation
  c.train = t = Config()
  t.steps = 1500
  t.batch_size = 32
  t.seed = 0
  t.log_every = 25
  t.eval_every = 250
  t.patience = 5  # early stopping: evaluations without a better dev exact match (0: never stop early)
  t.ckpt_every = 250
  t.keep_ckpts = 2
  c.mesh = ms = Config()
  ms.shape = (1, -1, 1)  # (data, fsdp, tensor) for the frozen LMs' params; -1 takes the remaining devices
  c.source = ""  # set from --source / --target (recorded in config.json)
  c.target = ""
  if variant == "cpu":  # tests and smoke runs
    m.b, m.depth, m.heads, m.dropout = 16, 1, 2, 0.0
    o.warmup_steps = 2
    t.steps, t.batch_size, t.log_every, t.eval_every, t.ckpt_every = 4, 4, 1, 2, 2
    d.train_pairs, d.dev_questions, d.max_new = 64, 2, 8
  if variant == "gsm8k_32":  # the original's 2a_stable_32tok between two 7-8B LMs (configs/latentwire.py)
    m.b, m.depth, m.heads = 768, 4, 12
    o.lr, o.warmup_steps = 1e-4, 600
    t.steps, t.batch_size, t.log_every, t.eval_every, t.ckpt_every = 3000, 40, 25, 250, 250
    d.task = "gsm8k"
    d.src_len, d.tgt_len, d.prompt_len = 320, 320, 320  # GSM8K prompts and solutions in 7-8B tokenizers
    d.max_new, d.dev_questions, d.eval_batch = 256, 200, 50
  return lock(c)


def config_for(saved: dict) -> Config:
  """The default config of the kind of run a config.json holds (bridge or interlingua), to merge it over."""
  if saved.get("model", {}).get("kind") == "interlingua":
    return interlingua.interlingua_config()
  return bridge_config("bridge_k8")


def read_config(workdir: str, error=ConfigError) -> Config:
  """A bridge or interlingua workdir's config.json over today's defaults of its kind (dba-train's reader,
  loading.read_config, knows only LM configs); a key those lack is an `error`."""
  return rundir.read_config(workdir, config_for, error)


def make_system(c: Config, src: sides.LM, tgt: sides.LM):
  """A Bridge or an Interlingua (the same interface to the training loop and the harness)."""
  if c.model.kind == "interlingua":
    return interlingua.Interlingua(c, src, tgt)
  return Bridge(c, src, tgt)


def validate(c: Config) -> Config:
  if "kind" not in c.get("model", {}) or "loss" not in c:
    raise ConfigError("--config is not a bridge config (it has no model.kind / loss section: an LM config is "
                      "dba-train's); use e.g. --config=configs/latentwire.py:bridge_k8")
  if c.model.get("kind") == "interlingua":
    return interlingua.validate(c)
  m, ls, o, d, t = c.model, c.loss, c.optim, c.data, c.train
  if m.kind != "bridge":
    raise ConfigError(f"model.kind={m.kind!r} is not one of ['bridge', 'interlingua']")

  def need(ok, msg):
    if not ok:
      raise ConfigError(msg)

  for key in ("K", "b", "depth", "heads", "ffn_mult"):
    need(m[key] > 0, f"model.{key}={m[key]} must be positive")
  need(m.b % m.heads == 0, f"model.b={m.b} is not divisible by model.heads={m.heads}")
  need(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
  need(m.source_state in ("final_norm", "pre_norm"), f"model.source_state={m.source_state!r} is not one of "
       "['final_norm', 'pre_norm']")
  need(len(m.rms_clamp) == 2 and 0 < m.rms_clamp[0] <= m.rms_clamp[1],
       f"model.rms_clamp={tuple(m.rms_clamp)} must be (lo, hi) with 0 < lo <= hi")
  need(ls.kl_direction in lw_losses.KL_DIRECTIONS, f"loss.kl_direction={ls.kl_direction!r} is not one of "
       f"{list(lw_losses.KL_DIRECTIONS)}")
  need(ls.kl_weight >= 0 and ls.nce_weight >= 0 and ls.tau > 0, "loss.kl_weight, loss.nce_weight must be >= 0 and "
       f"loss.tau > 0 (got {ls.kl_weight}, {ls.nce_weight}, {ls.tau})")
  need(o.lr > 0 and o.gate_lr_mult > 0, f"optim.lr={o.lr} and optim.gate_lr_mult={o.gate_lr_mult} must be positive")
  for key in ("train_pairs", "src_len", "tgt_len", "prompt_len", "max_new"):
    need(d[key] > 0, f"data.{key}={d[key]} must be positive")
  need(d.dev_questions >= 0, f"data.dev_questions={d.dev_questions} must be >= 0")
  for key in ("steps", "batch_size", "log_every", "eval_every", "ckpt_every", "keep_ckpts", "eval_batch"):
    sec = d if key == "eval_batch" else t
    need(sec[key] > 0, f"{'data' if key == 'eval_batch' else 'train'}.{key}={sec[key]} must be positive")
  need(t.patience >= 0, f"train.patience={t.patience} must be >= 0")
  need(t.batch_size >= 2 or ls.nce_weight == 0, "InfoNCE needs train.batch_size >= 2 (in-batch negatives)")
  check_task(c)
  return c


def check_task(c: Config):
  """The task section builds (a bad choice, template or missing path is a ConfigError); the files are read later."""
  try:
    tasks_lib.from_config(c.data)
  except tasks_lib.TaskError as e:
    raise ConfigError(str(e)) from None
  if c.train.get("patience", 0) > 0 and c.data.get("task", "synthetic") != "synthetic" and not c.data.dev_path:
    raise ConfigError("train.patience > 0 stops early on the dev exact match: set data.dev_path (or "
                      "--config.train.patience=0)")


# ---------------------------------------------------------------------------------------------- the bridge

class Bridge:
  """Source, target, translator and the jitted steps for one bridge config."""

  def __init__(self, c: Config, src: sides.LM, tgt: sides.LM):
    self.c, self.src, self.tgt = c, src, tgt
    self.task = make_task(c)
    m = c.model
    build = lambda key: bridge_lib.Translator(src.width, tgt.width, m.b, m.K, m.depth, m.heads, m.ffn_mult,
                                              m.dropout, rngs=nnx.Rngs(key))
    self.build = build
    self.graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(0)))
    self.abstract_params = nnx.to_pure_dict(abstract)
    self.target_rms = bridge_lib.target_rms(tgt.model.params["embed"], tgt.vocab)
    self.frozen = {"src": src.model.params, "tgt": tgt.model.params}
    self.tx = make_optimizer(c, self.abstract_params)
    self._soft = jax.jit(self.soft_tokens)
    self._open = jax.jit(lambda tgt_params, soft: sides.with_open(tgt, tgt_params, soft))
    self.train_step = jax.jit(self._train_step, donate_argnums=0)
    self.eval_batch = c.data.get("eval_batch", 16)
    n_open, n_stub = len(tgt.open_ids), len(tgt.encode(self.task.stub))
    self.speaker_len = sides.speaker_len(n_open + m.K + n_stub, c.data.max_new, tgt)
    d = c.data
    for lm, n, what in ((src, d.src_len, "data.src_len"), (tgt, d.prompt_len + d.tgt_len, "data.prompt_len + "
                        "data.tgt_len (the teacher's row)"), (tgt, n_open + m.K + d.tgt_len, "the student's row")):
      if lm.m.positions == "learned" and n > lm.m.max_seq_len:  # no table row past it (a gather would give NaN)
        raise ConfigError(f"{what} = {n} exceeds the {lm.role}'s learned position table ({lm.m.max_seq_len})")

  def init_state(self, seed: int) -> dict:
    params = nnx.to_pure_dict(nnx.state(self.build(seed)))
    return {"params": params, "opt": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}

  def soft_tokens(self, params, frozen, src_ids, src_mask, rng=None):
    """Soft tokens [B, K, target width] after RMS matching; the source runs without gradient."""
    src = nnx.merge(self.src.model.graphdef, frozen["src"])
    h = jax.lax.stop_gradient(bridge_lib.source_states(src, src_ids, self.c.model.source_state))
    soft = nnx.merge(self.graphdef, params)(h, src_mask, rng)
    return bridge_lib.rms_match(soft, self.target_rms, tuple(self.c.model.rms_clamp))

  def loss(self, params, frozen, batch, rng, step):
    c, V = self.c, self.tgt.vocab
    soft = self.soft_tokens(params, frozen, batch["src_ids"], batch["src_mask"], rng)
    tgt = nnx.merge(self.tgt.model.graphdef, frozen["tgt"])
    prefix = sides.with_open(self.tgt, frozen["tgt"], soft)  # [BOS ; soft] where the target's texts open with one
    P, T = prefix.shape[1], batch["tgt_ids"].shape[1]
    student = tgt.forward(batch["tgt_ids"], embeds_BPd=prefix).logits[:, P - 1:P - 1 + T]
    teacher_all = jax.lax.stop_gradient(tgt.forward(batch["teacher_ids"]).logits)
    idx_BT = batch["teacher_off"][:, None] + jnp.arange(T)[None, :] - 1
    teacher = jnp.take_along_axis(teacher_all, idx_BT[:, :, None], axis=1)
    mask = batch["label_mask"]
    nll = lw_losses.answer_nll(student, batch["tgt_ids"], mask, V)
    kl = lw_losses.answer_kl(student, teacher, mask, V, c.loss.kl_direction)
    prompt_emb = jnp.take(frozen["tgt"]["embed"], batch["teacher_ids"], axis=0)
    nce = lw_losses.info_nce(soft, jnp.ones(soft.shape[:2], bool), prompt_emb, batch["prompt_mask"], c.loss.tau)
    warm = c.optim.warmup_steps
    w_kl = jnp.where(step > warm, c.loss.kl_weight, 0.0)
    w_nce = jnp.where(step > warm // 2, c.loss.nce_weight, 0.0)
    parts = {"nll": nll, "kl": kl, "nce": nce, "teacher_nll": lw_losses.answer_nll(teacher, batch["tgt_ids"], mask, V)}
    return nll + w_kl * kl + w_nce * nce, parts

  def batch(self, examples) -> dict:
    d = self.c.data
    return sides.bridge_batch(self.task, self.src, self.tgt, tasks_lib.as_examples(examples), d.src_len, d.tgt_len,
                              d.prompt_len)

  def describe(self, n_params: int) -> str:
    m = self.c.model
    return (f"bridge K={m.K} b={m.b} depth={m.depth}: {n_params:,} params; source {self.c.source} (width "
            f"{self.src.width}), target {self.c.target} (width {self.tgt.width}, embedding RMS {self.target_rms:.4f})")

  @property
  def tokens_per_step(self) -> int:
    d = self.c.data  # the source prompt, the student [soft ; stub ; answer], the teacher
    return self.c.train.batch_size * (d.src_len + self.c.model.K + d.tgt_len + d.prompt_len + d.tgt_len)

  def progress(self, last: dict) -> str:
    return (f" | nll {last['nll']:.3f} (text {last['teacher_nll']:.3f}) kl {last['kl']:.3f} nce {last['nce']:.3f}"
            f" | gates {last['gate_abs']:.3f}")

  def dev_eval(self, params, examples, max_new: int) -> dict:
    return {"dev_exact_match": sides.bridged_exact_match(self, params, examples, max_new)}

  def _train_step(self, state, frozen, batch, key):
    rng = jax.random.fold_in(key, state["step"]) if self.c.model.dropout > 0 else None
    (loss, parts), grads = jax.value_and_grad(self.loss, has_aux=True)(state["params"], frozen, batch, rng,
                                                                       state["step"])
    updates, opt = self.tx.update(grads, state["opt"], state["params"])
    gates = [jnp.tanh(b[g]).reshape(()) for b in state["params"]["blocks"].values() for g in ("cross_gate", "ffn_gate")]
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads),
               "gate_abs": jnp.mean(jnp.abs(jnp.stack(gates)))}
    new = {"params": optax.apply_updates(state["params"], updates), "opt": opt, "step": state["step"] + 1}
    return new, metrics


TOOL = "dba-latentwire-train"


def batch_at(br: Bridge, pool, step: int) -> dict:
  """The training batch of `step`: drawn from (train.seed, step), so a resumed run sees the same batches."""
  c = br.c
  rng = np.random.default_rng([c.train.seed, step])
  return br.batch([pool[i] for i in rng.integers(len(pool), size=c.train.batch_size)])


# ---------------------------------------------------------------------------------------------------- loop

def make_task(c: Config) -> tasks_lib.Task:
  try:
    return tasks_lib.from_config(c.data)
  except tasks_lib.TaskError as e:
    raise ConfigError(str(e)) from None


def make_mesh(c: Config):
  """The mesh the frozen LMs' params are laid out on (mesh.shape; configs written before it had one: 1 device)."""
  shape = c.get("mesh", {}).get("shape", (1, 1, 1))
  try:
    return mesh_lib.make_mesh(shape)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def task_examples(c: Config, task: tasks_lib.Task, split: str) -> list:
  """The training pool or the dev questions of the configured task (a file task reads its files here)."""
  d = c.data
  try:
    if split == "train":
      return task.examples("train", d.train_pairs if task.name == "synthetic" else None, d.train_seed)
    if task.name != "synthetic" and not task.paths["dev"]:
      return []
    return task.examples("dev", d.dev_questions, d.dev_seed)
  except tasks_lib.TaskError as e:
    raise sides.SideError(str(e)) from None


def load_bridge(workdir: str, src: sides.LM | None = None, tgt: sides.LM | None = None, mesh=None):
  """(Bridge, params, config) of a trained bridge workdir: its best state (DIR/best, the highest dev exact match)
  where it has one, else its latest good checkpoint. Its source and target are those its config.json names; already
  loaded ones may be passed in, and must be those."""
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise sides.SideError(f"bridge {workdir}: no config.json (not a dba-latentwire-train workdir)")
  c = read_config(workdir, sides.SideError)
  for role, lm in (("source", src), ("target", tgt)):
    if lm is not None and os.path.abspath(lm.path) != os.path.abspath(c[role]):
      raise sides.SideError(f"bridge {workdir} was trained with {role} {c[role]}, not {lm.path}")
  try:
    validate(c)
  except ConfigError as e:
    raise sides.SideError(f"bridge {workdir}: {e}") from None
  mesh = mesh if mesh is not None else make_mesh(c)
  br = make_system(c, src or sides.load_lm(c.source, "source", mesh), tgt or sides.load_lm(c.target, "target", mesh))
  best = os.path.join(workdir, "best")
  use_best = os.path.isdir(best) and ckpt.Checkpointer(best, read_only=True).all_steps()
  ckpts = ckpt.Checkpointer(best if use_best else os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    step, params = ckpts.restore_for_reading(_placed(br.abstract_params, mesh), what="bridge checkpoint")
  except (ckpt.CheckpointDamaged, ckpt.CheckpointMismatch) as e:  # e.g. written before a parameter was renamed
    raise sides.SideError(f"bridge {workdir}: {e}") from None
  finally:
    ckpts.close()
  br.loaded = {"step": step, "best": bool(use_best)}
  return br, params, c


def _placed(tree, mesh=None):
  """Abstract arrays replicated over the mesh (one device without one): what a bridge checkpoint restores into."""
  where = mesh_lib.replicated(mesh) if mesh is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where), tree)


def dev_score(ems: dict) -> float:
  """The early-stopping score of a dev evaluation: the bridged (or interlingua target's) dev exact match."""
  return float(ems["dev_exact_match"])


class EarlyStop:
  """Best dev score so far, its step, and evaluations since it improved (rebuilt from eval.jsonl on resume)."""

  def __init__(self, patience: int):
    self.patience, self.best, self.best_step, self.bad = patience, -1.0, None, 0

  def update(self, step: int, score: float) -> bool:
    """Records an evaluation; True when it is a new best (strictly higher: the earlier state wins a tie)."""
    if score > self.best:
      self.best, self.best_step, self.bad = score, step, 0
      return True
    self.bad += 1
    return False

  @property
  def stop(self) -> bool:
    return self.patience > 0 and self.bad >= self.patience

  @classmethod
  def replay(cls, patience: int, path: str) -> "EarlyStop":
    es = cls(patience)
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          rec = json.loads(line)
          if "dev_exact_match" in rec:
            es.update(rec["step"], dev_score(rec))
    return es


def train(c: Config, workdir: str, quiet: bool = False, stop: StopSignals | None = None) -> dict:
  """Trains (or resumes) the translator in `workdir`. The workdir guard is dba-train's (rundir.check_workdir) with a
  bridge's reader: a different model section or kind of run (bridge / interlingua), or other LMs, are refused.
  `stop`: the command's signal handler (installed here if not given); the first signal saves and stops."""
  stop = stop if stop is not None else StopSignals()
  with stop:
    return _train(c, workdir, quiet, stop)


def _train(c: Config, workdir: str, quiet: bool, stop: StopSignals) -> dict:
  validate(c)
  workdir = os.path.abspath(workdir)
  resuming = rundir.check_workdir(c, workdir, read_config, tool=TOOL)
  if resuming:
    saved = rundir.read_saved(workdir)
    moved = [k for k in ("source", "target") if os.path.abspath(saved[k]) != os.path.abspath(c[k])]
    if moved:
      raise ConfigError(f"{workdir} holds a bridge for " + ", ".join(f"{k} {saved[k]}" for k in moved)
                        + "; use another --workdir")
  mesh = make_mesh(c)
  br = make_system(c, sides.load_lm(c.source, "source", mesh), sides.load_lm(c.target, "target", mesh))
  task = br.task
  pool, dev = task_examples(c, task, "train"), task_examples(c, task, "dev")
  batch_at(br, pool, 0)  # every length checked before anything is written
  say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
  if stop.received:
    say(f"{stop.received} during start-up: nothing was written; start again with the same command")
    return {"workdir": workdir, "stopped": stop.received, "step": 0}
  rundir.write_config(c, workdir)
  ckpts = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), c.train.keep_ckpts, async_save=False)
  best_ckpts = ckpt.Checkpointer(os.path.join(workdir, "best"), 1, async_save=False)
  rep = mesh_lib.replicated(mesh)
  state = jax.device_put(br.init_state(c.train.seed), rep)  # committed, as the step's outputs: one compile
  restored = ckpts.restore_latest_good(_placed(state["params"], mesh), _placed(state["opt"], mesh)) \
      if resuming else None
  start = 0
  if restored is not None:
    start, params, opt, _ = restored
    state = {"params": params, "opt": opt, "step": jax.device_put(jnp.asarray(start, jnp.int32), rep)}
  for name in ("metrics.jsonl", "eval.jsonl"):
    rundir.truncate_jsonl(os.path.join(workdir, name), start)
  for step in best_ckpts.all_steps():  # a best state from steps about to be run again is not this run's
    if step > start:
      shutil.rmtree(best_ckpts.step_dir(step), ignore_errors=True)
  early = EarlyStop.replay(c.train.patience, os.path.join(workdir, "eval.jsonl"))
  rundir.record_start(c, workdir, start or None, jax.device_count(), TOOL)
  say(br.describe(sum(x.size for x in jax.tree.leaves(state["params"])))
      + (f"; resumed at step {start}" if start else "") + f"; task {task.name} ({len(pool)} training examples, "
      f"{len(dev)} dev questions)")
  key = jax.random.key(c.train.seed)
  log = lambda name, rec: rundir.append_jsonl(os.path.join(workdir, name), rec)
  tokens_per_step = br.tokens_per_step
  progress = rundir.Progress(c.train.steps, quiet=quiet)
  t_mark, step_mark, last = None, start, {}
  frozen = br.frozen
  rows = mesh.shape["data"] * mesh.shape["fsdp"]  # the batch split over the batch axes where it divides
  place = (lambda b: jax.device_put(b, mesh_lib.batch_sharding(mesh))) if c.train.batch_size % rows == 0 and \
      rows > 1 else (lambda b: b)
  try:
    for step in range(start, c.train.steps):
      if early.stop:
        break
      state, metrics = br.train_step(state, frozen, place(batch_at(br, pool, step)), key)
      done = step + 1
      if t_mark is None:
        jax.block_until_ready(metrics)
        t_mark, step_mark = time.perf_counter(), done
      if done % c.train.log_every == 0 or done == c.train.steps:
        now = time.perf_counter()
        tok_s = (done - step_mark) * tokens_per_step / (now - t_mark) if done > step_mark else float("nan")
        last = {"step": done, **{k: float(v) for k, v in jax.device_get(metrics).items()}, "tokens_per_s": tok_s}
        log("metrics.jsonl", last)
        eta = (c.train.steps - done) * (now - t_mark) / (done - step_mark) if done > step_mark else float("inf")
        progress.update(done, last["loss"], tok_s, eta, br.progress(last))
        t_mark, step_mark = now, done
      if dev and (done % c.train.eval_every == 0 or done == c.train.steps):
        ems = br.dev_eval(state["params"], dev, c.data.max_new)
        if early.update(done, dev_score(ems)):
          best_ckpts.save(done, state["params"], {"none": jnp.zeros(())}, {"step": done, **ems})
          best_ckpts.wait()
        log("eval.jsonl", {"step": done, **ems, "dev_questions": len(dev), "best_step": early.best_step,
                           "best_dev_exact_match": early.best})
        say(f"\nstep {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in ems.items()) + f" over {len(dev)} held-out "
            f"questions (best {early.best:.3f} at step {early.best_step})")
        if early.stop:
          say(f"early stop: {early.bad} evaluations without a better dev exact match; the best state (step "
              f"{early.best_step}) is in {workdir}/best")
      stopping = stop.received is not None and done < c.train.steps
      if done % c.train.ckpt_every == 0 or done == c.train.steps or stopping or early.stop:
        stop.saving = f"checkpoint of step {done}" if stopping else None
        ckpts.save(done, state["params"], state["opt"], {"step": done})
        ckpts.wait()
        stop.saving = None
      if stopping:
        say(f"\n{stop.received}: saved a checkpoint at step {done}; exiting. Start again with the same command to "
            "resume.")
        return {"workdir": workdir, "stopped": stop.received, "step": done}
  finally:
    progress.close()
    ckpts.close()
    best_ckpts.close()
  out = {"workdir": workdir, "steps": c.train.steps, **last}
  if dev:
    out.update(best_step=early.best_step, best_dev_exact_match=early.best, early_stopped=early.stop)
  return out


def _flags(fv):
  flags.DEFINE_string("source", None, "the source LM: a dba-train workdir or a dba-convert output", flag_values=fv)
  flags.DEFINE_string("target", None, "the target LM: a dba-train workdir or a dba-convert output", flag_values=fv)
  flags.DEFINE_string("workdir", None, "the bridge's run directory (config, metrics, checkpoints)", flag_values=fv)


@command(TOOL, errors=(ConfigError, sides.SideError, ckpt.CheckpointMismatch))
def main(argv: list[str], stop: StopSignals | None = None) -> int:
  fv = flags_of(argv, _flags, doc=__doc__)
  missing = [f"--{k}" for k in ("config", "source", "target", "workdir") if not getattr(fv, k)]
  if missing:
    raise CommandError(f"{', '.join(missing)} required (see --help)")
  c = fv.config
  c.unlock()
  c.source, c.target = fv.source, fv.target
  c.lock()
  print(json.dumps(train(c, fv.workdir, stop=stop)))
  return 0


cli = entry(main, stops=True)


if __name__ == "__main__":
  cli()
