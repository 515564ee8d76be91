"""dba-bench: FLOP accounting and a smoke run on a simulated mesh."""
import json

from dba_jax import bench
from helpers import load_preset


def test_flops_per_token_by_hand():
  # 22-layer baseline: 6 x (all params - the input embedding table) + 6 L T (q.k + p.v widths) / 2 (causal).
  m = load_preset("dba_paper_1b.py", "baseline").model
  assert bench.flops_per_token(m, 2048) == 6 * (1_336_502_272 - 50304 * 2048) + 6 * 22 * 2048 * (2048 + 2048) / 2
  # GPT-2: the tied table is the head matmul (counted), the learned positions are a lookup (not counted).
  g = load_preset("gpt2_small.py").model
  assert bench.flops_per_token(g, 1024) == 6 * (124_475_904 - 1024 * 768) + 6 * 12 * 1024 * (768 + 768) / 2
  # DBA scores use sem + geo, values v: sem8 is 256 + 1024 and 1280 wide.
  s = load_preset("dba_paper_1b.py", "sem8").model
  assert bench.flops_per_token(s, 2048) == 6 * (1_198_090_240 - 50304 * 2048) + 6 * 22 * 2048 * (1280 + 1280) / 2


def test_bench_runs_on_a_mesh_and_writes_its_report(tmp_path):
  out = tmp_path / "bench.json"
  rc = bench.main(["--config=configs/quickstart.py:dba", "--config.model.n_layers=1", "--config.train.batch_size=8",
                   "--config.data.seq_len=32", "--steps", "2", "--ckpt-every", "1", "--meshes", "2,2,2",
                   "--peak-tflops", "1", "--out", str(out)])
  assert rc == 0
  report = json.loads(out.read_text())
  assert [(r["mesh"], r["ckpt_every"]) for r in report["rows"]] == [("2x2x2", 0), ("2x2x2", 1)]
  for r in report["rows"]:
    assert r["step_ms"] > 0 and abs(r["tokens_per_s"] - 8 * 32 / (r["step_ms"] / 1e3)) < 1e-6 * r["tokens_per_s"]
    assert r["mfu"] == report["flops_per_token"] * r["tokens_per_s"] / (1e12 * 8)


def test_attention_bench_reports_every_op(tmp_path):
  out = tmp_path / "attn.json"
  assert bench.main(["attention", "--seq", "64", "--heads", "2", "--head-dim", "8", "--dba-qk", "12", "--dba-v", "8", "--repeats", "1",
                     "--out", str(out)]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert {r["op"] for r in rows} == {
      "standard xla fwd+bwd", "standard pallas fwd+bwd", "selective xla fwd+bwd", "selective pallas_scan fwd+bwd",
      "selective pallas fwd+bwd", "dba xla fwd+bwd", "dba pallas fwd+bwd", "dba padded dot_product_attention",
      "cumsum xla fp32 fwd+bwd", "cumsum pallas fp32 fwd+bwd", "protect-attack xla fp32 fwd+bwd",
      "protect-attack pallas fp32 fwd+bwd", "cumsum xla fp64 fwd+bwd", "protect-attack xla fp64 fwd+bwd"}
  assert all(r["T"] == 64 and r["ms"] > 0 for r in rows)


def test_convert_bench_runs_both_directions(tmp_path):
  out = tmp_path / "convert.json"
  small = ["--config.model.n_layers=1", "--config.model.d_model=64", "--config.model.n_heads=4",
           "--config.model.attn_dim=48", "--config.model.sem_dim=16", "--config.model.geo_dim=32",
           "--config.model.d_ff=96", "--config.model.vocab_size=100"]
  assert bench.main(["convert", "--dir", str(tmp_path / "w"), "--out", str(out), *small]) == 0
  r = json.loads(out.read_text())
  assert (tmp_path / "w" / "converted" / "config.json").exists() and (tmp_path / "w" / "back.pt").exists()
  assert r["file_bytes"] >= 4 * r["params"] and r["import_s"] > 0 and r["export_peak_rss"] > r["runtime_rss"] > 0


def test_decode_bench_reports_each_model_and_cache(tmp_path):
  out = tmp_path / "decode.json"
  assert bench.main(["decode", "--layers", "1", "--d-model", "64", "--heads", "2", "--prompt", "16", "--gen", "4",
                     "--out", str(out)]) == 0
  r = json.loads(out.read_text())
  assert r["date"] and r["jax"] and len(r["rows"]) == 4
  assert all(row["kv_bytes_per_token"] > 0 and row["cache_bytes"] > 0 for row in r["rows"])
