"""dba-seeds: the statistics against closed forms, and a real 2-variant sweep (run in parallel) that resumes, trains
further when asked for more steps, and reports. Its refusals are rows of the bad-input table (bad_input_seeds.py)."""
import json
import math
import os
import subprocess
import sys

import pytest

from dba_jax import seeds
from dba_jax.evals import stats
from helpers import cli_env


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5, 7.0])
def test_t_p_values_match_closed_forms(t):
  # df 1 is the Cauchy distribution, df 2 has P(|T| >= t) = 1 - t / sqrt(2 + t^2).
  assert stats.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-10)
  assert stats.t_two_sided_p(-t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-10)


def test_incomplete_beta_special_cases():
  for x in (0.05, 0.3, 0.7, 0.98):
    assert stats.betainc(1.0, 1.0, x) == pytest.approx(x, abs=1e-12)
    assert stats.betainc(3.0, 1.0, x) == pytest.approx(x ** 3, abs=1e-12)
    assert stats.betainc(2.5, 4.0, x) + stats.betainc(4.0, 2.5, 1 - x) == pytest.approx(1.0, abs=1e-12)


def test_paired_test_by_hand():
  a, b = [1.0, 2.0, 3.0, 4.0, 5.5], [1.5, 2.25, 3.5, 4.75, 6.0]
  r = stats.paired(a, b)
  d = [-0.5, -0.25, -0.5, -0.75, -0.5]
  mean = sum(d) / 5
  sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
  assert r["mean_diff"] == pytest.approx(mean) and r["std_diff"] == pytest.approx(sd)
  assert r["t"] == pytest.approx(mean / (sd / math.sqrt(5)))
  assert r["a_lower"] == 5
  assert r["p_sign_flip"] == pytest.approx(2 / 32)  # only all-minus and all-plus are as extreme
  # One difference of the other sign: 2 more patterns reach |mean| >= observed? Count them by brute force.
  r2 = stats.paired([1.0, 2.0, 3.0, 4.0], [0.0, 3.0, 4.0, 5.0])  # diffs +1, -1, -1, -1: |mean| 0.5
  assert r2["p_sign_flip"] == pytest.approx(10 / 16)  # sign patterns with |sum| >= 2 among (+-1)^4: 2 + 8


def _run(*args):
  env = cli_env()  # one CPU device per run, not the 8 this test process simulates
  return subprocess.run([sys.executable, "-m", "dba_jax.seeds", *args], capture_output=True, text=True, timeout=600,
                        env=env)


def test_sweep_runs_resumes_extends_and_reports(tmp_path):
  w = str(tmp_path / "sweep")
  tiny = ["--config.train.eval_every=1", "--config.train.eval_batches=1", "--config.train.batch_size=2",
          "--config.train.log_every=1", "--config.train.ckpt_every=1", "--config.model.n_layers=1",
          "--config.data.seq_len=32", "--config.model.max_seq_len=32"]
  args = ["run", "--config=configs/selective_quick.py", "--seeds", "3", "--workdir", w, "--jobs", "2", *tiny]
  both = [*args, "--variants", "selective", "unselective", "--config.train.steps=2"]
  r = _run(*both)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "2 of 2 runs finished" in r.stdout
  again = _run(*both)
  assert again.returncode == 0 and "2 already finished, 0 to train" in again.stdout, again.stdout + again.stderr
  # More steps train a finished run further: it resumes from its last checkpoint (W7).
  sel = tmp_path / "sweep" / "selective" / "seed3"
  longer = _run(*args, "--variants", "selective", "--config.train.steps=3")
  assert longer.returncode == 0 and "0 already finished, 1 to train" in longer.stdout, longer.stdout + longer.stderr
  starts = [json.loads(x) for x in (sel / "runs.jsonl").read_text().splitlines()]
  assert [x["resumed_from"] for x in starts] == [None, 2]
  assert [x["step"] for x in seeds.read_jsonl(str(sel / "eval.jsonl"))] == [1, 2, 3]
  assert seeds.finished(str(sel))["step"] == 3 and seeds.finished(str(sel), 2) is None
  r = _run("report", "--workdir", w, "--baseline", "unselective")
  assert r.returncode == 0, r.stderr
  rep = json.loads((tmp_path / "sweep" / "report.json").read_text())
  assert sorted((x["variant"], x["seed"], x["steps"]) for x in rep["runs"]) == [("selective", 3, 3),
                                                                                  ("unselective", 3, 2)]
  losses = {(x["variant"], x["seed"]): x["final_eval_loss"] for x in rep["runs"]}
  assert all(v is not None and math.isfinite(v) for v in losses.values())
  assert losses["selective", 3] == seeds.read_jsonl(str(sel / "eval.jsonl"))[-1]["eval_loss"]
  p = rep["paired"]["selective"]
  assert p["seeds"] == [3] and p["diffs"] == pytest.approx([losses["selective", 3] - losses["unselective", 3]])
  assert rep["variants"]["selective"]["mean"] == losses["selective", 3]
  assert (tmp_path / "sweep" / "report.md").exists() and (tmp_path / "sweep" / "report.png").stat().st_size > 1000
  assert not [f for f in os.listdir(w) if ".tmp" in f]
  bad = _run("report", "--workdir", w, "--baseline", "nope", "--force")
  assert bad.returncode == 2 and "nope" in bad.stderr
  assert _run("report", "--workdir", w, "--force").returncode == 0  # the report files exist: replaced with --force


def test_sigterm_stops_the_sweep_cleanly_and_the_same_command_resumes(tmp_path):
  import signal
  import time
  w = str(tmp_path / "sweep")
  args = [sys.executable, "-m", "dba_jax.seeds", "run", "--config=configs/selective_quick.py", "--variants", "selective",
          "--seeds", "0", "--workdir", w, "--config.train.steps=400", "--config.train.eval_every=400",
          "--config.train.eval_batches=1", "--config.train.batch_size=2", "--config.train.log_every=20",
          "--config.train.ckpt_every=100", "--config.model.n_layers=1", "--config.data.seq_len=32",
          "--config.model.max_seq_len=32"]
  env = cli_env()
  proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  metrics = tmp_path / "sweep" / "selective" / "seed0" / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0 and "every run it had started saved its step" in out, out
  assert "Traceback" not in out
  log = (tmp_path / "sweep" / "selective" / "seed0.log").read_text()
  assert "saved a checkpoint at step" in log and seeds.finished(os.path.join(w, "selective", "seed0")) is None
  r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0 and "1 of 1 runs finished" in r.stdout, r.stdout + r.stderr
  runs = (tmp_path / "sweep" / "selective" / "seed0" / "runs.jsonl").read_text().strip().splitlines()
  assert len(runs) == 2 and json.loads(runs[1])["resumed_from"] > 0  # resumed, not restarted
