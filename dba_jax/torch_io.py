"""PyTorch checkpoint files as numpy, without torch: the zip `.pt` format, safetensors, and writers.

`load(path)` returns the pickled object with every tensor as a numpy array. Zip-format `.pt` files (torch.save's
default since 1.6) are unpickled here with a restricted Unpickler: tensor storages are memory-mapped straight from
the archive (torch stores them uncompressed), so a conversion touches one tensor at a time and never holds the
file twice. bfloat16 storages are viewed as `ml_dtypes.bfloat16` (a jax dependency), whose float32 cast is the
exact 16-bit shift. Classes that are not tensors or plain containers (a pickled `__main__.GPTConfig`, enums,
numpy scalars, argparse.Namespace, ...) become `StandIn` objects recording their class path and pickled
arguments and state: nothing from the file is imported or executed. The legacy (pre-zip) format is read the same
way (`_load_legacy`), also without torch.

safetensors is read and written here too (header: 8-byte little-endian length, then JSON with dtype, shape and
data_offsets per tensor, then raw little-endian bytes). `save(path, obj)` writes `.safetensors` itself and `.pt`
through torch.save when torch is installed.
"""
from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)


class CheckpointReadError(ValueError):
  """A checkpoint file cannot be read (truncated, corrupt, or an unsupported format); the message names it."""


# --------------------------------------------------------------------------------------------- stand-ins


class StandIn:
  """An object of a class the checkpoint names but that is not loaded here. `class_path` is "module.name",
  `args` what the pickle called it with, `state` what it set afterwards; a dict state is also readable as
  attributes (a stand-in GPTConfig has `.n_head`)."""

  class_path = "?"

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.__dict__.update(args=args, kwargs=kwargs, state=None)
    return obj

  def __init__(self, *args, **kwargs):  # a REDUCE calls the class; __new__ already recorded the arguments
    pass

  def __setstate__(self, state):
    self.__dict__["state"] = state
    # dataclasses with __slots__ pickle (dict or None, slots dict)
    parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
    for part in parts:
      if isinstance(part, dict):
        self.__dict__.update({k: v for k, v in part.items() if isinstance(k, str)})

  def __repr__(self):
    inner = ", ".join([repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()])
    if isinstance(self.state, dict):
      inner = ", ".join(filter(None, [inner] + [f"{k}={v!r}" for k, v in self.state.items()]))
    return f"<{self.class_path}({inner})>"


_STAND_INS: dict[tuple[str, str], type] = {}


def stand_in(module: str, name: str) -> type:
  key = (module, name)
  if key not in _STAND_INS:
    _STAND_INS[key] = type(name, (StandIn,), {"class_path": f"{module}.{name}", "__module__": __name__})
  return _STAND_INS[key]


# ------------------------------------------------------------------------------------------------- dtypes

# torch's legacy typed-storage classes and torch.<dtype> names -> numpy dtypes (little-endian as stored)
STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": BF16,
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "?", "ComplexFloatStorage": "<c8", "ComplexDoubleStorage": "<c16",
    "UntypedStorage": "u1",  # bytes; _rebuild_tensor_v3 passes the dtype separately
}
TORCH_DTYPES = {
    "float64": "<f8", "double": "<f8", "float32": "<f4", "float": "<f4", "float16": "<f2", "half": "<f2",
    "bfloat16": BF16, "int64": "<i8", "long": "<i8", "int32": "<i4", "int": "<i4", "int16": "<i2",
    "short": "<i2", "int8": "i1", "uint8": "u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "bool": "?",
    "complex64": "<c8", "complex128": "<c16",
}


class _TorchDtype:
  """What `torch.float32` (or `torch.FloatStorage`) unpickles to here: just its numpy dtype."""

  def __init__(self, name: str, dtype):
    self.name, self.dtype = name, np.dtype(dtype)

  def __repr__(self):
    return f"torch.{self.name}"


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused):
  """A tensor as a numpy view of its storage: offset, size and stride count elements."""
  size, stride = tuple(size), tuple(stride)
  n = int(np.prod(size, dtype=np.int64))
  if n == 0:
    return np.zeros(size, storage.dtype)
  contiguous = tuple(int(np.prod(size[i + 1:], dtype=np.int64)) for i in range(len(size)))
  if all(s == c or d == 1 for s, c, d in zip(stride, contiguous, size)):
    return storage[offset:offset + n].reshape(size)
  end = offset + 1 + sum((d - 1) * s for d, s in zip(size, stride))
  if min(stride, default=0) < 0 or end > storage.size:
    raise pickle.UnpicklingError(f"tensor view (offset {offset}, size {size}, stride {stride}) exceeds its storage")
  base = storage[offset:end]
  return np.lib.stride_tricks.as_strided(base, size, tuple(s * base.itemsize for s in stride), writeable=False)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *_unused):
  """Newer dtypes (uint16, ...) are saved as untyped byte storages with the dtype beside them."""
  return _rebuild_tensor(storage.view(dtype.dtype), offset, size, stride)


def _rebuild_parameter(data, *_unused):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  return func(*args)  # tensor subclasses (e.g. a Parameter with python attributes) become plain arrays


# Globals a checkpoint may name that are rebuilt for real; everything else is a stand-in.
_TORCH_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,  # a state_dict (BUILD sets its `_metadata`)
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray,
}


def _codecs_encode(text, encoding="utf-8"):
  """Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')."""
  return text.encode(encoding)


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, storage: callable):
    super().__init__(file)
    self._storage = storage

  def find_class(self, module, name):
    if (module, name) in _TORCH_GLOBALS:
      return _TORCH_GLOBALS[(module, name)]
    if module == "_codecs" and name == "encode":
      return _codecs_encode
    if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
      return _TorchDtype(name, STORAGE_DTYPES[name])
    if module == "torch" and name in TORCH_DTYPES:
      return _TorchDtype(name, TORCH_DTYPES[name])
    return stand_in(module, name)

  def persistent_load(self, pid):
    """Zip files: ("storage", type, key, location, numel). Legacy files add view metadata (view key, element
    offset, elements) or None, and name the classes of whole-module saves as ("module", class, file, source)."""
    kind = pid[0].decode("ascii") if isinstance(pid, tuple) and pid and isinstance(pid[0], bytes) else \
        (pid[0] if isinstance(pid, tuple) and pid else None)
    if kind == "module" and len(pid) >= 2:
      return pid[1]
    if kind != "storage" or len(pid) < 5:
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid[:5]
    if not isinstance(storage_type, _TorchDtype):
      raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
    view = pid[5] if len(pid) > 5 else None
    return self._storage(str(key), storage_type.dtype, int(numel), *([view] if view is not None else []))


# ---------------------------------------------------------------------------------------------- zip format


def _member_offset(f, info: zipfile.ZipInfo) -> int:
  """Where a stored member's bytes start: after its local header (whose extra field may differ from the
  central directory's)."""
  f.seek(info.header_offset)
  header = f.read(30)
  if len(header) != 30 or header[:4] != b"PK\x03\x04":
    raise CheckpointReadError("bad local file header")
  name_len, extra_len = struct.unpack("<HH", header[26:30])
  return info.header_offset + 30 + name_len + extra_len


def _load_zip(path: str):
  size = os.path.getsize(path)
  with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
    infos = {i.filename: i for i in zf.infolist()}
    pkls = [n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkls) != 1:
      raise CheckpointReadError(f"expected one data.pkl in the archive, found {pkls}")
    prefix = pkls[0][:-len("data.pkl")]
    order = zf.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in infos else "little"
    if order not in ("little", "big"):
      raise CheckpointReadError(f"unknown byteorder {order!r}")
    cache: dict[str, np.ndarray] = {}

    def storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      if key in cache:  # tied weights share one storage
        return cache[key]
      info = infos.get(f"{prefix}data/{key}")
      if info is None:
        raise CheckpointReadError(f"storage {key} is missing from the archive")
      if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointReadError(f"storage {key} is compressed; torch writes storages uncompressed")
      if order == "big" and dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">")
      if info.file_size != numel * dtype.itemsize:
        raise CheckpointReadError(f"storage {key}: {info.file_size} bytes for {numel} x {dtype}")
      start = _member_offset(f, info)
      if start + info.file_size > size:
        raise CheckpointReadError(f"storage {key} ends at byte {start + info.file_size} of a {size}-byte file")
      arr = np.zeros((0,), dtype) if numel == 0 else \
          np.asarray(np.memmap(path, dtype=dtype, mode="r", offset=start, shape=(numel,)))
      if dtype.byteorder == ">":
        arr = arr.astype(dtype.newbyteorder("<"))
      cache[key] = arr
      return arr

    with zf.open(pkls[0]) as pf:
      return _Unpickler(pf, storage).load()


# ------------------------------------------------------------------------------------------- safetensors

SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": BF16, "I64": "<i8", "I32": "<i4",
                      "I16": "<i2", "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8",
                      "BOOL": "?"}
_SAFETENSORS_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """(tensors memory-mapped from the file, the header's __metadata__)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise CheckpointReadError(f"{path}: truncated safetensors file ({size} bytes)")
    n = struct.unpack("<Q", head)[0]
    if n > size - 8:
      raise CheckpointReadError(f"{path}: header of {n} bytes in a {size}-byte file (truncated or not safetensors)")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointReadError(f"{path}: unreadable safetensors header ({e})") from None
  meta = header.pop("__metadata__", None) or {}
  tensors = {}
  for key, spec in header.items():
    if spec.get("dtype") not in SAFETENSORS_DTYPES:
      raise CheckpointReadError(f"{path}: {key} has unsupported dtype {spec.get('dtype')!r}")
    dtype = np.dtype(SAFETENSORS_DTYPES[spec["dtype"]])
    shape, (begin, end) = tuple(spec["shape"]), spec["data_offsets"]
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != count * dtype.itemsize or 8 + n + end > size:
      raise CheckpointReadError(f"{path}: {key} {spec} does not fit the file ({size} bytes; truncated?)")
    tensors[key] = np.zeros(shape, dtype) if count == 0 else \
        np.asarray(np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=shape))
  return tensors, meta


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None):
  header, offset = {}, 0
  arrays = {}
  for key, x in tensors.items():
    x = np.asarray(x)
    if x.dtype not in _SAFETENSORS_NAMES:
      raise ValueError(f"{key}: dtype {x.dtype} has no safetensors name")
    arrays[key] = x
    header[key] = {"dtype": _SAFETENSORS_NAMES[x.dtype], "shape": list(x.shape),
                   "data_offsets": [offset, offset + x.nbytes]}
    offset += x.nbytes
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the reference writer does
  with open(path, "xb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for x in arrays.values():
      f.write(np.ascontiguousarray(x.astype(x.dtype.newbyteorder("<"), copy=False)).tobytes())


# --------------------------------------------------------------------------------------------------- api


def load(path: str):
  """The object a checkpoint file holds, tensors as numpy arrays (memory-mapped where the format allows).
  `.safetensors` gives a flat dict of arrays."""
  if not os.path.isfile(path):
    raise CheckpointReadError(f"{path}: no such file")
  with open(path, "rb") as f:
    magic = f.read(8)
  try:
    if path.endswith(".safetensors"):
      return read_safetensors(path)[0]
    if magic[:4] == b"PK\x03\x04" or zipfile.is_zipfile(path):
      return _load_zip(path)
    if magic[:2] == b"\x80\x02":  # the legacy format opens with a protocol-2 pickle of torch's magic number
      return _load_legacy(path)
  except CheckpointReadError as e:
    raise CheckpointReadError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
  except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, struct.error, ValueError, OSError) as e:
    raise CheckpointReadError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {e})") from None
  raise CheckpointReadError(f"{path}: not a PyTorch checkpoint (zip or legacy .pt) or .safetensors file")


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization's MAGIC_NUMBER
LEGACY_VERSION = 1001


class _LegacyScan(_Unpickler):
  """First pass over a legacy object pickle: only the storages' persistent ids matter, tensors are not built."""

  def find_class(self, module, name):
    found = super().find_class(module, name)
    return (lambda *args, **kwargs: None) if found in (_rebuild_tensor, _rebuild_tensor_v3) else found


def _load_legacy(path: str):
  """torch.save(..., _use_new_zipfile_serialization=False), read without torch: pickles of the magic number,
  the protocol version and sys_info, the object (storages as persistent ids), the list of storage keys, then
  each storage as an int64 element count and its bytes. The object pickle (small: no tensor data) is read
  twice: first for the storages' dtypes, whose sizes then give each storage's offset after the keys list; then
  for the object, every storage memory-mapped like the zip format's."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    header = _Unpickler(f, None)
    if header.load() != LEGACY_MAGIC:
      raise CheckpointReadError("not a PyTorch legacy file (bad magic number)")
    version = _Unpickler(f, None).load()
    if version != LEGACY_VERSION:
      raise CheckpointReadError(f"legacy format protocol version {version!r}, expected {LEGACY_VERSION}")
    info = _Unpickler(f, None).load()
    little = not isinstance(info, dict) or info.get("little_endian", True)
    start = f.tell()
    roots: dict[str, tuple[np.dtype, int]] = {}

    def record(key, dtype, numel, view=None):
      roots.setdefault(key, (dtype, numel))

    _LegacyScan(f, record).load()
    keys = _Unpickler(f, None).load()
    if not isinstance(keys, list) or set(map(str, keys)) != set(roots):
      raise CheckpointReadError(f"the storage list {keys!r} does not match the storages the object uses")
    offsets = {}
    for key in map(str, keys):
      dtype, numel = roots[key]
      count = f.read(8)
      if len(count) != 8:
        raise CheckpointReadError(f"storage {key} is missing (file ends at byte {size})")
      stored = struct.unpack("<q" if little else ">q", count)[0]
      if stored != numel:
        raise CheckpointReadError(f"storage {key}: {stored} elements in the file, {numel} in the object")
      offsets[key] = f.tell()
      if offsets[key] + numel * dtype.itemsize > size:
        raise CheckpointReadError(f"storage {key} ends at byte {offsets[key] + numel * dtype.itemsize} of a "
                                  f"{size}-byte file")
      f.seek(numel * dtype.itemsize, os.SEEK_CUR)
    cache: dict[str, np.ndarray] = {}

    def storage(key, dtype, numel, view=None):
      if key not in cache:
        stored = dtype if little or dtype.itemsize == 1 else dtype.newbyteorder(">")
        arr = np.zeros((0,), dtype) if numel == 0 else \
            np.asarray(np.memmap(path, dtype=stored, mode="r", offset=offsets[key], shape=(numel,)))
        cache[key] = arr.astype(dtype) if stored != dtype else arr
      if view is None:
        return cache[key]
      _view_key, offset, count = view  # a storage slice (element offset, elements): torch before 1.0
      return cache[key][int(offset):int(offset) + int(count)]

    f.seek(start)
    return _Unpickler(f, storage).load()


def save(path: str, obj):
  """Write `obj` (nested dicts of numpy arrays) as `.safetensors` (a flat dict of arrays) or `.pt` (torch.save;
  arrays that are the same object stay one shared storage, as tied weights are). Never overwrites."""
  if os.path.exists(path):
    raise FileExistsError(f"{path} exists; refusing to overwrite it")
  if path.endswith(".safetensors"):
    bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
      raise ValueError(f"{path}: safetensors holds a flat dict of tensors; {bad} are not tensors")
    return write_safetensors(path, obj)
  try:
    import torch  # lazy: heavy optional dependency, only for writing .pt
  except ImportError:
    raise CheckpointReadError(f"{path}: writing .pt needs torch installed; write FILE.safetensors instead") from None
  memo: dict[int, torch.Tensor] = {}

  def to_torch(x):
    if isinstance(x, dict):
      return {k: to_torch(v) for k, v in x.items()}
    if not isinstance(x, np.ndarray):
      return x
    if id(x) not in memo:
      y = np.ascontiguousarray(x).reshape(x.shape)  # ascontiguousarray makes 0-d arrays 1-d
      y = y if y.flags.writeable else y.copy()  # torch.from_numpy wants writable memory (a memmap is not)
      memo[id(x)] = torch.from_numpy(y.view(np.int16)).view(torch.bfloat16) if y.dtype == BF16 else \
          torch.from_numpy(y)
    return memo[id(x)]

  torch.save(to_torch(obj), path)
