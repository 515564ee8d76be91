"""`dba-upcycle`: a Llama-family checkpoint -> a DBA model (docs/upcycle.md).

  dba-upcycle HF_OR_DBA_DIR --config=configs/dba_upcycle.py:VARIANT --out DIR [--init svd_caramba|svd_joint|random]
              [--config.a.b=value ...] [--upcycle.a.b=value ...]

HF_OR_DBA_DIR is a Hugging Face save_pretrained directory of a Llama-family causal LM (read as dba-convert reads it,
in memory) or a dba_jax workdir holding such a model (dba-convert's output, or a dba-train run). The config file's
get_config(VARIANT) is the student's run config (what dba-train reads afterwards; its data section is also the
distillation data), its get_upcycle(VARIANT) the upcycle settings (dba_jax/upcycle/settings.py). The student is the
teacher with DBA attention: embeddings, norms, MLP and head copied, V / O copied or truncated, Q / K from --init.
Then blockwise distillation and end-to-end KD (upcycle.blockwise, upcycle.kd), with the losses measured before and
after each phase.

DIR becomes a dba_jax workdir, written under a temporary name and renamed at the end (nothing is left when anything
fails or Ctrl-C interrupts, exit 130): config.json, an Orbax checkpoint at step 0 with a fresh optimizer (so
`dba-train --config=configs/from_workdir.py:DIR --config.train.init_from=DIR --workdir=NEW` continues it, and
dba_jax.load_model(DIR) reads it), and the report upcycle.json + upcycle.md. An existing non-empty DIR is refused.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from dba_jax import ckpt, conversion, convert, data, loading, model as model_lib, rundir
from dba_jax.cli import FLAG_ERRORS, HELP, CommandError, check_config_file, command, entry, flag_error
from dba_jax.config import base_config, validate
from dba_jax.configlib import attn_dim, kv_heads, lock
from dba_jax.formats import hf
from dba_jax.upcycle import distill, init as init_lib, settings
from dba_jax.upcycle.init import UpcycleError

PROG = "dba-upcycle"
USAGE = (f"usage: {PROG} HF_OR_DBA_DIR --config=configs/dba_upcycle.py:VARIANT --out DIR "
         "[--init svd_caramba|svd_joint|random] [--config.a.b=value ...] [--upcycle.a.b=value ...]")
# The widths a config with upcycle.teacher_shapes='check' must share with the teacher.
SHAPES = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "rope_base", "norm", "norm_eps", "mlp",
          "tie_embeddings")


# --------------------------------------------------------------------------------------------------- flags

def _config_arg(argv: list[str]) -> str | None:
  value = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if value is None and "--config" in argv[:-1]:
    value = argv[argv.index("--config") + 1]
  return value


def upcycle_settings(config_arg: str | None):
  """The config file's get_upcycle(variant), checked against settings.SECTION (defaults without one)."""
  if not config_arg or ".py" not in config_arg:
    return settings.defaults()
  path, _, variant = config_arg.partition(".py:")
  path = path if path.endswith(".py") else path + ".py"
  spec = importlib.util.spec_from_file_location("dba_upcycle_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if not hasattr(mod, "get_upcycle"):
    return settings.defaults()
  u = mod.get_upcycle(variant) if variant else mod.get_upcycle()
  settings.SECTION.check(u, "upcycle.")
  return u


def parse(argv: list[str]):
  """(flags, positional arguments)."""
  fv = flags.FlagValues()
  if any(a in HELP for a in argv[1:]):
    print(USAGE + "\n\n" + (__doc__ or "").strip() + "\n\nupcycle settings (--upcycle.KEY=value):")
    for key, f in settings.SECTION.fields().items():
      print(f"  {key} = {f.default!r}: {f.doc}")
    raise SystemExit(0)
  config_arg = _config_arg(argv)
  if not config_arg:
    raise CommandError("--config is required (e.g. --config=configs/dba_upcycle.py:tiny)")
  check_config_file(argv)
  config_flags.DEFINE_config_file("config", None, "the student's run config", flag_values=fv, lock_config=True,
                                  sys_argv=list(argv))
  config_flags.DEFINE_config_dict("upcycle", lock(upcycle_settings(config_arg)), "upcycle settings",
                                  flag_values=fv, sys_argv=list(argv))
  flags.DEFINE_string("out", None, "the new workdir", flag_values=fv)
  flags.DEFINE_enum("init", None, list(settings.INITS), "Q/K initialiser (overrides upcycle.init)", flag_values=fv)
  rest = fv(list(argv))
  return fv, rest[1:]


# ------------------------------------------------------------------------------------------------- teacher

def load_teacher(src: str):
  """(params as numpy, config, how it was read): an HF directory converted in memory, or a dba_jax workdir."""
  if not os.path.isdir(src):
    raise UpcycleError(f"{src}: no such directory (give a Hugging Face Llama directory or a dba_jax workdir)")
  if hf.detect_dir(src):
    tensors, extras = hf.read_dir(src)
    c = hf.config_from_saved(extras["config"], base_config(), tensors)
    c = validate(hf.config_from(tensors, c))
    params = hf.to_params(tensors, c)
    return jax.tree.map(np.asarray, params), c, "hf"
  if os.path.exists(os.path.join(src, "config.json")):
    try:
      loading.locate(src)
    except FileNotFoundError as e:
      raise UpcycleError(str(e)) from None
    model, c = loading.load_model(src)
    return jax.tree.map(np.asarray, model.params), c, "dba_jax"
  raise UpcycleError(f"{src}: neither a Hugging Face directory (config.json + model.safetensors) nor a dba_jax "
                     "workdir (config.json + checkpoints/)")


def _even(x: float) -> int:
  return max(2, 2 * int(round(x / 2)))


def student_config(run_c, t_c, u, tokenizer_given: bool):
  """The student's run config: the teacher's model with DBA attention (widths from the config, or derived from the
  teacher's head dim under teacher_shapes='take'), the run config's data / optim / train / mesh."""
  init_lib.check_teacher(t_c.model)
  rm, tm = run_c.model, t_c.model
  if u.teacher_shapes == "check":
    for key in SHAPES:
      if rm[key] != tm[key]:
        raise UpcycleError(f"the config's model.{key}={rm[key]!r} is not the teacher's {tm[key]!r} (another "
                           "checkpoint? upcycle.teacher_shapes='take' adopts the teacher's widths)")
    if kv_heads(rm) != kv_heads(tm):
      raise UpcycleError(f"the config has {kv_heads(rm)} KV heads, the teacher {kv_heads(tm)}")
  c = copy.deepcopy(run_c)
  c.unlock()
  m = copy.deepcopy(tm)
  m.unlock()
  m.attn_kind, m.dba = "dba", copy.deepcopy(rm.dba)
  m.attn_dim = rm.attn_dim
  H, hd = tm.n_heads, attn_dim(tm) // tm.n_heads
  if u.teacher_shapes == "take":
    m.dba.sem_dim = H * _even(u.sem_frac * hd) if u.sem_frac > 0 else rm.dba.sem_dim
    m.dba.geo_dim = H * _even(u.geo_frac * hd) if u.geo_frac > 0 else rm.dba.geo_dim
    m.attn_dim = H * max(1, int(round(u.v_frac * hd)))
  # DBA runs RoPE unscaled (model.rope_scaling belongs to standard attention): the geometric path's frequencies are
  # base^(-2j / d_geo); svd_joint matches them to the teacher's scaled ones (docs/upcycle.md §2.3).
  m.rope_scaling = base_config().model.rope_scaling
  m.param_dtype, m.scan_layers = "float32", True
  m.compute_dtype, m.attn_impl, m.scan_unroll = rm.compute_dtype, rm.attn_impl, rm.scan_unroll
  if m.dba.tie_qk:
    raise UpcycleError("model.dba.tie_qk=True has no k_sem to initialise; upcycling builds separate q and k")
  c.model = m
  if not tokenizer_given:
    c.data.tokenizer = t_c.data.tokenizer  # the teacher's own tokens
  return validate(lock(c))


# -------------------------------------------------------------------------------------------------- output

def kv_bytes(m, nbytes: int = 2) -> dict:
  elems = model_lib.kv_elems_per_token(m)
  return {"elems_per_token": elems, "bytes_per_token_16bit": elems * nbytes}


def write_workdir(out: str, c, params: dict, report: dict, src: str):
  """config.json, the Orbax checkpoint (step 0, fresh dba-train optimizer state) and the report, all under a
  temporary name renamed to `out` at the end."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with rundir.atomic_output(out) as tmp:
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      f.write(c.to_json(indent=2))
    with open(os.path.join(tmp, "upcycle.json"), "w") as f:
      json.dump(report, f, indent=2)
    with open(os.path.join(tmp, "upcycle.md"), "w") as f:
      f.write(markdown(report))
    key = jax.random.fold_in(jax.random.key(c.train.seed), 1)  # as Trainer.init_state derives the run's rng
    meta = {"step": 0, "rng": np.asarray(jax.random.key_data(key)).tolist(), "nonfinite": 0,
            "data": {"next_index": 0}, "source": os.path.abspath(src), "format": "dba-upcycle"}
    ckpts = ckpt.Checkpointer(os.path.join(tmp, "checkpoints"), keep=1, async_save=False, host_arrays=True,
                              compress_opt=True)
    try:
      ckpts.save(0, params, convert.optimizer_state(c, params), meta)
    finally:
      ckpts.close()
    conversion.refuse_existing_dir(out)  # nothing appeared there meanwhile


def markdown(r: dict) -> str:
  rows = [("at init", r["at_init"]), (f"after {r['steps']['blockwise']} blockwise steps", r["after_blockwise"]),
          (f"after {r['steps']['kd']} KD steps", r["after_kd"])]
  lines = [f"# dba-upcycle: {r['init']}", "", f"teacher `{r['teacher']}` ({r['teacher_read_as']}); "
           f"teacher next-token loss {r['at_init']['teacher_loss']:.4f}", "",
           "| stage | student loss | blockwise rel. err | KD KL |", "|---|---|---|---|"]
  lines += [f"| {name} | {e['student_loss']:.4f} | {e['blockwise_rel_err']:.4f} | {e['kd_kl']:.4f} |"
            for name, e in rows]
  kv_t, kv_s = r["kv"]["teacher"], r["kv"]["student"]
  lines += ["", f"KV cache per token (16-bit): teacher {kv_t['bytes_per_token_16bit']:,} B, student "
            f"{kv_s['bytes_per_token_16bit']:,} B ({kv_s['elems_per_token'] / kv_t['elems_per_token']:.3f}x)", ""]
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- main

def upcycle(src: str, run_c, u, out: str, tokenizer_given: bool) -> dict:
  t0 = time.time()
  t_params, t_c, read_as = load_teacher(src)
  c = student_config(run_c, t_c, u, tokenizer_given)
  t_m = copy.deepcopy(t_c.model)
  t_m.unlock()
  t_m.scan_layers = True
  t_params = init_lib.stacked(t_params, t_m.n_layers)
  s_m = c.model
  horizon = u.sem_horizon or c.data.seq_len
  plan = init_lib.plan_of(t_m, s_m, u.init, horizon, u.sem_pairs)
  s_init = jax.tree.map(np.asarray, model_lib.init_params(s_m, jax.random.key(u.seed)))
  s_params = init_lib.upcycle_params(t_params, t_m, s_init, s_m, u.init, plan)
  distill.say(f"{src}: {read_as} teacher, {t_m.n_layers} layers, d_model {t_m.d_model}; student DBA sem "
              f"{s_m.dba.sem_dim} geo {s_m.dba.geo_dim} v {attn_dim(s_m)}; init {u.init}")

  splits = data.load_splits(c.data, s_m.vocab_size)
  evals = data.eval_batches(splits, c.data.seq_len, u.batch_size, u.eval_batches)
  d = copy.deepcopy(c.data)
  d.unlock()
  d.seed = u.seed
  batches = data.train_iterator(splits, d, u.batch_size)
  to_jnp = lambda tree: jax.tree.map(jnp.asarray, tree)
  dist = distill.Distiller(distill.Net(t_m, model_lib.abstract(t_m)[0]), to_jnp(t_params),
                           distill.Net(s_m, model_lib.abstract(s_m)[0]), to_jnp(s_params), u, s_m.vocab_size)
  report = {"teacher": os.path.abspath(src), "teacher_read_as": read_as, "init": u.init,
            "upcycle": u.to_dict(), "plan": plan,
            "shapes": {"teacher": {k: t_m[k] for k in ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size")}
                       | {"n_kv_heads": kv_heads(t_m), "head_dim": attn_dim(t_m) // t_m.n_heads},
                       "student": {"sem_dim": s_m.dba.sem_dim, "geo_dim": s_m.dba.geo_dim, "attn_dim": attn_dim(s_m)}},
            "kv": {"teacher": kv_bytes(t_m), "student": kv_bytes(s_m)},
            "data": {"source": c.data.source, "tokenizer": c.data.tokenizer, "seq_len": c.data.seq_len,
                     "batch_size": u.batch_size, "eval_batches": int(evals.shape[0])},
            "steps": {"blockwise": u.blockwise.steps, "kd": u.kd.steps}}
  report["at_init"] = dist.evaluate(evals)
  distill.say(f"at init: teacher loss {report['at_init']['teacher_loss']:.4f}, student "
              f"{report['at_init']['student_loss']:.4f}, blockwise rel. err {report['at_init']['blockwise_rel_err']:.4f}")
  t1 = time.time()
  report["blockwise_log"] = dist.blockwise(batches)
  report["after_blockwise"] = dist.evaluate(evals)
  t2 = time.time()
  report["kd_log"] = dist.kd(batches)
  report["after_kd"] = dist.evaluate(evals)
  report["seconds"] = {"setup": round(t1 - t0, 1), "blockwise": round(t2 - t1, 1), "kd": round(time.time() - t2, 1)}
  for stage in ("after_blockwise", "after_kd"):
    e = report[stage]
    distill.say(f"{stage.replace('_', ' ')}: student loss {e['student_loss']:.4f}, blockwise rel. err "
                f"{e['blockwise_rel_err']:.4f}, KD KL {e['kd_kl']:.4f}")
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), dist.params)
  write_workdir(out, c, params, report, src)
  distill.say(f"wrote {out}")
  return report


@command(PROG, errors=(ValueError, FloatingPointError))
def main(argv: list[str]) -> int:
  try:
    fv, positional = parse(argv)
  except FLAG_ERRORS as e:
    raise CommandError(f"bad flag, --config or override: {flag_error(e)}\n{USAGE}") from None
  if not fv.out:
    raise CommandError("--out is required")
  if len(positional) != 1:
    raise CommandError(f"expected one HF_OR_DBA_DIR, got {positional or 'none'}")
  conversion.refuse_existing_dir(os.path.normpath(fv.out))
  u = copy.deepcopy(fv.upcycle)
  u.unlock()
  if fv.init:
    u.init = fv.init
  settings.SECTION.check(u, "upcycle.")
  validate(fv.config)
  tokenizer_given = any(a.startswith("--config.data.tokenizer") for a in argv)
  upcycle(positional[0], fv.config, lock(u), os.path.normpath(fv.out), tokenizer_given)
  return 0


cli = entry(main)


if __name__ == "__main__":
  cli()
