"""Parameter counts of every preset, from abstract shapes (the 1B models are never allocated)."""
import subprocess
import sys

import pytest

from dba_jax import model as model_lib
from dba_jax.config import validate
from helpers import REPO, load_preset

EXPECTED = [
    ("dba_paper_1b.py", "baseline", 1_336_502_272),
    ("dba_paper_1b.py", "sem16", 1_244_227_584),
    ("dba_paper_1b.py", "sem8", 1_198_090_240),
    ("dba_paper_1b.py", "sem8_gated", 1_198_090_944),
    ("gpt2_small.py", "", 124_475_904),
    # 12-layer suite (dba.md §2.3: d_ff 4096, sem16/geo32/v48; 709.4M baseline as the reference derives).
    ("dba_paper_12l.py", "baseline", 709_412_864),
    ("dba_paper_12l.py", "bottleneck", 659_081_216),
    ("dba_paper_12l.py", "decoupled", 659_081_216),
    ("dba_paper_12l.py", "gqa", 621_332_480),
]


@pytest.mark.parametrize("name,variant,expected", EXPECTED)
def test_preset_param_counts(name, variant, expected):
  c = validate(load_preset(name, variant))
  assert model_lib.count_params(c.model) == expected


def test_param_count_formula_dba():
  """P = 2Vd + L(A + 3 d f + 2d) + d with A = d(2 sem + 2 geo + v) + v d (dba.md §3), for a non-paper shape."""
  c = load_preset("dba_paper_1b.py", "sem8")
  m = c.model
  m.n_layers, m.d_model, m.n_heads, m.d_ff, m.dba.sem_dim, m.dba.geo_dim, m.attn_dim = 3, 256, 8, 512, 64, 128, 192
  V, d, f = 50304, 256, 512
  attn = d * (2 * 64 + 2 * 128 + 192) + 192 * d
  assert model_lib.count_params(m) == 2 * V * d + 3 * (attn + 3 * d * f + 2 * d) + d


def test_kv_cache_sizes_match_reference():
  """Elements per token for the 22-layer models: 4096 / 3072 / 2560 per layer (dba.md §1.3)."""
  per_layer = {v: model_lib.kv_elems_per_token(load_preset("dba_paper_1b.py", v).model) // 22
               for v in ("baseline", "sem16", "sem8")}
  assert per_layer == {"baseline": 4096, "sem16": 3072, "sem8": 2560}


@pytest.mark.parametrize("variant,expected", [("sem8", 1_198_090_240), ("baseline", 1_336_502_272)])
def test_dry_run_prints_params_and_exits_zero(variant, expected, tmp_path):
  out = subprocess.run([sys.executable, "-m", "dba_jax.main", f"--config=configs/dba_paper_1b.py:{variant}",
                        "--dry-run", f"--workdir={tmp_path / 'w'}"], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert f"params: {expected}" in out.stdout
  assert "mesh:" in out.stdout and "memory per device" in out.stdout
  assert not (tmp_path / "w").exists()  # a dry run writes nothing


def test_selective_gpt2_presets():
  # Selective attention is parameter-free: both 12-head variants have GPT-2 small's 124,475,904 parameters.
  for v in ("selective", "unselective"):
    assert model_lib.count_params(validate(load_preset("selective_gpt2.py", v)).model) == 124_475_904
  # 13 heads with n_embd 768: q, k, v 768 -> 832 (+ biases) and out 832 -> 768 add 64-wide slices per layer.
  extra = 12 * (3 * (768 * 64 + 64) + 64 * 768)
  assert model_lib.count_params(validate(load_preset("selective_gpt2.py", "selective13")).model) == 124_475_904 + extra


def test_cpt_and_mup_presets():
  """CPT: the 12-head checkpoint plus one head per layer (= the 13-head count); every variant validates."""
  extra = 12 * (3 * (768 * 64 + 64) + 64 * 768)
  for v in ("ko_zero", "k_zero", "o_zero", "zero", "normal", "o_rescaled", "unselective_ko_zero"):
    c = validate(load_preset("selective_cpt.py", v))
    assert model_lib.count_params(c.model) == 124_475_904 + extra
    assert (c.train.surgery, c.train.surgery_init) == ("add_head_start", v.removeprefix("unselective_"))
    assert c.model.attn_kind == ("standard" if v.startswith("unselective") else "selective")
  m = validate(load_preset("selective_mup.py", "mini12")).model
  assert (m.mup, m.n_heads, m.d_model, m.mup_base_d_model) == (True, 12, 264, 768)
