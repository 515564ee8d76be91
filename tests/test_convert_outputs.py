"""dba-convert's outputs (issue 26): metadata an original checkpoint holds that JSON cannot (paths, numpy scalars)
is stored as strings and numbers; a conversion that fails midway leaves no trace of --out, and the same command then
runs; the addition model writer replaces a model directory whole."""
import errno
import json
import os
import pathlib

import numpy as np
import pytest

from bad_input_tools import addition_state
from dba_jax import ckpt, conversion, convert, torch_io
from dba_jax.addition import checkpoint
from helpers import tiny, untrained_run

torch = pytest.importorskip("torch")


def _torch_addition_file(path, **extra):
  """The original's torch.save of an addition model, with a train_config as its scripts write it."""
  obj = addition_state()
  obj["model_state"] = {k: torch.from_numpy(v) for k, v in obj["model_state"].items()}
  torch.save({**obj, **extra}, path)


def test_paths_and_numpy_scalars_in_train_config_convert(tmp_path, capsys):
  src = tmp_path / "best.pt"
  _torch_addition_file(src, train_config={"run_dir": pathlib.Path("results/runs/x"), "lr": np.float64(0.02),
                                          "seed": np.int64(43), "digits": (np.int32(1), 10)},
                       step=np.int64(34000), val_exact=np.float32(0.5))
  out = tmp_path / "m"
  assert convert.main(["dba-convert", str(src), "--out", str(out)]) == 0, capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["best.pt", "m"]  # no temporary left beside it
  meta = json.loads((out / "meta.json").read_text())
  assert meta["train_config"] == {"run_dir": os.path.join("results", "runs", "x"), "lr": 0.02, "seed": 43,
                                  "digits": [1, 10]}
  assert (meta["step"], meta["val_exact"], meta["seed"]) == (34000, 0.5, 43)
  assert convert.main(["dba-convert", "--to-torch", str(out), "--out", str(tmp_path / "back.pt")]) == 0
  back = torch.load(tmp_path / "back.pt", weights_only=True)
  assert back["train_config"]["run_dir"] == os.path.join("results", "runs", "x") and back["step"] == 34000


def test_json_safe_keeps_what_json_holds():
  assert conversion.json_safe({"a": 1, "b": [1.5, None, True], "c": "x"}) == {"a": 1, "b": [1.5, None, True], "c": "x"}
  assert conversion.json_safe({1: np.arange(2), "p": pathlib.PurePosixPath("a/b"), "o": object}) == \
      {"1": [0, 1], "p": "a/b", "o": str(object)}


def _fail_after_writing(monkeypatch, obj, name):
  """`obj.name` does its work, then raises the disk-full error: a failure after part of the output exists."""
  real = getattr(obj, name)

  def boom(*args, **kwargs):
    real(*args, **kwargs)
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(obj, name, boom)


def test_failed_addition_conversion_leaves_nothing_and_reruns(tmp_path, monkeypatch, capsys):
  src, out = tmp_path / "best.pt", tmp_path / "m"
  _torch_addition_file(src)
  argv = ["dba-convert", str(src), "--out", str(out)]
  with monkeypatch.context() as m:
    _fail_after_writing(m, checkpoint.np, "savez")  # params.npz written, meta.json not yet
    assert convert.main(argv) == 4
  err = capsys.readouterr().err
  assert "No space left on device" in err and "Traceback" not in err
  assert sorted(os.listdir(tmp_path)) == ["best.pt"]
  assert convert.main(argv) == 0
  assert checkpoint.load(str(out))[0].meta["step"] == 100


def test_failed_lm_conversion_leaves_nothing_and_reruns(tmp_path, monkeypatch, capsys):
  """The Orbax workdir path: the checkpoint written, then the failure; --out is absent, and the rerun converts."""
  untrained_run(tmp_path / "run", tiny("gpt2"))
  src, out = tmp_path / "model.pt", tmp_path / "wd"
  assert convert.main(["dba-convert", "--to-torch", str(tmp_path / "run"), "--out", str(src)]) == 0
  argv = ["dba-convert", str(src), "--out", str(out), "--config.model.n_heads=4"]
  with monkeypatch.context() as m:
    _fail_after_writing(m, ckpt.Checkpointer, "save")
    assert convert.main(argv) == 4
  assert "Traceback" not in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["model.pt", "run"]
  assert convert.main(argv) == 0 and os.path.isdir(out / "checkpoints")
  assert convert.main(argv) == 2  # and never over the finished one
  assert "is not empty" in capsys.readouterr().err


def test_failed_export_leaves_no_file(tmp_path, monkeypatch, capsys):
  src, out = tmp_path / "best.pt", tmp_path / "m"
  _torch_addition_file(src)
  assert convert.main(["dba-convert", str(src), "--out", str(out)]) == 0
  argv = ["dba-convert", "--to-torch", str(out), "--out", str(tmp_path / "back.pt")]
  with monkeypatch.context() as m:
    _fail_after_writing(m, convert.torch_io, "save")
    assert convert.main(argv) == 4
  assert sorted(os.listdir(tmp_path)) == ["best.pt", "m"]
  assert convert.main(argv) == 0 and os.path.isfile(tmp_path / "back.pt")


def test_model_directory_replaced_whole(tmp_path):
  """checkpoint.save over an existing model: the new one whole; a kill between replace_dir's two renames leaves
  best.old, which load reads."""
  src = str(tmp_path / "src.pt")
  torch_io.save(src, addition_state())
  m = checkpoint.load(src)[0]
  best = tmp_path / "model_0" / "best"
  checkpoint.save(str(best), m.params, m.arch, {"step": 1})
  checkpoint.save(str(best), m.params, m.arch, {"step": 2})
  assert sorted(os.listdir(tmp_path / "model_0")) == ["best"]
  assert checkpoint.load(str(tmp_path / "model_0"))[0].meta["step"] == 2
  os.rename(best, str(best) + ".old")
  assert [m.meta["step"] for m in checkpoint.load(str(tmp_path))] == [2]

