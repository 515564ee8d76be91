"""Device mesh and the one table that maps logical axis names to mesh axes."""
from __future__ import annotations

import logging
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
log = logging.getLogger("dba_jax")

# Logical name -> mesh axis (or tuple of axes, or None = replicated). Modules name axes; only this table and
# the config's mesh shape decide the physical layout.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    # activations
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def resolve_shape(shape, n_devices: int, micro_batch: int | None = None) -> tuple[int, ...]:
  """mesh.shape with its -1 filled by the remaining devices. A -1 on a batch axis (data or fsdp) with tensor = 1
  takes only as many devices as the micro-batch splits over and gives the rest to tensor, so one preset runs
  from 1 device to a slice larger than its micro-batch (e.g. the 1B presets' 4 sequences on 64 chips: 4 x 16)."""
  shape = tuple(int(s) for s in shape)
  known = math.prod(s for s in shape if s != -1)
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape={shape}: use positive sizes and at most one -1")
  if -1 in shape:
    if n_devices % known:
      raise ValueError(f"mesh.shape={shape} does not divide the {n_devices} devices")
    rest, axis = n_devices // known, shape.index(-1)
    if micro_batch and axis < 2 and shape[2] == 1 and micro_batch % shape[1 - axis] == 0:
      fit = math.gcd(rest, micro_batch // shape[1 - axis])
      if fit < rest:
        log.info("mesh.shape=%s: the micro-batch of %d splits over %d of the %d devices on %s; tensor takes %d",
                 shape, micro_batch, fit, rest, MESH_AXES[axis], rest // fit)
        shape = tuple(fit if i == axis else (rest // fit if i == 2 else s) for i, s in enumerate(shape))
    shape = tuple(rest if s == -1 else s for s in shape)
  if math.prod(shape) != n_devices:
    raise ValueError(f"mesh.shape={shape} needs {math.prod(shape)} devices but {n_devices} are present")
  return shape


def make_mesh(shape, devices=None, micro_batch: int | None = None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_shape(shape, len(devices), micro_batch)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def spec(logical: tuple, shape: tuple, mesh: Mesh, where: str = "") -> P:
  """PartitionSpec for an array with these logical axes; a dimension that does not divide is an error."""
  out, used = [], set()
  for name, dim in zip(logical, shape):
    axes = LOGICAL_RULES.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)  # size-1 axes shard nothing
    size = math.prod(mesh.shape[a] for a in axes)
    if dim % size:
      raise ValueError(f"{where}: dimension {name}={dim} does not divide over mesh axes {axes} of size {size}; "
                       f"change mesh.shape or the model width")
    used.update(axes)
    out.append(axes if len(axes) > 1 else (axes[0] if axes else None))
  return P(*out)


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh):
  """NamedShardings for a params-like tree, given a tree of logical-axes tuples of the same structure."""
  is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
  paths_axes = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=is_axes)[0]
  shapes = jax.tree.leaves(shapes_tree)
  specs = [NamedSharding(mesh, spec(ax, s.shape, mesh, jax.tree_util.keystr(path)))
           for (path, ax), s in zip(paths_axes, shapes)]
  return jax.tree.unflatten(jax.tree.structure(axes_tree, is_leaf=is_axes), specs)


_dropped: set = set()


def constrain(x: jax.Array, logical: tuple) -> jax.Array:
  """Pin an activation's layout by logical names inside a jit traced under `jax.set_mesh`; a no-op without a
  mesh (plain calls, tests). Where a dimension does not divide its mesh axes the constraint is dropped (XLA then
  picks the layout) and that is logged once per logical axes and shape."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  try:
    return jax.lax.with_sharding_constraint(x, spec(logical, x.shape, mesh, f"activation {logical}"))
  except ValueError as e:
    if (logical, x.shape) not in _dropped:
      _dropped.add((logical, x.shape))
      log.warning("sharding constraint dropped: %s", e)
    return x


def per_shard(fn, in_logical: tuple, out_logical: tuple, *args):
  """Run `fn` (a Pallas kernel: XLA cannot partition it) on each device's block of `args` inside a jit traced
  under `jax.set_mesh`, the blocks laid out by logical names; a plain call without a mesh. Raises ValueError
  when a dimension does not divide its mesh axes (callers fall back to XLA)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return fn(*args)
  in_specs = tuple(spec(lg, a.shape, mesh, "kernel input") for lg, a in zip(in_logical, args))
  out_shape = jax.eval_shape(fn, *args)
  out_specs = spec(out_logical, out_shape.shape, mesh, "kernel output")
  return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def target_platform() -> str:
  """'cpu', 'gpu' or 'tpu': the platform of the mesh being traced under (`jax.set_mesh`), else the default
  backend. A step traced on a CPU host for TPU devices (dba-aot) then makes its TPU choices at trace time."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  name = device.platform if device is not None else jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, spec(("batch",), (mesh.shape["data"] * mesh.shape["fsdp"],), mesh))


def global_batch(local: np.ndarray, sharding: NamedSharding, batch_axis: int = 0) -> jax.Array:
  """A global jax.Array laid out by `sharding` from this process's slice of the batch (along `batch_axis`)."""
  global_shape = list(local.shape)
  global_shape[batch_axis] *= jax.process_count()
  return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))
