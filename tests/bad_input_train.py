"""Bad-input rows of the training tools (dba-train, dba-addition-train, dba-latentwire-train), run by
tests/test_bad_input.py."""
import os

from bad_input import Case
from dba_jax import rundir
from helpers import tiny, untrained_run

QS = "--config=configs/quickstart.py:dba"
ADD = "--config=configs/addition.py:456p --config.train.steps=2"
BRIDGE = "--config=configs/latentwire.py:cpu --source={lm} --target={lm}"


def _file(tmp):
  path = os.path.join(tmp, "w")
  with open(path, "w") as f:
    f.write("notes\n")
  return {"w": path}


def _foreign(tmp):
  os.makedirs(os.path.join(tmp, "w"))
  with open(os.path.join(tmp, "w", "thesis.txt"), "w") as f:
    f.write("chapter 1\n")
  return {"w": os.path.join(tmp, "w")}


def _run_of(tool):
  """A workdir whose runs.jsonl says `tool` started it (config.json an LM's)."""
  def setup(tmp):
    c = tiny("standard")
    w = untrained_run(os.path.join(tmp, "w"), c)
    rundir.record_start(c, w, None, 1, tool)
    return {"w": w, "lm": w}
  return setup


def _lm(tmp):
  return {"lm": untrained_run(os.path.join(tmp, "lm"), tiny("standard"))}


CASES = [
    Case("train-workdir-is-a-file", "dba-train", f"{QS} --workdir={{w}}", "is a file", setup=_file),
    Case("train-foreign-files", "dba-train", f"{QS} --workdir={{w}}", "not a dba_jax workdir", setup=_foreign),
    Case("train-into-addition-run", "dba-train", f"{QS} --workdir={{w}}", "holds a dba-addition-train run",
         setup=_run_of("dba-addition-train")),
    Case("addtrain-into-dba-train-run", "dba-addition-train", f"{ADD} --workdir={{w}}", "holds a dba-train run",
         setup=_run_of("dba-train")),  # W1
    Case("addtrain-foreign-files", "dba-addition-train", f"{ADD} --workdir={{w}}", "not a dba_jax workdir",
         setup=_foreign),  # W11
    Case("addtrain-workdir-is-a-file", "dba-addition-train", f"{ADD} --workdir={{w}}", "is a file", setup=_file),
    Case("addtrain-no-workdir", "dba-addition-train", ADD, "--workdir is required"),
    Case("addtrain-bad-override", "dba-addition-train", f"{ADD} --config.train.stepz=3 --workdir={{tmp}}/w",
         "stepz", absent=("{tmp}/w",)),
    Case("lwtrain-lm-config", "dba-latentwire-train", f"{QS} --source={{lm}} --target={{lm}} --workdir={{tmp}}/b",
         "not a bridge config", setup=_lm, absent=("{tmp}/b",)),
    Case("lwtrain-into-dba-train-run", "dba-latentwire-train", f"{BRIDGE} --workdir={{w}}", "holds a dba-train run",
         setup=_run_of("dba-train")),
    Case("lwtrain-workdir-is-a-file", "dba-latentwire-train", f"{BRIDGE} --workdir={{w}}", "is a file",
         setup=lambda tmp: {**_file(tmp), **_lm(tmp)}),
]
