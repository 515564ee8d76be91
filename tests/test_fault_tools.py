"""The fault matrix of every console script (dba_jax/tools.py's TOOLS; a new tool adds one row to ROWS).

Each tool is started as its console script would be (`python -m dba_jax.tools NAME ...`), stopped by SIGINT, SIGTERM
or SIGKILL at start-up (during the imports), mid-run, or while it writes (a checkpoint, a resume point, or an output
held open by DBA_FAULT_PAUSE_IN_WRITE), and then started again with the same command. Checked:
- the stop's exit code: a training tool saves and exits 0 on SIGINT / SIGTERM; any other tool exits 130 / 143; a
  SIGKILL is -9. Never a traceback.
- nothing half-written: no output exists unless whole (its temporary name is all a kill can leave); nothing at all
  after a stop at start-up.
- the same command then finishes, and a training tool's results equal an uninterrupted run's.
The default tier runs one case per tool (listed in DEFAULT); the rest are slow. dba-train's own five-point matrix
is tests/test_fault_matrix.py."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Callable

import jax
import pytest

from dba_jax import ckpt, rundir
from dba_jax.tools import TOOLS
from helpers import REPO, cli_env, tiny, untrained_run

PAUSE = 3.0  # seconds an output stays unfinished under DBA_FAULT_PAUSE_IN_WRITE


def _lines(path):
  try:
    with open(path) as f:
      return [json.loads(line) for line in f if line.endswith("\n")]
  except FileNotFoundError:
    return []


def _without(rows, *keys):
  return [{k: v for k, v in r.items() if k not in keys} for r in rows]


def _tmp_outputs(root):
  return [p for p in glob.glob(os.path.join(root, "**", "*.tmp[0-9]*"), recursive=True)]


@dataclasses.dataclass
class Row:
  argv: str  # after the tool's name; {tmp} (this row's directory) and the setup's names filled in
  setup: Callable[[str], dict]  # (shared dir) -> {name: path}: inputs, built once per module
  outputs: tuple  # what the command writes (formatted like argv)
  mid: Callable[[dict], bool]  # true once the run is past start-up and working
  writing: Callable[[dict], bool]  # true while an output or a checkpoint is unfinished
  results: Callable[[dict], object] | None = None  # a training tool's results, compared with an uninterrupted run
  pause: str = "*"  # the outputs (a glob of the file name) held unfinished for the `writing` point


def _after(seconds):
  t0 = []
  def cond(names):
    t0.append(time.time()) if not t0 else None
    return time.time() - t0[0] >= seconds
  return cond


def _exists(pattern):
  return lambda names: bool(glob.glob(pattern.format(**names)))


def _lm(root):
  return {"lm": untrained_run(os.path.join(root, "lm"), tiny("standard"))}


def _teacher(root):
  return {"teacher": untrained_run(os.path.join(root, "teacher"), tiny("gqa"))}


def _lms(root):
  from test_latentwire import _lm_config, _write_lm  # lazy: the latentwire fixtures only where used
  return {"src": _write_lm(os.path.join(root, "src"), _lm_config("byte", 256, 32), 0),
          "tgt": _write_lm(os.path.join(root, "tgt"), _lm_config("bpe_qa", 384, 24, n_kv=2), 1)}


def _addition_ckpt(root):
  from test_addition import _configs  # lazy: as above
  from dba_jax.addition import checkpoint
  from dba_jax.addition.model import Arch, init_params
  c = _configs().get_config("456p")
  a = Arch.from_config(c.model)
  path = os.path.join(root, "add456")
  if not os.path.exists(path):
    checkpoint.save(path, jax.device_get(init_params(a, jax.random.key(0))), a, {"step": 0, "config": {}})
  return {"add": path}


def _addition_run(root):
  """A finished-looking addition run for dba-addition-report: model_0 with metrics and a best checkpoint."""
  names = _addition_ckpt(root)
  run = os.path.join(root, "addrun")
  if not os.path.exists(run):
    os.makedirs(os.path.join(run, "model_0"))
    with open(os.path.join(run, "model_0", "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": 0, "val/exact_match": 0.0, "val/digit_acc": 0.1}) + "\n")
    with open(os.path.join(run, "summary.json"), "w") as f:
      model = {"model": 0, "seed": 43, "best_val_exact": 0.0, "best_step": 0, "last_val_exact": 0.0,
               "best_test_exact": 0.0, "final_loss": 1.0}
      json.dump({"params": 456, "steps": 1, "num_models": 1, "steps_per_s": 10.0, "models": [model]}, f)
  return {**names, "run": run}


TRAIN = ("--config=configs/quickstart.py:dba --config.model.n_layers=1 --config.train.steps=12 "
         "--config.train.log_every=1 --config.train.ckpt_every=4 --config.train.eval_every=6 "
         "--config.train.eval_batches=4 --config.optim.warmup_steps=2 --workdir={tmp}/w")
ADD = ("--config=configs/addition.py:456p --config.train.steps=20 --config.train.batch_size=32 "
       "--config.train.eval_interval=5 --config.train.val_size=64 --config.train.test_size=64 "
       "--config.train.eval_batch_size=64 --config.train.log_every=1 --config.optim.warmup_steps=5 --workdir={tmp}/w")
BRIDGE = ("--config=configs/latentwire.py:cpu --source={src} --target={tgt} --config.train.steps=8 "
          "--config.train.log_every=1 --config.train.ckpt_every=4 --config.train.eval_every=100 --workdir={tmp}/w")

ROWS = {
    "dba-train": Row(TRAIN, lambda root: {}, ("{tmp}/w",),
                     mid=lambda n: len(_lines(f"{n['tmp']}/w/metrics.jsonl")) >= 2,
                     writing=_exists("{tmp}/w/checkpoints/*.orbax-checkpoint-tmp*"),
                     results=lambda n: (_without(_lines(f"{n['tmp']}/w/metrics.jsonl"), "tokens_per_s"),
                                        _lines(f"{n['tmp']}/w/eval.jsonl"))),
    "dba-addition-train": Row(ADD, lambda root: {}, ("{tmp}/w",),
                              mid=lambda n: len(_lines(f"{n['tmp']}/w/model_0/metrics.jsonl")) >= 3,
                              writing=_exists("{tmp}/w/resume.tmp[0-9]*"), pause="resume",
                              results=lambda n: (_without(_lines(f"{n['tmp']}/w/model_0/metrics.jsonl"),
                                                          "steps_per_s"),
                                                 [{k: v for k, v in m.items()} for m in json.load(
                                                     open(f"{n['tmp']}/w/summary.json"))["models"]])),
    "dba-latentwire-train": Row(BRIDGE, _lms, ("{tmp}/w",),
                                mid=lambda n: len(_lines(f"{n['tmp']}/w/metrics.jsonl")) >= 2,
                                writing=_exists("{tmp}/w/checkpoints/*.orbax-checkpoint-tmp*"),
                                results=lambda n: _without(_lines(f"{n['tmp']}/w/metrics.jsonl"), "tokens_per_s")),
    "dba-seeds": Row("run --config=configs/selective_quick.py --variants selective unselective --seeds 0 --jobs 2 "
                     "--config.train.steps=4 --config.train.eval_every=2 --config.train.eval_batches=1 "
                     "--config.train.batch_size=2 --config.train.log_every=1 --config.train.ckpt_every=1 "
                     "--config.model.n_layers=1 --config.data.seq_len=32 --config.model.max_seq_len=32 "
                     "--workdir={tmp}/w", lambda root: {}, ("{tmp}/w",),
                     mid=lambda n: bool(_lines(f"{n['tmp']}/w/selective/seed0/metrics.jsonl")),
                     writing=_exists("{tmp}/w/*/*/checkpoints/*.orbax-checkpoint-tmp*"),
                     results=lambda n: sorted((p[len(n["tmp"]):], _lines(p))
                                              for p in glob.glob(f"{n['tmp']}/w/*/*/eval.jsonl"))),
    "dba-eval": Row("ppl --checkpoint {lm} --max-windows 4 --out {tmp}/ppl.json", _lm, ("{tmp}/ppl.json",),
                    mid=_after(4), writing=_exists("{tmp}/ppl.tmp[0-9]*.json")),
    "dba-addition-eval": Row("--checkpoint {add} --limit 64 --out {tmp}/e.json", _addition_ckpt, ("{tmp}/e.json",),
                             mid=_after(4), writing=_exists("{tmp}/e.tmp[0-9]*.json")),
    "dba-addition-shrink": Row("--config=configs/addition.py:456p --checkpoint={add} --out={tmp}/s", _addition_ckpt,
                               ("{tmp}/s",), mid=_after(4), writing=_exists("{tmp}/s.tmp[0-9]*")),
    "dba-addition-report": Row("{run} --out {tmp}/r.md", _addition_run, ("{tmp}/r.md",),
                               mid=_after(1), writing=_exists("{tmp}/r.tmp[0-9]*.md")),
    "dba-convert": Row("--to-torch {lm} --out {tmp}/m.pt", _lm, ("{tmp}/m.pt",),
                       mid=_after(4), writing=_exists("{tmp}/m.tmp[0-9]*.pt")),
    "dba-bench": Row("attention --seq 64 --heads 2 --head-dim 16 --out {tmp}/b.json", lambda root: {},
                     ("{tmp}/b.json",), mid=_after(4), writing=_exists("{tmp}/b.tmp[0-9]*.json")),
    "dba-coord-check": Row("--config=configs/selective_mup.py:cpu --heads=1,2 --steps=0 --out={tmp}/cc",
                           lambda root: {}, ("{tmp}/cc/coords.csv", "{tmp}/cc/coords.svg"), mid=_after(5),
                           writing=_exists("{tmp}/cc/*.tmp[0-9]*")),
    "dba-aot": Row("--config=configs/quickstart.py:baseline --config.model.n_layers=1 --config.model.d_model=32 "
                   "--config.model.d_ff=64 --config.model.n_heads=2 --config.data.seq_len=32 "
                   "--config.train.batch_size=2 --topology=v5e:1x1 --out {tmp}/a.json", lambda root: {},
                   ("{tmp}/a.json",), mid=_after(5), writing=_exists("{tmp}/a.tmp[0-9]*.json")),
    "dba-upcycle": Row("{teacher} --config=configs/dba_upcycle.py:tiny --out {tmp}/u --config.data.seq_len=16 "
                       "--upcycle.blockwise.steps=2 --upcycle.kd.steps=1 --upcycle.eval_batches=1", _teacher,
                       ("{tmp}/u",), mid=_after(5), writing=_exists("{tmp}/u.tmp[0-9]*")),
}

# One case per tool in the default tier: a stop while writing (the hardest point for what is on disk) where the
# tool writes for long enough, else mid-run or at start-up (W2: a Ctrl-C in the first second). dba-train's SIGKILL
# chain over five points is tests/test_fault_matrix.py.
DEFAULT = {"dba-train": ("writing", "SIGTERM"), "dba-addition-train": ("writing", "SIGINT"),
           "dba-latentwire-train": ("startup", "SIGINT"), "dba-seeds": ("startup", "SIGINT"),
           "dba-eval": ("writing", "SIGINT"), "dba-addition-eval": ("startup", "SIGTERM"),
           "dba-addition-shrink": ("writing", "SIGKILL"), "dba-addition-report": ("writing", "SIGINT"),
           "dba-convert": ("writing", "SIGINT"), "dba-bench": ("startup", "SIGTERM"),
           "dba-coord-check": ("startup", "SIGTERM"), "dba-aot": ("startup", "SIGINT"),
           "dba-upcycle": ("startup", "SIGINT")}
POINTS = ("startup", "mid", "writing")
SIGNALS = ("SIGINT", "SIGTERM", "SIGKILL")


def test_every_tool_has_a_row():
  assert set(ROWS) == set(TOOLS) == set(DEFAULT)


def _start(tool, argv, names, pause=""):
  env = cli_env(fast_compile=True, DBA_FAULT_PAUSE_IN_WRITE=f"{PAUSE}:{pause}" if pause else "")
  args = [a.format(**names) for a in argv.split()]
  return subprocess.Popen([sys.executable, "-m", "dba_jax.tools", tool, *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(tool, row, names):
  p = _start(tool, row.argv, names)
  out, err = p.communicate(timeout=600)
  assert p.returncode == 0, (tool, err[-3000:])
  assert "Traceback" not in err, err[-3000:]
  return out, err


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("inputs"))
  cache = {}

  def get(tool):  # keyed by the setup: rows that share one (dba-eval, dba-convert) share its files
    setup = ROWS[tool].setup
    if setup not in cache:
      cache[setup] = setup(root)
    return cache[setup]
  return get


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
  """A training tool's results, run once without a fault."""
  cache = {}

  def get(tool):
    if tool not in cache:
      names = {**inputs(tool), "tmp": str(tmp_path_factory.mktemp(tool))}
      _finish(tool, ROWS[tool], names)
      cache[tool] = ROWS[tool].results(names)
    return cache[tool]
  return get


CASES = [pytest.param(tool, point, sig, id=f"{tool}-{point}-{sig}",
                      marks=() if DEFAULT[tool] == (point, sig) else pytest.mark.slow)
         for tool in ROWS for point in POINTS for sig in SIGNALS]


@pytest.mark.parametrize("tool,point,sig", CASES)
def test_stopped_then_the_same_command_finishes(tool, point, sig, inputs, uninterrupted, tmp_path):
  row, trains = ROWS[tool], TOOLS[tool][1]
  names = {**inputs(tool), "tmp": str(tmp_path)}
  p = _start(tool, row.argv, names, row.pause if point == "writing" else "")
  if point == "startup":
    time.sleep(0.3)  # the interpreter is importing
  else:
    cond = row.mid if point == "mid" else row.writing
    t0 = time.time()
    while not cond(names):
      assert p.poll() is None, f"{tool} ended before the {point} point: {p.communicate()[1][-2000:]}"
      assert time.time() - t0 < 300, f"timed out waiting for the {point} point"
      time.sleep(0.005)
  if p.poll() is not None:  # a stdlib-only tool (dba-addition-report) can finish within the start-up wait
    assert p.returncode == 0 and point == "startup", p.communicate()[1][-2000:]
    pytest.skip(f"{tool} finished before the start-up signal")
  p.send_signal(getattr(signal, sig))
  out, err = p.communicate(timeout=300)
  assert "Traceback" not in err, err[-3000:]
  want = -signal.SIGKILL if sig == "SIGKILL" else 0 if trains else {"SIGINT": 130, "SIGTERM": 143}[sig]
  assert p.returncode == want, (p.returncode, err[-2000:])
  for step in re.findall(r"saved a checkpoint at step (\d+)", err):  # only once it is complete on disk (W12)
    assert glob.glob(f"{tmp_path}/**/checkpoints/{step}/{ckpt.MANIFEST}", recursive=True), err[-2000:]
  if point == "startup":  # stopped while importing: nothing at all was written
    assert not os.listdir(tmp_path), os.listdir(tmp_path)
  if not trains:  # nothing half-written: the output is absent, only a kill may leave its temporary name
    for path in row.outputs:
      assert not os.path.exists(path.format(**names)), path
    if sig != "SIGKILL":
      assert not _tmp_outputs(str(tmp_path)), _tmp_outputs(str(tmp_path))
  _finish(tool, row, names)
  for path in row.outputs:
    assert os.path.exists(path.format(**names)), path
  assert not _tmp_outputs(str(tmp_path)), _tmp_outputs(str(tmp_path))
  if row.results is not None and point != "startup":  # (after a start-up stop, the finishing run is uninterrupted)
    assert row.results(names) == uninterrupted(tool)


def test_an_addition_run_killed_before_its_first_resume_point_starts_again(tmp_path, capsys):
  """W6: config.json and model_0's first records exist, no resume point: the same command trains from step 0 (its
  records written once), where it used to refuse the directory."""
  from test_addition import _tiny  # lazy: the addition fixtures only here
  from dba_jax.addition import train as add_train
  c = _tiny(1, 0)
  c.train.steps = 3
  w = tmp_path / "w"
  rundir.write_config(c, str(w))
  (w / "model_0").mkdir()
  (w / "model_0" / "metrics.jsonl").write_text('{"step": 0, "loss": 9.0}\n{"step": 1, "lo')  # cut by the kill
  keys = ("steps", "batch_size", "eval_interval", "val_size", "seed", "test_size", "eval_batch_size", "log_every")
  argv = [f"--workdir={w}", "--config.optim.warmup_steps=5"] + [f"--config.train.{k}={c.train[k]}" for k in keys]
  assert add_train.main(["dba-addition-train", "--config=configs/addition.py:456p", *argv]) == 0, \
      capsys.readouterr().err
  steps = [r["step"] for r in _lines(w / "model_0" / "metrics.jsonl") if "loss" in r]
  assert steps == sorted(set(steps)) and 9.0 not in [r.get("loss") for r in _lines(w / "model_0" / "metrics.jsonl")]


@pytest.mark.parametrize("tool,argv,kib", [("dba-train", TRAIN, 64), ("dba-addition-train", ADD, 4)])
def test_a_disk_that_refuses_a_save_is_one_line_and_exit_4(tool, argv, kib, tmp_path):
  """'File too large' (a file-size limit below a checkpoint; ENOSPC takes the same path): one line naming it, exit
  code 4, no traceback and no half-written checkpoint."""
  args = " ".join(a.format(tmp=tmp_path) for a in argv.split())
  p = subprocess.run(["bash", "-c", f"ulimit -f {kib} && exec {sys.executable} -m dba_jax.tools {tool} {args}"],
                     cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
  assert p.returncode == 4, p.stderr[-3000:]
  assert "Traceback" not in p.stderr and "File too large" in p.stderr, p.stderr[-3000:]
  assert len([ln for ln in p.stderr.splitlines() if "error:" in ln]) == 1, p.stderr[-3000:]
  assert not glob.glob(str(tmp_path / "w" / "**" / "*tmp*"), recursive=True)
