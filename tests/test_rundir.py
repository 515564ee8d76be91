"""The run directory every trainer shares (dba_jax/rundir.py) and the one command-line prologue (dba_jax/cli.py):
the workdir guard of each tool, atomic writes, JSONL cut-back, the progress line, one-line errors."""
import io
import json
import os
import subprocess
import sys

import pytest
from absl import flags

from dba_jax import cli, loading, rundir
from dba_jax.addition import train as add_train
from dba_jax.config import ConfigError
from dba_jax.latentwire import train as lw_train
from helpers import REPO, load_preset, tiny


def _addition(steps: int = 20):
  c = load_preset("addition.py", "456p")
  c.train.steps, c.train.num_models = steps, 1
  return c


# ------------------------------------------------------------------------------------------------------ guard

def test_guard_fresh_resume_and_refusals(tmp_path):
  c = tiny("standard")
  w = tmp_path / "w"
  assert rundir.check_workdir(c, str(w), loading.read_config) is False  # missing: a fresh start
  (w / "tb").mkdir(parents=True)  # an interrupted start's empty trace
  assert rundir.check_workdir(c, str(w), loading.read_config) is False
  rundir.write_config(c, str(w))
  assert rundir.check_workdir(c, str(w), loading.read_config) is True
  c.model.d_model = 64
  with pytest.raises(ConfigError, match=r"a different model \(differs in model.d_model: saved 32 vs now 64\)"):
    rundir.check_workdir(c, str(w), loading.read_config)
  (tmp_path / "f").write_text("x")
  with pytest.raises(ConfigError, match="is a file, not a directory"):
    rundir.check_workdir(c, str(tmp_path / "f"), loading.read_config)


def test_each_trainer_refuses_the_others_workdir(tmp_path):
  """A workdir is one tool's: dba-train refuses a LatentWire bridge's, the LatentWire trainer an LM's, before
  anything is written."""
  lm, bridge = tmp_path / "lm", tmp_path / "bridge"
  rundir.write_config(tiny("standard"), str(lm))
  rundir.write_config(lw_train.bridge_config("cpu"), str(bridge))
  with pytest.raises(ConfigError, match="unknown config key"):
    rundir.check_workdir(tiny("standard"), str(bridge), loading.read_config)
  with pytest.raises(ConfigError, match="unknown config key"):
    rundir.check_workdir(lw_train.bridge_config("cpu"), str(lm), lw_train.read_config)
  other = lw_train.bridge_config("bridge_k4")
  with pytest.raises(ConfigError, match="differs in model.b: saved 16 vs now 64"):
    rundir.check_workdir(other, str(bridge), lw_train.read_config)
  assert sorted(os.listdir(lm)) == sorted(os.listdir(bridge)) == ["config.json"]


def test_addition_trainer_refuses_a_file_a_foreign_dir_and_another_config(tmp_path):
  """The guarantees dba-train always had, now the addition trainer's too (before: only a resumed run's config
  was compared)."""
  (tmp_path / "f").write_text("x")
  with pytest.raises(ConfigError, match="is a file"):
    add_train.train(_addition(), str(tmp_path / "f"), quiet=True)
  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(ConfigError, match=r"holds \['notes.txt'\] but no config.json"):
    add_train.train(_addition(), str(foreign), quiet=True)
  assert os.listdir(foreign) == ["notes.txt"]
  started = tmp_path / "started"  # killed after config.json, before any model directory
  rundir.write_config(_addition(), str(started))
  with pytest.raises(ConfigError, match="a different config .*differs in train.steps: saved 20 vs now 30"):
    add_train.train(_addition(steps=30), str(started), quiet=True)
  assert os.listdir(started) == ["config.json"]


# ------------------------------------------------------------------------------------------------------ files

def test_atomic_files_and_jsonl_cut_back(tmp_path):
  p = str(tmp_path / "a.json")
  rundir.atomic_write(p, "text")
  rundir.atomic_write(p, b"bytes")
  assert open(p, "rb").read() == b"bytes" and os.listdir(tmp_path) == ["a.json"]
  log = str(tmp_path / "metrics.jsonl")
  for step in (1, 2, 3):
    rundir.append_jsonl(log, {"step": step})
  rundir.truncate_jsonl(log, 2)
  assert [json.loads(x)["step"] for x in open(log)] == [1, 2]
  final, tmp = str(tmp_path / "resume"), str(tmp_path / "resume.tmp")
  for n in (1, 2):
    os.makedirs(tmp)
    rundir.atomic_write(os.path.join(tmp, "n"), str(n))
    rundir.replace_dir(tmp, final)
    assert open(os.path.join(rundir.settled_dir(final), "n")).read() == str(n)
  os.replace(final, final + ".old")  # as if killed between replace_dir's two renames
  assert rundir.settled_dir(final) == final + ".old"


def test_progress_line():
  out = io.StringIO()
  p = rundir.Progress(10, stream=out)
  p.update(5, 1.23456, 12345.6, 61.0, " | eval 2.0000")
  q = rundir.Progress(10, unit="steps/s", digits=1, stream=out)
  q.update(6, 0.5, 3.25, float("inf"))
  assert out.getvalue().splitlines() == ["step 5/10 | loss 1.2346 | 12,346 tok/s | ETA 00:01:01 | eval 2.0000",
                                         "step 6/10 | loss 0.5000 | 3.2 steps/s | ETA ?"]
  rundir.Progress(10, quiet=True).update(1, 1.0, 1.0, 1.0)  # writes nowhere


# ---------------------------------------------------------------------------------------------------- prologue

def test_command_prologue(capsys, monkeypatch):
  @cli.command("dba-x", errors=(ConfigError,))
  def main(argv):
    fv = cli.flags_of(argv, lambda fv: flags.DEFINE_bool("dry_run", False, "", flag_values=fv))
    if argv[-1] == "boom":
      raise ConfigError("model.x=1 is impossible")
    return 0 if fv.dry_run else 1

  assert main(["dba-x", "--dry-run"]) == 0  # the dashed spelling reaches dry_run
  assert main(["dba-x", "boom"]) == 2
  assert capsys.readouterr().err == "dba-x: error: model.x=1 is impossible\n"
  assert main(["dba-x", "--config=nope.py"]) == 2
  assert capsys.readouterr().err == "dba-x: error: bad --config or override: config file nope.py does not exist\n"



ABORT = """
import os, signal, sys
from dba_jax import rundir, signals
signals.install("dba-y", stops=False)
with rundir.atomic_output(sys.argv[1]) as tmp:
  open(tmp, "w").write("half")
  os.kill(os.getpid(), signal.SIG{sig})
  print("not reached")
"""


@pytest.mark.parametrize("sig,code", [("INT", 130), ("TERM", 143)])
def test_a_tool_that_does_not_train_aborts_on_the_first_signal_leaving_nothing(tmp_path, sig, code):
  out = tmp_path / "r.json"
  p = subprocess.run([sys.executable, "-c", ABORT.format(sig=sig), str(out)], capture_output=True, text=True,
                     cwd=REPO, timeout=60)
  assert p.returncode == code and "not reached" not in p.stdout, p.stderr
  assert p.stderr.strip() == f"dba-y: interrupted (SIG{sig}); no output was left half-written"
  assert os.listdir(tmp_path) == []  # neither the output nor its temporary file
