"""Bad-input rows of the evaluation tools (dba-eval and its subcommands, dba-addition-eval): tests/test_bad_input.py.

Most are refused by the argument types or the --out guard before any checkpoint is read, so their --checkpoint need
not exist; the rest read a config.json or an untrained checkpoint (helpers.untrained_run), never a training run."""
import json
import os

from bad_input import Case, files
from dba_jax import rundir
from dba_jax.config import validate
from dba_jax.hope import memstate
from helpers import tiny
from test_hope import hope_config


def _config_only(kind="standard", **model):
  """A workdir holding only config.json: what the checks made before loading a model read."""
  def setup(tmp):
    w = os.path.join(tmp, "w")
    rundir.write_config(validate(tiny(kind, **model)), w)
    return {"w": w}
  return setup


def _all_set_aside(tmp):
  """A run whose every checkpoint a resume moved to checkpoints_broken."""
  w = _config_only()(tmp)["w"]
  os.makedirs(os.path.join(w, "checkpoints"))
  os.makedirs(os.path.join(w, "checkpoints_broken", "4"))
  with open(os.path.join(w, "checkpoints_broken", "4", "note"), "w") as f:
    f.write("kept for inspection\n")
  return {"w": w}


def _empty_npy(tmp):
  """An LM run whose data.train_path is a 0-byte .npy file (config.json only: the data is read before the model)."""
  npy = os.path.join(tmp, "tokens.npy")
  open(npy, "w").close()
  c = tiny("standard")
  c.data.source, c.data.train_path = "npy", npy
  rundir.write_config(c, os.path.join(tmp, "w"))
  return {"w": os.path.join(tmp, "w"), "npy": npy}


def _truncated_state(tmp):
  """A HOPE run's config, a text, and a memory state whose state.npz was cut short (read before the model)."""
  c = hope_config(periods=(2, 4), vocab=256, online_chunk=8)
  w = os.path.join(tmp, "hope")
  rundir.write_config(c, w)
  state = os.path.join(tmp, "mem")
  os.makedirs(state)
  with open(os.path.join(state, "state.json"), "w") as f:
    json.dump({"format": memstate.FORMAT, **{k: c.model[k] for k in memstate.SIZES}}, f)
  with open(os.path.join(state, "state.npz"), "wb") as f:
    f.write(b"PK\x03\x04" + b"\0" * 60)  # a zip header, then nothing
  text = os.path.join(tmp, "doc.txt")
  with open(text, "w") as f:
    f.write("The pass key is KEY-4821. Remember it. " * 2)
  return {"w": w, "state": state, "text": text}


ONE_CHECKPOINT = "def get_config():\n  return {'checkpoints': [{'name': 'a', 'path': 'a', 'baseline': True}]"


def _manifest(text):
  def setup(tmp):
    path = os.path.join(tmp, "m.py")
    with open(path, "w") as f:
      f.write(text)
    return {"m": path}
  return setup


def _compare_out_taken(tmp):
  names = _manifest(ONE_CHECKPOINT + "}\n")(tmp)
  return {**names, **files(svg="out/compare.svg")(tmp), "out": os.path.join(tmp, "out")}


NONE = "--checkpoint {tmp}/none"  # never read: the row is refused first
ADD = "dba-addition-eval"

CASES = [
    # W10 and the counts: range-checked by the argument types, before any checkpoint is read.
    Case("eval-prune-ratio-out-of-range", "dba-eval", f"prune {NONE} --ratios 1.5,-0.5", "must be in (0, 1]"),
    Case("eval-prune-ratio-negative", "dba-eval", f"prune {NONE} --ratios=-0.5", "must be in (0, 1]"),
    Case("eval-prune-budget-below-2", "dba-eval", f"prune {NONE} --budgets 1,8", "integer >= 2"),
    Case("eval-prune-budget-above-seq-len", "dba-eval", "prune --checkpoint {w} --budgets 8,48",
         "larger than the window length T=16", setup=_config_only(attn_kind="selective")),
    Case("eval-prune-max-windows-0", "dba-eval", f"prune {NONE} --max-windows 0", "integer >= 1"),
    Case("eval-prune-not-selective", "dba-eval", "prune --checkpoint {w}", "per-key eviction score",
         setup=_config_only()),
    Case("eval-generate-temperature-nan", "dba-eval", f"generate {NONE} --prompt hi --temperature nan",
         "finite number >= 0"),
    Case("eval-generate-temperature-negative", "dba-eval", f"generate {NONE} --prompt hi --temperature=-1",
         "finite number >= 0"),
    Case("eval-generate-max-new-0", "dba-eval", f"generate {NONE} --prompt hi --max-new 0", "integer >= 1"),
    Case("eval-generate-prompt-and-ids", "dba-eval", f"generate {NONE} --prompt hi --prompt-ids 1,2",
         "not allowed with argument"),
    Case("eval-generate-prompt-ids-not-ints", "dba-eval", f"generate {NONE} --prompt-ids 1,x",
         "comma-separated list of int"),
    Case("eval-ppl-batch-size-0", "dba-eval", f"ppl {NONE} --batch-size 0", "integer >= 1"),
    Case("eval-ppl-max-windows-negative", "dba-eval", f"ppl {NONE} --max-windows=-1", "integer >= 0"),
    Case("eval-ppl-seq-len-negative", "dba-eval", f"ppl {NONE} --seq-len=-16", "integer >= 0"),
    Case("eval-ppl-stride-0", "dba-eval", f"ppl {NONE} --overlap --stride 0", "integer >= 1"),
    Case("eval-hope-lengths-negative", "dba-eval", f"hope passkey {NONE} --lengths=-5", "integer >= 1"),
    Case("eval-hope-samples-negative", "dba-eval", f"hope passkey {NONE} --samples=-1", "integer >= 0"),
    Case("eval-hope-passkey-no-checkpoint", "dba-eval", "hope passkey", "needs --checkpoint"),
    Case("eval-hope-recall-with-checkpoint", "dba-eval", f"hope recall {NONE}", "no --checkpoint"),
    Case("eval-hope-recall-one-key", "dba-eval", "hope recall --keys 1", "needs >= 2 keys"),
    Case("eval-hope-recall-bad-override", "dba-eval", "hope recall --set model.nope=1", "bad --config or override"),
    Case("eval-hope-recall-carry-not-mac", "dba-eval",
         "hope recall --carry 4 --set model.block=titans_mag --set model.hope.titans_positions=absolute",
         "needs titans_mac"),
    Case("eval-hope-lengths-not-numbers", "dba-eval", f"hope niah {NONE} --lengths 256,many", "not a number"),
    Case("eval-hope-continual-two-lengths", "dba-eval", f"hope continual {NONE} --lengths 16,32", "one --lengths"),
    Case("eval-addition-limit-negative", ADD, "--checkpoint {tmp}/none --limit -5", "integer >= 0"),
    Case("eval-addition-seeds-not-numbers", ADD, "--checkpoint {tmp}/none --seeds a,b", "not a number"),
    Case("eval-addition-seeds-negative", ADD, "--checkpoint {tmp}/none --seeds=1,-2", "integer >= 0"),
    Case("eval-addition-seeds-twice", ADD, "--checkpoint {tmp}/none --seeds 1,2,1", "more than once"),
    Case("eval-addition-batch-size-0", "dba-eval", "addition --checkpoint {tmp}/none --batch-size 0", "integer >= 1"),
    # W4: every file a subcommand writes, sidecars included, is refused before any work without --force.
    Case("eval-latentwire-md-exists", "dba-eval", "latentwire --manifest {tmp}/m.json --out {tmp}/r.json",
         "r.md exists", setup=files(md="r.md"), absent=("{tmp}/r.json",)),
    Case("eval-latentwire-out-is-md", "dba-eval", "latentwire --manifest {tmp}/m.json --out {tmp}/r.md",
         "give the JSON another extension"),
    Case("eval-hope-plot-exists", "dba-eval", f"hope passkey {NONE} --plot {{png}}", "exists; refusing",
         setup=files(png="existing.png")),
    Case("eval-hope-plot-not-a-needle-task", "dba-eval", f"hope continual {NONE} --plot {{tmp}}/c.png",
         "--plot belongs to"),
    Case("eval-hope-save-state-exists", "dba-eval", f"hope read {NONE} --text {{txt}} --save-state {{tmp}}/mem",
         "exists; refusing", setup=files(txt="doc.txt", state="mem/state.json")),
    Case("eval-hope-save-state-is-a-file", "dba-eval",
         f"hope read {NONE} --text {{txt}} --save-state {{txt}} --force", "is a file", setup=files(txt="doc.txt")),
    Case("eval-ppl-out-exists", "dba-eval", f"ppl {NONE} --out {{out}}", "exists; refusing",
         setup=files(out="p.json")),
    Case("eval-ppl-out-dir-missing", "dba-eval", f"ppl {NONE} --out {{tmp}}/no/such/p.json", "does not exist",
         absent=("{tmp}/no",)),
    Case("eval-compare-output-exists", "dba-eval", "compare --manifest {m} --out {out}", "compare.svg exists",
         setup=_compare_out_taken),
    Case("eval-addition-out-exists", ADD, "--checkpoint {tmp}/none --out {out}", "exists; refusing",
         setup=files(out="a.json")),
    # Tracebacks that are one line now.
    Case("eval-compare-manifest-syntax", "dba-eval", "compare --manifest {m}", "m.py:1: ",
         setup=_manifest("def get_config(:\n  pass\n")),
    Case("eval-compare-manifest-raises", "dba-eval", "compare --manifest {m}", "get_config() failed: NameError",
         setup=_manifest("def get_config():\n  return undefined_name\n")),
    Case("eval-compare-manifest-count-0", "dba-eval", "compare --manifest {m}", "eval.batch_size=0",
         setup=_manifest(ONE_CHECKPOINT + ", 'eval': {'batch_size': 0}}\n")),
    Case("eval-ppl-empty-npy", "dba-eval", "ppl --checkpoint {w}", "tokens.npy: not a readable .npy",
         setup=_empty_npy),
    Case("eval-hope-read-truncated-state", "dba-eval", "hope read --checkpoint {w} --text {text} --state {state}",
         "state.npz: unreadable", setup=_truncated_state),
    # Every checkpoint moved aside by a resume: say so, not "no checkpoint for step None".
    Case("eval-ppl-every-checkpoint-set-aside", "dba-eval", "ppl --checkpoint {w}",
         "holds no checkpoint (1 set aside in checkpoints_broken", setup=_all_set_aside),
]
