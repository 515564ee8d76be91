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
  detect_dir(path) / read_dir(path) -> (tensors, extras) / write_dir(out, params, c, layout)
      a directory in and out (Hugging Face save_pretrained): extras["config"] goes to config_from_saved,
      extras["layout"] is recorded and handed back to write_dir.

PyTorch Linear weights are [out, in]; dba_jax kernels are [in, out]. Scanned layers stack every block
parameter on a leading layer axis.
"""
from __future__ import annotations

import importlib

# The conversion primitives, here for callers that know them by this package.
from dba_jax.conversion import GIVEN, ConversionError, Keys, given, is_float  # noqa: F401

# Every format dba-convert knows, in detection order; a module not written yet is skipped.
NAMES = ("caramba", "nanogpt", "addition", "hope", "latentwire", "hf")


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
