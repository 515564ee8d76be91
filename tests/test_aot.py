"""dba-aot: the Trainer's own step compiled by libtpu for a TPU slice that is not here (compile-only devices)."""
import json

import jax
import numpy as np
import pytest

from dba_jax import aot, mesh as mesh_lib, train
from dba_jax.cli import parse_flags
from dba_jax.config import ConfigError, validate

TINY = ["--config.model.n_layers=1", "--config.model.d_model=64", "--config.model.d_ff=128",
        "--config.model.max_seq_len=32", "--config.data.seq_len=32", "--config.train.batch_size=8"]


def tiny_config(*extra):
  return validate(parse_flags(["t", "--config=configs/quickstart.py:dba", *TINY, *extra]).config)


@pytest.fixture(scope="module")
def v5e():
  try:
    return aot.aot_kernels.topology_devices("v5e:2x2")
  except ConfigError as e:
    pytest.skip(f"no TPU compile-only topology on this host ({e})")


def test_abstract_state_is_what_dba_train_passes():
  """No libtpu needed: the abstract state and batch dba-aot lowers with give the very program dba-train's real
  state does (same shapes, dtypes, shardings), through the same jit that Trainer.train_step wraps."""
  c = tiny_config("--config.mesh.shape=(2,2,2)")
  p = aot.train_program(c, jax.devices())
  trainer = p.owner
  assert p.fn is trainer.train_step.__wrapped__ is trainer.train_step_jit
  state = trainer.init_state(0)
  tokens = np.zeros((1, 8, 33), np.int32)
  batch = mesh_lib.global_batch(tokens, trainer.accum_sharding, 1)
  with jax.set_mesh(trainer.mesh):
    real = p.fn.lower(state, batch).as_text()
    abstract = p.fn.lower(*p.args).as_text()
  assert abstract == real


def test_compiles_and_reports(v5e, tmp_path, capsys):
  out = tmp_path / "r.json"
  rc = aot.main(["dba-aot", "--config=configs/quickstart.py:dba", "--topology=v5e:2x2", *TINY, f"--out={out}"])
  assert rc == 0
  r = json.loads(out.read_text())
  assert (r["topology"], r["chip"], r["device_count"], r["devices_used"]) == ("v5e:2x2", "v5e", 4, 4)
  assert r["mesh_shape"] == {"data": 4, "fsdp": 1, "tensor": 1} and r["fits"] is True and r["hbm_gib"] == 16
  b = r["bytes_per_device"]
  assert b["total"] == b["argument"] + b["output"] - b["alias"] + b["temp"] + b["generated_code"] > 0
  assert b["alias"] > 0  # the state is donated
  assert r["compiler_per_device"]["flops"] > 0 and r["compile_s"] > 0 and r["peak_flops_per_chip"] == 197e12
  assert {"estimate_tokens_per_s_compiler", "estimate_mfu_compiler", "model_flops_per_step"} <= set(r)
  assert "fits" in capsys.readouterr().out
  with pytest.raises(SystemExit) as e:  # an existing report is kept without --force
    aot.main(["dba-aot", "--config=configs/quickstart.py:dba", "--topology=v5e:2x2", f"--out={out}"])
  assert e.value.code == 2 and "--force" in capsys.readouterr().err


def test_does_not_fit_exits_3(v5e, capsys):
  # ~1.7B parameters, replicated: 20 GiB of fp32 params and Adam moments per 16 GiB v5e device.
  big = ["--config.model.d_model=8192", "--config.model.d_ff=65536", "--config.model.n_heads=8",
         "--config.model.attn_dim=0", "--config.model.dba.sem_dim=64", "--config.model.dba.geo_dim=128"]
  rc = aot.main(["dba-aot", "--config=configs/quickstart.py:dba", "--topology=v5e:2x2", *TINY, *big])
  err = capsys.readouterr().err
  assert rc == 3 and "Traceback" not in err and len(err.strip().splitlines()) == 1
  assert "GiB over" in err and "mesh.shape" in err


@pytest.mark.parametrize("args, needle", [
    (["--topology=v9z:2x2"], "v9z"),
    (["--topology=v5e:2x2", "--config.mesh.shape=(3,1,1)"], "4 are present"),
    (["--topology=v5e:2x2", "--config.mesh.shape=(4,1,1)", "--config.train.batch_size=6"], "must split"),
    (["--topology=v5e:2x2", "--config.model.d_modl=3"], "bad --config"),
])
def test_bad_input_exits_2(v5e, capsys, args, needle):
  rc = aot.main(["dba-aot", "--config=configs/quickstart.py:dba", *TINY, *args])
  err = capsys.readouterr().err
  assert rc == 2 and needle in err and "Traceback" not in err


def test_decode_step_compiles(v5e, tmp_path):
  out = tmp_path / "d.json"
  assert aot.main(["dba-aot", "--config=configs/quickstart.py:dba", "--topology=v5e:2x2", *TINY, "--decode",
                   f"--out={out}"]) == 0
  r = json.loads(out.read_text())
  assert r["what"] == "decode" and r["devices_used"] == 1 and r["tokens_per_step"] == 8 and r["fits"]


def test_without_libtpu_exits_2(monkeypatch, capsys):
  monkeypatch.setattr(aot.aot_kernels.importlib.util, "find_spec", lambda name: None)
  assert aot.main(["dba-aot", "--config=configs/quickstart.py:dba", "--topology=v5e:2x2"]) == 2
  assert "needs libtpu: pip install -e '.[tpu]'" in capsys.readouterr().err


def test_kernels_mode_reports_every_case_and_fails_on_one(monkeypatch, tmp_path, capsys):
  """--kernels runs aot_kernels' matrix: every row in --out, exit 1 naming a case that does not compile."""
  cases = [aot.aot_kernels.Case("cumsum", "v5p", 256, "float32"),
           aot.aot_kernels.Case("flash_attention", "v5p", 0, "float32")]  # T = 0: the kernel refuses it
  monkeypatch.setattr(aot.aot_kernels, "matrix", lambda full: cases)
  try:
    aot.aot_kernels.topology_devices("v5p:2x2x1")
  except Exception as e:  # noqa: BLE001
    pytest.skip(f"no TPU compile-only topology on this host ({e})")
  out = tmp_path / "k.json"
  assert aot.main(["dba-aot", "--kernels", f"--out={out}"]) == 1
  rows = json.loads(out.read_text())
  assert [r["ok"] for r in rows] == [True, False] and rows[0]["mosaic_kernels"] == 2
  assert "1 cases failed: flash_attention/v5p/T0" in capsys.readouterr().err


def test_one_and_two_chip_topologies_construct():
  """v6e-1 / v5e-1 style hosts sit below libtpu's default 2x2x1 chips per host: they need their own bounds."""
  try:
    devices = {name: aot.aot_kernels.topology_devices(name) for name in ("v6e:1x1", "v6e:2x1", "v5e:2x2")}
  except ConfigError as e:
    pytest.skip(f"no TPU compile-only topology on this host ({e})")
  assert {name: len(d) for name, d in devices.items()} == {"v6e:1x1": 1, "v6e:2x1": 2, "v5e:2x2": 4}
