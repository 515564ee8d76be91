"""Preemption and resume: SIGKILL / SIGTERM at any point, broken checkpoints, foreign checkpoints, NaN policy,
and a two-process run over loopback. Resumed runs must match an uninterrupted run bit for bit (CPU)."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import dba_jax
from dba_jax import ckpt, data, train
from helpers import REPO, cli_env, tiny

# Quickstart-sized so a step takes long enough (~0.1 s) to be interrupted at a chosen point.
ARGS = ["--config=configs/quickstart.py:dba", "--config.train.steps=40", "--config.train.log_every=1",
        "--config.train.ckpt_every=5", "--config.train.eval_every=20", "--config.train.eval_batches=2",
        "--config.optim.warmup_steps=5"]
ENV = cli_env(fast_compile=False)  # quickstart-sized runs: the optimised code pays


def start(workdir, *extra):
  return subprocess.Popen([sys.executable, "-m", "dba_jax.main", *ARGS, *extra, f"--workdir={workdir}"], cwd=REPO,
                          env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def last_step(workdir):
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = [line for line in f if line.endswith("\n")]
    return json.loads(lines[-1])["step"] if lines else 0
  except FileNotFoundError:
    return 0


def interrupt_at(workdir, step, sig):
  p = start(workdir)
  while last_step(workdir) < step and p.poll() is None:
    time.sleep(0.02)
  assert p.poll() is None, f"run finished before step {step}: {p.communicate()[1][-2000:]}"
  p.send_signal(sig)
  out, err = p.communicate(timeout=120)
  return p.returncode, err


def finish(workdir):
  p = start(workdir)
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-3000:]
  return err


def history(workdir):
  """metrics.jsonl without the wall-clock field, which no two runs share."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def assert_same_run(a, b):
  assert history(a) == history(b)
  pa, pb = dba_jax.load_model(a)[0].params, dba_jax.load_model(b)[0].params
  jax.tree.map(np.testing.assert_array_equal, pa, pb)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  finish(workdir)
  assert [r["step"] for r in history(workdir)] == list(range(1, 41))
  return workdir


@pytest.mark.slow  # ~140 s; the fault matrix's SIGKILL case covers it in the default tier
def test_sigkill_at_three_points_then_resume_is_bitwise_identical(reference, tmp_path):
  workdir = str(tmp_path)
  for step in (7, 18, 31):
    code, _ = interrupt_at(workdir, step, signal.SIGKILL)
    assert code == -signal.SIGKILL
  finish(workdir)
  with open(os.path.join(workdir, "runs.jsonl")) as f:
    resumed = [json.loads(line)["resumed_from"] for line in f]
  assert resumed[0] is None and len(resumed) == 4 and all(r is not None for r in resumed[1:])
  assert_same_run(workdir, reference)


def test_sigterm_saves_current_step_exits_zero_and_resumes(reference, tmp_path):
  workdir = str(tmp_path)
  code, err = interrupt_at(workdir, 12, signal.SIGTERM)
  assert code == 0, err[-2000:]
  saved = int(err.split("SIGTERM: saved a checkpoint at step ")[1].split(";")[0])
  assert saved >= 12
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(saved)))
  finish(workdir)
  assert_same_run(workdir, reference)


def test_truncated_latest_checkpoint_is_skipped(tmp_path):
  c = tiny("dba")
  c.train.steps = 6
  workdir = str(tmp_path / "w")
  train.train(c, workdir, quiet=True)
  step_dir = os.path.join(workdir, "checkpoints", "6")
  victim = max((os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "opt")) for f in fs),
               key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  c.train.steps = 8
  with _capture_warnings() as logs:
    train.train(c, workdir, quiet=True)
  assert any(step_dir in m and "truncated" in m for m in logs), logs
  with open(os.path.join(workdir, "runs.jsonl")) as f:
    assert [json.loads(line)["resumed_from"] for line in f] == [None, 4]
  assert os.path.isdir(os.path.join(workdir, "checkpoints_broken", "6"))  # kept, not deleted


class _capture_warnings:
  """Collect the messages dba_jax logs at WARNING level."""

  def __enter__(self):
    import logging

    class H(logging.Handler):
      def __init__(self, sink):
        super().__init__(logging.WARNING)
        self.sink = sink

      def emit(self, record):
        self.sink.append(record.getMessage())

    self.messages, self.handler = [], H([])
    self.handler.sink = self.messages
    logging.getLogger("dba_jax").addHandler(self.handler)
    return self.messages

  def __exit__(self, *exc):
    import logging
    logging.getLogger("dba_jax").removeHandler(self.handler)


def test_checkpoint_of_another_shape_is_refused(tmp_path):
  c = tiny("dba")
  workdir = str(tmp_path)
  train.train(c, workdir, quiet=True)
  cfg = os.path.join(workdir, "config.json")
  saved = json.load(open(cfg))
  saved["model"]["d_ff"] = 96  # e.g. a config.json edited by hand, or checkpoints copied between runs
  json.dump(saved, open(cfg, "w"))
  before = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(workdir) for p in fs}
  c.model.d_ff = 96
  with pytest.raises(ckpt.CheckpointMismatch) as e:
    train.train(c, workdir, quiet=True)
  msg = str(e.value)
  assert "['blocks']['mlp']['w_in']: checkpoint (2, 32, 2, 64) vs model (2, 32, 2, 96)" in msg
  assert "['blocks']['mlp']['w_out']['kernel']: checkpoint (2, 64, 32) vs model (2, 96, 32)" in msg
  after = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(workdir) for p in fs}
  assert after == before


class _Poisoned:
  """The training iterator with the batches of the given (1-based) steps replaced by an out-of-range token id: the
  embedding lookup then gives NaN, so those steps' loss and gradient are non-finite (fault injection by data)."""

  def __init__(self, it, steps):
    self.it, self.steps, self.n = it, set(steps), 0

  def __iter__(self):
    return self

  def __next__(self):
    batch, self.n = next(self.it), self.n + 1
    return np.full_like(batch, 1 << 30) if self.n in self.steps else batch

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def poison(monkeypatch, steps):
  real = data.train_iterator
  monkeypatch.setattr(train.data, "train_iterator", lambda *a, **kw: _Poisoned(real(*a, **kw), steps))


def test_nonfinite_stop_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  c = tiny("standard")
  c.train.steps, c.train.ckpt_every, c.train.log_every = 8, 2, 1
  with pytest.raises(train.TrainingStopped, match=r"1 non-finite loss/gradient step\(s\) between steps 5 and 5"):
    poison(monkeypatch, (5,))
    train.train(c, str(tmp_path), quiet=True)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]


def test_nonfinite_skip_leaves_params_unchanged_for_that_batch(tmp_path, monkeypatch):
  c = tiny("standard")
  c.train.steps, c.train.nonfinite = 4, "skip"
  with monkeypatch.context() as mp:
    poison(mp, (4,))
    train.train(c, str(tmp_path / "skip"), quiet=True)
  c.train.steps = 3
  train.train(c, str(tmp_path / "three"), quiet=True)
  rows = history(str(tmp_path / "skip"))
  assert np.isnan(rows[3]["loss"]) and rows[2]["loss"] == history(str(tmp_path / "three"))[2]["loss"]
  skipped = dba_jax.load_model(str(tmp_path / "skip"))[0].params
  three = dba_jax.load_model(str(tmp_path / "three"))[0].params
  jax.tree.map(np.testing.assert_array_equal, skipped, three)


def test_two_processes_over_loopback_match_one_process(tmp_path):
  small = ["--config=configs/quickstart.py:dba", "--config.model.d_model=32", "--config.model.d_ff=64",
           "--config.model.n_layers=2", "--config.data.seq_len=32", "--config.train.batch_size=8",
           "--config.train.steps=20", "--config.train.log_every=1", "--config.train.eval_every=10",
           "--config.train.eval_batches=2", "--config.train.ckpt_every=10"]
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  out = subprocess.run([sys.executable, "-m", "dba_jax.launch", "local", "--processes", "2", "--", *small,
                        f"--workdir={multi}"], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  env = cli_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")  # same global batch, same 2-way split
  out = subprocess.run([sys.executable, "-m", "dba_jax.main", *small, f"--workdir={single}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(multi, "runs.jsonl")) as f:
    assert json.loads(f.readline())["devices"] == 2
  assert [r["loss"] for r in history(multi)] == [r["loss"] for r in history(single)]
  assert len(history(multi)) == 20
