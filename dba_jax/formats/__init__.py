"""PyTorch checkpoint formats: how each seed system's state-dict keys map onto dba_jax parameters.

A format is a module in this package with:

  NAME: str
  detect(keys: set[str]) -> bool
      True when the (prefix-stripped) state-dict keys are this format's.
  config_from(tensors: dict[str, np.ndarray], c: Config) -> Config
      `c` (from --config and its overrides, or a preset) with every field the tensors' shapes determine set
      from them; raises ConversionError naming the key, the shape and the config field when a shape contradicts
      a field the user set explicitly or the file cannot tell a field (then --config must).
  to_params(tensors, c: Config) -> dict
      the nested params dict of `dba_jax.model.init_params(c.model, key)` (same tree, shapes, float32), built
      tensor by tensor. Every key must be used: `Keys` reports missing and unexpected ones together.
  from_params(params: dict, c: Config) -> dict[str, np.ndarray]
      the inverse: a state dict the original code loads (its key names, shapes and dtypes; float32).

Optional hooks (dba-convert uses them when present):
  config_from_saved(saved, c, tensors) -> Config     a pickled training config (a torch_io.StandIn): what the
      shapes cannot tell, after checking the sizes it names against `tensors`.
  companion_state(path, c, load) -> dict             files beside the checkpoint (optimizer moments, data position).
  trio_paths(out) -> dict / trio(out, state, c, mu, nu, count, meta) -> {path: object}
      --to-torch into the original's training-loop files (model, optimizer, data position).
  layout_of(tensors) / from_params(..., layout=)     a key layout to write back as it came.
  import_file(src, out) / export_dir(workdir, out)   a model family converted file to file.

PyTorch Linear weights are [out, in]; dba_jax kernels are [in, out]. Scanned layers stack every block
parameter on a leading layer axis.
"""
from __future__ import annotations

import importlib

import numpy as np

# Every format dba-convert knows, in detection order; a module not written yet is skipped.
NAMES = ("caramba", "nanogpt", "addition")


class ConversionError(ValueError):
  """A checkpoint does not fit: the message lists every offending key, shape or config field."""


class Keys:
  """Strict key accounting for one conversion: `take` marks a key used (checking its shape), `finish` raises
  one error listing every missing key, unexpected key and shape mismatch."""

  def __init__(self, tensors: dict, source: str = "checkpoint"):
    self.tensors, self.source = tensors, source
    self.used: set[str] = set()
    self.problems: list[str] = []

  def take(self, key: str, shape: tuple | None = None):
    if key not in self.tensors:
      self.problems.append(f"missing key {key}" + (f" (expected shape {tuple(shape)})" if shape else ""))
      return None
    self.used.add(key)
    x = self.tensors[key]
    if not is_float(x):
      self.problems.append(f"{key}: dtype {x.dtype} but a parameter needs a float tensor")
      return None
    if shape is not None and tuple(x.shape) != tuple(shape):
      self.problems.append(f"{key}: shape {tuple(x.shape)} but the config needs {tuple(shape)}")
      return None
    return np.asarray(x, np.float32)

  def ignore(self, predicate):
    """Mark keys that carry no parameters (e.g. nanoGPT's causal-mask `attn.bias` buffers) as used."""
    self.used.update(k for k in self.tensors if predicate(k))

  def finish(self):
    unexpected = sorted(set(self.tensors) - self.used)
    problems = self.problems + [f"unexpected key {k} {tuple(self.tensors[k].shape)}" for k in unexpected]
    if problems:
      raise ConversionError(f"{self.source} does not fit the config ({len(problems)} problem(s)):\n  " +
                            "\n  ".join(problems))


def is_float(x) -> bool:
  return getattr(x, "dtype", None) is not None and (x.dtype.kind == "f" or x.dtype.name == "bfloat16")


def get(name: str):
  """The format module `name`, or None when it does not exist (yet)."""
  try:
    return importlib.import_module(f"{__name__}.{name}")
  except ModuleNotFoundError as e:
    if e.name == f"{__name__}.{name}":
      return None
    raise


def available() -> dict:
  return {name: mod for name in NAMES if (mod := get(name)) is not None}


# Config fields the user set on the command line (dba-convert fills this before config_from); a field also
# counts as given when it differs from base_config(), e.g. set by a --config preset.
GIVEN: set[str] = set()


def given(c, field: str) -> bool:
  """Whether config field "section.key" (e.g. "model.n_heads") was chosen by the user rather than defaulted."""
  from dba_jax.config import base_config
  section, key = field.split(".", 1)
  return field in GIVEN or c[section][key] != base_config()[section][key]
