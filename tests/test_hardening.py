"""Never stuck, never silent (issue 17): start-up order and traces, the workdir guard, --out guards, broken
checkpoints in training and in the read-only tools, one-line errors and --help on every command."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import dba_jax
from dba_jax import aot, bench, ckpt, convert, coord_check, eval_cli, model as model_lib, seeds, torch_io, train
from dba_jax.addition import report as add_report, shrink, train as add_train
from dba_jax.config import ConfigError, validate
from dba_jax.formats import nanogpt
from helpers import REPO, cli_env, tiny

ENV = cli_env()


def dba_train(*args):
  return subprocess.run([sys.executable, "-m", "dba_jax.main", *map(str, args)], cwd=REPO, capture_output=True,
                        text=True, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny GPT-2-shaped dba-train run with checkpoints at steps 2 and 4."""
  c = tiny("gpt2")
  workdir = str(tmp_path_factory.mktemp("run") / "w")
  train.train(c, workdir, quiet=True)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  return workdir


def _copy(run_dir, tmp_path):
  dst = str(tmp_path / "copy")
  shutil.copytree(run_dir, dst)
  return dst


def _truncate_largest(step_dir):
  victim = max((os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if f != ckpt.MANIFEST),
               key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  return victim


# ------------------------------------------------------------------------------------------ start-up, workdir

def test_config_json_is_written_before_anything_else(tmp_path, monkeypatch):
  workdir = str(tmp_path / "w")
  seen = []
  real = train.ckpt.Checkpointer

  def checkpointer(directory, *a, **kw):
    seen.append(sorted(os.listdir(workdir)))
    return real(directory, *a, **kw)

  monkeypatch.setattr(train.ckpt, "Checkpointer", checkpointer)
  c = tiny("standard")
  c.train.steps = 2
  train.train(c, workdir, quiet=True)
  assert seen == [["config.json"]]


def test_an_empty_data_file_leaves_no_workdir(tmp_path):
  empty = tmp_path / "tokens.npy"
  np.save(empty, np.zeros((0,), np.uint16))
  c = tiny("standard")
  c.data.source, c.data.train_path = "npy", str(empty)
  with pytest.raises(Exception, match="tokens.npy"):
    train.train(c, str(tmp_path / "w"), quiet=True)
  assert not (tmp_path / "w").exists()


def test_start_up_traces_are_started_cleanly(tmp_path):
  """What an interrupted start can leave (an older version's empty checkpoints/, an empty tb/, a partial
  config.json.tmp) is a fresh start, not 'not a dba_jax workdir'."""
  w = tmp_path / "w"
  (w / "checkpoints").mkdir(parents=True)
  (w / "tb").mkdir()
  (w / "config.json.tmp").write_text('{"mod')
  c = tiny("standard")
  c.train.steps = 2
  assert train.train(c, str(w), quiet=True)["steps"] == 2
  assert json.loads((w / "config.json").read_text())["model"]["d_model"] == 32


def test_foreign_files_refused_and_untouched(tmp_path):
  w = tmp_path / "w"
  w.mkdir()
  (w / "thesis.txt").write_text("four years of work")
  with pytest.raises(ConfigError, match=r"holds \['thesis.txt'\] but no config.json"):
    train.train(tiny("standard"), str(w), quiet=True)
  assert sorted(os.listdir(w)) == ["thesis.txt"]


def test_workdir_that_is_a_file_or_not_writable(tmp_path, monkeypatch):
  f = tmp_path / "notes"
  f.write_text("x")
  with pytest.raises(ConfigError, match="is a file, not a directory"):
    train.train(tiny("standard"), str(f), quiet=True)
  monkeypatch.setattr(train.os, "access", lambda path, mode: False)  # (root ignores permission bits)
  with pytest.raises(ConfigError, match="is not writable"):
    train.train(tiny("standard"), str(tmp_path / "w"), quiet=True)
  assert not (tmp_path / "w").exists()


def test_dba_train_one_line_errors(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n  pass\n")
  for args, message in [([f"--config={tmp_path / 'nope.py'}"], "nope.py does not exist"),
                        ([f"--config={bad}:x"], f"{bad}:1: invalid syntax"),
                        (["--config=configs/quickstart.py:dba", f"--workdir={bad}"], "is a file, not a directory")]:
    out = dba_train(*args, f"--workdir={tmp_path / 'w'}" if "--workdir" not in args[-1] else "")
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "w").exists()


def test_dba_bench_missing_config_is_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    bench.main(["--config", str(tmp_path / "nope.py")])
  assert e.value.code == 2 and "nope.py does not exist" in capsys.readouterr().err


def test_help_on_every_command(capsys):
  for fn, argv in [(convert.main, ["dba-convert", "--help"]), (coord_check.main, ["dba-coord-check", "-h"]),
                   (add_train.main, ["dba-addition-train", "--help"]), (shrink.main, ["dba-addition-shrink", "-h"]),
                   (add_report.main, ["--help"]),
                   (bench.main, ["--help"]), (eval_cli.main, ["--help"]), (seeds.main, ["--help"]),
                   (seeds.main, ["run", "--help"]), (seeds.main, ["report", "--help"]), (aot.main, ["dba-aot", "--help"])]:
    with pytest.raises(SystemExit) as e:
      fn(argv)
    assert e.value.code in (0, None), argv
    assert "usage" in capsys.readouterr().out.lower(), argv
  out = dba_train("--help")
  assert out.returncode == 0 and "usage: " in out.stdout and "--workdir" in out.stdout


# ------------------------------------------------------------------------------------------- --out guards

def test_eval_out_is_never_overwritten_without_force(run_dir, tmp_path, capsys):
  out = tmp_path / "ppl.json"
  out.write_text("my earlier result")
  argv = ["ppl", "--checkpoint", run_dir, "--seq-len", "16", "--max-windows", "2", "--out", str(out)]
  with pytest.raises(SystemExit) as e:
    eval_cli.main(argv)
  assert e.value.code == 2 and "--force" in capsys.readouterr().err
  assert out.read_text() == "my earlier result"
  assert eval_cli.main(argv + ["--force"]) == 0
  assert json.loads(out.read_text())["windows"] == 2


def test_convert_refuses_a_non_empty_foreign_out_dir(run_dir, tmp_path, capsys):
  back = tmp_path / "back.pt"
  assert convert.main(["dba-convert", "--to-torch", run_dir, "--out", str(back)]) == 0  # format from the config
  assert "nanogpt format" in capsys.readouterr().err
  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "thesis.txt").write_text("x")
  assert convert.main(["dba-convert", str(back), "--out", str(foreign), "--config.model.n_heads=4"]) == 2
  assert "not empty" in capsys.readouterr().err and sorted(os.listdir(foreign)) == ["thesis.txt"]


def test_missing_head_count_hint_fits_the_width(tmp_path, capsys):
  c = validate(tiny("gpt2"))
  params = jax.tree.map(np.asarray, model_lib.init_params(c.model, jax.random.key(0)))
  torch_io.save(str(tmp_path / "m.pt"), nanogpt.from_params(params, c))
  assert convert.main(["dba-convert", str(tmp_path / "m.pt"), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert "give --config.model.n_heads" in err and "4 (heads of 8)" in err and "12 or 13" not in err


# ------------------------------------------------------------------------------------------ broken checkpoints

def test_every_checkpoint_broken_stops_unless_restart_is_asked(run_dir, tmp_path):
  w = _copy(run_dir, tmp_path)
  for step in ("2", "4"):
    _truncate_largest(os.path.join(w, "checkpoints", step))
  c = tiny("gpt2")
  c.train.steps = 6
  with pytest.raises(train.TrainingStopped, match="every one is broken"):
    train.train(c, w, quiet=True)
  with pytest.raises(train.TrainingStopped, match="on_no_good_checkpoint=restart"):  # and again: still refused
    train.train(c, w, quiet=True)
  c.train.on_no_good_checkpoint = "restart"
  assert train.train(c, w, quiet=True)["steps"] == 6
  with open(os.path.join(w, "runs.jsonl")) as f:
    assert [json.loads(line)["resumed_from"] for line in f][-1] is None


def test_read_only_tools_skip_a_damaged_latest_checkpoint(run_dir, tmp_path, caplog):
  w = _copy(run_dir, tmp_path)
  victim = _truncate_largest(os.path.join(w, "checkpoints", "4"))
  with caplog.at_level("WARNING", logger="dba_jax"):
    model, _ = dba_jax.load_model(w)
  assert victim in caplog.text and "loaded step 2" in caplog.text
  want = dba_jax.load_model(os.path.join(run_dir, "checkpoints", "2"))[0]
  jax.tree.map(np.testing.assert_array_equal, model.params, want.params)
  with pytest.raises(ckpt.CheckpointDamaged, match="truncated"):
    dba_jax.load_model(os.path.join(w, "checkpoints", "4"))


def test_missing_metadata_is_damage_not_a_different_model(run_dir, tmp_path, capsys):
  w = _copy(run_dir, tmp_path)
  for step in ("2", "4"):
    os.remove(os.path.join(w, "checkpoints", step, "params", "_METADATA"))
  with pytest.raises(ckpt.CheckpointDamaged) as e:
    dba_jax.load_model(w)
  assert "different model" not in str(e.value) and "checkpoints/4" in str(e.value)
  assert eval_cli.main(["ppl", "--checkpoint", w, "--seq-len", "16", "--max-windows", "1"]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
  assert convert.main(["dba-convert", "--to-torch", w, "--out", str(tmp_path / "b.pt")]) == 2


def test_a_run_saved_before_a_config_field_was_added_still_resumes(run_dir, tmp_path):
  w = _copy(run_dir, tmp_path)
  path = os.path.join(w, "config.json")
  with open(path) as f:
    saved = json.load(f)
  del saved["model"]["hope"]["memory"], saved["model"]["block"]  # as written by an older dba_jax
  with open(path, "w") as f:
    json.dump(saved, f)
  c = tiny("gpt2")
  c.train.steps = 6
  assert train.train(c, w, quiet=True)["steps"] == 6
  c.model.d_model *= 2  # a real difference is still refused
  with pytest.raises(ConfigError, match="model.d_model: saved"):
    train.train(c, w, quiet=True)
