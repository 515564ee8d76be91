"""HOPE (issue 14): CMS levels, the inner optimiser, the teach signal and the two-pass online step, against float64
references written here from others.md B.2–B.4 and against the original package's parameter counts."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dba_jax import eval_cli, losses, model as model_lib, train
from dba_jax.evals import stats
from dba_jax.config import validate
from dba_jax.hope import cms, step as hope_step, teach
from helpers import load_preset, untrained_run


def hope_config(block="hope_attention", periods=(1, 4), vocab=97, d=32, layers=2, heads=4, **hope):
  c = load_preset("hope.py", "cpu")
  m = c.model
  m.block, m.vocab_size, m.pad_vocab_to, m.d_model, m.n_layers, m.n_heads = block, vocab, 1, d, layers, heads
  c.model.hope.cms_periods, c.model.hope.online_chunk = periods, 0
  for k, v in hope.items():
    c.model.hope[k] = v
  c.data.seq_len, c.train.batch_size = 16, 4
  return validate(c)


@pytest.mark.parametrize("block,periods,vocab,d,want", [
    ("hope_attention", (1, 4), 97, 32, 45_152), ("hope_transformer", (1, 4), 97, 32, 28_000),  # measured (package)
    ("hope_attention", (4, 16, 64), 256, 128, 956_416), ("hope_transformer", (4, 16, 64), 256, 128, 427_264),
])
def test_parameter_counts_match_the_original(block, periods, vocab, d, want):
  c = hope_config(block, periods, vocab, d, heads=4)
  assert model_lib.count_params(c.model) == want


def _level(key, d=6, mult=2):
  p = cms.init_level(key, d, mult, std=0.5, dtype=jnp.float64)
  k = jax.random.split(key, 4)
  p["norm_scale"] = 1 + 0.1 * jax.random.normal(k[0], (d,), jnp.float64)
  p["b1"] = 0.1 * jax.random.normal(k[1], p["b1"].shape, jnp.float64)
  p["b2"] = 0.1 * jax.random.normal(k[2], p["b2"].shape, jnp.float64)
  return p


def test_inner_loss_gradient_is_two_delta_on_active_tokens():
  """∂L/∂pred = 2δ·mask for L = Σ_active ‖pred − sg(pred − δ)‖², and level_grad is that pulled back."""
  with jax.enable_x64(True):
    key = jax.random.key(0)
    p = _level(key)
    x, t = jax.random.normal(key, (5, 6), jnp.float64), jax.random.normal(jax.random.key(1), (5, 6), jnp.float64)
    active = jnp.array([True, False, True, True, False])
    loss = lambda pred: (((pred - jax.lax.stop_gradient(pred - t)) ** 2).sum(-1) * active).sum()
    pred = cms.level_apply(p, x)
    np.testing.assert_allclose(jax.grad(loss)(pred), 2 * t * active[:, None], rtol=0, atol=1e-14)
    want = jax.grad(lambda q: loss(cms.level_apply(q, x)))(p)
    got = cms.level_grad(p, x, t, active)
    for k in p:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-14, err_msg=k)


def test_teach_signal_closed_form_equals_autograd_at_the_final_norm():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    B, T, d, V, vocab = 2, 5, 8, 13, 11  # two padded vocab columns
    h = jnp.asarray(rng.normal(size=(B, T, d)))
    W = jnp.asarray(rng.normal(size=(V, d)))
    y = jnp.asarray(rng.integers(0, vocab, (B, T)))
    mask = jnp.asarray(rng.random((B, T)) < 0.7)
    head = lambda h_: jnp.einsum("btd,vd->btv", h_, W)
    ce = lambda z: (losses.nll(z, y, vocab) * mask).sum() / mask.sum()
    d_logits = teach.closed_form(head(h), y, mask, vocab)
    np.testing.assert_allclose(np.asarray(d_logits), np.asarray(jax.grad(ce)(head(h))), rtol=1e-12, atol=1e-14)
    _, pull = jax.vjp(head, h)  # hope/step pulls it back through the model's readout the same way
    want = jax.grad(lambda h_: ce(head(h_)))(h)
    np.testing.assert_allclose(np.asarray(pull(d_logits)[0]), np.asarray(want), rtol=1e-12, atol=1e-14)


def test_teach_schedule_and_clip():
  vals = [float(teach.schedule(s, 0.1, 2000, 120_000, 20_000)) for s in (0, 1999, 130_000, 139_999, 200_000)]
  np.testing.assert_allclose(vals, [5e-5, 0.1, 0.049995, 0.0, 0.0], rtol=1e-5, atol=1e-12)  # B.10's values
  s = teach.scale_and_clip(jnp.array([[[3.0, 4.0], [0.3, 0.4]]]), 1.0, 2.0)
  np.testing.assert_allclose(np.asarray(s), [[[1.2, 1.6], [0.3, 0.4]]], rtol=1e-6)


def _online(periods, T, flush=False, variant="nl_l2_precond", d=6, lr=0.05):
  key = jax.random.key(3)
  levels = [_level(k, d) for k in jax.random.split(key, len(periods))]
  x = jax.random.normal(jax.random.key(4), (T, d), jnp.float64)
  t = jax.random.normal(jax.random.key(5), (T, d), jnp.float64)
  t = t.at[2].set(0.0)  # an inactive token (zero teach)
  fast = cms.init_fast_state(levels, variant)
  y, fast = cms.online(levels, fast, x, t, jnp.ones(T, bool), periods, lr, variant, flush=flush)
  return levels, x, t, y, fast


def test_cms_cadence():
  """T = 9, periods 2 and 4: 4 and 2 updates (the partial tail waits); with the flush 5 and 3."""
  with jax.enable_x64(True):
    assert [int(f["updates"]) for f in _online((2, 4), 9)[4]] == [4, 2]
    assert [int(f["updates"]) for f in _online((2, 4), 9, flush=True)[4]] == [5, 3]


def _reference_online(levels, x, t, periods, lr, variant, beta=0.9, beta2=0.999, eps=1e-8):
  """The original's buffered form, token lists and all, in float64: sub-chunks of min(periods); each level
  buffers (input, teach, active) and when it holds p tokens pops p and takes one DeepMomentum step."""
  c = min(periods)
  params = [dict(p) for p in levels]
  mom = [{k: np.zeros(v.shape) for k, v in p.items()} for p in levels]
  sq = [{k: np.zeros(v.shape) for k, v in p.items()} for p in levels]
  buf = [[] for _ in levels]
  outs = []
  for s in range(0, x.shape[0], c):
    cur = x[s:s + c]
    for i, p in enumerate(params):
      inp = cur
      cur = cms.level_apply(p, cur)
      buf[i] += [(inp[j], t[s + j]) for j in range(inp.shape[0])]
      while len(buf[i]) >= periods[i]:
        chunk, buf[i] = buf[i][:periods[i]], buf[i][periods[i]:]
        xs, ts = jnp.stack([a for a, _ in chunk]), jnp.stack([b for _, b in chunk])
        act = jnp.abs(ts).sum(-1) > 0
        loss = lambda q: ((((lambda pr: pr - jax.lax.stop_gradient(pr - ts))(cms.level_apply(q, xs))) ** 2).sum(-1)
                          * act).sum()
        g = jax.grad(loss)(p)
        ctx = np.asarray(xs).mean(0)
        unit = ctx / (np.linalg.norm(ctx) + eps)
        for k in p:
          gk = np.asarray(g[k])
          if variant == "nl_l2_precond" and k in ("norm_scale", "norm_bias", "b2"):
            u = gk - (gk @ unit) * unit
          elif variant == "nl_l2_precond" and k == "w1":  # torch W1 [h, d]: project its rows off the context
            u = (gk.T - np.outer(gk.T @ unit, unit)).T
          elif variant in ("preconditioned", "muon"):
            sq[i][k] = beta2 * sq[i][k] + (1 - beta2) * gk * gk
            u = gk / (np.sqrt(sq[i][k]) + eps)
            u = np.tanh(u) if variant == "muon" else u
          elif variant == "dmgd":
            u = np.tanh(gk)
          elif variant == "l2_objective":  # g + 0.1·mean over the last axis of torch's layout (weights [out, in])
            gt = gk.T if gk.ndim == 2 else gk
            u = gt + 0.1 * gt.mean(-1, keepdims=True)
            u = u.T if gk.ndim == 2 else u
          else:
            u = gk
          mom[i][k] = beta * mom[i][k] + (1 - beta) * u
          p[k] = p[k] - lr * mom[i][k]
        params[i] = p
    outs.append(cur)
  return params, mom, np.concatenate(outs)


@pytest.mark.parametrize("variant", ["nl_l2_precond", "preconditioned", "dmgd", "muon", "l2_objective"])
def test_inner_loop_trajectory_equals_the_buffered_float64_reference(variant):
  """Params, momenta and outputs after one update pass (periods 1, 2, 4 over 10 tokens) equal the original's
  buffer-then-pop form written from the spec: the summed per-sub-chunk gradients are the buffered gradient."""
  periods, T, lr = (1, 2, 4), 10, 0.05
  with jax.enable_x64(True):
    levels, x, t, y, fast = _online(periods, T, variant=variant, lr=lr)
    want_p, want_m, want_y = _reference_online(levels, x, t, periods, lr, variant)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-10, atol=1e-12)
    for i, lv in enumerate(levels):
      for k in lv:
        np.testing.assert_allclose(np.asarray(lv[k] + fast[i]["delta"][k]), np.asarray(want_p[i][k]), rtol=1e-10,
                                   atol=1e-12, err_msg=f"level {i} {k}")
        np.testing.assert_allclose(np.asarray(fast[i]["m"][k]), want_m[i][k], rtol=1e-10, atol=1e-12)
    assert [int(f["updates"]) for f in fast] == [10, 5, 2]


def test_newton_schulz_orthogonalises():
  g = jax.random.normal(jax.random.key(0), (8, 5))
  o = cms.newton_schulz(g, steps=10)
  s = np.linalg.svd(np.asarray(o), compute_uv=False)
  assert np.all((s > 0.6) & (s < 1.25)), s  # Muon's quintic iteration lands near (not at) 1


@pytest.fixture(scope="module")
def tiny_hope():
  c = hope_config(periods=(2, 4), online_chunk=8, teach_scale=1.0, inner_lr=0.05)
  decoder = model_lib.Decoder(c.model, nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, 97, (3, 17)).astype(np.int32)
  return c, decoder, tokens


def test_memory_fires_and_rows_are_independent(tiny_hope):
  c, decoder, tokens = tiny_hope
  ce, ce_n, fired, nll, _ = hope_step.memory_forward(decoder, jnp.asarray(tokens), 0, c.model.hope, 97)
  np.testing.assert_allclose(np.asarray(nll).reshape(3, 2, 8).mean((0, 2)), np.asarray(ce_n), rtol=1e-6)
  assert ce_n.shape == (2,) and np.isfinite(float(ce))
  # Chunk 0: 8 tokens -> 4 and 2 updates per row for periods 2 and 4, in every layer, 3 rows.
  np.testing.assert_array_equal(np.asarray(fired[0]), [[12, 6], [12, 6]])
  # Row 0's second-chunk loss does not depend on row 2's tokens.
  other = tokens.copy()
  other[2] = (other[2] + 5) % 97
  fwd = jax.jit(lambda t: hope_step.memory_forward(decoder, t, 0, c.model.hope, 97))
  per_row = lambda toks: np.asarray(jax.vmap(lambda r: fwd(r[None])[1])(jnp.asarray(toks)))
  a, b = per_row(tokens), per_row(other)
  np.testing.assert_array_equal(a[:2], b[:2])
  assert np.abs(a[2] - b[2]).max() > 0


def test_memory_changes_later_chunks_and_leaves_meta_params(tiny_hope):
  c, decoder, tokens = tiny_hope
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(decoder)))
  with_mem = hope_step.memory_forward(decoder, jnp.asarray(tokens), 0, c.model.hope, 97).ce_chunks
  off = c.model.hope.copy_and_resolve_references()
  off.teach_scale = 0.0  # no teach signal: no memory
  without, fired = hope_step.memory_forward(decoder, jnp.asarray(tokens), 0, off, 97)[1:3]
  assert int(np.asarray(fired).sum()) == 0  # no teach signal: no update counts as fired
  assert float(with_mem[0]) == float(without[0])  # the first chunk reads the empty memory either way
  assert abs(float(with_mem[1]) - float(without[1])) > 1e-6
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(decoder)))
  jax.tree.map(np.testing.assert_array_equal, before, after)


def _byte_hope_config(mode):
  return hope_config(periods=(2, 4), vocab=256, online_chunk=8, teach=mode)


def _train_three_steps(tmp_path, mode):
  c = _byte_hope_config(mode)
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.ckpt_every, c.train.eval_batches = 3, 1, 3, 3, 1
  c.train.batch_size = 8  # one row per simulated device: rows keep their own memory under the mesh
  summary = train.train(c, str(tmp_path / mode), quiet=True)
  assert summary["steps"] == 3 and np.isfinite(summary["eval_loss"])


@pytest.mark.slow
def test_per_layer_teach_trains(tmp_path):
  _train_three_steps(tmp_path, "per_layer")


def test_global_teach_trains(tmp_path):
  _train_three_steps(tmp_path, "global")


def test_the_memory_evals_run(tmp_path, capsys):
  """dba-eval hope on the initial parameters (the evals read a checkpoint; test_global_teach_trains makes one)."""
  # A live inner loop (teach 1, inner lr 1, no momentum): the anchor's 0.1 / 3e-4 moves the logits by ~1e-7.
  untrained_run(tmp_path / "global", hope_config(periods=(2, 4), vocab=256, online_chunk=8, teach="global",
                                                 teach_scale=1.0, inner_lr=1.0, inner_beta=0.0))
  out = tmp_path / "passkey.json"
  png = tmp_path / "passkey.png"
  assert eval_cli.main(["hope", "passkey", "--checkpoint", str(tmp_path / "global"), "--samples", "2", "--lengths",
                        "60", "--out", str(out), "--plot", str(png)]) == 0
  r = json.loads(out.read_text())
  assert [row["length"] for row in r["by_length"]] == [60] and png.stat().st_size > 0
  for row in r["by_length"]:  # the statistics are those of the per-prompt outcomes (paired, same prompts)
    assert row["samples"] == 2 and row["tokens"] >= row["length"] and row["updates_fired_per_sample"] > 0
    for arm in ("memory", "writes_off", "baseline"):
      k = round(row[f"{arm}_acc"] * 2)
      assert row[f"{arm}_p_chance"] == pytest.approx(stats.binomial_greater(k, 2, 0.5))
      assert row[f"{arm}_ci95"] == pytest.approx(list(stats.wilson_interval(k, 2)))
    mc = row["memory_vs_baseline"]
    assert mc["only_a"] - mc["only_b"] == round(2 * (row["memory_acc"] - row["baseline_acc"]))
  out = tmp_path / "continual.json"
  assert eval_cli.main(["hope", "continual", "--checkpoint", str(tmp_path / "global"), "--samples", "3", "--lengths",
                        "16", "--out", str(out)]) == 0
  r = json.loads(out.read_text())
  assert r["segment_tokens"] == 16 and r["baseline"]["updates_fired_per_sample"] == 0
  assert r["memory"]["updates_fired_per_sample"] > 0 and r["writes_off"]["updates_fired_per_sample"] == 0
  # The first segment's first chunk reads the empty memory either way; memory changes the re-read by more than float
  # noise, and the paired difference is the difference of the means, inside its own interval.
  for k in ("reread_after_itself", "reread_after_others"):
    d = r["memory"][k] - r["baseline"][k]
    assert abs(d) > 1e-4 and r["delta"][k] == pytest.approx(d)
    lo, hi = r["delta_ci95"][k]
    assert lo < d < hi and 0 <= r["delta_p"][k] <= 1
  # A memory state saved after reading a text, then read again from it; an existing directory is never replaced.
  ckpt, doc, saved = str(tmp_path / "global"), tmp_path / "doc.txt", tmp_path / "memory"
  doc.write_text("The pass key is KEY-4821. Remember it. " * 3)
  assert eval_cli.main(["hope", "read", "--checkpoint", ckpt, "--text", str(doc), "--save-state", str(saved)]) == 0
  before = (saved / "state.npz").read_bytes()
  out = tmp_path / "read.json"
  assert eval_cli.main(["hope", "read", "--checkpoint", ckpt, "--text", str(doc), "--state", str(saved),
                        "--out", str(out)]) == 0
  r = json.loads(out.read_text())
  assert r["tokens_before"] == r["tokens"] > 100 and r["updates_fired"] > 0 and r["memory_ce"] != r["baseline_ce"]
  with pytest.raises(SystemExit) as e:  # refused before any work, as an existing --out is (cli.refuse_existing)
    eval_cli.main(["hope", "read", "--checkpoint", ckpt, "--text", str(doc), "--save-state", str(saved)])
  assert e.value.code == 2 and "--force" in capsys.readouterr().err
  assert eval_cli.main(["hope", "passkey", "--checkpoint", ckpt, "--state", str(saved)]) == 2
  assert eval_cli.main(["hope", "read", "--checkpoint", ckpt, "--text", str(tmp_path / "none.txt")]) == 2
  assert (saved / "state.npz").read_bytes() == before


def test_needle_prompts_have_their_length_the_key_and_a_distractor():
  from dba_jax import data
  from dba_jax.evals import hope_memory as evals
  tok = data.get_tokenizer("byte")
  for task, at_start in (("passkey", True), ("niah", False)):
    true_text, other_text, key = evals.needle_prompt(np.random.default_rng(1), task, 400, tok, depth=0.5)
    assert len(tok.encode(true_text)) >= 400 and true_text.endswith(f"KEY-{key}")
    assert true_text[:-4] == other_text[:-4] and other_text[-4:] != str(key)
    assert true_text.count(str(key)) == 2 and (true_text.index("KEY-") == 16) == at_start
    assert true_text.index("KEY-") < len(true_text) - 200  # the needle is far from the question
  # Whatever the depth, at least `span` tokens lie between the needle's end and the question's end.
  for depth in (0.0, 0.5, 1.0):
    true_text, _, key = evals.needle_prompt(np.random.default_rng(2), "niah", 150, tok, depth=depth, span=120)
    needle_end = true_text.index(f"KEY-{key}") + len(f"KEY-{key}.")
    assert len(tok.encode(true_text[needle_end:-4])) >= 120
