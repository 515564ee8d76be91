"""`dba-train` on bad input: a clear error naming the problem, exit code 2, and an untouched workdir."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, cli_env


def run(*args):
  env = cli_env()
  return subprocess.run([sys.executable, "-m", "dba_jax.main", *args], cwd=REPO, capture_output=True, text=True,
                        env=env, timeout=300)


def snapshot(d):
  out = {}
  for root, _, files in os.walk(d):
    for f in files:
      p = os.path.join(root, f)
      out[os.path.relpath(p, d)] = (hashlib.sha256(open(p, "rb").read()).hexdigest(), os.stat(p).st_mtime_ns)
  return out


QS = "--config=configs/quickstart.py:dba"


@pytest.mark.parametrize("override,message", [
    ("--config.model.n_layerz=3", 'n_layerz Did you mean "n_layers"'),
    ("--config.optim.lr=fast", "lr"),
    ("--config.model.dba.sem_dim=30", "model.dba.sem_dim=30 is not divisible by model.n_heads=4"),
    ("--config.model.dba.geo_dim=66", "model.dba.geo_dim=66 is not divisible by model.n_heads=4"),
    ("--config.model.n_heads=3", "is not divisible by model.n_heads=3"),
    ("--config.model.attn_kind=flash", "model.attn_kind='flash' is not one of"),
])
def test_bad_config_fails_clearly(tmp_path, override, message):
  out = run(QS, override, f"--workdir={tmp_path / 'w'}")
  assert out.returncode == 2, out.stderr
  assert message in out.stderr
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "w").exists()


def test_missing_data_file(tmp_path):
  missing = tmp_path / "fineweb.npy"
  out = run(QS, "--config.data.source=npy", f"--config.data.train_path={missing}", f"--workdir={tmp_path / 'w'}")
  assert out.returncode == 2
  assert str(missing) in out.stderr and "data.train_path" in out.stderr
  assert not (tmp_path / "w").exists()


def test_workdir_of_another_model_is_left_alone(tmp_path):
  w = tmp_path / "w"
  w.mkdir()
  (w / "config.json").write_text(json.dumps({"model": {"attn_kind": "standard", "d_model": 64}}))
  (w / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
  before = snapshot(w)
  out = run(QS, f"--workdir={w}")
  assert out.returncode == 2 and "holds a run of a different model" in out.stderr
  assert "model.d_model: saved 64 vs now 128" in out.stderr
  assert snapshot(w) == before


def test_foreign_files_are_not_overwritten(tmp_path):
  w = tmp_path / "w"
  w.mkdir()
  (w / "metrics.jsonl").write_text("my own notes\n")
  before = snapshot(w)
  out = run(QS, f"--workdir={w}")
  assert out.returncode == 2 and "not a dba_jax workdir" in out.stderr
  assert snapshot(w) == before
