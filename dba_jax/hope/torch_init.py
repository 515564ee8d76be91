"""model.hope.init = torch_default: the HOPE original's parameters as torch draws them (nested_learning sets no
init of its own), for parity runs; the default draws weights from N(0, model.init_std).

A pass over the built decoder's parameters, by name and logical axes (leading stacked-layer axes are kept):
  embed (a "vocab" axis)    nn.Embedding: N(0, 1) (the tied head is the same array)
  *norm*                    nn.LayerNorm: ones / zeros (left as built)
  b<k> beside w<k>          nn.Linear bias: U(±1/sqrt(fan_in of w<k>))
  any other >= 2-D weight   nn.Linear / depthwise nn.Conv1d weight: U(±1/sqrt(fan_in)) (kaiming_uniform, a = √5),
                            fan_in = its first axis (weights are [in, out...] here, torch's [out, in] transposed)
"""
from __future__ import annotations

import jax
from flax import nnx


def _draw(path: tuple, var, weights: dict, key):
  """The torch default for one parameter, or None to leave it as built."""
  names = [str(k) for k in path]
  name, axes, x = names[-1], tuple(var.get_metadata()["axes"]), var.get_value()
  lead = x.ndim - len(axes)  # stacked layers (scan_layers) carry no "layers" in their metadata
  if any("norm" in n for n in names):
    return None
  if "vocab" in axes and name == "embed":
    return jax.random.normal(key, x.shape, x.dtype)
  if len(axes) >= 2:
    fan_in = x.shape[lead]
  elif name.startswith("b") and path[:-1] + ("w" + name[1:],) in weights:
    w = weights[path[:-1] + ("w" + name[1:],)]
    fan_in = w.get_value().shape[w.get_value().ndim - len(w.get_metadata()["axes"])]
  else:
    return None
  bound = fan_in ** -0.5
  return jax.random.uniform(key, x.shape, x.dtype, -bound, bound)


def apply(decoder, rngs: nnx.Rngs):
  """Redraw the decoder's parameters in place with torch's defaults (the module docstring)."""
  key = rngs.params()
  flat = list(nnx.to_flat_state(nnx.state(decoder, nnx.Param)))
  weights = {tuple(path): var for path, var in flat}
  for i, (path, var) in enumerate(flat):
    new = _draw(tuple(path), var, weights, jax.random.fold_in(key, i))
    if new is not None:
      var.set_value(new)
