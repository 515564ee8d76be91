"""LatentWire (issue 15): synthetic QA, the bpe_qa tokeniser, the soft-token prefix, the translator, the losses against
float64 references, label masks, KV / wire bytes, the training CLI (resume, refusals) and the harness."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dba_jax import arith_qa as synthetic, ckpt, data, generate, model as model_lib, rundir
from dba_jax.config import base_config, validate
from dba_jax.evals import latentwire as harness, stats
from dba_jax.latentwire import bridge, losses, sides, tasks
from dba_jax.latentwire import train as lw_train
from dba_jax.tokenizers import bpe_qa

from helpers import load_preset


# ------------------------------------------------------------------------------------------------ fixtures

def _lm_config(tokenizer: str, vocab: int, d: int, n_kv: int = 0):
  c = base_config()
  m = c.model
  m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff, m.max_seq_len = vocab, d, 2, 4, n_kv, 2 * d, 64
  c.data.source, c.data.generator, c.data.tokenizer, c.data.seq_len = "synthetic", "arith_qa", tokenizer, 32
  return validate(c)


def _write_lm(path, c, seed):
  """An untrained LM as a dba_jax workdir (config.json + one checkpoint), without running dba-train."""
  rundir.write_config(c, str(path))
  params = model_lib.init_params(c.model, jax.random.key(seed))
  ck = ckpt.Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
  ck.save(1, params, {"none": jnp.zeros(())}, {"step": 1})
  ck.close()
  return str(path)


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
  root = tmp_path_factory.mktemp("lw")
  src = _write_lm(root / "source", _lm_config("byte", 256, 32), 0)
  tgt = _write_lm(root / "target", _lm_config("bpe_qa", 384, 24, n_kv=2), 1)
  return src, tgt


def _cpu_config(src, tgt, **over):
  c = lw_train.bridge_config("cpu")
  c.source, c.target = src, tgt
  for k, v in over.items():
    sec, key = k.split("__")
    c[sec][key] = v
  return c


# ------------------------------------------------------------------------------------------ data, tokeniser

def test_synthetic_splits_are_disjoint_deterministic_and_strictly_scored():
  train, test = synthetic.qa_pairs(400, 0, "train"), synthetic.qa_pairs(400, 0, "test")
  assert train == synthetic.qa_pairs(400, 0, "train") and train != synthetic.qa_pairs(400, 1, "train")
  assert not {q for q, _ in train} & {q for q, _ in test}
  corpus = synthetic.arith_qa_text(20_000, 3)
  assert not any(synthetic.PROMPT.format(q=q) in corpus for q, _ in test)
  q, a = train[0]
  assert synthetic.extract(a) == synthetic.gold(a) and a.endswith("#### " + synthetic.gold(a))
  assert synthetic.extract("12 + 3 = 15") is None  # no "####": wrong, no last-number fallback
  assert synthetic.extract("#### 1,234\n#### 9") == "1234"
  assert data.generator("arith_qa") is synthetic.arith_qa_text


def test_bpe_qa_round_trip_and_lm_presets():
  tok = bpe_qa()
  text = synthetic.arith_qa_text(2_000, 5) + "def f(x):\n  return x ** 2  # ünïcode\n"
  ids = tok.encode(text)
  assert tok.decode(ids) == text and len(ids) < len(text.encode()) and ids.max() < tok.vocab_size
  assert data.get_tokenizer("bpe_qa") is tok
  # The prompt is the question's tokens then the stub's: what the teacher / student alignment assumes.
  q = synthetic.qa_pairs(1, 0)[0][0]
  prompt = list(tok.encode(synthetic.PROMPT.format(q=q)))
  assert prompt == list(tok.encode("Q: " + q)) + list(tok.encode(synthetic.STUB))
  src, tgt = load_preset("latentwire.py", "source_lm"), load_preset("latentwire.py", "target_lm")
  validate(src), validate(tgt)
  assert src.data.tokenizer != tgt.data.tokenizer and src.model.d_model != tgt.model.d_model
  assert tgt.model.vocab_size >= tok.vocab_size
  for v, K in (("bridge_k4", 4), ("bridge_k8", 8), ("bridge_k16", 16), ("cpu", 4)):
    assert lw_train.validate(load_preset("latentwire.py", v)).model.K == K
  g = load_preset("latentwire.py", "gsm8k_32")  # the original's 2a_stable_32tok, on local GSM8K files
  with pytest.raises(lw_train.ConfigError, match="data.train_path"):
    lw_train.validate(g)
  g.data.train_path = g.data.dev_path = g.data.test_path = "gsm8k.jsonl"
  m = lw_train.validate(g).model
  assert bridge.param_count(4096, 4096, m.b, m.K, m.depth) == 61_456_904 and g.train.patience == 5


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_forward_with_an_embedding_prefix_equals_the_token_forward(positions):
  c = _lm_config("byte", 256, 32)
  c.model.positions = positions
  dec = model_lib.Decoder(c.model, nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
  prefix = jnp.take(dec.embed[...], tokens[:, :5], axis=0)
  full, split = dec.forward(tokens), dec.forward(tokens[:, 5:], embeds_BPd=prefix)
  np.testing.assert_allclose(split.logits, full.logits, atol=1e-5)
  np.testing.assert_allclose(split.hidden, full.hidden, atol=1e-5)


# --------------------------------------------------------------------------------------------- translator

@pytest.mark.parametrize("s,t,b,K,depth,heads", [(48, 40, 16, 3, 2, 4), (32, 24, 32, 5, 1, 2)])
def test_translator_parameter_count_formula(s, t, b, K, depth, heads):
  tr = bridge.Translator(s, t, b, K, depth, heads, rngs=nnx.Rngs(0))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(tr, nnx.Param)))
  assert n == bridge.param_count(s, t, b, K, depth)


def test_translator_paper_and_cpu_sizes():
  assert bridge.param_count(4096, 4096, 1024, 64, 8) == 189_020_176
  assert bridge.param_count(4096, 4096, 1024, 48, 6) == 142_815_244
  assert bridge.param_count(4096, 4096, 768, 32, 4) == 61_456_904
  assert bridge.param_count(128, 128, 64, 8, 2) == 159_108


def test_closed_gates_ignore_the_source_and_block_cross_attention_gradients():
  tr = bridge.Translator(12, 10, 16, 4, 2, 4, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(tr)
  src = jax.random.normal(jax.random.key(1), (2, 7, 12))
  mask = jnp.arange(7)[None] < jnp.array([[7], [4]])
  out = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, mask))
  np.testing.assert_allclose(out(params, src), out(params, 3.0 * src[::-1]), atol=1e-6)
  np.testing.assert_allclose(out(params, src)[0], out(params, src)[1], atol=1e-6)  # identical for every input
  g = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(out(p, src)))))(params)
  for blk in g["blocks"].values():
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(blk["cross_attn"]))
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(blk["src_norm"]))
    assert float(jnp.abs(blk["cross_gate"]).max()) > 0 and float(jnp.abs(blk["ffn_gate"]).max()) > 0


def test_rms_matching_hits_the_target_unless_clamped():
  x = jnp.stack([jnp.full((8,), v) for v in (0.02, 0.2, 0.5)])[None]  # rms 0.02, 0.2, 0.5 against target 0.1
  r = bridge.rms(bridge.rms_match(x, 0.1))[0, :, 0]
  np.testing.assert_allclose(r, [0.02 * 4.0, 0.1, 0.5 * 0.25], rtol=1e-6)  # factors 5 -> 4, 0.5, 0.2 -> 0.25
  z = jax.random.normal(jax.random.key(0), (3, 5, 16)) * 0.15
  np.testing.assert_allclose(bridge.rms(bridge.rms_match(z, 0.1))[..., 0], 0.1, rtol=1e-5)
  emb = jnp.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [100.0, 100.0]])
  assert bridge.target_rms(emb, 3) == pytest.approx(2.0)  # padding rows beyond the vocabulary ignored


# ------------------------------------------------------------------------------------------------- losses

def _np_logp(logits, vocab):
  x = logits[..., :vocab].astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_losses_match_float64_references():
  rng = np.random.default_rng(0)
  B, T, V, Vp = 3, 5, 7, 9
  s, t = rng.normal(size=(B, T, Vp)).astype(np.float32), rng.normal(size=(B, T, Vp)).astype(np.float32)
  y = rng.integers(0, V, size=(B, T))
  mask = rng.random((B, T)) < 0.6
  mask[0, 0] = True
  ls, lt = _np_logp(s, V), _np_logp(t, V)
  ref_nll = -np.take_along_axis(ls, y[..., None], -1)[..., 0][mask].mean()
  got = losses.answer_nll(jnp.asarray(s), jnp.asarray(y), jnp.asarray(mask), V)
  np.testing.assert_allclose(got, ref_nll, rtol=1e-5)
  kl_st = (np.exp(ls) * (ls - lt)).sum(-1)[mask].mean()
  kl_ts = (np.exp(lt) * (lt - ls)).sum(-1)[mask].mean()
  for direction, ref in (("student_teacher", kl_st), ("teacher_student", kl_ts)):
    np.testing.assert_allclose(losses.answer_kl(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), V, direction), ref,
                               rtol=1e-5)
  # InfoNCE: masked means (padding excluded), cosine / tau, CE against the diagonal.
  soft, prompt = rng.normal(size=(B, 4, 6)), rng.normal(size=(B, 8, 6))
  pm = np.arange(8)[None] < np.array([[8], [3], [5]])
  sp = soft.mean(1)
  tp = np.stack([prompt[i][pm[i]].mean(0) for i in range(B)])
  sp, tp = sp / np.linalg.norm(sp, axis=-1, keepdims=True), tp / np.linalg.norm(tp, axis=-1, keepdims=True)
  lg = sp @ tp.T / 0.07
  ref = np.mean(np.log(np.exp(lg).sum(-1)) - np.diag(lg))
  got = losses.info_nce(jnp.asarray(soft, jnp.float32), jnp.ones((B, 4), bool), jnp.asarray(prompt, jnp.float32),
                        jnp.asarray(pm), 0.07)
  np.testing.assert_allclose(got, ref, rtol=1e-4)
  junk = np.where(pm[..., None], prompt, 1e3)  # padded rows never count
  np.testing.assert_allclose(losses.info_nce(jnp.asarray(soft, jnp.float32), jnp.ones((B, 4), bool),
                                             jnp.asarray(junk, jnp.float32), jnp.asarray(pm), 0.07), got, rtol=1e-5)


# ------------------------------------------------------------------------------------- batches, NLL, bytes

def test_label_masks_and_teacher_alignment_are_exact(lms):
  src, tgt = (sides.load_lm(p, r) for p, r in zip(lms, ("source", "target")))
  task = tasks.Task({"task": "synthetic"})
  exs = task.examples("train", 3, 4)
  pairs = [(ex.question, ex.answer) for ex in exs]
  b = sides.bridge_batch(task, src, tgt, exs, 128, 32, 64)
  stub = tgt.encode(synthetic.STUB)
  for i, (q, a) in enumerate(pairs):
    ans = tgt.encode(a + "\n\n")
    labelled = b["tgt_ids"][i][b["label_mask"][i]]
    np.testing.assert_array_equal(labelled, ans)  # the answer tokens, and nothing else
    np.testing.assert_array_equal(b["tgt_ids"][i, :len(stub)], stub)
    off, n = b["teacher_off"][i], len(stub) + len(ans)
    np.testing.assert_array_equal(b["teacher_ids"][i, off:off + n], b["tgt_ids"][i, :n])
    np.testing.assert_array_equal(b["teacher_ids"][i][b["prompt_mask"][i]], tgt.encode(synthetic.PROMPT.format(q=q)))
    assert src.tok.decode(b["src_ids"][i][b["src_mask"][i]]) == synthetic.PROMPT.format(q=q)
    assert "####" not in src.tok.decode(b["src_ids"][i])  # the source never sees the answer


def test_teacher_forced_nll_equals_a_float64_reference(lms):
  c = _cpu_config(*lms)
  br = lw_train.Bridge(lw_train.validate(c), sides.load_lm(lms[0], "source"), sides.load_lm(lms[1], "target"))
  params = br.init_state(0)["params"]
  batch = {k: jnp.asarray(v) for k, v in lw_train.batch_at(br, br.task.examples("train", 16, 0), 0).items()}
  _, parts = jax.jit(br.loss)(params, br.frozen, batch, None, 0)
  soft = br._soft(params, br.frozen, batch["src_ids"], batch["src_mask"])
  fwd = jax.jit(lambda p, t, e: nnx.merge(br.tgt.model.graphdef, p).forward(t, embeds_BPd=e).logits)
  logits = np.asarray(fwd(br.frozen["tgt"], batch["tgt_ids"], soft), np.float64)
  K, y, mask = soft.shape[1], np.asarray(batch["tgt_ids"]), np.asarray(batch["label_mask"])
  lp = _np_logp(logits, br.tgt.vocab)
  ref = [-lp[b, K - 1 + i, y[b, i]] for b in range(y.shape[0]) for i in range(y.shape[1]) if mask[b, i]]
  np.testing.assert_allclose(float(parts["nll"]), np.mean(ref), rtol=1e-5)
  assert float(parts["nce"]) > 0 and float(parts["kl"]) >= 0


def test_measured_kv_bytes_equal_the_formula(lms):
  tgt = sides.load_lm(lms[1], "target")
  m = tgt.m
  for cache, nbytes in (("float32", 4), ("float16", 2)):
    spk = sides.Speaker(tgt, 64, cache)
    assert spk.kv_bytes_per_token == 2 * m.n_layers * m.n_kv_heads * (m.d_model // m.n_heads) * nbytes
    assert spk.kv_bytes_per_token == generate.kv_bytes_per_token(m, cache)


def test_wire_bytes_are_counted_from_the_arrays():
  soft = np.random.default_rng(0).normal(size=(8, 96)).astype(np.float32)
  sizes = {f: harness.on_wire(soft, f)[0] for f in harness.WIRE}
  assert sizes == {"fp32": 8 * 96 * 4, "fp16": 8 * 96 * 2, "q8": 8 * 3 * (32 + 2), "q4": 8 * 3 * (16 + 2)}
  np.testing.assert_allclose(harness.on_wire(soft, "q8")[1], soft, atol=np.abs(soft).max() / 127)


def test_wilson_interval():
  lo, hi = stats.wilson_interval(0, 10)
  assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
  lo, hi = stats.wilson_interval(50, 100)
  assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)


# -------------------------------------------------------------------------------------------- CLI, harness

def test_bridge_training_cli_refuses_bad_input_before_writing(lms, tmp_path, capsys):
  src, tgt = lms
  argv = ["dba-latentwire-train", "--config=configs/latentwire.py:cpu", f"--source={src}", f"--target={tgt}"]
  cwd = os.getcwd()
  os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    with pytest.raises(SystemExit) as e:
      lw_train.main(argv[:2] + ["--help"])
    assert e.value.code == 0 and "--source" in capsys.readouterr().out
    assert lw_train.main(argv) == 2 and "--workdir" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("mine")
    assert lw_train.main(argv + [f"--workdir={foreign}"]) == 2 and os.listdir(foreign) == ["thesis.txt"]
    assert lw_train.main(argv + [f"--workdir={tmp_path / 'x'}", "--config.model.heads=3"]) == 2
    assert "model.b" in capsys.readouterr().err and not os.path.exists(tmp_path / "x")
    assert lw_train.main(argv[:3] + [f"--target={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'y'}"]) == 2
    assert "nowhere" in capsys.readouterr().err and not os.path.exists(tmp_path / "y")
  finally:
    os.chdir(cwd)


@pytest.mark.slow
def test_bridge_training_cli_resumes_and_refuses(lms, tmp_path, capsys):
  src, tgt = lms
  argv = ["dba-latentwire-train", "--config=configs/latentwire.py:cpu", f"--source={src}", f"--target={tgt}"]
  wd = tmp_path / "bridge"
  cwd = os.getcwd()
  os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    with pytest.raises(SystemExit) as e:
      lw_train.main(argv[:2] + ["--help"])
    assert e.value.code == 0
    assert lw_train.main(argv) == 2 and "--workdir" in capsys.readouterr().err
    assert lw_train.main(argv + [f"--workdir={wd}"]) == 0
    metrics = [json.loads(x) for x in open(wd / "metrics.jsonl")]
    assert [r["step"] for r in metrics] == [1, 2, 3, 4] and all(r["tokens_per_s"] > 0 for r in metrics[1:])
    assert [json.loads(x)["step"] for x in open(wd / "eval.jsonl")] == [2, 4]
    assert lw_train.main(argv + [f"--workdir={wd}", "--config.train.steps=6"]) == 0  # resumes at 4
    assert [json.loads(x)["step"] for x in open(wd / "metrics.jsonl")][-2:] == [5, 6]
    assert lw_train.main(argv + [f"--workdir={wd}", "--config.model.b=32"]) == 2
    assert "different model" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("mine")
    assert lw_train.main(argv + [f"--workdir={foreign}"]) == 2 and os.listdir(foreign) == ["thesis.txt"]
    assert lw_train.main(argv + [f"--workdir={tmp_path / 'x'}", "--config.model.heads=3"]) == 2
    assert "model.b" in capsys.readouterr().err and not os.path.exists(tmp_path / "x")
  finally:
    os.chdir(cwd)


def test_harness_runs_every_method_and_the_answer_never_reaches_the_bridged_target(lms, tmp_path, monkeypatch, capsys):
  from dba_jax import eval_cli
  src, tgt = lms
  c = _cpu_config(src, tgt)
  wd = tmp_path / "bridge"  # an untrained bridge, written as dba-latentwire-train writes one
  rundir.write_config(c, str(wd))
  ck = ckpt.Checkpointer(os.path.join(wd, "checkpoints"), async_save=False)
  ck.save(1, lw_train.Bridge(c, sides.load_lm(src, "source"), sides.load_lm(tgt, "target")).init_state(0)["params"],
          {"none": jnp.zeros(())}, {"step": 1})
  ck.close()
  man = tmp_path / "manifest.json"
  man.write_text(json.dumps({"source": src, "target": tgt, "bridges": [str(wd)], "questions": 2, "max_new": 3,
                             "source_max_new": 3, "wire_formats": ["fp32", "q4"], "batch_size": 2}))
  seen = []
  generate_ = sides.Speaker.generate

  def spy(self, rows, max_new, prefix_NPd=None, task=None):
    seen.extend((self.lm.role, np.asarray(ids).tolist(), prefix_NPd is not None) for ids in rows)
    return generate_(self, rows, max_new, prefix_NPd, task)

  monkeypatch.setattr(sides.Speaker, "generate", spy)
  out = tmp_path / "r.json"
  assert eval_cli.main(["latentwire", "--manifest", str(man), "--out", str(out)]) == 0
  r = json.loads(out.read_text())
  assert set(r["methods"]) == {"target_text", "source_text", "cascade", "joint_text", "bridge_k4_fp32", "bridge_k4_q4",
                               "budget_k4", "text_soft_k4", "joint_bridge_k4"}
  assert all(v["n"] == 2 and 0 <= v["wilson95"][0] <= v["wilson95"][1] <= 1 for v in r["methods"].values())
  for name in ("joint_text", "joint_bridge_k4"):
    j = r["methods"][name]
    assert j["exact_match"] <= j["oracle_exact_match"] and 0 <= j["agreement"] <= 1
  tb = r["kv_bytes_per_token"]
  assert tb["target"] == tb["target_formula"] and tb["source"] == tb["source_formula"]
  assert r["methods"]["bridge_k4_fp32"]["wire_bytes"] == 4 * 24 * 4
  assert r["bridges"][0]["step"] == 1 and not r["bridges"][0]["best"]
  # the paired tests count the questions one method got right and the other wrong, from the rows themselves
  ok = {m: [ch == "1" for ch in v["correct_by_question"]] for m, v in r["methods"].items()}
  assert all(len(v) == 2 and sum(v) == r["methods"][m]["correct"] for m, v in ok.items())
  assert [(t["a"], t["b"]) for t in r["paired"]] == [("bridge_k4_fp32", "target_text"), ("bridge_k4_fp32", "budget_k4")]
  for t in r["paired"]:
    assert t["only_a"] == sum(x and not y for x, y in zip(ok[t["a"]], ok[t["b"]])) and 0 < t["p"] <= 1
  assert os.path.exists(tmp_path / "r.md")
  # Soft-token decoding (the calls with a prefix and no question text) gets the stub and nothing else.
  stub = sides.load_lm(tgt, "target").encode(synthetic.STUB).tolist()
  tok = bpe_qa()
  bridged = [ids for role, ids, pre in seen if role == "target" and pre and "Q:" not in tok.decode(ids)]
  assert len(bridged) == 2 * 2 and all(ids == stub for ids in bridged)
  for ex in tasks.Task({"task": "synthetic"}).examples("test", 2, 12345):
    assert all(ex.golds[0] not in tok.decode(ids) for ids in bridged)
  # Errors name the file and exit 2.
  assert eval_cli.main(["latentwire", "--manifest", str(tmp_path / "none.json")]) == 2
  assert "none.json" in capsys.readouterr().err
  man.write_text(json.dumps({"source": src, "target": tgt, "questionz": 3}))
  assert eval_cli.main(["latentwire", "--manifest", str(man)]) == 2 and "questionz" in capsys.readouterr().err


def test_a_damaged_latest_bridge_checkpoint_is_named_when_skipped(lms, tmp_path, caplog):
  """W5: load_bridge (dba-eval latentwire's loader) skips a truncated latest checkpoint only with a warning naming
  it and the step it read instead."""
  src, tgt = lms
  c = _cpu_config(src, tgt)
  wd = tmp_path / "bridge"
  rundir.write_config(c, str(wd))
  params = lw_train.Bridge(c, sides.load_lm(src, "source"), sides.load_lm(tgt, "target")).init_state(0)["params"]
  ck = ckpt.Checkpointer(os.path.join(wd, "checkpoints"), async_save=False)
  for step in (1, 2):
    ck.save(step, params, {"none": jnp.zeros(())}, {"step": step})
  ck.close()
  files = [os.path.join(d, f) for d, _, fs in os.walk(wd / "checkpoints" / "2") for f in fs if f != ckpt.MANIFEST]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  with caplog.at_level("WARNING", logger="dba_jax"):
    lw_train.load_bridge(str(wd))
  assert "skipped damaged bridge checkpoint" in caplog.text and "loaded step 1" in caplog.text
  assert os.path.join("checkpoints", "2") in caplog.text
