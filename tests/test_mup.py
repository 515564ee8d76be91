"""muP (selective.md §7): multipliers, MuAdamW groups, and the coordinate check across 4 widths."""
import jax
import numpy as np
import pytest

from dba_jax import coord_check, model as model_lib, optim
from dba_jax.config import validate
from helpers import load_preset, tiny


def test_mup_init_readout_and_optimizer_groups():
  c = validate(tiny("standard", mup=True, mup_base_d_model=16, mup_zero_query=True))  # width_mult 2
  sp = validate(tiny("standard"))
  p, p_sp = (model_lib.init_params(x.model, jax.random.key(0)) for x in (c, sp))
  attn, attn_sp = p["blocks"]["attn"], p_sp["blocks"]["attn"]
  np.testing.assert_array_equal(attn["q"]["kernel"], 0)  # mup_zero_query
  np.testing.assert_allclose(attn["k"]["kernel"], attn_sp["k"]["kernel"] / np.sqrt(2), rtol=1e-6)  # matrix-like
  np.testing.assert_array_equal(p["embed"], p_sp["embed"])  # vector-like keeps the plain std
  np.testing.assert_array_equal(p["head"]["kernel"], p_sp["head"]["kernel"])
  mult = optim.lr_multipliers(c.model, model_lib.param_axes(c.model))
  assert mult["blocks"]["attn"]["k"]["kernel"] == 0.5 and mult["blocks"]["mlp"]["w_in"] == 0.5
  assert mult["embed"] == 1.0 and mult["head"]["kernel"] == 1.0 and mult["blocks"]["attn_norm"]["scale"] == 1.0
  # Readout multiplier 1/width_mult and attention scale 1/d_head: same params, muP model's logits = SP's / 2
  # when the attention scale cannot matter (zero queries give uniform attention either way).
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (1, 8), 0, 256))
  run = lambda cfg, params: np.asarray(model_lib.Model(cfg.model, model_lib.abstract(cfg.model)[0], params)(tokens))
  np.testing.assert_allclose(run(c, p), run(sp, p) / 2, rtol=1e-5, atol=1e-6)


def test_mup_attention_scale_is_one_over_head_dim():
  c = validate(tiny("standard", mup=True, mup_base_d_model=32))  # width_mult 1: only the attention scale differs
  sp = validate(tiny("standard"))
  p = model_lib.init_params(c.model, jax.random.key(0))
  attn = p["blocks"]["attn"]
  D = 8
  # Scaling the queries by 1/sqrt(D) turns SP's q.k/sqrt(D) into muP's q.k/D.
  p_sp = {**p, "blocks": {**p["blocks"], "attn": {**attn, "q": {"kernel": attn["q"]["kernel"] / np.sqrt(D)}}}}
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (1, 8), 0, 256))
  run = lambda cfg, params: np.asarray(model_lib.Model(cfg.model, model_lib.abstract(cfg.model)[0], params)(tokens))
  np.testing.assert_allclose(run(c, p), run(sp, p_sp), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def coords():
  base = load_preset("selective_mup.py", "cpu")
  base.data.seq_len, base.train.batch_size = 32, 4
  out = {}
  for mup in (True, False):
    c = base.copy_and_resolve_references()
    c.model.mup = mup
    out[mup] = coord_check.run(c, [1, 2, 4, 8], steps=4)
  return out


@pytest.mark.slow  # ~110 s (four widths trained); the coord-check CLI test runs in the default tier
def test_mup_coordinates_flat_across_four_widths(coords):
  """After 4 Adam steps, muP keeps every block output within ~2x across an 8x width range, while the standard
  parametrisation lets the MLP and attention outputs grow several-fold with width."""
  for site in ("embed", "attn", "mlp", "logits", "v"):
    assert coord_check.growth(coords[True], site, 4) < 2.5, site
  assert coord_check.growth(coords[False], "mlp", 4) > 5
  assert coord_check.growth(coords[False], "attn", 4) > 4


def test_coord_check_cli_writes_csv_and_svg(tmp_path):
  args = ["dba-coord-check", "--config=" + load_preset.__globals__["REPO"] + "/configs/selective_mup.py:cpu",
          "--config.data.seq_len=16", "--config.train.batch_size=2", "--heads=1,2", "--steps=1", f"--out={tmp_path}"]
  assert coord_check.main(args) == 0
  lines = (tmp_path / "coords.csv").read_text().splitlines()
  assert lines[0] == "heads,d_model,step,site,mean_abs" and len(lines) == 1 + 2 * 2 * 8  # 2 widths, steps 0-1, 8 sites
  assert (tmp_path / "coords.svg").read_text().startswith("<svg")
  assert coord_check.main(args[:2] + ["--heads=2", f"--out={tmp_path}"]) == 2
