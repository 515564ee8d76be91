"""dba_jax.gpu_check (issue 16) in its --cpu-dry mode: sections pass and are written, a wrong kernel or a raising
section makes the run exit 1, an occupied --out is refused. The whole dry run, through launch/gpu_check.sh, is slow."""
import json
import os
import subprocess

import pytest

from dba_jax import gpu_check
from helpers import REPO


@pytest.fixture
def dry(monkeypatch, tmp_path):
  """gpu_check.main with --cpu-dry into a fresh folder; the environment it sets is restored afterwards."""
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  out = tmp_path / "out"

  def run(*args):
    code = gpu_check.main(["--cpu-dry", "--out", str(out), *args])
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    return code, results, out
  return run


def test_scans_section_passes_and_writes_json_and_markdown(dry):
  code, results, out = dry("--sections", "scans")
  assert code == 0
  assert results["exit_code"] == 0 and results["mode"] == "cpu-dry"
  assert list(results["sections"]) == ["scans"]
  rows = results["sections"]["scans"]["rows"]
  assert {r["case"].split("_T")[0] for r in rows} == {"cumsum", "protect_attack"}
  assert all(r["status"] == "pass" for r in rows)
  md = (out / "results.md").read_text()
  assert "| scans | pass |" in md and "protect_attack_T100" in md


def test_injected_kernel_fault_exits_nonzero(dry):
  """A 10% error in the cumsum kernel's output: that case fails, the other scan still passes, exit 1."""
  code, results, out = dry("--sections", "scans", "--inject-fault", "cumsum")
  assert code == 1 and results["exit_code"] == 1
  by = {r["case"]: r for r in results["sections"]["scans"]["rows"]}
  assert results["sections"]["scans"]["status"] == "fail"
  assert by["cumsum_T100"]["status"] == "fail" and by["cumsum_T100"]["rel_err"]["out"] > 0.05
  assert by["protect_attack_T100"]["status"] == "pass"
  assert "## Failures" in (out / "results.md").read_text()


def test_a_raising_section_is_recorded_and_the_rest_still_runs(dry, monkeypatch):
  def broken(plan, fault):
    raise RuntimeError("Triton could not lower this")
  monkeypatch.setattr(gpu_check, "check_flash", broken)
  monkeypatch.setattr(gpu_check, "check_scans", lambda plan, fault: {"status": "pass", "rows": []})  # fast stand-in
  code, results, _ = dry("--sections", "flash", "scans")
  assert code == 1
  flash, scans = results["sections"]["flash"], results["sections"]["scans"]
  assert flash["status"] == "error" and "Triton could not lower this" in flash["error"]
  assert "Traceback" in flash["traceback"] and "broken" in flash["traceback"]
  assert scans["status"] == "pass"


def test_kernel_compile_error_is_a_case_error(dry, monkeypatch):
  """An exception inside one kernel case (here: the reference) marks that case, not the whole run, as an error."""
  from dba_jax.ops import selective
  monkeypatch.setattr(selective, "protect_and_attack", lambda a, p: 1 / 0)
  code, results, _ = dry("--sections", "scans")
  by = {r["case"]: r for r in results["sections"]["scans"]["rows"]}
  assert code == 1 and results["sections"]["scans"]["status"] == "error"
  assert by["protect_attack_T100"]["status"] == "error" and "ZeroDivisionError" in by["protect_attack_T100"]["error"]
  assert by["cumsum_T100"]["status"] == "pass"


def test_existing_out_folder_is_refused_and_untouched(tmp_path, capsys):
  (tmp_path / "notes.txt").write_text("keep")
  assert gpu_check.main(["--cpu-dry", "--out", str(tmp_path)]) == 2
  assert "never overwritten" in capsys.readouterr().err
  assert os.listdir(tmp_path) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "keep"


def test_bad_arguments_exit_2():
  for argv in (["--sections", "nope"], ["--budget-s", "-1"], ["--inject-fault", "everything"]):
    with pytest.raises(SystemExit) as e:
      gpu_check.main(argv)
    assert e.value.code == 2


def test_targets_are_reported_but_never_the_exit_status():
  """Targets from GPU-like numbers: a missed target is 'fail' in the table only."""
  results = {"sections": {
      "timing": {"rows": [{"T": 1024, "selective_vs_flash": 3.0, "selective_vs_cudnn": 3.0},
                          {"T": 2048, "selective_vs_flash": 1.2, "selective_vs_cudnn": 1.5},
                          {"T": 8192, "selective_vs_flash": 1.25, "selective_vs_cudnn": None}]},
      "memory": {"rows": [{"T": 8192}], "selective_ratio": 40.0, "ratio_metric": "peak_bytes"},
      "gpt2": {"mfu": 0.31}}}
  got = gpu_check.targets(results, dry=False)
  assert [t["status"] for t in got] == ["pass", "fail", "pass", "fail"]  # T=1024 is outside 2k-8k; cuDNN 1.5x
  assert got[0]["value"] == 1.25  # the worst ratio in range                 # and MFU 31% miss
  assert all(t["status"].startswith("n/a") for t in gpu_check.targets(results, dry=True))


@pytest.mark.slow
def test_full_cpu_dry_run_through_the_launcher(tmp_path):
  """launch/gpu_check.sh --cpu-dry end to end (about 2 minutes on the 2-core CPU): every section passes."""
  out = tmp_path / "check"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "DBA_VENV": os.path.join(REPO, ".venv")}
  env.pop("XLA_FLAGS", None)  # the CLI's own environment, not the tests' 8 simulated devices
  proc = subprocess.run([os.path.join(REPO, "launch", "gpu_check.sh"), "--cpu-dry", "--out", str(out)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert {n: s["status"] for n, s in results["sections"].items()} == {n: "pass" for n in gpu_check.SECTIONS}
  assert results["sections"]["gpt2"]["tokens_per_s"] > 0
  assert len(results["sections"]["memory"]["rows"]) == 4 and len(results["targets"]) == 4
  md = (out / "results.md").read_text()
  assert md in proc.stdout  # the markdown is also printed
  assert (out / "gpt2_bench.json").exists()


def test_gpu_plan_kernels_lower_for_cuda():
  """Every kernel call the GPU run makes (correctness cases at their T and dtypes, the timed T 8192 bf16 calls)
  builds its Triton kernels from this CPU host, forward and backward: a block or shape the GPU sizes break would
  show here, before a GPU is lent (lowering only; nothing is compiled for a device)."""
  import jax
  import jax.numpy as jnp

  from dba_kernels import cumsum as kcumsum, flash_attention as fa, protect_attack as kpa, selective_flash as sflash
  plan = gpu_check.gpu_plan()
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
  calls = []  # (label, fn, inputs + cotangent)
  for name, B, T, H, K, D, E, n_prefix, dtype in plan.flash:
    S = T + n_prefix
    calls.append((name, lambda q, k, v, n=n_prefix: fa.flash_attention(q, k, v, n_prefix=n),
                   [sds(s, dtype) for s in ((B, T, H, D), (B, S, K, D), (B, S, K, E), (B, T, H, E))]))
  for name, B, T, H, K, D, E, variant, dtype in plan.selective:
    m = variant.get("selection_heads", 0)
    calls.append((name, lambda q, k, v, kw=variant: sflash.selective_flash_attention(q, k, v, **kw),
                  [sds(s, dtype) for s in ((B, T, H, D), (B, T, K, D), (B, T, K, E), (B, T, H - m, E))]))
  for name, kind, B, T, S in plan.scans:
    n_in = 1 if kind == "cumsum" else 2
    fn = kcumsum.exclusive_cumsum if kind == "cumsum" else kpa.protect_and_attack
    calls.append((name, fn, [sds((B, T, S), "float32")] * (n_in + 1)))
  T = max(plan.timing_seq)
  for name in ("selective", "flash"):
    calls.append((f"timing_{name}_T{T}", gpu_check._attention_fns(True)[name],
                  [sds((plan.timing_tokens // T, T, plan.heads, plan.head_dim), "bfloat16")] * 4))
  for label, fn, args in calls:
    def fwd_bwd(*a, f=fn):  # the output and the input gradients: forward and backward kernels (an unused forward
      out, pull = jax.vjp(f, *a[:-1])  # is dead code: cumsum's backward needs no residual)
      return out, pull(a[-1])
    text = jax.jit(fwd_bwd).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") >= 2, label  # forward and backward kernels
    assert "mosaic_gpu" not in text, label
