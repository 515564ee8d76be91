"""`dba-eval compare` on two tiny 2-step checkpoints: every output file, the baseline's zero deltas, the panels."""
import csv
import json
import math
import os

import pytest

from dba_jax import compare_eval, evaluate, train
from helpers import tiny

MANIFEST = '''
import ml_collections

def get_config():
  c = ml_collections.ConfigDict()
  c.name = "tiny"
  c.checkpoints = [{{"name": "std", "path": "{std}", "baseline": True}},
                   {{"name": "dba_tiny", "path": "{dba}", "baseline": False}}]
  c.eval = {{"max_windows": 4, "batch_size": 4}}
  c.behavior = {{"suite": "v1", "limit": 6, "max_new": 4, "n_resamples": 200}}
  c.latency = {{"context_lengths": (16,), "decode_tokens": 3}}
  c.cache = "float16"
  return c
'''


@pytest.fixture(scope="module")
def out(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("compare")
  paths = {}
  for kind in ("standard", "dba"):
    c = tiny(kind)
    c.train.steps, c.train.ckpt_every, c.train.eval_every = 2, 2, 2
    paths[kind] = str(tmp / kind)
    train.train(c, paths[kind], quiet=True)
  manifest = tmp / "manifest.py"
  manifest.write_text(MANIFEST.format(std=paths["standard"], dba=paths["dba"]))
  out_dir = tmp / "out"
  # Through the dba-eval entry point, so the subcommand wiring is exercised too.
  assert evaluate.main(["compare", "--manifest", str(manifest), "--out", str(out_dir)]) == 0
  return out_dir


FILES = ["results.json", "results.csv", "results.md", "results.tex", "compare.svg"] + [
    f"panel_{k}.svg" for k in compare_eval.PANEL_TITLES]


def test_every_output_file_is_written(out):
  for name in FILES:
    assert (out / name).is_file() and (out / name).stat().st_size > 0, name


def test_json_has_both_models_and_baseline(out):
  r = json.loads((out / "results.json").read_text())
  models = {m["name"]: m for m in r["models"]}
  assert list(models) == ["std", "dba_tiny"] and r["baseline"] == "std"
  assert models["std"]["baseline"] and not models["dba_tiny"]["baseline"]
  assert models["std"]["attn_kind"] == "standard" and models["dba_tiny"]["attn_kind"] == "dba"
  assert r["n_probes"] == 6 and all(len(m["records"]) == 6 for m in models.values())
  for m in models.values():
    assert math.isfinite(m["loss"]["nll"]) and 0 < m["loss"]["nll"] < 10
    assert m["params"] > 0
    (ctx,) = m["context"]
    assert ctx["context"] == 16 and ctx["decode_tokens_per_s"] > 0 and ctx["ttft_s"] > 0
    # The float16 cache allocates exactly the analytic bytes per token (no window, no null tokens here).
    assert ctx["measured_bytes_per_token"] == m["kv_bytes_per_token_analytic"]
  # float16 x 2 layers: standard k + v = 2 x 32 values; DBA k_sem 16 + k_geo 32 + v 48 values.
  assert models["std"]["kv_bytes_per_token_analytic"] == 2 * 2 * 64
  assert models["dba_tiny"]["kv_bytes_per_token_analytic"] == 2 * 2 * 96


def test_baseline_category_deltas_are_zero(out):
  r = json.loads((out / "results.json").read_text())
  base = next(m for m in r["models"] if m["baseline"])
  deltas = base["behavior"]["per_category_delta_pp"]
  assert len(deltas) >= 3  # the round-robin limit spreads 6 probes over several categories
  assert all(d["weighted"] == 0.0 and d["hard"] == 0.0 for d in deltas.values())
  assert base["behavior"]["vs_baseline"] is None
  other = next(m for m in r["models"] if not m["baseline"])
  assert set(other["behavior"]["per_category_delta_pp"]) == set(deltas)


def test_tables_have_a_row_per_model(out):
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["model"] for r in rows] == ["std", "dba_tiny"] and [r["baseline"] for r in rows] == ["yes", ""]
  assert all(math.isfinite(float(r["loss"])) for r in rows)
  md = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
  assert len(md) == 3 and md[1].startswith("| std |") and md[2].startswith("| dba_tiny |")
  tex = (out / "results.tex").read_text()
  assert tex.count(r"\\") == 3 and r"dba\_tiny &" in tex and "\nstd &" in tex
  assert tex.strip().endswith(r"\end{tabular}")


def test_figure_has_every_panel(out):
  svg = (out / "compare.svg").read_text()
  assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
  for key, title in compare_eval.PANEL_TITLES.items():
    assert title in svg, title
    assert title in (out / f"panel_{key}.svg").read_text()
  assert set(compare_eval.PANEL_TITLES) == {"scores", "difficulty", "match_types", "category_deltas", "memory",
                                            "decode", "ttft"}
  for color in compare_eval.PALETTE[:3]:
    assert color in svg


def test_manifest_needs_exactly_one_baseline(tmp_path):
  p = tmp_path / "m.py"
  p.write_text(MANIFEST.format(std="a", dba="b").replace('"baseline": False', '"baseline": True'))
  with pytest.raises(ValueError, match="exactly one"):
    compare_eval.load_manifest(str(p))
  assert compare_eval.main(["--manifest", str(p)]) == 2
