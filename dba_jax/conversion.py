"""Conversion primitives every checkpoint format shares (dba_jax.formats, dba_jax.addition.checkpoint): the error
type, strict key accounting, and which config fields the user chose."""
from __future__ import annotations

import os

import numpy as np

from dba_jax import rundir
from dba_jax.config import base_config


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


# Config fields the user set on the command line (dba-convert fills this before config_from); a field also
# counts as given when it differs from base_config(), e.g. set by a --config preset.
GIVEN: set[str] = set()


def given(c, field: str) -> bool:
  """Whether config field "section.key" (e.g. "model.n_heads") was chosen by the user rather than defaulted."""
  section, key = field.split(".", 1)
  return field in GIVEN or c[section][key] != base_config()[section][key]


CONTAINERS = ("system_state_dict", "model_state_dict", "state_dict", "model", "model_state")
PREFIXES = ("_orig_mod.", "module.")


def _is_tensor(x) -> bool:
  return isinstance(x, np.ndarray)


def unwrap(obj, source: str) -> tuple[dict, dict]:
  """(state dict with prefixes stripped, the container's other entries, e.g. "config" and "step")."""
  extras: dict = {}
  while isinstance(obj, dict) and not all(_is_tensor(v) for v in obj.values()):
    inner = next((k for k in CONTAINERS if isinstance(obj.get(k), dict)), None)
    if inner is None:
      bad = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not _is_tensor(v)][:8]
      raise ConversionError(f"{source}: not a state dict and no {'/'.join(CONTAINERS)} entry in it; "
                            f"non-tensor entries: {', '.join(bad)}")
    extras = {**{k: v for k, v in obj.items() if k != inner}, **extras}
    obj = obj[inner]
  if not isinstance(obj, dict) or not obj:
    raise ConversionError(f"{source}: holds a {type(obj).__name__}, not a state dict of tensors")
  tensors = {}
  for key, x in obj.items():
    name = str(key)
    for prefix in PREFIXES:  # torch.compile / DataParallel wrappers, in either nesting
      name = name.removeprefix(prefix)
    name = name.removeprefix(PREFIXES[0])
    if name in tensors:
      raise ConversionError(f"{source}: {key} and another key both become {name} without their prefixes")
    tensors[name] = x
  return tensors, extras


def refuse_existing_dir(out: str):
  """An --out that is a file or a non-empty directory is refused: a conversion never overwrites or adds to it; so
  is one that cannot be made (under a file), before any work."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise ConversionError(f"--out {out} exists and is not a directory")
  parent = rundir.nearest_existing(os.path.dirname(os.path.abspath(out)))
  if not os.path.isdir(parent):
    raise ConversionError(f"--out {out}: {parent} is a file, not a directory")
  taken = sorted(os.listdir(out)) if os.path.isdir(out) else []
  if taken:
    raise ConversionError(f"--out {out} is not empty (it holds {taken[:5]}); refusing to overwrite or add to it, "
                          "choose a new or empty directory")


def field_of(section, dotted: str):
  """(the ConfigDict holding a dotted field such as "dba.sem_dim", its last name)."""
  *path, name = dotted.split(".")
  for key in path:
    section = section[key]
  return section, name


def json_safe(x):
  """`x` (metadata read from a checkpoint) with every value JSON can hold as it is and the rest as strings: numpy
  scalars and arrays become numbers and lists; a path (a pathlib object, or the stand-in torch_io reads one
  pickled as) its path string; a numpy scalar read from a pickle (a stand-in of numpy's `scalar`) its number;
  anything else `str(x)`."""
  if isinstance(x, dict):
    return {str(k): json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple, set, frozenset)):
    return [json_safe(v) for v in x]
  if isinstance(x, (np.generic, np.ndarray)):
    return json_safe(x.tolist())
  if x is None or isinstance(x, (str, int, float)):
    return x
  if isinstance(x, os.PathLike):
    return os.fspath(x)
  path = getattr(type(x), "class_path", "")  # a torch_io.StandIn: what the pickle named, never loaded
  args = getattr(x, "args", None)
  if path.startswith("pathlib.") and isinstance(args, tuple) and all(isinstance(a, str) for a in args):
    return os.path.join(*args) if args else "."
  if path.endswith("multiarray.scalar"):
    return json_safe(_pickled_scalar(args))
  return str(x)


def _pickled_scalar(args):
  """numpy's pickle of a scalar is scalar(dtype(code, ...), raw bytes); decoded as data (numbers only)."""
  try:
    dtype, raw = args
    code, state = dtype.args[0], getattr(dtype, "state", None)
    order = state[1] if isinstance(state, tuple) and len(state) > 1 and state[1] in "<>" else "<"
    dt = np.dtype(code).newbyteorder(order)
    if dt.kind in "biuf" and isinstance(raw, bytes) and len(raw) == dt.itemsize:
      return np.frombuffer(raw, dt)[0].item()
  except (TypeError, ValueError, AttributeError, IndexError):
    pass
  return f"numpy scalar {args!r}"
