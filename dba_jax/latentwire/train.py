"""`dba-latentwire-train --config=configs/latentwire.py:bridge_k8 --source DIR --target DIR --workdir DIR`.

Trains the translator between two frozen dba_jax LMs (dba_jax/latentwire/bridge.py) on train-split arithmetic
problems: target input [soft tokens ; stub ; answer], loss = answer NLL + kl_weight·KL (after warmup) +
nce_weight·InfoNCE (after warmup / 2) (dba_jax/latentwire/losses.py). AdamW (0.9, 0.98) in three groups: matrices
and queries with weight decay, biases and norms without, the tanh gates at gate_lr_mult x lr without; linear warmup
then linear decay to 0; global-norm clipping; float32 weights and compute. The workdir works as dba-train's: a new
or empty directory starts a run, one holding this bridge resumes from its latest good checkpoint, anything else is
refused (exit 2). Logs step, losses, gates and tokens/s to stderr and metrics.jsonl; dev exact match to eval.jsonl.

With --config=configs/latentwire.py:interlingua (model.kind="interlingua") the same loop trains the interlingua
instead: byte encoder -> M latents -> one adapter per receiving LM (dba_jax/latentwire/interlingua.py); --source and
--target still name the two LMs, which both receive.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx

from dba_jax import arith_qa as synthetic, ckpt, rundir
from dba_jax.cli import CommandError, command, entry, flags_of
from dba_jax.configlib import Config, ConfigError, lock
from dba_jax.latentwire import bridge as bridge_lib, interlingua, losses as lw_losses, sides
from dba_jax.latentwire.optim import make_optimizer
from dba_jax.signals import StopSignals

# ------------------------------------------------------------------------------------------------- config

SHAPES = {"bridge_k4": 4, "bridge_k8": 8, "bridge_k16": 16, "cpu": 4}


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
  d.train_seed = 0  # draws of train-split problems (synthetic.qa_pairs)
  d.train_pairs = 20_000  # pool size
  d.dev_seed = 1  # dev questions: held-out split, another seed than the harness's
  d.dev_questions = 32
  d.src_len, d.tgt_len, d.prompt_len = 128, 32, 64  # padded lengths (source prompt, stub + answer, target prompt)
  d.max_new = 24  # dev decoding budget (target tokens)
  c.train = t = Config()
  t.steps = 1500
  t.batch_size = 32
  t.seed = 0
  t.log_every = 25
  t.eval_every = 250
  t.ckpt_every = 250
  t.keep_ckpts = 2
  c.source = ""  # set from --source / --target (recorded in config.json)
  c.target = ""
  if variant == "cpu":  # tests and smoke runs
    m.b, m.depth, m.heads, m.dropout = 16, 1, 2, 0.0
    o.warmup_steps = 2
    t.steps, t.batch_size, t.log_every, t.eval_every, t.ckpt_every = 4, 4, 1, 2, 2
    d.train_pairs, d.dev_questions, d.max_new = 64, 2, 8
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
  for key in ("steps", "batch_size", "log_every", "eval_every", "ckpt_every", "keep_ckpts"):
    need(t[key] > 0, f"train.{key}={t[key]} must be positive")
  need(t.batch_size >= 2 or ls.nce_weight == 0, "InfoNCE needs train.batch_size >= 2 (in-batch negatives)")
  return c


# ---------------------------------------------------------------------------------------------- the bridge

class Bridge:
  """Source, target, translator and the jitted steps for one bridge config."""

  def __init__(self, c: Config, src: sides.LM, tgt: sides.LM):
    self.c, self.src, self.tgt = c, src, tgt
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
    self.train_step = jax.jit(self._train_step, donate_argnums=0)

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
    K, T = soft.shape[1], batch["tgt_ids"].shape[1]
    student = tgt.forward(batch["tgt_ids"], embeds_BPd=soft).logits[:, K - 1:K - 1 + T]
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

  def batch(self, pairs) -> dict:
    d = self.c.data
    return sides.bridge_batch(self.src, self.tgt, pairs, d.src_len, d.tgt_len, d.prompt_len)

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

  def dev_eval(self, params, pairs, max_new: int) -> dict:
    return {"dev_exact_match": sides.bridged_exact_match(self, params, pairs, max_new)}

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

def load_bridge(workdir: str, src: sides.LM | None = None, tgt: sides.LM | None = None):
  """(Bridge, params, config) of a trained bridge workdir. Its source and target are those its config.json names;
  already loaded ones may be passed in, and must be those."""
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise sides.SideError(f"bridge {workdir}: no config.json (not a dba-latentwire-train workdir)")
  c = read_config(workdir, sides.SideError)
  for role, lm in (("source", src), ("target", tgt)):
    if lm is not None and os.path.abspath(lm.path) != os.path.abspath(c[role]):
      raise sides.SideError(f"bridge {workdir} was trained with {role} {c[role]}, not {lm.path}")
  br = make_system(validate(c), src or sides.load_lm(c.source, "source"), tgt or sides.load_lm(c.target, "target"))
  ckpts = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    _, params = ckpts.restore_for_reading(_placed(br.abstract_params), what="bridge checkpoint")
  except (ckpt.CheckpointDamaged, ckpt.CheckpointMismatch) as e:  # e.g. written before a parameter was renamed
    raise sides.SideError(f"bridge {workdir}: {e}") from None
  finally:
    ckpts.close()
  return br, params, c


def _placed(tree):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)


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
  br = make_system(c, sides.load_lm(c.source, "source"), sides.load_lm(c.target, "target"))
  pool = synthetic.qa_pairs(c.data.train_pairs, c.data.train_seed, "train")
  dev = synthetic.qa_pairs(c.data.dev_questions, c.data.dev_seed, "test")
  batch_at(br, pool, 0)  # every length checked before anything is written
  say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
  if stop.received:
    say(f"{stop.received} during start-up: nothing was written; start again with the same command")
    return {"workdir": workdir, "stopped": stop.received, "step": 0}
  rundir.write_config(c, workdir)
  ckpts = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), c.train.keep_ckpts, async_save=False)
  state = jax.device_put(br.init_state(c.train.seed), jax.devices()[0])  # committed, as the step's outputs: one compile
  restored = ckpts.restore_latest_good(_placed(state["params"]), _placed(state["opt"])) if resuming else None
  start = 0
  if restored is not None:
    start, params, opt, _ = restored
    state = {"params": params, "opt": opt, "step": jnp.asarray(start, jnp.int32)}
  for name in ("metrics.jsonl", "eval.jsonl"):
    rundir.truncate_jsonl(os.path.join(workdir, name), start)
  rundir.record_start(c, workdir, start or None, jax.device_count(), TOOL)
  say(br.describe(sum(x.size for x in jax.tree.leaves(state["params"])))
      + (f"; resumed at step {start}" if start else ""))
  key = jax.random.key(c.train.seed)
  log = lambda name, rec: rundir.append_jsonl(os.path.join(workdir, name), rec)
  tokens_per_step = br.tokens_per_step
  progress = rundir.Progress(c.train.steps, quiet=quiet)
  t_mark, step_mark, last = None, start, {}
  try:
    for step in range(start, c.train.steps):
      state, metrics = br.train_step(state, br.frozen, batch_at(br, pool, step), key)
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
        log("eval.jsonl", {"step": done, **ems, "dev_questions": len(dev)})
        say(f"\nstep {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in ems.items()) + f" over {len(dev)} held-out "
            "questions")
      stopping = stop.received is not None and done < c.train.steps
      if done % c.train.ckpt_every == 0 or done == c.train.steps or stopping:
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
  return {"workdir": workdir, "steps": c.train.steps, **last}


def _flags(fv):
  flags.DEFINE_string("source", None, "the source LM's dba-train workdir", flag_values=fv)
  flags.DEFINE_string("target", None, "the target LM's dba-train workdir", flag_values=fv)
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
