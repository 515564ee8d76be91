"""dba_jax.torch_io: PyTorch zip checkpoints read without torch, safetensors both ways, clear errors."""
import argparse
import enum
import json
import os
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from dba_jax import torch_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torch():
  return pytest.importorskip("torch")


def _to_numpy(t):
  torch = _torch()
  if t.dtype == torch.bfloat16:
    return t.float().numpy()
  return t.numpy()


class Kind(enum.Enum):
  SELECTIVE = "selective"


def mixed_checkpoint(path, legacy=False):
  """Tensors of several dtypes, a non-contiguous view, a tied pair and non-tensor objects."""
  torch = _torch()
  g = torch.Generator().manual_seed(0)
  w = torch.randn(6, 4, generator=g)
  sd = {"f32": w, "tied": w, "t": w.t(), "slice": w[1:5:2, 1:], "f16": torch.randn(3, 5, generator=g).half(),
        "bf16": (torch.randn(7, generator=g) * 1e3).bfloat16(), "i64": torch.arange(-3, 9).reshape(3, 4),
        "i32": torch.tensor([1, -2], dtype=torch.int32), "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.ones(2))}
  obj = {"model": sd, "step": 7, "args": argparse.Namespace(lr=1e-3, name="x"), "kind": Kind.SELECTIVE,
         "np_scalar": np.float64(1.25), "nested": [1, (2, 3.0), {"a": None}]}
  torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
  return obj


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reader_matches_torch_load(tmp_path, monkeypatch, legacy):
  """Both torch.save formats, read while `import torch` fails."""
  torch = _torch()
  path = str(tmp_path / "mixed.pt")
  ref = mixed_checkpoint(path, legacy)["model"]
  with open(path, "rb") as f:
    assert f.read(2) == (b"\x80\x02" if legacy else b"PK")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails from here on
  got = torch_io.load(path)
  monkeypatch.undo()
  sd = got["model"]
  assert list(sd) == list(ref)
  for k, t in ref.items():
    assert sd[k].shape == tuple(t.shape), k
    np.testing.assert_array_equal(np.asarray(sd[k], np.float32) if sd[k].dtype == torch_io.BF16 else sd[k],
                                  _to_numpy(t.detach()), err_msg=k)
  assert sd["bf16"].dtype == ml_dtypes.bfloat16 and sd["f16"].dtype == np.float16 and sd["i64"].dtype == np.int64
  assert sd["bool"].dtype == np.bool_ and sd["u8"].dtype == np.uint8 and sd["scalar"].shape == ()
  assert np.shares_memory(sd["f32"], sd["tied"]) and np.shares_memory(sd["f32"], sd["t"])  # memory-mapped views
  # bf16 -> f32 is exact (the 16-bit shift): compare bit patterns with torch's own cast
  bits = np.asarray(sd["bf16"], np.float32).view(np.uint32)
  assert np.array_equal(bits, ref["bf16"].float().numpy().view(np.uint32))
  assert got["step"] == 7 and got["nested"] == [1, (2, 3.0), {"a": None}]
  assert isinstance(got["args"], torch_io.StandIn) and got["args"].class_path == "argparse.Namespace"
  assert got["args"].lr == 1e-3 and got["args"].name == "x"
  assert got["kind"].class_path.endswith("Kind") and got["kind"].args == ("selective",)
  assert isinstance(got["np_scalar"], torch_io.StandIn)  # not executed, only recorded


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reader_never_imports_torch(tmp_path, legacy):
  """In a fresh interpreter where torch cannot be imported at all."""
  _torch()
  path = str(tmp_path / "mixed.pt")
  mixed_checkpoint(path, legacy)
  code = ("import sys; sys.modules['torch'] = None\n"
          "from dba_jax import torch_io\n"
          f"obj = torch_io.load({path!r})\n"
          "print(sorted(obj['model']), obj['model']['i64'].sum(), [m for m in sys.modules if m.startswith('torch')])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "'bf16'" in out.stdout and out.stdout.split()[-2:] == ["30", "['torch']"]


def test_pickled_main_config_is_not_imported(tmp_path):
  """A context-compression model file's `__main__.GPTConfig` (a dataclass with an enum) loads as a stand-in."""
  torch = _torch()
  import dataclasses
  main = sys.modules["__main__"]

  @dataclasses.dataclass
  class GPTConfig:
    n_head: int = 13
    attention_kind: Kind = Kind.SELECTIVE

  GPTConfig.__module__, GPTConfig.__qualname__ = "__main__", "GPTConfig"
  main.GPTConfig = GPTConfig
  try:
    torch.save({"model": {"w": torch.ones(2)}, "config": GPTConfig()}, tmp_path / "m.pt")
  finally:
    del main.GPTConfig
  cfg = torch_io.load(str(tmp_path / "m.pt"))["config"]
  assert type(cfg) is not GPTConfig and cfg.class_path == "__main__.GPTConfig"
  assert cfg.n_head == 13 and cfg.attention_kind.args == ("selective",)
  assert "n_head=13" in repr(cfg)


def test_safetensors_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"f32": rng.standard_normal((3, 4)).astype(np.float32),
             "f16": rng.standard_normal(5).astype(np.float16),
             "bf16": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
             "i64": np.arange(6, dtype=np.int64).reshape(2, 3), "i32": np.array([-1, 2], np.int32),
             "bool": np.array([True, False]), "empty": np.zeros((0, 2), np.float32),
             "view": rng.standard_normal((4, 3)).astype(np.float32).T}
  path = str(tmp_path / "x.safetensors")
  torch_io.write_safetensors(path, tensors, {"format": "pt"})
  with open(path, "rb") as f:  # the layout by hand: u64 length, JSON header, 8-byte aligned data
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
  assert n % 8 == 0 and header["__metadata__"] == {"format": "pt"}
  assert header["bf16"]["dtype"] == "BF16" and header["i64"] == {"dtype": "I64", "shape": [2, 3],
                                                                "data_offsets": header["i64"]["data_offsets"]}
  got, meta = torch_io.read_safetensors(path)
  assert meta == {"format": "pt"} and list(got) == list(tensors)
  for k, x in tensors.items():
    assert got[k].dtype == x.dtype and got[k].shape == x.shape and np.array_equal(got[k], x), k
  with pytest.raises(FileExistsError):
    torch_io.save(path, tensors)
  assert torch_io.load(path)["i32"].tolist() == [-1, 2]


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
  rng = np.random.default_rng(0)
  st = str(tmp_path / "x.safetensors")
  torch_io.write_safetensors(st, {"w": rng.standard_normal(1000).astype(np.float32)})
  cut = str(tmp_path / "cut.safetensors")
  open(cut, "wb").write(open(st, "rb").read()[:2000])
  with pytest.raises(torch_io.CheckpointReadError, match=r"cut\.safetensors.*truncated"):
    torch_io.load(cut)
  junk = str(tmp_path / "junk.pt")
  open(junk, "wb").write(b"not a checkpoint at all")
  with pytest.raises(torch_io.CheckpointReadError, match=r"junk\.pt: not a PyTorch checkpoint"):
    torch_io.load(junk)
  with pytest.raises(torch_io.CheckpointReadError, match="no such file"):
    torch_io.load(str(tmp_path / "missing.pt"))


def test_truncated_pt_name_the_file(tmp_path):
  torch = _torch()
  path = str(tmp_path / "model.pt")
  torch.save({"w": torch.randn(256, 256)}, path)
  data = open(path, "rb").read()
  for n in (len(data) // 2, len(data) - 30):
    cut = str(tmp_path / f"cut{n}.pt")
    open(cut, "wb").write(data[:n])
    with pytest.raises(torch_io.CheckpointReadError, match=f"cut{n}.pt"):
      torch_io.load(cut)


def test_legacy_format_truncated_or_corrupt(tmp_path):
  torch = _torch()
  path = tmp_path / "legacy.pt"
  torch.save({"w": torch.randn(64, 64), "b": torch.ones(2).bfloat16()}, path, _use_new_zipfile_serialization=False)
  data = path.read_bytes()
  for n in (len(data) // 2, len(data) - 4, 40):  # inside the storages, at the end, inside the object pickle
    cut = tmp_path / f"cut{n}.pt"
    cut.write_bytes(data[:n])
    with pytest.raises(torch_io.CheckpointReadError, match=f"cut{n}.pt"):
      torch_io.load(str(cut))


def test_save_pt_keeps_shared_storage_and_dtypes(tmp_path):
  torch = _torch()
  w = np.arange(6, dtype=np.float32).reshape(2, 3)
  obj = {"system_state_dict": {"a": w, "b": w, "h": np.ones(2, ml_dtypes.bfloat16), "i": np.arange(3),
                               "s": np.asarray(2.0, np.float32)}, "step": 4}
  path = str(tmp_path / "out.pt")
  torch_io.save(path, obj)
  got = torch.load(path, weights_only=True)
  sd = got["system_state_dict"]
  assert got["step"] == 4 and sd["a"].data_ptr() == sd["b"].data_ptr() and sd["s"].shape == ()
  assert sd["h"].dtype == torch.bfloat16 and sd["i"].dtype == torch.int64 and torch.equal(sd["a"], torch.from_numpy(w))
  back = torch_io.load(path)["system_state_dict"]
  assert np.array_equal(back["a"], w) and back["h"].dtype == ml_dtypes.bfloat16


def test_save_pt_without_torch_suggests_safetensors(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(torch_io.CheckpointReadError, match="safetensors"):
    torch_io.save(str(tmp_path / "x.pt"), {"w": np.zeros(2, np.float32)})
