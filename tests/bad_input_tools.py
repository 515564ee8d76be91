"""Bad-input rows of the tools that convert, measure and report (dba-convert, dba-bench and its modes,
dba-coord-check, dba-aot, dba-addition-shrink, dba-addition-report, dba-upcycle): tests/test_bad_input.py.

Every row is refused before any work: no training, no timing, no conversion. Their inputs are small files written
here (an addition checkpoint of ~450 parameters, or files that only have to exist), never a training run."""
import os

import jax
import numpy as np

from bad_input import Case, files
from dba_jax import torch_io
from dba_jax.addition import checkpoint
from dba_jax.addition.model import Arch, _is_spec, param_spec

QUICK = "--config=configs/quickstart.py:dba"
UPCYCLE = "--config=configs/dba_upcycle.py:tiny"
MUP = "--config=configs/selective_mup.py:cpu"
ADD = "--config=configs/addition.py:456p"


def addition_state(seed: int = 0) -> dict:
  """The original's {"model_state", "model_config", ...} dict of a default TinyDecoderLM, numpy-drawn parameters."""
  a, rng = Arch(), np.random.default_rng(seed)
  draw = lambda spec: (0.1 * rng.standard_normal(spec[0])).astype(np.float32)
  params = jax.tree.map(draw, param_spec(a), is_leaf=_is_spec)
  return {"model_state": checkpoint.from_params(params), "model_config": checkpoint.arch_to_torch_config(a),
          "train_config": {"seed": seed}, "step": 100, "val_exact": 0.5, "params": 456}


def _addition_pt(tmp):
  path = os.path.join(tmp, "best.pt")
  torch_io.save(path, addition_state())
  return {"pt": path}


def _addition_pt_and(**names):
  def setup(tmp):
    return {**_addition_pt(tmp), **files(**names)(tmp)}
  return setup


def _run_dir(tmp):
  os.makedirs(os.path.join(tmp, "run"))
  return {"run": os.path.join(tmp, "run")}


CASES = [
    # ------------------------------------------------------------------------------------------- dba-convert
    Case("convert-format-hope-on-addition", "dba-convert", "{pt} --out {tmp}/o --format hope",
         "not a nested_learning HOPE checkpoint", setup=_addition_pt, absent=("{tmp}/o",)),
    Case("convert-format-nanogpt-on-addition", "dba-convert", "{pt} --out {tmp}/o --format nanogpt",
         "not a nanoGPT checkpoint", setup=_addition_pt, absent=("{tmp}/o",)),
    Case("convert-out-not-empty", "dba-convert", "{pt} --out {tmp}/o", "is not empty",
         setup=_addition_pt_and(mine="o/thesis.txt")),
    Case("convert-out-is-file", "dba-convert", "{pt} --out {mine}", "is not a directory",
         setup=_addition_pt_and(mine="o")),
    Case("convert-out-under-file", "dba-convert", "{pt} --out {mine}/o", "is a file, not a directory",
         setup=_addition_pt_and(mine="notes")),
    Case("convert-missing-input", "dba-convert", "{tmp}/nope.pt --out {tmp}/o", "no such file",
         absent=("{tmp}/o",)),
    Case("convert-to-torch-out-exists", "dba-convert", "--to-torch {tmp}/w --out {mine}", "refusing to overwrite",
         setup=files(mine="back.pt")),
    Case("convert-to-torch-bad-suffix", "dba-convert", "--to-torch {tmp}/w --out {tmp}/back.bin",
         "write FILE.pt or FILE.safetensors", absent=("{tmp}/back.bin",)),
    # --------------------------------------------------------------------------------------------- dba-bench
    Case("bench-mesh-3-3-3", "dba-bench", f"{QUICK} --mesh 3,3,3", "needs 27 devices"),
    Case("bench-mesh-two-sizes", "dba-bench", f"{QUICK} --meshes 2,2", "give 3 sizes"),
    Case("bench-mesh-batch-does-not-split", "dba-bench", f"{QUICK} --meshes 8,1,1 --config.train.batch_size=4",
         "train.batch_size=4 must split"),
    Case("bench-steps-negative", "dba-bench", f"{QUICK} --steps -2", "--steps: -2 is out of range"),
    Case("bench-ckpt-every-negative", "dba-bench", f"{QUICK} --ckpt-every -1", "--ckpt-every: -1 is out of range"),
    Case("bench-peak-nan", "dba-bench", f"{QUICK} --peak-tflops nan", "--peak-tflops: nan is out of range"),
    Case("bench-out-exists", "dba-bench", f"{QUICK} --out {{mine}}", "refusing to overwrite",
         setup=files(mine="existing.json")),
    Case("bench-out-is-dir", "dba-bench", f"{QUICK} --out {{tmp}}", "is a directory"),
    Case("bench-attention-seq-0", "dba-bench", "attention --seq 0", "--seq: 0 is out of range"),
    Case("bench-attention-repeats-0", "dba-bench", "attention --repeats 0", "--repeats: 0 is out of range"),
    Case("bench-attention-out-exists", "dba-bench", "attention --seq 16 --out {mine}", "refusing to overwrite",
         setup=files(mine="attn.json")),
    Case("bench-decode-gen-0", "dba-bench", "decode --gen 0", "--gen: 0 is out of range"),
    Case("bench-decode-bad-cache", "dba-bench", "decode --layers 1 --d-model 32 --heads 2 --caches q3",
         "--caches q3"),
    Case("bench-decode-heads-do-not-divide", "dba-bench", "decode --layers 1 --d-model 30 --heads 4",
         "not divisible by model.n_heads=4"),
    Case("bench-decode-out-exists", "dba-bench", "decode --out {mine}", "refusing to overwrite",
         setup=files(mine="decode.json")),
    Case("bench-convert-out-exists", "dba-bench", "convert --out {mine}", "refusing to overwrite",
         setup=files(mine="conv.json")),
    Case("bench-convert-dir-not-empty", "dba-bench", "convert --dir {tmp}/scratch", "is not empty",
         setup=files(mine="scratch/notes.txt")),
    Case("bench-addition-chunk-0", "dba-bench", f"addition {ADD} --chunk 0", "--chunk: 0 is out of range"),
    Case("bench-addition-num-models-0", "dba-bench", f"addition {ADD} --num-models 0",
         "--num-models: 0 is out of range"),
    Case("bench-addition-out-exists", "dba-bench", f"addition {ADD} --out {{mine}}", "refusing to overwrite",
         setup=files(mine="add.json")),
    Case("bench-gpt-rounds-0", "dba-bench", "gpt --torch --rounds 0", "--rounds: 0 is out of range"),
    Case("bench-gpt-bad-shape", "dba-bench", "gpt --torch --shapes 4:128", "neither a preset"),
    Case("bench-gpt-out-exists", "dba-bench", "gpt --torch --out {mine}", "refusing to overwrite",
         setup=files(mine="gpt.json")),
    # ---------------------------------------------------------------------------------------- dba-coord-check
    Case("coord-out-is-file", "dba-coord-check", f"{MUP} --out {{mine}}", "is a file",
         setup=files(mine="report.txt")),
    Case("coord-out-under-file", "dba-coord-check", f"{MUP} --out {{mine}}/sub", "is a file",
         setup=files(mine="report.txt")),
    Case("coord-out-exists", "dba-coord-check", f"{MUP} --out {{tmp}}/cc", "refusing to overwrite",
         setup=files(mine="cc/coords.svg")),
    Case("coord-heads-one", "dba-coord-check", f"{MUP} --heads=2 --out {{tmp}}/cc", "at least two",
         absent=("{tmp}/cc",)),
    Case("coord-heads-not-numbers", "dba-coord-check", f"{MUP} --heads=1,a --out {{tmp}}/cc",
         "comma-separated head counts", absent=("{tmp}/cc",)),
    Case("coord-steps-negative", "dba-coord-check", f"{MUP} --steps=-1 --out {{tmp}}/cc", "--steps=-1",
         absent=("{tmp}/cc",)),
    # ------------------------------------------------------------------------------------------------ dba-aot
    Case("aot-out-is-dir", "dba-aot", "--kernels --out {tmp}", "is a directory"),
    Case("aot-out-exists", "dba-aot", "--kernels --out {mine}", "refusing to overwrite",
         setup=files(mine="kernels.json")),
    # -------------------------------------------------------------------------------------------- dba-upcycle
    Case("upcycle-no-config", "dba-upcycle", "{tmp} --out {tmp}/o", "--config is required", absent=("{tmp}/o",)),
    Case("upcycle-no-out", "dba-upcycle", f"{{tmp}} {UPCYCLE}", "--out is required"),
    Case("upcycle-out-not-empty", "dba-upcycle", f"{{tmp}}/t {UPCYCLE} --out {{tmp}}/o", "is not empty",
         setup=files(mine="o/thesis.txt")),
    Case("upcycle-missing-teacher", "dba-upcycle", f"{{tmp}}/nope {UPCYCLE} --out {{tmp}}/o", "no such directory",
         absent=("{tmp}/o",)),
    Case("upcycle-not-a-teacher", "dba-upcycle", f"{{tmp}}/t {UPCYCLE} --out {{tmp}}/o", "neither a Hugging Face",
         setup=files(mine="t/notes.txt"), absent=("{tmp}/o",)),
    Case("upcycle-bad-init", "dba-upcycle", f"{{tmp}}/t {UPCYCLE} --init svd --out {{tmp}}/o", "--init",
         absent=("{tmp}/o",)),
    Case("upcycle-negative-steps", "dba-upcycle", f"{{tmp}}/t {UPCYCLE} --upcycle.blockwise.steps=-1 --out {{tmp}}/o",
         "upcycle.blockwise.steps=-1 must be >= 0", absent=("{tmp}/o",)),
    # ---------------------------------------------------------------------------------------- dba-addition-shrink
    Case("shrink-out-exists", "dba-addition-shrink", f"{ADD} --checkpoint={{pt}} --out={{tmp}}/m",
         "already exists", setup=_addition_pt_and(a="m/params.npz", b="m/meta.json")),
    Case("shrink-force-foreign-dir", "dba-addition-shrink", f"{ADD} --checkpoint={{pt}} --out={{tmp}}/m --force",
         "not an addition model", setup=_addition_pt_and(mine="m/thesis.txt")),
    Case("shrink-out-is-file", "dba-addition-shrink", f"{ADD} --checkpoint={{pt}} --out={{mine}}", "is a file",
         setup=_addition_pt_and(mine="m")),
    # ---------------------------------------------------------------------------------------- dba-addition-report
    Case("report-out-exists", "dba-addition-report", "{run} --out {mine}", "refusing to overwrite",
         setup=lambda tmp: {**_run_dir(tmp), **files(mine="table.md")(tmp)}),
    Case("report-same-run-twice", "dba-addition-report", "{run} {run}/", "more than once", setup=_run_dir),
    Case("report-missing-run", "dba-addition-report", "{tmp}/nope --out {tmp}/t.md", "no such run directory",
         absent=("{tmp}/t.md",)),
]
