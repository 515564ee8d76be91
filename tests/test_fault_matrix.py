"""Fault-injection matrix (issue 17): a small dba-train run is stopped by SIGKILL, SIGTERM or SIGINT at five points
in turn, in one workdir (before any file, right after the workdir appears, during a checkpoint save, right after a
checkpoint, during evaluation); the next start must finish with metrics, evals and parameters bitwise equal to an
uninterrupted run (CPU). SIGTERM and SIGINT must exit 0 at every point; SIGKILL dies with it."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import dba_jax
from helpers import REPO, cli_env

ARGS = ["--config=configs/quickstart.py:dba", "--config.model.n_layers=2", "--config.train.steps=30",
        "--config.train.log_every=1", "--config.train.ckpt_every=5", "--config.train.eval_every=10",
        "--config.train.eval_batches=24", "--config.optim.warmup_steps=5"]
ENV = cli_env(fast_compile=False)  # quickstart-sized runs: the optimised code pays
EVAL_EVERY = 10


def start(workdir):
  return subprocess.Popen([sys.executable, "-m", "dba_jax.main", *ARGS, f"--workdir={workdir}"], cwd=REPO, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(path):
  try:
    with open(path) as f:
      return [json.loads(line) for line in f if line.endswith("\n")]
  except FileNotFoundError:
    return []


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return set(os.listdir(d)) if os.path.isdir(d) else set()


def wait_for(p, cond, what, timeout=120):
  t0 = time.time()
  while not cond():
    assert p.poll() is None, f"the run ended before {what}: {p.communicate()[1][-2000:]}"
    assert time.time() - t0 < timeout, f"timed out waiting for {what}"
    time.sleep(0.002)


def before_any_file(p, workdir):
  time.sleep(0.8)  # the interpreter is still importing; nothing may exist yet
  assert not os.path.exists(workdir) or not os.listdir(workdir)


def workdir_appears(p, workdir):
  wait_for(p, lambda: os.path.exists(os.path.join(workdir, "config.json")), "config.json")


def mid_save(p, workdir):
  done = {s for s in _steps(workdir) if s.isdigit()}
  wait_for(p, lambda: any(s not in done for s in _steps(workdir)), "a new checkpoint directory")


def after_checkpoint(p, workdir):
  done = {s for s in _steps(workdir) if s.isdigit()}
  wait_for(p, lambda: any(s.isdigit() and s not in done for s in _steps(workdir)), "a committed checkpoint")


def during_eval(p, workdir):
  def logged_eval_step():
    rows = _lines(os.path.join(workdir, "metrics.jsonl"))
    evals = {r["step"] for r in _lines(os.path.join(workdir, "eval.jsonl"))}
    return bool(rows) and rows[-1]["step"] % EVAL_EVERY == 0 and rows[-1]["step"] not in evals
  wait_for(p, logged_eval_step, "an evaluation")


POINTS = [before_any_file, workdir_appears, mid_save, after_checkpoint, during_eval]


def record(workdir):
  strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
  return strip(_lines(os.path.join(workdir, "metrics.jsonl"))), _lines(os.path.join(workdir, "eval.jsonl"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "w")
  p = start(workdir)
  _, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]
  return workdir


# SIGKILL in the default tier (the hardest stop); SIGTERM / SIGINT, ~100 s each, in the slow tier
SLOW_SIGNALS = [pytest.param(s, marks=pytest.mark.slow) for s in (signal.SIGTERM, signal.SIGINT)]


@pytest.mark.parametrize("sig", [signal.SIGKILL] + SLOW_SIGNALS, ids=lambda s: s.name)
def test_stopped_at_five_points_then_finished_is_bitwise_identical(reference, tmp_path, sig):
  workdir = str(tmp_path / "w")
  for point in POINTS:
    p = start(workdir)
    point(p, workdir)
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    assert p.returncode == (-sig if sig == signal.SIGKILL else 0), (point.__name__, err[-3000:])
    assert "Traceback" not in err, (point.__name__, err[-3000:])
    if sig != signal.SIGKILL and point is not before_any_file:  # the summary says what happened, no "nan" loss
      assert f"stopped by {sig.name}" in out and "nan" not in out, (point.__name__, out)
  p = start(workdir)
  _, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]
  assert record(workdir) == record(reference)
  got, want = dba_jax.load_model(workdir)[0].params, dba_jax.load_model(reference)[0].params
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
  workdir, log = str(tmp_path / "w"), tmp_path / "stderr.txt"
  with open(log, "w") as err:
    p = subprocess.Popen([sys.executable, "-m", "dba_jax.main", *ARGS, f"--workdir={workdir}"], cwd=REPO, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=err, text=True)
    wait_for(p, lambda: len(_lines(os.path.join(workdir, "metrics.jsonl"))) >= 3, "step 3")
    p.send_signal(signal.SIGINT)
    wait_for(p, lambda: "stopping at the next safe point" in log.read_text(), "the first Ctrl-C's message")
    p.send_signal(signal.SIGINT)  # (two signals sent at once would reach Python's handler as one)
    p.wait(timeout=120)
  text = log.read_text()
  assert p.returncode == 130 and "aborting" in text, text[-2000:]
  # W12: no claim of a save that is not complete on disk
  for step in re.findall(r"saved a checkpoint at step (\d+)", text):
    assert os.path.exists(os.path.join(workdir, "checkpoints", step, "dba_manifest.json")), text[-2000:]
