"""dba-bench: FLOP accounting and a smoke run on a simulated mesh; the addition speed harness against torch."""
import json

import jax
import numpy as np
import pytest

from dba_jax import bench
from dba_jax.bench import addition as bench_addition, gpt as bench_gpt, train_step
from helpers import load_preset


def test_flops_per_token_by_hand():
  # 22-layer baseline: 6 x (all params - the input embedding table) + 6 L T (q.k + p.v widths) / 2 (causal).
  m = load_preset("dba_paper_1b.py", "baseline").model
  assert train_step.flops_per_token(m, 2048) == 6 * (1_336_502_272 - 50304 * 2048) + 6 * 22 * 2048 * (2048 + 2048) / 2
  # GPT-2: the tied table is the head matmul (counted), the learned positions are a lookup (not counted).
  g = load_preset("gpt2_small.py").model
  assert train_step.flops_per_token(g, 1024) == 6 * (124_475_904 - 1024 * 768) + 6 * 12 * 1024 * (768 + 768) / 2
  # DBA scores use sem + geo, values v: sem8 is 256 + 1024 and 1280 wide.
  s = load_preset("dba_paper_1b.py", "sem8").model
  assert train_step.flops_per_token(s, 2048) == 6 * (1_198_090_240 - 50304 * 2048) + 6 * 22 * 2048 * (1280 + 1280) / 2


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
           "--config.model.attn_dim=48", "--config.model.dba.sem_dim=16", "--config.model.dba.geo_dim=32",
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


def _addition_pair(variant: str):
  """(config, arch, stacked (1, ...) params, torch model loaded with the same params, batch (64, 33) x and y)."""
  from dba_jax.addition import data, torch_ref
  from dba_jax.addition.model import Arch
  c = load_preset("addition.py", variant)
  a = Arch.from_config(c.model)
  params = bench_addition.addition_params(a, [c.train.seed])
  model = torch_ref.load_params(torch_ref.TinyDecoderLM(a), jax.tree.map(lambda x: x[0], params))
  x, y = data.Sampler(64, 0, np.zeros(0, np.uint64)).batch(7000)
  return c, a, params, model, x, y


def test_addition_torch_step_equals_jax_step():
  """torch_ref's step computes what train.make_train_step computes, so the speed table compares like with like.
  456p covers RMSNorm, shareA_tieKV and the low-rank linears. From the same params and batch, one step gives the
  same loss and params. Warmup is 1 step, so the full lr moves every parameter. LambdaLR's factors also equal our
  schedule. Longer runs drift by about 1e-5. Adam divides each gradient element by that element's RMS, and this
  magnifies fp32 summation noise (about 1e-7) on the elements near zero."""
  torch = pytest.importorskip("torch")

  from dba_jax.addition import torch_ref, train
  from dba_jax.optim import lr_schedule
  c, a, params, model, x, y = _addition_pair("456p")
  o = c.optim
  o.warmup_steps, c.train.steps = 1, 4
  opt = train.make_optimizer(o, c.train.steps)
  topt, sched = torch_ref.make_optimizer(model, o, c.train.steps)
  params = jax.device_put(params)  # not jnp.asarray, which compiles a tiny program per leaf shape
  params, _, m = train.make_train_step(a, opt)(params, jax.jit(jax.vmap(opt.init))(params), x[None], y[None])
  loss = torch_ref.train_step(model, topt, sched, torch.from_numpy(x).long(), torch.from_numpy(y).long())
  assert abs(float(m["loss"][0]) - float(loss)) < 1e-5
  ours = jax.tree.map(lambda v: np.asarray(v)[0], params)  # index in numpy: no eager JAX op per leaf shape
  jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, atol=1e-5, rtol=0), ours, torch_ref.to_params(model))
  o.warmup_steps = 3
  steps = np.arange(10)  # warmup, cosine, and flat past the end
  np.testing.assert_allclose(jax.jit(lr_schedule(o, 8))(steps), [o.lr * torch_ref.lr_factor(o, 8, s) for s in steps],
                             rtol=1e-6)


def test_addition_torch_grads_equal_jax_grads():
  """1128p covers the other model paths: LayerNorm, full-rank linears, and a fused qkv split q|k|v. The optimizer
  is the same for every model, so the loss and gradients suffice here, and they cost one compile less."""
  torch = pytest.importorskip("torch")
  import functools

  from dba_jax.addition import torch_ref
  from dba_jax.addition.model import loss_fn
  c, a, params, model, x, y = _addition_pair("1128p")
  loss, grads = jax.jit(jax.value_and_grad(functools.partial(loss_fn, a)))(jax.tree.map(lambda p: p[0], params), x, y)
  logits = model(torch.from_numpy(x).long())
  tloss = torch.nn.functional.cross_entropy(logits.reshape(-1, a.vocab_size), torch.from_numpy(y).long().reshape(-1),
                                            ignore_index=-100)
  tloss.backward()
  for p in model.parameters():  # copy the gradients into the params so to_params lays them out as ours
    p.data = p.grad
  assert abs(float(loss) - float(tloss)) < 1e-5
  jax.tree.map(lambda g, h: np.testing.assert_allclose(g, h, atol=1e-5, rtol=1e-4), grads, torch_ref.to_params(model))


def test_addition_bench_times_jax_and_torch(tmp_path):
  pytest.importorskip("torch")
  out = tmp_path / "add.json"
  assert bench.main(["addition", "--config=configs/addition.py:456p", "--config.train.batch_size=16",
                     "--config.train.val_size=8", "--config.train.test_size=8", "--steps", "4", "--warmup", "1",
                     "--chunk", "2", "--num-models", "2", "--batching", "map", "--torch-threads", "1",
                     "--steps-per-call", "1", "2", "--full-positions", "--torch-batched", "--out", str(out)]) == 0
  r = json.loads(out.read_text())
  assert r["params"] == 456 and r["torch_num_threads"] >= 1 and r["jax_devices"] and r["interleaved"]
  assert [(x["impl"], x["sampler"], x["num_models"], x["batching"], x["threads"], x["steps_per_call"],
           x["loss_from"]) for x in r["rows"]] == [
      ("jax", "numpy", 2, "map", None, 1, 21), ("jax", "numpy", 2, "map", None, 2, 21),
      ("jax", "numpy", 2, "map", None, 1, 0), ("torch", "loop", 1, "-", 1, 1, 0),
      ("torch", "vectorised", 1, "-", 1, 1, 0), ("torch", "vectorised", 2, "batched", 1, 1, 0)]
  for x in r["rows"]:
    assert x["steps_per_s"] > 0 and x["model_steps_per_s"] == x["num_models"] * x["steps_per_s"]
    assert x["sampler_ms"] > 0 and np.isfinite(x["final_loss"])


# ---------------------------------------------------------------------------------- dba-bench gpt --torch

TINY_GPT = (2, 32, 2, 16, 2, 64)  # L, d, H, T, B, V
# Larger init and lr than GPT-2's: O(1) attention logits make F matter, and two steps move the loss visibly.
TINY_GPT_OVERRIDES = ["--config.model.init_std=0.3", "--config.optim.lr=1e-2"]


@pytest.mark.parametrize("attn", ["standard", "selective"])
def test_torch_gpt_matches_dba_jax_through_two_adamw_steps(attn):
  import torch

  from dba_jax import mesh as mesh_lib, torch_gpt, train
  c = bench_gpt.gpt_config(attn, TINY_GPT, TINY_GPT_OVERRIDES)
  trainer = train.Trainer(c, mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]))
  state = trainer.init_state(3)
  tm = torch_gpt.from_jax(state["params"], c)
  n_jax = sum(int(np.size(x)) for x in jax.tree.leaves(state["params"]))
  assert sum(p.numel() for p in tm.parameters()) == n_jax  # tied head counted once in both
  topt = torch_gpt.make_optimizer(tm, c.optim)
  tokens = np.random.default_rng(1).integers(0, 64, (2, 17)).astype(np.int32)
  batch = mesh_lib.global_batch(tokens[None], trainer.accum_sharding, 1)
  if attn == "selective":  # the test can see F: the same weights without it give another loss
    plain = torch_gpt.GPT(bench_gpt.gpt_config("standard", TINY_GPT, TINY_GPT_OVERRIDES).model)
    plain.load_state_dict(tm.state_dict())
    with torch.no_grad():
      no_f, with_f = float(plain.loss(torch.as_tensor(tokens).long())), float(tm.loss(torch.as_tensor(tokens).long()))
    assert abs(no_f - with_f) > 1e-3 * with_f
  jax_losses, torch_losses = [], []
  for i in range(3):  # losses before step 1, after 1 and after 2 AdamW steps
    state, metrics = trainer.train_step(state, batch)
    jax_losses.append(float(metrics["loss"]))
    torch_losses.append(torch_gpt.train_step(tm, topt, torch.as_tensor(tokens).long(), float(trainer.schedule(i)),
                                             c.optim.clip_norm))
  np.testing.assert_allclose(torch_losses[0], jax_losses[0], rtol=1e-5)
  np.testing.assert_allclose(torch_losses[1:], jax_losses[1:], rtol=1e-4)
  assert jax_losses[2] < jax_losses[0] - 0.05  # the steps did move the parameters


def test_gpt_torch_bench_writes_both_rates(tmp_path):
  out = tmp_path / "gpt.json"
  assert bench.main(["gpt", "--torch", "--attn", "standard", "--shapes", ":".join(map(str, TINY_GPT)), "--steps", "1",
                     "--rounds", "1", "--warmup", "1", "--out", str(out)]) == 0
  r = json.loads(out.read_text())
  (row,) = r["rows"]
  assert row["jax_tokens_per_s"] > 0 and row["torch_tokens_per_s"] > 0 and r["torch_num_threads"] >= 1
  assert row["ratio_jax_over_torch"] == pytest.approx(row["jax_tokens_per_s"] / row["torch_tokens_per_s"])
  assert (row["layers"], row["d_model"], row["heads"], row["seq_len"], row["batch"], row["vocab"]) == TINY_GPT
  assert row["first_loss"]["jax"] == pytest.approx(row["first_loss"]["torch"], rel=1e-5)


def test_gpt_bench_refuses_bad_shapes_and_layouts(capsys):
  with pytest.raises(SystemExit) as e:
    bench.main(["gpt", "--torch", "--shapes", "4:128"])
  assert e.value.code == 2 and "neither a preset" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    bench.main(["gpt", "--torch", "--shapes", "2:32:2:16:2:64", "--config.model.mlp=swiglu"])
  assert e.value.code == 2 and "model.mlp='swiglu'" in capsys.readouterr().err


def test_fused_head_cross_entropy_matches_logits_then_nll():
  """losses.fused_head_nll_mean against losses.nll of the full logits: value and both gradients, with padded
  vocab columns (60 real of 64) masked out of the normaliser."""
  from dba_jax import losses
  k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
  h_Nd, w_Vd = jax.random.normal(k1, (48, 16)), 0.5 * jax.random.normal(k2, (64, 16))
  t_N = jax.random.randint(k3, (48,), 0, 60)
  ref = lambda h, w: 2.5 * losses.nll(jax.numpy.einsum("nd,vd->nv", h, w), t_N, 60).mean()
  fused = lambda h, w: 2.5 * losses.fused_head_nll_mean(h, w, t_N, 60, 16)
  np.testing.assert_allclose(fused(h_Nd, w_Vd), ref(h_Nd, w_Vd), rtol=1e-6)
  for a, b in zip(jax.grad(fused, (0, 1))(h_Nd, w_Vd), jax.grad(ref, (0, 1))(h_Nd, w_Vd)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="not a multiple"):
    losses.fused_head_nll_mean(h_Nd, w_Vd, t_N, 60, 20)


def test_fused_cross_entropy_and_unrolled_layers_match_the_default_step():
  """train.ce_chunk (fused vocab projection + CE) and model.scan_unroll=0 change the program, not the math: the
  training loss and every gradient (the tied table gets both its uses) agree with the default step."""
  from dba_jax import mesh as mesh_lib, train
  shape = (2, 32, 2, 16, 2, 60)
  tokens = jax.numpy.asarray(np.random.default_rng(2).integers(0, 60, (2, 17)).astype(np.int32))
  results = []
  for extra in ([], ["--config.train.ce_chunk=8", "--config.model.scan_unroll=0"]):
    c = bench_gpt.gpt_config("selective", shape, ["--config.model.init_std=0.3"] + extra)
    trainer = train.Trainer(c, mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]))
    params = trainer.init_state(5)["params"]
    (loss, _), grads = jax.jit(jax.value_and_grad(trainer.loss_fn, has_aux=True))(params, tokens, jax.random.key(0))
    results.append((float(loss), grads))
  (ref_loss, ref_grads), (loss, grads) = results
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, ref_grads)
  with pytest.raises(SystemExit):  # a chunk that does not divide the micro-batch's 32 tokens is refused up front
    bench_gpt.gpt_config("selective", shape, ["--config.train.ce_chunk=12"])
