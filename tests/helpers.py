"""Tiny configs, config-file loading, untrained workdirs and subprocess environments shared by the tests."""
import importlib.util
import os

import jax
import jax.numpy as jnp
from flax import nnx

from dba_jax import attention, ckpt, model as model_lib, rundir
from dba_jax.config import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_preset(name: str, variant: str = ""):
  path = os.path.join(REPO, "configs", name)
  spec = importlib.util.spec_from_file_location(name.replace(".py", ""), path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant) if variant else mod.get_config()


def tiny(kind: str = "dba", **model):
  """A 2-layer model config of the given flavour; `model` overrides fields of config.model, or of an attention
  kind's section (model.dba / model.selective) by the field's own name."""
  c = base_config()
  m = c.model
  m.d_model, m.n_layers, m.n_heads, m.d_ff, m.max_seq_len = 32, 2, 4, 64, 32
  if kind == "dba":
    m.attn_kind, m.dba.sem_dim, m.dba.geo_dim, m.attn_dim = "dba", 16, 32, 48
  elif kind == "gqa":
    m.n_kv_heads = 2
  elif kind == "gpt2":
    m.positions, m.norm, m.mlp, m.bias, m.tie_embeddings = "learned", "layernorm", "gelu", True, True
  set_model(m, **model)
  c.data.seq_len = 16
  c.train.batch_size, c.train.steps, c.train.log_every, c.train.eval_every = 8, 4, 1, 2
  c.train.ckpt_every, c.train.eval_batches = 2, 2
  c.optim.warmup_steps = 2
  return c


def owner(m, key: str):
  """The section holding model field `key`: config.model, or an attention kind's section (model.dba, ...)."""
  sections = [k.name for k in attention.KINDS.values() if k.section is not None and k.name in m]
  return next((m[s] for s in sections if key not in m and key in m[s]), m)


def set_model(m, **fields):
  for k, v in fields.items():
    owner(m, k)[k] = v


def layer(decoder, i: int):
  """Block i of a Decoder (sliced out of the stacked parameters when layers are scanned)."""
  if not decoder.m.scan_layers:
    return decoder.blocks[i]
  graphdef, stacked = nnx.split(decoder.blocks)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))


def cli_env(fast_compile: bool = True, **extra) -> dict:
  """The environment of a CLI started as a subprocess: one CPU device, not the 8 this process simulates, and
  otherwise this process's (the compilation cache; conftest.py's JAX_DISABLE_MOST_OPTIMIZATIONS). fast_compile=False
  gives the compiler's default optimisations, for runs long enough that they pay (the quickstart-sized ones)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
  if not fast_compile:
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
  return {**env, **extra}


def untrained_run(workdir, c, seed: int = 0) -> str:
  """A dba_jax workdir, config.json and one checkpoint of the initial parameters, written without a training run:
  what the read-only tools (dba-eval, dba-convert) read, at no train-step compile."""
  rundir.write_config(c, str(workdir))
  saver = ckpt.Checkpointer(os.path.join(str(workdir), "checkpoints"), async_save=False)
  saver.save(1, model_lib.init_params(c.model, jax.random.key(seed)), {"none": jnp.zeros(())}, {"step": 1})
  saver.close()
  return str(workdir)
