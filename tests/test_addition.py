"""dba_jax.addition: encoding, curriculum, held-out exclusion, parameter counts, tie modes, vmapped training,
evaluation of hand-built models, and the released PyTorch checkpoints (others.md System A)."""
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dba_jax import torch_io
from dba_jax.addition import checkpoint, data
from dba_jax.evals import addition as eval_lib
from dba_jax.addition import model as M
from dba_jax.addition import train as train_lib
from dba_jax.addition.config import validate
from dba_jax.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.normpath(os.path.join(REPO, "..", "shared", "fixtures", "addition"))


def _configs():
  spec = importlib.util.spec_from_file_location("addition_configs", os.path.join(REPO, "configs", "addition.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


# ------------------------------------------------------------------------------------------------------ data


def test_encoding_round_trip():
  rng = np.random.default_rng(0)
  a = np.concatenate([[0, 9_999_999_999, 1, 5_000_000_000], rng.integers(0, data.MAX_OPERAND, 500)])
  b = np.concatenate([[0, 9_999_999_999, 9_999_999_999, 5_000_000_000], rng.integers(0, data.MAX_OPERAND, 500)])
  full = data.encode(a, b)
  assert full.shape == (504, 34) and full.max() <= data.EOS
  assert list(full[2, :22]) == [0] * 9 + [1, data.PLUS] + [9] * 10 + [data.EQUALS]  # MSD first, zero-padded
  assert list(full[2, 22:]) == [0] * 10 + [1, data.EOS]  # 10,000,000,000 reversed, then EOS
  ra, rb = data.decode_prompt(full[:, :22])
  np.testing.assert_array_equal(ra, a)
  np.testing.assert_array_equal(rb, b)
  np.testing.assert_array_equal(data.decode_sum(full[:, 22:33]), a + b)
  assert (full[:, 33] == data.EOS).all()
  x, y = data.inputs_labels(full)
  assert x.shape == y.shape == (504, 33)
  assert (y[:, :21] == data.IGNORE).all() and (y[:, 21:] == full[:, 22:]).all()  # 12 labelled positions
  np.testing.assert_array_equal(x, full[:, :33])


def test_curriculum_boundaries():
  for step, want in [(0, (1, 3)), (1999, (1, 3)), (2000, (1, 6)), (6999, (1, 6)), (7000, (1, 10)),
                     (27000, (1, 10)), (54000, (1, 10))]:
    assert data.phase_at(step) == want, step
  s = data.Sampler(4096, 0, np.zeros(0, np.uint64))
  a, b = s.operands(1999)
  assert max(a.max(), b.max()) < 10**3 and max(a.max(), b.max()) >= 100
  a, b = s.operands(2000)
  assert max(a.max(), b.max()) < 10**6 and max(a.max(), b.max()) >= 10**3
  a, b = s.operands(7000)
  assert max(a.max(), b.max()) >= 10**9
  # n is uniform in [1, 10]: about 10% of pairs have both operands < 10
  assert 0.05 < np.mean((a < 10) & (b < 10)) < 0.15
  assert data.parse_curriculum("1-2:5,3-4:7") == ((1, 2, 5), (3, 4, 7))


def test_holdout_exclusion():
  sp = data.holdout_splits(300, 700, seed=3)
  pairs = set(zip(np.concatenate([sp["val_a"], sp["test_a"]]).tolist(),
                  np.concatenate([sp["val_b"], sp["test_b"]]).tolist()))
  assert len(pairs) == 1000 and len(sp["val_a"]) == 300 and len(sp["test_b"]) == 700
  np.testing.assert_array_equal(data.holdout_splits(300, 700, seed=3)["test_a"], sp["test_a"])  # deterministic
  # 1-digit phase: 100 possible pairs; reserve all but (4, 7), so every draw must be (4, 7)
  every = [(i, j) for i in range(10) for j in range(10) if (i, j) != (4, 7)]
  ra, rb = np.array([p[0] for p in every]), np.array([p[1] for p in every])
  reserved = data.reserved_hashes({"val_a": ra, "val_b": rb, "test_a": ra[:0], "test_b": rb[:0]})
  s = data.Sampler(256, 1, reserved, phases=((1, 1, 10),))
  x, y = s.batch(0)
  a, b = data.decode_prompt(x[:, :22])
  assert (a == 4).all() and (b == 7).all()


# ----------------------------------------------------------------------------------------------------- model


def test_parameter_counts():
  cfgs = _configs()
  for name in ("456p", "512p", "498p", "582p", "763p", "959p", "1128p"):
    c = cfgs.get_config(name)
    validate(c)
    a = M.Arch.from_config(c.model)
    params = jax.eval_shape(lambda k: M.init_params(a, k), jax.random.key(0))
    assert M.count_params(a) == sum(x.size for x in jax.tree.leaves(params)) == int(name[:-1]), name
  c = cfgs.get_config("512p")
  c.model.norm = "rmsnorm"
  with pytest.raises(ConfigError, match="expect_params=512 but this model has 491"):  # rezabyt's 491
    validate(c)
  c.model.tie_qkv, c.model.qkv_rank = "shareA", 0
  with pytest.raises(ConfigError, match="qkv_rank"):
    validate(c)


@pytest.mark.parametrize("mode", M.TIE_MODES)
def test_tie_mode_shapes_and_forward(mode):
  d, r = 7, 3
  qkv_params = {"none": 4 * d * r, "all": 2 * d * r, "qk": 4 * d * r, "kv": 4 * d * r, "shareA": 4 * d * r,
                "shareB": 4 * d * r, "shareB_tieQK": 3 * d * r, "shareB_tieKV": 3 * d * r,
                "shareA_tieKV": 3 * d * r, "shareA_tieQK": 3 * d * r, "shareA_folded": d * r + r * r}[mode]
  out_params = 2 * (r + d) if mode == "shareA_folded" else 2 * (d + d)  # folded: the projection reads r values
  base = dict(d_model=d, d_ff=14, pos_rank=3, attn_out_rank=2, ffn_rank=3, norm="rmsnorm", tie_qkv=mode)
  a = M.Arch(qkv_rank=r, **base)
  assert M.count_params(a) == 98 + 120 + 21 + qkv_params + out_params + 126
  if mode in ("none", "all", "qk", "kv"):  # full rank: 3d^2 / d^2 / 2d^2 / 2d^2
    full = M.Arch(qkv_rank=0, **base)
    assert M.count_params(full) - M.count_params(a) == {"none": 3, "all": 1, "qk": 2, "kv": 2}[mode] * d * d - qkv_params
  shapes = jax.eval_shape(lambda k: M.init_params(a, k), jax.random.key(1))
  for path, (shape, _) in checkpoint._leaf_paths(M.param_spec(a)):
    node = shapes
    for k in path:
      node = node[k]
    assert node.shape == shape, path
  rng = np.random.default_rng(0)  # numpy values: one compilation (the forward) per mode
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), jnp.float32), shapes)
  ids = jnp.asarray(data.encode(np.array([123, 4567]), np.array([89, 10]))[:, :33])
  fwd = jax.jit(M.forward, static_argnums=0)
  logits = fwd(a, params, ids)
  assert logits.shape == (2, 33, 14) and bool(jnp.isfinite(logits).all())
  q, k, v = M.qkv(a, params["blocks"]["0"]["attn"], jnp.ones((1, 4, d)) * jnp.arange(d, dtype=jnp.float32)[None, None])
  assert {"all": (q is k is v), "qk": q is k, "kv": k is v, "shareA_tieKV": k is v, "shareA_tieQK": q is k,
          "shareB_tieQK": q is k, "shareB_tieKV": k is v, "shareA_folded": k is v}.get(mode, not (q is k or k is v))
  changed = ids.at[:, 30].set(5)  # causal: earlier positions cannot see a later token
  np.testing.assert_allclose(fwd(a, params, changed)[:, :30], logits[:, :30], atol=1e-6)


# -------------------------------------------------------------------------------------------------- training


def _tiny(num_models: int, seed: int, batching: str = "auto"):
  c = _configs().get_config("456p")
  t = c.train
  t.steps, t.batch_size, t.num_models, t.seed, t.model_batching = 20, 32, num_models, seed, batching
  t.eval_interval, t.val_size, t.test_size, t.eval_batch_size, t.log_every = 10, 32, 32, 32, 5
  c.optim.warmup_steps = 5
  return c


@pytest.mark.parametrize("batching", ["vmap", "map"])
def test_vmapped_training_equals_separate_runs(tmp_path, batching):
  s3 = train_lib.train(_tiny(3, 5, batching), str(tmp_path / "n3"), quiet=True)
  assert [m["seed"] for m in s3["models"]] == [5, 6, 7]
  for i in range(3):
    single = train_lib.train(_tiny(1, 5 + i), str(tmp_path / f"n1_{i}"), quiet=True)
    a = checkpoint.load(str(tmp_path / "n3" / f"model_{i}"), "last")[0]
    b = checkpoint.load(str(tmp_path / f"n1_{i}" / "model_0"), "last")[0]
    assert a.meta["step"] == b.meta["step"] == 19
    # vmap batches the matmuls differently (float32 reassociation), and Adam's normalised steps at lr 2e-2
    # carry that noise for 20 steps: 1e-5 absolute on weights of ~0.05-0.5 (a seed mix-up differs by ~0.1).
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
      np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
    assert single["models"][0]["final_loss"] == pytest.approx(s3["models"][i]["final_loss"], abs=1e-6)
  x0 = jax.tree.leaves(checkpoint.load(str(tmp_path / "n3" / "model_0"), "last")[0].params)
  x1 = jax.tree.leaves(checkpoint.load(str(tmp_path / "n3" / "model_1"), "last")[0].params)
  assert max(float(np.abs(p - q).max()) for p, q in zip(x0, x1)) > 1e-3  # different seeds, different models
  rows = [json.loads(ln) for ln in open(tmp_path / "n3" / "model_2" / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [4, 9, 14, 19]
  assert [r["step"] for r in rows if "val/exact_match" in r] == [0, 10, 19]
  assert os.listdir(tmp_path / "n3" / "model_2" / "tb")
  assert open(tmp_path / "n3" / "curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
  c = _tiny(2, 5, "map")
  c.train.steps = 30
  whole = train_lib.train(c, str(tmp_path / "whole"), quiet=True)
  real, calls = train_lib.exact_match_all, []

  def dies_on_third_eval(*a, **k):
    calls.append(1)
    if len(calls) == 3:  # evals at steps 0 and 10 saved resume points; the kill lands before the step-20 one
      raise KeyboardInterrupt
    return real(*a, **k)
  monkeypatch.setattr(train_lib, "exact_match_all", dies_on_third_eval)
  with pytest.raises(KeyboardInterrupt):
    train_lib.train(c, str(tmp_path / "cut"), quiet=True)
  monkeypatch.setattr(train_lib, "exact_match_all", real)
  assert json.load(open(tmp_path / "cut" / "resume" / "meta.json"))["step"] == 11
  os.replace(tmp_path / "cut" / "resume", tmp_path / "cut" / "resume.old")  # as if killed between the two renames
  resumed = train_lib.train(c, str(tmp_path / "cut"), quiet=True)  # the same call again
  for i in range(2):
    a = checkpoint.load(str(tmp_path / "whole" / f"model_{i}"), "last")[0]
    b = checkpoint.load(str(tmp_path / "cut" / f"model_{i}"), "last")[0]
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
      np.testing.assert_array_equal(x, y)  # bitwise: data is a function of the step, and Adam's state is restored
    rows = [[{k: v for k, v in json.loads(ln).items() if k != "steps_per_s"} for ln in open(d / f"model_{i}" /
                                                                                           "metrics.jsonl")]
            for d in (tmp_path / "whole", tmp_path / "cut")]
    assert rows[0] == rows[1]  # no record lost or doubled
    assert whole["models"][i]["best_val_exact"] == resumed["models"][i]["best_val_exact"]
  with pytest.raises(train_lib.ConfigError, match="finished run"):
    train_lib.train(c, str(tmp_path / "cut"), quiet=True)
  import shutil
  shutil.copytree(tmp_path / "cut", tmp_path / "cut2")  # an unfinished run, then resumed with another config
  other = _tiny(2, 5, "map")  # steps 20, not 30
  os.remove(tmp_path / "cut2" / "summary.json")
  with pytest.raises(train_lib.ConfigError, match="differs in train.steps"):
    train_lib.train(other, str(tmp_path / "cut2"), quiet=True)


def test_grok_steps_are_the_first_evaluation_at_each_level(tmp_path):
  rows = [{"step": 0, "val/exact_match": 0.0}, {"step": 99, "loss": 1.0}, {"step": 500, "val/exact_match": 0.6},
          {"step": 1000, "val/exact_match": 0.4}, {"step": 1500, "val/exact_match": 0.995},
          {"step": 2000, "val/exact_match": 0.999}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert train_lib.grok_steps(str(tmp_path)) == {"grok_step_0.5": 500, "grok_step_0.99": 1500, "grok_step_1": None}


def test_report_lists_every_seed_with_its_grokking_steps_and_scores(tmp_path, capsys):
  from dba_jax.addition import report
  from dba_jax.evals import addition as eval_lib
  run = tmp_path / "run"
  assert report.main([str(run)]) == 2 and "no such run directory" in capsys.readouterr().err
  run.mkdir()
  assert report.main([str(run)]) == 2 and "not finished" in capsys.readouterr().err
  s = train_lib.train(_tiny(2, 5, "map"), str(run), quiet=True)
  assert eval_lib.main(["--checkpoint", str(run), "--limit", "50", "--seeds", "1,2", "--out",
                        str(run / "eval100k.json")]) == 0
  scores = {r["training"]["seed"]: r["multi_seed_validation"] for r in json.load(open(run / "eval100k.json"))["models"]}
  capsys.readouterr()
  assert report.main([str(run), "--out", str(tmp_path / "t.md")]) == 0
  text = (tmp_path / "t.md").read_text()
  for m in s["models"]:
    assert m["grok_step_0.5"] == train_lib.grok_steps(str(run / f"model_{m['model']}"))["grok_step_0.5"]
    v = scores[m["seed"]]
    row = [ln for ln in text.splitlines() if ln.startswith(f"| {m['seed']} |")]
    assert len(row) == 1 and f"| {v['aggregate_exact_match']:.5f} | {v['aggregate_errors']} |" in row[0], text
  assert "2 seeds, 20 steps" in text
  with pytest.raises(SystemExit, match="2"):  # never replaces a file
    report.main([str(run), "--out", str(tmp_path / "t.md")])


def test_lr_schedule():
  c = _configs().get_config("456p")
  f = train_lib.lr_schedule(c.optim, 54000)
  assert float(f(0)) == pytest.approx(0.02 / 1350)
  assert float(f(1349)) == pytest.approx(0.02)
  assert float(f(1350)) == pytest.approx(0.02)
  assert float(f(54000)) == pytest.approx(0.002) and float(f(80000)) == pytest.approx(0.002)
  mid = 1350 + (54000 - 1350) / 2
  assert float(f(mid)) == pytest.approx(0.011, rel=1e-4)


# ------------------------------------------------------------------------------------------------ evaluation


def _oracle(wrong_digit: int = -1, eos: int = data.EOS):
  """Logits that read the answer off the prompt: always right, or off by one at one digit, or a wrong 12th token."""

  def logits_fn(ids_BT):
    p = ids_BT[:, :data.PROMPT_LEN]
    a, b = p[:, 9::-1], p[:, 20:10:-1]  # LSD first
    carry, digits = jnp.zeros(ids_BT.shape[0], jnp.int32), []
    for i in range(10):
      s = a[:, i] + b[:, i] + carry
      digits.append(s % 10)
      carry = s // 10
    digits.append(carry)
    ans = jnp.stack(digits, 1)
    if wrong_digit >= 0:
      ans = ans.at[:, wrong_digit].set((ans[:, wrong_digit] + 1) % 10)
    tgt = jnp.concatenate([ans, jnp.full((ids_BT.shape[0], 1), eos, jnp.int32)], 1)
    logits = jnp.zeros(ids_BT.shape + (data.VOCAB,))
    return logits.at[:, data.PROMPT_LEN - 1:].set(jax.nn.one_hot(tgt, data.VOCAB) * 5.0)

  return jax.jit(lambda prompt: M.greedy_decode(logits_fn, prompt))


def test_evaluation_of_hand_built_models():
  kw = dict(seeds=(1, 2), limit=300, batch_size=128)
  v = eval_lib.evaluate(_oracle(), **kw)["multi_seed_validation"]
  assert v["aggregate_exact_match"] == 1.0 and v["aggregate_errors"] == 0 and v["total_examples"] == 600
  res = eval_lib.evaluate(_oracle(wrong_digit=3), max_failures=5, **kw)
  v = res["multi_seed_validation"]
  assert v["aggregate_exact_match"] == 0.0 and v["aggregate_errors"] == 600
  assert v["per_digit_accuracy_lsd_first"][3] == 0.0
  assert all(x == 1.0 for i, x in enumerate(v["per_digit_accuracy_lsd_first"]) if i != 3)
  f = res["failures"][0]
  assert len(res["failures"]) == 5 and f["wrong_digits_lsd_first"] == [3]
  assert abs(f["got"] - f["expected"]) == 1000 or (f["got"] - f["expected"]) % 1000 == 0
  no_eos = eval_lib.evaluate(_oracle(eos=0), **kw)["multi_seed_validation"]
  assert no_eos["aggregate_exact_match"] == 1.0 and no_eos["eos_accuracy"] == 0.0  # EOS unchecked, as the original
  strict = eval_lib.evaluate(_oracle(eos=0), strict=True, **kw)["multi_seed_validation"]
  assert strict["aggregate_exact_match"] == 0.0 and strict["aggregate_exact_match_eos_unchecked"] == 1.0


def test_greedy_decode_feeds_back_its_tokens():
  def logits_fn(ids_BT):  # next token = previous token + 1 (mod 10); position 21 starts at 0
    nxt = (ids_BT + 1) % 10
    nxt = nxt.at[:, data.PROMPT_LEN - 1].set(0)
    return jax.nn.one_hot(nxt, data.VOCAB)

  out = M.greedy_decode(logits_fn, jnp.full((2, 22), 11, jnp.int32))
  assert out.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]] * 2


# --------------------------------------------------------------------------------------- released checkpoints

needs_fixtures = pytest.mark.skipif(not os.path.isdir(FIXTURES), reason=f"{FIXTURES} absent")


def _np_forward(sd: dict, mc: dict, ids):
  """others.md A.3 written out in numpy from the torch state dict (independent of model.py's param tree)."""
  from math import erf
  d = mc["d_model"]
  rms = mc.get("use_rmsnorm", False)

  def norm(x, name):
    if rms:
      return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-8) * sd[name + ".weight"]
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * sd[name + ".weight"] + sd[name + ".bias"]

  def lin(x, name):
    return x @ sd[name + ".A"] @ sd[name + ".B"] if name + ".A" in sd else x @ sd[name + ".weight"].T

  x = sd["token_emb.weight"][ids] + (sd["pos_emb.A"] @ sd["pos_emb.B"])[None, :ids.shape[1]]
  h = norm(x, "blocks.0.ln1")
  if mc.get("tie_qkv", "none") == "shareA_tieKV":
    z = h @ sd["blocks.0.attn.qkv_A"]
    q, k = z @ sd["blocks.0.attn.qkv_Bq"], z @ sd["blocks.0.attn.qkv_Bkv"]
    v = k
  else:
    q, k, v = np.split(lin(h, "blocks.0.attn.qkv"), 3, axis=-1)
  s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
  T = ids.shape[1]
  s = np.where(np.tril(np.ones((T, T), bool))[None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  x = x + lin(p @ v, "blocks.0.attn.proj")
  u = lin(norm(x, "blocks.0.ln2"), "blocks.0.mlp.fc1")
  u = 0.5 * u * (1.0 + np.vectorize(erf)(u / math.sqrt(2.0)))
  x = x + lin(u, "blocks.0.mlp.fc2")
  return norm(x, "ln_f") @ sd["lm_head.weight"].T


@needs_fixtures
@pytest.mark.parametrize("name", ["best_456p_s43.pt", "best_512params.pt", "best_582params.pt"])
def test_released_checkpoint_logits(name):
  path = os.path.join(FIXTURES, name)
  raw = torch_io.load(path)
  sd = {k: np.asarray(v, np.float64) for k, v in raw["model_state"].items()}
  loaded = checkpoint.load(path)[0]
  assert M.count_params(loaded.arch) == {"best_456p_s43.pt": 456, "best_512params.pt": 512,
                                         "best_582params.pt": 582}[name] == (raw["params"])
  rng = np.random.default_rng(0)
  full = data.encode(rng.integers(0, data.MAX_OPERAND, 64), rng.integers(0, data.MAX_OPERAND, 64))
  want = _np_forward(sd, raw["model_config"], full[:, :33])
  with jax.enable_x64(True):  # float64 end to end: float32 rounding alone moves these logits (|x| ~ 40) by ~2e-3
    got = np.asarray(M.forward(loaded.arch, jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), loaded.params),
                               jnp.asarray(full[:, :33])))
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  got32 = np.asarray(M.forward(loaded.arch, jax.tree.map(jnp.asarray, loaded.params), jnp.asarray(full[:, :33])))
  np.testing.assert_allclose(got32, want, atol=1e-2, rtol=1e-3)
  np.testing.assert_array_equal(got32[:, 21:].argmax(-1), want[:, 21:].argmax(-1))
  back = checkpoint.from_params(loaded.params)  # and back to the torch names and layouts
  assert set(back) == set(raw["model_state"])
  for k, x in back.items():
    np.testing.assert_array_equal(x, raw["model_state"][k])


@needs_fixtures
def test_released_456p_exact_match():
  loaded = checkpoint.load(os.path.join(FIXTURES, "best_456p_s43.pt"))[0]
  assert loaded.meta["step"] == 34000 and loaded.meta["val_exact"] == 1.0
  res = eval_lib.evaluate_checkpoint(loaded, seeds=(41, 100), limit=1500, batch_size=1500)
  v = res["multi_seed_validation"]
  assert v["total_examples"] == 3000 and v["aggregate_exact_match"] == 1.0 and v["eos_accuracy"] == 1.0


@needs_fixtures
def test_torch_reader_matches_torch():
  torch = pytest.importorskip("torch")
  path = os.path.join(FIXTURES, "best_512params.pt")
  ours, ref = torch_io.load(path), torch.load(path, map_location="cpu", weights_only=True)
  assert ours["model_config"] == ref["model_config"] and ours["step"] == ref["step"] == 24000
  for k, v in ref["model_state"].items():
    np.testing.assert_array_equal(ours["model_state"][k], v.numpy())


def test_cli_errors(tmp_path, capsys):
  cfg = os.path.join(REPO, "configs", "addition.py")
  assert train_lib.main(["prog", f"--config={cfg}:456p", "--config.model.tie_qkv=bogus"]) == 2
  assert "model.tie_qkv='bogus'" in capsys.readouterr().err
  assert train_lib.main(["prog", f"--config={cfg}:1128p", "--dry-run"]) == 0
  assert "params: 1128" in capsys.readouterr().out
  assert eval_lib.main(["--checkpoint", str(tmp_path)]) == 2


@needs_fixtures
def test_dba_convert_addition_both_ways(tmp_path):
  """dba-convert reads the released file (format detected), writes an addition model dir, and exports it back
  to the original dict: the same state tensors bit for bit and the same model config."""
  from dba_jax import convert
  src = os.path.join(FIXTURES, "best_456p_s43.pt")
  assert convert.main(["dba-convert", src, "--out", str(tmp_path / "m")]) == 0
  assert checkpoint.load(str(tmp_path / "m"))[0].meta["step"] == 34000
  assert convert.main(["dba-convert", "--to-torch", str(tmp_path / "m"), "--out", str(tmp_path / "back.pt")]) == 0
  raw, back = torch_io.load(src), torch_io.load(str(tmp_path / "back.pt"))
  assert set(back["model_state"]) == set(raw["model_state"])
  for k, v in raw["model_state"].items():
    np.testing.assert_array_equal(back["model_state"][k], v)
  assert checkpoint.arch_from_torch_config(back["model_config"]) == checkpoint.arch_from_torch_config(raw["model_config"])
  assert convert.main(["dba-convert", src, "--out", str(tmp_path / "m")]) == 2  # never overwrites


# ------------------------------------------------------------------------- below 456: fixed positions, shrinking


def test_sinusoidal_positions():
  base = M.Arch(d_model=7, d_ff=14, pos_rank=3, qkv_rank=3, attn_out_rank=2, ffn_rank=3, norm="rmsnorm",
                tie_qkv="shareA_tieKV")
  assert M.count_params(base) == 456
  fixed = M.Arch(**{**base.__dict__, "pos_basis": "sinusoidal", "pos_rank": 0})
  assert M.count_params(fixed) == 456 - 3 * (33 + 7)  # a fixed table is not a parameter (AdderBoard's rule)
  S = np.asarray(M.sinusoids(33, 6))
  pos = np.arange(33)[:, None]
  np.testing.assert_allclose(S[:, 0], np.sin(pos[:, 0]), atol=1e-6)  # frequency 1
  np.testing.assert_allclose(S[:, 5], np.cos(pos[:, 0] / 10000 ** (4 / 6)), atol=1e-6)
  half = M.Arch(**{**base.__dict__, "pos_basis": "sinusoidal"})  # fixed (33, 3) basis, learned (3, 7) factor
  p = M.init_params(half, jax.random.key(0))
  assert set(p["pos_emb"]) == {"B"}
  np.testing.assert_allclose(M.position_table(half, p["pos_emb"]), np.asarray(M.sinusoids(33, 3)) @ p["pos_emb"]["B"],
                             atol=1e-6)
  assert M.forward(fixed, M.init_params(fixed, jax.random.key(1)), jnp.zeros((2, 33), jnp.int32)).shape == (2, 33, 14)


def _rank_deficient(a: M.Arch, seed: int = 0):
  """Random params of `a` whose ffn, shared-A q/k/v and position products have rank <= 2."""
  from dba_jax.addition import shrink
  p = jax.tree.map(np.array, M.init_params(a, jax.random.key(seed)))  # writable copies
  blk = p["blocks"]["0"]
  for lin in blk["mlp"].values():
    lin["A"][:, 2] = 0.0
  blk["attn"]["qkv_A"][:, 2] = 0.0
  for ln in ("ln1", "ln2"):  # non-trivial norm weights, so folding them is a real test
    blk[ln]["weight"] = np.random.default_rng(seed + 1).uniform(0.5, 2.0, 7).astype(np.float32)
  S = np.asarray(M.sinusoids(33, 8))
  p["pos_emb"]["A"], p["pos_emb"]["B"] = shrink.factor(S @ np.random.default_rng(seed).normal(size=(8, 7)), 3)
  return p


def test_shrink_keeps_the_function_when_ranks_suffice():
  from dba_jax.addition import shrink
  src = M.Arch(d_model=7, d_ff=14, pos_rank=3, qkv_rank=3, attn_out_rank=2, ffn_rank=3, norm="rmsnorm",
               tie_qkv="shareA_tieKV")
  p = _rank_deficient(src)
  same = shrink.shrink(src, p, src)  # no change: a copy up to the SVD's float32 rounding
  ids = jnp.asarray(data.encode(np.arange(8) * 12345, np.arange(8) * 678)[:, :33])
  want = np.asarray(M.forward(src, p, ids))
  np.testing.assert_allclose(M.forward(src, same, ids), want, atol=1e-5)
  dst = M.Arch(**{**src.__dict__, "ffn_rank": 2, "qkv_rank": 2, "pos_basis": "sinusoidal", "pos_rank": 8})
  small = shrink.shrink(src, p, dst)
  # ffn 2·r·(d+f): 126 -> 84; shareA_tieKV q/k/v 3·d·r: 63 -> 42; positions 3·(33+7) = 120 -> 8·7 = 56
  assert M.count_params(dst) == sum(np.size(x) for x in jax.tree.leaves(small)) == 456 - 42 - 21 - 64
  np.testing.assert_allclose(M.forward(dst, small, ids), want, atol=1e-5)  # the truncation lost nothing
  folded = M.Arch(**{**dst.__dict__, "block_norm_weight": False})  # ln1/ln2 weights folded: exact, 14 fewer
  small = shrink.shrink(src, p, folded)
  assert "ln1" not in small["blocks"]["0"] or not small["blocks"]["0"]["ln1"]
  assert M.count_params(folded) == 456 - 42 - 21 - 64 - 14
  np.testing.assert_allclose(M.forward(folded, small, ids), want, atol=1e-5)
  with pytest.raises(ConfigError, match="folded away, not created"):
    shrink.shrink(folded, small, dst)
  # a rank the source really uses is lost: the function changes
  lossy = M.Arch(**{**src.__dict__, "attn_out_rank": 1})
  assert np.abs(np.asarray(M.forward(lossy, shrink.shrink(src, p, lossy), ids)) - want).max() > 1e-3
  with pytest.raises(ConfigError, match=r"model.d_model \(7 vs 8\)"):
    shrink.shrink(src, p, M.Arch(**{**src.__dict__, "d_model": 8}))


def test_folded_attention_equals_shareA_tieKV(tmp_path, capsys):
  """shareA_tieKV -> shareA_folded (M = B_q·B_kvᵀ, B_kv into the projection) plus folded norm weights is the same
  function with 55 fewer parameters; what cannot fold is refused."""
  from dba_jax.addition import shrink
  src = M.Arch(d_model=7, d_ff=14, pos_rank=3, qkv_rank=3, attn_out_rank=2, ffn_rank=3, norm="rmsnorm",
               tie_qkv="shareA_tieKV")
  p = jax.tree.map(np.array, M.init_params(src, jax.random.key(5)))
  for ln in ("ln1", "ln2"):
    p["blocks"]["0"][ln]["weight"] = np.random.default_rng(6).uniform(0.5, 2.0, 7).astype(np.float32)
  ids = jnp.asarray(data.encode(np.arange(8) * 98765, np.arange(8) * 4321)[:, :33])
  want = np.asarray(M.forward(src, p, ids))
  dst = M.Arch(**{**src.__dict__, "tie_qkv": "shareA_folded", "block_norm_weight": False})
  small = shrink.shrink(src, p, dst)
  # q/k/v 3·7·3 = 63 -> A 21 + M 9; projection 2·(7+7) = 28 -> 2·(3+7) = 20; ln1/ln2 weights 14 -> 0
  assert M.count_params(dst) == sum(np.size(x) for x in jax.tree.leaves(small)) == 456 - 33 - 8 - 14 == 401
  np.testing.assert_allclose(M.forward(dst, small, ids), want, atol=1e-5)
  np.testing.assert_allclose(M.forward(dst, shrink.shrink(dst, small, dst), ids), want, atol=1e-5)  # folded -> folded
  lossy = M.Arch(**{**dst.__dict__, "attn_out_rank": 1})  # a rank the model uses: the function changes
  assert np.abs(np.asarray(M.forward(lossy, shrink.shrink(src, p, lossy), ids)) - want).max() > 1e-3
  with pytest.raises(ConfigError, match="same qkv_rank"):
    shrink.shrink(src, p, M.Arch(**{**dst.__dict__, "qkv_rank": 2}))
  with pytest.raises(ConfigError, match="only shareA_tieKV -> shareA_folded"):
    shrink.shrink(src, p, M.Arch(**{**src.__dict__, "tie_qkv": "shareA"}))
  from dba_jax.formats import ConversionError
  with pytest.raises(ConversionError, match="shareA_folded"):  # the original TinyDecoderLM has no such mode
    checkpoint.arch_to_torch_config(dst)
  c = _configs().get_config("456p")
  c.model.tie_qkv, c.model.n_head, c.model.expect_params = "shareA_folded", 7, 0
  with pytest.raises(ConfigError, match="n_head=7"):
    validate(c)
  # the CLI: writes a new directory, never over an existing one
  checkpoint.save(str(tmp_path / "src"), p, src, {"step": 1})
  cfg = os.path.join(REPO, "configs", "addition.py")
  argv = ["prog", f"--config={cfg}:456p+ft", "--config.model.tie_qkv=shareA_folded",
          "--config.model.block_norm_weight=False", f"--checkpoint={tmp_path / 'src'}", f"--out={tmp_path / 'dst'}"]
  assert shrink.main(argv) == 0 and "456 -> 401 params" in capsys.readouterr().out
  got = checkpoint.load(str(tmp_path / "dst"))[0]
  assert got.arch == dst
  np.testing.assert_allclose(M.forward(dst, got.params, ids), want, atol=1e-5)
  before = (tmp_path / "dst" / "params.npz").read_bytes()
  assert shrink.main(argv) == 2 and "already exists" in capsys.readouterr().err
  assert (tmp_path / "dst" / "params.npz").read_bytes() == before


def test_init_from_checkpoint_trains(tmp_path):
  c = _tiny(1, 3)
  train_lib.train(c, str(tmp_path / "src"), quiet=True)
  c = _tiny(1, 4)
  c.model.ffn_rank, c.model.expect_params = 2, 0
  c.train.init_from = str(tmp_path / "src" / "model_0" / "last")
  s = train_lib.train(c, str(tmp_path / "dst"), quiet=True)
  assert s["params"] == 456 - 2 * (7 + 14)
  c.model.d_model = 8
  with pytest.raises(ConfigError, match="model.d_model"):
    train_lib.train(c, str(tmp_path / "bad"), quiet=True)


@pytest.mark.parametrize("variant,sdpa", [("456p", False), ("1128p", True)])
def test_torch_batched_step_equals_single_model_steps(variant, sdpa):
  """torch_ref's N-model trainer (the original's HEAD layout: stacked params, one AdamW, per-model clip) takes
  the same 3 steps as N separate single-model torch_ref loops, to 1e-5 in losses and params. 456p covers RMSNorm,
  shareA_tieKV and low-rank linears; 1128p LayerNorm and full-rank linears. The clip is set low enough to act,
  and (explicit softmax) model 1 gets 2x larger weights, so a clip shared across models would fail. With SDPA
  the weights stay as drawn, and only 1128p is checked (the benchmarked model): its rounding differs from the
  explicit softmax's, which 456p's low-rank attention amplifies to 3e-5 in the params after 3 steps."""
  torch = pytest.importorskip("torch")
  from dba_jax.addition import torch_ref
  from dba_jax.bench import addition as bench_addition
  c = _configs().get_config(variant)
  a, o = M.Arch.from_config(c.model), c.optim
  o.warmup_steps = 2
  # Adam's step g/(|g| + eps) turns 1e-7 rounding noise in near-zero gradient elements into ~lr-sized moves at
  # eps 1e-8 (1e-4 apart after 3 steps here); at eps 1e-3 it is smooth, and a wrong clip or gradient still shows
  o.eps = 1e-3
  N, steps = 3, 3
  params = bench_addition.addition_params(a, [1, 2, 3])
  scale = np.array([1.0, 1.0 if sdpa else 2.0, 1.0], np.float32)
  params = jax.tree.map(lambda p: p * scale.reshape((N,) + (1,) * (p.ndim - 1))
                        if p.ndim > 1 else p, params)
  rng = np.random.default_rng(0)
  xs = [[data.Sampler(32, int(rng.integers(1 << 30)), np.zeros(0, np.uint64)).batch(7000) for _ in range(N)]
        for _ in range(steps)]
  big = torch_ref.load_params_batched(torch_ref.BatchedTinyDecoderLM(a, N, sdpa), params)
  bopt, bsched = torch_ref.make_optimizer(big, o, 10)
  singles = [torch_ref.load_params(torch_ref.TinyDecoderLM(a), jax.tree.map(lambda p: np.asarray(p)[i], params))
             for i in range(N)]
  sopts = [torch_ref.make_optimizer(m, o, 10) for m in singles]
  clip = 0.3
  for s in range(steps):
    x = torch.from_numpy(np.stack([b[0] for b in xs[s]])).long()
    y = torch.from_numpy(np.stack([b[1] for b in xs[s]])).long()
    loss_N = torch_ref.batched_train_step(big, bopt, bsched, x, y, clip)
    want = [float(torch_ref.train_step(m, *so, x[i], y[i], clip)) for i, (m, so) in enumerate(zip(singles, sopts))]
    np.testing.assert_allclose(loss_N.numpy(), want, atol=1e-5, rtol=0)
  got = torch_ref.to_params_batched(big)
  for i in range(N):
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, atol=1e-5, rtol=0), got[i],
                 torch_ref.to_params(singles[i]))
  moved = max(float(np.abs(np.asarray(p) - np.asarray(q)[1]).max())
              for p, q in zip(jax.tree.leaves(got[1]), jax.tree.leaves(params)))
  assert moved > 1e-3  # the steps did move the parameters


def test_scanned_steps_equal_single_steps(tmp_path):
  """train.steps_per_call K > 1 runs K steps in one lax.scan call, stopping at log and eval steps. It only
  changes dispatch: same data order, same metrics rows, and the same final params as K = 1 (1e-6)."""
  runs = {}
  for K in (1, 3):
    c = _tiny(2, 5, "map")
    c.train.steps_per_call = K
    runs[K] = train_lib.train(c, str(tmp_path / f"k{K}"), quiet=True)
  for i in range(2):
    p1 = checkpoint.load(str(tmp_path / "k1" / f"model_{i}"), "last")[0].params
    p3 = checkpoint.load(str(tmp_path / "k3" / f"model_{i}"), "last")[0].params
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p3)):
      np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
    rows = {K: [json.loads(ln) for ln in open(tmp_path / f"k{K}" / f"model_{i}" / "metrics.jsonl")] for K in (1, 3)}
    assert [(r["step"], sorted(r)) for r in rows[1]] == [(r["step"], sorted(r)) for r in rows[3]]
    for r1, r3 in zip(rows[1], rows[3]):
      for k in ("loss", "grad_norm", "val/exact_match"):
        if k in r1:
          assert r1[k] == pytest.approx(r3[k], abs=1e-6)
  assert train_lib._next_stop(1, _tiny(1, 0).train) == 4  # log after step 4 (5 steps), before eval at 10


def test_loss_from_first_label_equals_full_loss():
  """loss_fn(label_start=21) skips the positions whose labels are all IGNORE: the same loss and gradients as
  the loss over all 33 positions (1e-6), for a low-rank shareA model, the full-rank 1128p, and 1128p with two
  layers (only the last one is cut)."""
  import dataclasses
  import functools
  for variant, layers in (("456p", 1), ("1128p", 1), ("1128p", 2)):
    a = dataclasses.replace(M.Arch.from_config(_configs().get_config(variant).model), n_layer=layers)
    params = M.init_params(a, jax.random.key(3))
    x, y = data.Sampler(64, 1, np.zeros(0, np.uint64)).batch(7000)
    assert (y[:, :data.PROMPT_LEN - 1] == data.IGNORE).all()
    full = jax.jit(jax.value_and_grad(functools.partial(M.loss_fn, a)))(params, x, y)
    cut = jax.jit(jax.value_and_grad(functools.partial(M.loss_fn, a, label_start=data.PROMPT_LEN - 1)))(params, x, y)
    assert float(full[0]) == pytest.approx(float(cut[0]), abs=1e-6)
    jax.tree.map(lambda g, h: np.testing.assert_allclose(g, h, atol=1e-6, rtol=0), full[1], cut[1])
    logits = M.forward(a, params, x)
    np.testing.assert_allclose(M.forward(a, params, x, 21), logits[:, 21:], atol=1e-6, rtol=0)
