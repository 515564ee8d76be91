"""LatentWire's interlingua variant (issue 15): byte encoder -> M latents -> one adapter per receiving LM. Shapes,
gradients to every parameter, the early-token losses against float64 references, the answer never in any input,
and the training CLI (slow)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dba_jax import arith_qa as synthetic, ckpt, rundir
from dba_jax.latentwire import interlingua, losses, sides
from dba_jax.latentwire import train as lw_train
from dba_jax.tokenizers import bpe_qa

from test_latentwire import _np_logp, lms  # noqa: F401  (the module-scoped pair of untrained LMs)


def _config(src, tgt, **over):
  c = interlingua.cpu_config()
  c.source, c.target = src, tgt
  for k, v in over.items():
    sec, key = k.split("__")
    c[sec][key] = v
  return interlingua.validate(c)


def _system(lms, **over):
  return lw_train.make_system(_config(*lms, **over), sides.load_lm(lms[0], "source"), sides.load_lm(lms[1], "target"))


def test_shapes_rms_and_every_parameter_gets_a_gradient(lms):
  il = _system(lms)
  m = il.c.model
  params = il.init_state(0)["params"]
  batch = {k: jnp.asarray(v) for k, v in il.batch(il.task.examples("train", 5, 3)).items()}
  z = il.latents(params, batch["bytes"], batch["bytes_mask"])
  assert z.shape == (5, m.M, m.d_z)
  for r in ("source", "target"):
    pre = il.prefix(params, z, r)
    assert pre.shape == (5, m.M, il.lms[r].width)
    # RMS matched to the receiver's embeddings unless the factor hit the clamp
    ratio = np.asarray(jnp.sqrt(jnp.mean(jnp.square(pre), -1))) / il.rms[r]
    assert np.all((np.abs(ratio - 1) < 1e-4) | (np.abs(ratio - 0.25) < 1e-3) | (ratio > 0.999))
  # Padding bytes change nothing: the same prompt with more padding gives the same Z.
  wide = jnp.pad(batch["bytes"], ((0, 0), (0, 7)), constant_values=65)
  wide_mask = jnp.pad(batch["bytes_mask"], ((0, 0), (0, 7)))
  np.testing.assert_allclose(il.latents(params, wide, wide_mask), z, atol=1e-5)
  grads = jax.jit(jax.grad(lambda p: il.loss(p, il.frozen, batch)[0]))(params)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  dead = [jax.tree_util.keystr(p) for p, g in flat if not float(jnp.abs(g).max()) > 0]
  assert not dead, f"no gradient reaches {dead}"
  assert {k for k in params["adapters"]} == {"source", "target"}
  # One receiver: only its adapter exists, and the loss is that receiver's.
  only = _system(lms, model__receivers=("target",))
  assert set(only.init_state(0)["params"]["adapters"]) == {"target"}
  with pytest.raises(Exception, match="receivers"):
    _config(*lms, model__receivers=("target", "thirdparty"))


def test_early_token_losses_match_float64_references():
  rng = np.random.default_rng(0)
  B, T, V, Vp = 3, 8, 7, 9
  s, t = rng.normal(size=(B, T, Vp)).astype(np.float32), rng.normal(size=(B, T, Vp)).astype(np.float32)
  y = rng.integers(0, V, size=(B, T))
  mask = np.zeros((B, T), bool)
  mask[0, 2:8], mask[1, 3:5], mask[2, 1:7] = True, True, True  # row 1 has only 2 answer tokens (< k)
  ls = _np_logp(s, V)
  ce = -np.take_along_axis(ls, y[..., None], -1)[..., 0]
  for k in (1, 4):
    sel = [(b, i) for b in range(B) for i in np.flatnonzero(mask[b])[:k]]
    ref = np.mean([ce[b, i] for b, i in sel])
    got = losses.first_k_ce(jnp.asarray(s), jnp.asarray(y), jnp.asarray(mask), k, V)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
  tau, k = 2.0, 4
  lst, ltt = _np_logp(s.astype(np.float64) / tau, V), _np_logp(t.astype(np.float64) / tau, V)
  sel = [(b, i) for b in range(B) for i in np.flatnonzero(mask[b])[:k]]
  ref = tau ** 2 * np.mean([(np.exp(ltt[b, i]) * (ltt[b, i] - lst[b, i])).sum() for b, i in sel])
  got = losses.kd_first_k(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), k, V, tau)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  same = losses.kd_first_k(jnp.asarray(t), jnp.asarray(t), jnp.asarray(mask), k, V, tau)
  assert float(same) == pytest.approx(0, abs=1e-6)


def test_sinusoids_match_the_formula():
  pe = interlingua.sinusoids(5, 6)
  for pos in range(5):
    for i in range(3):
      w = 10000.0 ** (-2 * i / 6)
      assert pe[pos, 2 * i] == pytest.approx(np.sin(pos * w), abs=1e-6)
      assert pe[pos, 2 * i + 1] == pytest.approx(np.cos(pos * w), abs=1e-6)


def _write_interlingua(path, c, il):
  rundir.write_config(c, str(path))
  ck = ckpt.Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
  ck.save(1, il.init_state(0)["params"], {"none": jnp.zeros(())}, {"step": 1})
  ck.close()


def test_harness_rows_and_the_answer_never_reaches_an_input(lms, tmp_path, monkeypatch):
  from dba_jax import eval_cli
  src, tgt = lms
  c = _config(src, tgt)
  il = lw_train.make_system(c, sides.load_lm(src, "source"), sides.load_lm(tgt, "target"))
  # Training batches: the encoder's bytes are the text prompt, never the answer.
  exs = il.task.examples("train", 4, 5)
  pairs = [(ex.question, ex.answer) for ex in exs]
  b = il.batch(exs)
  for i, (q, a) in enumerate(pairs):
    sent = bytes(b["bytes"][i][b["bytes_mask"][i]].astype(np.uint8)).decode()
    assert sent == synthetic.PROMPT.format(q=q) and "####" not in sent
  wd = tmp_path / "interlingua"
  _write_interlingua(wd, c, il)
  man = tmp_path / "manifest.json"
  man.write_text(json.dumps({"source": src, "target": tgt, "bridges": [str(wd)], "questions": 2, "max_new": 3,
                             "source_max_new": 3, "wire_formats": ["fp16", "q8"], "batch_size": 2}))
  seen, encoded = [], []
  generate_, rows = sides.Speaker.generate, interlingua.utf8_rows

  def spy(self, ids_rows, max_new, prefix_NPd=None, task=None):
    seen.extend((self.lm.role, np.asarray(ids).tolist(), prefix_NPd is not None) for ids in ids_rows)
    return generate_(self, ids_rows, max_new, prefix_NPd, task)

  def spy_rows(texts, length):
    encoded.extend(texts)
    return rows(texts, length)

  monkeypatch.setattr(sides.Speaker, "generate", spy)
  monkeypatch.setattr(interlingua, "utf8_rows", spy_rows)
  out = tmp_path / "r.json"
  assert eval_cli.main(["latentwire", "--manifest", str(man), "--out", str(out)]) == 0
  r = json.loads(out.read_text())
  M = c.model.M
  mine = {f"interlingua_m{M}_{lm}_{f}" for lm in ("source", "target") for f in ("fp16", "q8")}
  assert mine <= set(r["methods"]) and all(r["methods"][k]["n"] == 2 for k in mine)
  j = r["methods"][f"joint_interlingua_m{M}"]  # both receivers: the original's joint rescoring
  assert j["n"] == 2 and j["exact_match"] <= j["oracle_exact_match"] and 0 <= j["agreement"] <= 1
  assert r["methods"][f"interlingua_m{M}_target_fp16"]["wire_bytes"] == M * c.model.d_z * 2
  assert all(r["methods"][k]["source_kv_bytes"] == 0 for k in mine)
  assert r["bridges"][0]["kind"] == "interlingua"
  # Every prefixed decode got its receiver's stub and nothing else; the encoder read only the prompts.
  stubs = {"source": sides.load_lm(src, "source").encode(synthetic.STUB).tolist(),
           "target": sides.load_lm(tgt, "target").encode(synthetic.STUB).tolist()}
  prefixed = [(role, ids) for role, ids, pre in seen if pre]
  assert len(prefixed) == 2 * 2 * 2 and all(ids == stubs[role] for role, ids in prefixed)
  questions = [(ex.question, ex.answer) for ex in il.task.examples("test", 2, 12345)]
  assert encoded == [synthetic.PROMPT.format(q=q) for q, _ in questions]
  tok = bpe_qa()
  for _, a in questions:
    assert all(synthetic.gold(a) not in tok.decode(ids) for role, ids in prefixed if role == "target")


@pytest.mark.slow
def test_interlingua_training_cli_runs_and_resumes(lms, tmp_path, capsys):
  src, tgt = lms
  argv = ["dba-latentwire-train", "--config=configs/latentwire.py:interlingua_cpu", f"--source={src}",
          f"--target={tgt}"]
  wd = tmp_path / "il"
  cwd = os.getcwd()
  os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    assert lw_train.main(argv + [f"--workdir={wd}"]) == 0
    metrics = [json.loads(x) for x in open(wd / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and "kd_target" in metrics[0]
    assert [json.loads(x)["step"] for x in open(wd / "eval.jsonl")] == [2, 4]
    assert lw_train.main(argv + [f"--workdir={wd}", "--config.train.steps=5"]) == 0  # resumes at 4
    assert [json.loads(x)["step"] for x in open(wd / "metrics.jsonl")][-1] == 5
    assert lw_train.main(argv + [f"--workdir={wd}", "--config.model.M=5"]) == 2
    assert "different model" in capsys.readouterr().err
  finally:
    os.chdir(cwd)


def test_method_names_stay_distinct_when_two_systems_share_a_size():
  from types import SimpleNamespace as NS
  from dba_jax.evals import latentwire as harness
  cfg = lambda kind, **kw: NS(model=NS(kind=kind, **kw))
  confs = [cfg("bridge", K=8), cfg("bridge", K=8), cfg("bridge", K=4), cfg("interlingua", M=8)]
  tags = harness.method_tags(["runs/a/bridge_k8", "runs/b/k8_long/", "x/k4", "x/il"], confs)
  assert tags == ["k8-bridge_k8", "k8-k8_long", "k4", "m8"]
