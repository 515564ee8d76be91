"""dba_jax: efficient-attention transformer research in JAX / Flax NNX.

`dba_jax.load_model(path)` and `dba_jax.ops` load lazily, so `python -m dba_jax.launch --dry-run` works
before JAX is installed.
"""
import importlib

__all__ = ["load_model", "ops"]


def __getattr__(name):
  if name == "load_model":
    return importlib.import_module("dba_jax.loading").load_model
  if name == "ops":
    return importlib.import_module("dba_jax.ops")
  raise AttributeError(f"module 'dba_jax' has no attribute {name!r}")
