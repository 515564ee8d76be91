"""KV-cache generation (dba_jax.generate), perplexity and the dba-eval CLI (dba_jax.evals.perplexity)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dba_jax import eval_cli, generate, model as model_lib, ops
from dba_jax.evals import perplexity
from dba_jax.config import validate
from helpers import tiny

KINDS = {
    "standard": ("standard", {}),
    "gqa": ("gqa", {}),
    "dba": ("dba", {}),
    "dba_gated_null": ("dba", dict(gate=True, gate_dynamic=True, null_attn=True)),
    "selective": ("standard", dict(attn_kind="selective")),
    "selective_bos_self": ("standard", dict(attn_kind="selective", protect_bos=False, allow_self_mask=True)),
    "gpt2_unrolled": ("gpt2", dict(scan_layers=False)),  # learned positions, LayerNorm, tied head, no scan
}
T, PROMPT, MAX_LEN = 20, 5, 24  # prompt 5 pads to the 16-token bucket; 15 tokens are then decoded one by one


def make_model(name, **extra):
  kind, kw = KINDS[name]
  m = validate(tiny(kind, **{**kw, **extra})).model
  # Weights x3 so the logits (and the selection scores) are far from zero: differences cannot hide.
  params = jax.tree.map(lambda a: 3.0 * a if a.ndim >= 2 else a, model_lib.init_params(m, jax.random.key(1)))
  return model_lib.Model(m, model_lib.abstract(m)[0], params)


def tokens(m, batch=2, length=T, seed=0):
  return np.random.default_rng(seed).integers(0, m.vocab_size, (batch, length)).astype(np.int32)


def cached_logits(model, toks, cache="float32", window=0):
  gen = generate.Generator(model, cache=cache, window=window, max_len=MAX_LEN, batch=toks.shape[0])
  return np.asarray(generate.teacher_forced_logits(gen, toks, PROMPT)), gen


@pytest.mark.parametrize("name", list(KINDS))
def test_cached_decoding_matches_full_forward_fp32(name):
  model = make_model(name)
  toks = tokens(model.config)
  ref = np.asarray(model(toks))[:, PROMPT - 1:]
  got, gen = cached_logits(model, toks)
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
  assert gen.traces == {"prefill": 1, "decode": 1}
  if name.startswith("selective"):  # the F carry must matter: without selection the logits differ
    pm = validate(tiny("standard", **KINDS[name][1], disable_selection=True)).model
    plain = model_lib.Model(pm, model_lib.abstract(pm)[0], model.params)
    assert np.abs(np.asarray(plain(toks))[:, PROMPT - 1:] - ref).max() > 1e-3


# Relative half step of each storage: half an ulp for floats; half a level gap over the block's absmax for the
# block formats (q8_0 1/254, q4_0 1/14, nf4 half its widest gap 0.152).
REL_HALF_STEP = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "q8_0": 0.5 / 127, "q4_0": 0.5 / 7,
                 "nf4": 0.5 * float(np.diff(generate.NF4_LEVELS).max())}
AMPLIFICATION = 10.0  # stated model-level bound: |dlogits| <= 10 x rel half step x max|logits| (measured 1.3-6)


@pytest.mark.parametrize("name,cache", [("standard", "bfloat16"), ("selective", "float16"), ("gqa", "q8_0"),
                                        ("dba", "q4_0"), ("dba_gated_null", "nf4")])
def test_low_precision_and_quantised_caches_within_bound(name, cache):
  model = make_model(name)
  toks = tokens(model.config)
  ref = np.asarray(model(toks))[:, PROMPT - 1:]
  got, _ = cached_logits(model, toks, cache)
  err = np.abs(got - ref).max()
  assert 0 < err <= AMPLIFICATION * REL_HALF_STEP[cache] * np.abs(ref).max(), err


def test_full_precision_window_covering_everything_is_exact():
  model = make_model("dba_gated_null")
  toks = tokens(model.config)
  ref = np.asarray(model(toks))[:, PROMPT - 1:]
  got, _ = cached_logits(model, toks, "q4/q8/q4", window=MAX_LEN)
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_window_ring_holds_the_last_tokens_exactly():
  """Prefill 7 real tokens (chunk padded to 10), then decode 2: positions 5..8 read exact, 0..4 quantised."""
  B, S, F, W = 1, 12, 40, 4
  x = jax.random.normal(jax.random.key(0), (B, S, F))
  st = generate._empty_stream("q4_0", B, S, F, W)
  st = generate._write(st, "q4_0", x[:, :10], 0, 7)
  for pos in (7, 8):
    st = generate._write(st, "q4_0", x[:, pos:pos + 1], pos, pos + 1)
  got = np.asarray(generate._read(st, "q4_0", F, 9, jnp.float32))
  deq = np.asarray(generate.dequantize(generate.quantize(x, "q4_0"), "q4_0", F))
  np.testing.assert_array_equal(got[:, 5:9], np.asarray(x[:, 5:9]))
  np.testing.assert_array_equal(got[:, :5], deq[:, :5])
  assert np.abs(got[:, :5] - np.asarray(x[:, :5])).max() > 0


@pytest.mark.parametrize("kind", generate.QUANT_KINDS)
def test_quantise_round_trip_within_half_step(kind):
  x = jax.random.normal(jax.random.key(3), (3, 5, 70)) * jnp.linspace(0.01, 30.0, 70)[None, None]  # 70: a padded last block
  x = x.at[0, 0].set(0.0)  # an all-zero row: zero scale, exact
  st = generate.quantize(x, kind)
  assert st["q"].dtype == (jnp.int8 if kind == "q8_0" else jnp.uint8) and st["s"].dtype == jnp.float16
  assert st["q"].shape == (3, 5, 3, 32 if kind == "q8_0" else 16)
  err = jnp.abs(generate.dequantize(st, kind, 70) - x)
  err_blocks = generate._blocks(err).max(-1)
  assert bool((err_blocks <= generate.half_step(st, kind) * (1 + 1e-6)).all())
  assert float(err[0, 0].max()) == 0.0


@pytest.mark.parametrize("cache", ["bfloat16", "float16", "q8_0", "q4_0", "nf4"])
def test_attention_over_a_stored_cache_within_derived_bound(cache):
  """One attention read: keys off by <= dk move every logit by <= eps = scale * max ||q||_1 * dk, so each
  probability moves by a factor in [e^-2eps, e^2eps] and |do| <= (e^2eps - 1) max|v| + dv."""
  B, S, K, D = 1, 40, 2, 48
  kq, kk, kv = jax.random.split(jax.random.key(5), 3)
  q = jax.random.normal(kq, (B, 3, 4, D))
  k, v = jax.random.normal(kk, (B, S, K, D)), jax.random.normal(kv, (B, S, K, D))
  stored = {}
  bound = {}
  for name, t in (("k", k), ("v", v)):
    flat = t.reshape(B, S, K * D)
    st = generate._write(generate._empty_stream(cache, B, S, K * D, 0), cache, flat, 0, S)
    stored[name] = generate._read(st, cache, K * D, S, jnp.float32).reshape(B, S, K, D)
    if cache in generate.QUANT_KINDS:
      bound[name] = float(generate.half_step(st, cache).max())
    else:
      bound[name] = REL_HALF_STEP[cache] * float(jnp.abs(t).max())
    assert float(jnp.abs(stored[name] - t).max()) <= bound[name]
  scale = D ** -0.5
  visible = jnp.arange(S)[None, :] <= jnp.array([10, 25, 39])[:, None]
  exact = ops.attention(q, k, v, scale=scale, mask=visible[None], impl="xla")
  approx = ops.attention(q, stored["k"], stored["v"], scale=scale, mask=visible[None], impl="xla")
  eps = scale * float(jnp.abs(q).sum(-1).max()) * bound["k"]
  limit = math.expm1(2 * eps) * float(jnp.abs(v).max()) + bound["v"]
  assert 0 < float(jnp.abs(approx - exact).max()) <= limit


@pytest.mark.parametrize("name,cache,window", [("standard", "float16", 0), ("gqa", "q8_0", 3),
                                               ("dba", "q4/q8/q4", 4), ("selective", "nf4", 0)])
def test_measured_cache_bytes_equal_the_formula(name, cache, window):
  m = make_model(name).config
  B, S = 2, 16
  gen = generate.Generator(make_model(name), cache=cache, window=window, max_len=S, batch=B)
  want = B * S * generate.kv_bytes_per_token(m, cache) + B * window * generate.window_bytes_per_token(m, cache)
  assert generate.cache_bytes(gen.init_cache()) == want
  if cache == "float16":
    assert generate.kv_bytes_per_token(m, cache) == 2 * model_lib.kv_elems_per_token(m)


def test_dba_policy_per_stream():
  m = make_model("dba").config  # per layer: k_sem 16, k_geo 32, v 48 wide
  assert generate.parse_policy("q4/q8/q4", m) == {"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}
  assert generate.kv_bytes_per_token(m, "q4/q8/q4") == 2 * (18 + 34 + 2 * 18)
  with pytest.raises(ValueError, match="3 streams"):
    generate.parse_policy("q4/q8", m)


def test_greedy_stops_at_a_configured_stop_token_and_buckets_compile_once():
  model = make_model("dba")
  gen = generate.Generator(model, max_len=40)
  prompt = tokens(model.config, 1, 5)
  free = gen.generate(prompt, 10)["tokens"][0]
  assert len(free) == 10
  stop = free[4]
  cut = free.index(stop)
  out = gen.generate(prompt, 10, stop_tokens=[stop])
  assert out["tokens"][0] == free[:cut] and out["stopped"] == [True]
  gen.generate(tokens(model.config, 1, 9), 2)  # same 16-token bucket: no new prefill compilation
  assert gen.traces == {"prefill": 1, "decode": 1}
  gen.generate(tokens(model.config, 1, 17), 2)  # the 32-token bucket
  assert gen.traces == {"prefill": 2, "decode": 1}


def test_temperature_sampling_is_reproducible_for_a_seed():
  model = make_model("standard")
  gen = generate.Generator(model, max_len=32)
  prompt = tokens(model.config, 1, 6)
  a = gen.generate(prompt, 12, temperature=1.5, seed=7)["tokens"]
  b = gen.generate(prompt, 12, temperature=1.5, seed=7)["tokens"]
  c = gen.generate(prompt, 12, temperature=1.5, seed=8)["tokens"]
  assert a == b and a != c
  for bad in (float("nan"), float("inf"), -0.5):  # NaN used to decode greedily without a word
    with pytest.raises(ValueError, match="finite number >= 0"):
      gen.generate(prompt, 2, temperature=bad)


# --------------------------------------------------------------------------------------------- perplexity

def _hand_nll(model, windows, vocab_limit):
  nll = []
  for w in windows:
    logits = np.asarray(model(w[None, :-1]), np.float64)[0, :, :vocab_limit]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll.extend(logz - logits[np.arange(len(w) - 1), w[1:]])
  return np.array(nll)


def test_perplexity_matches_exp_mean_nll_by_hand():
  model = make_model("standard")
  m = model.config
  toks = np.random.default_rng(1).integers(0, 200, 23)
  L = 5
  # Non-overlapping: windows start at 0, 5, 10, 15 (6 tokens each); tokens 1..20 are scored once each.
  hand = _hand_nll(model, [toks[s:s + L + 1] for s in (0, 5, 10, 15)], m.vocab_size)
  r = perplexity.perplexity(model, m, toks, L, batch_size=3)
  assert r["scored_tokens"] == 20 == len(hand) and r["windows"] == 4
  np.testing.assert_allclose(r["ppl"], np.exp(hand.mean()), rtol=1e-5)
  # Overlapping (the anchor's): windows start at every token 0..17, all 5 targets of each count.
  hand = _hand_nll(model, [toks[s:s + L + 1] for s in range(18)], 200)
  r = perplexity.perplexity(model, m, toks, L, overlap=True, vocab_limit=200, batch_size=4)
  assert r["scored_tokens"] == 90 and r["stride"] == 1
  np.testing.assert_allclose(r["ppl"], np.exp(hand.mean()), rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ CLI

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  from dba_jax import ckpt
  d = tmp_path_factory.mktemp("run")
  text = d / "corpus.txt"
  text.write_text("def f(x):\n    return x + 1\n" * 40)
  c = tiny("dba")
  c.data.source, c.data.train_path, c.data.val_fraction = "text", str(text), 0.2
  validate(c)
  (d / "config.json").write_text(c.to_json(indent=2))
  saver = ckpt.Checkpointer(str(d / "checkpoints"), async_save=False)
  saver.save(1, model_lib.init_params(c.model, jax.random.key(0)), {"count": jnp.zeros(())}, {"step": 1})
  saver.close()
  return d


def test_cli_ppl_and_generate(workdir, tmp_path, capsys):
  out = tmp_path / "ppl.json"
  assert eval_cli.main(["ppl", "--checkpoint", str(workdir), "--seq-len", "16", "--out", str(out)]) == 0
  r = json.loads(out.read_text())
  assert r["mode"] == "non_overlapping" and r["ppl"] > 1 and r["scored_tokens"] % 16 == 0
  assert r["step"] == 1 and r["checkpoint_dir"] == str(workdir / "checkpoints" / "1")  # which checkpoint was scored
  capsys.readouterr()
  assert eval_cli.main(["generate", "--checkpoint", str(workdir), "--prompt", "def f", "--max-new", "4",
                        "--cache", "q4/q8/q4"]) == 0
  g = json.loads(capsys.readouterr().out)
  assert len(g["tokens"]) == 4
  assert g["kv_bytes_per_token"] == generate.kv_bytes_per_token(validate(tiny("dba")).model, "q4/q8/q4")


@pytest.mark.parametrize("argv", [["ppl"], ["generate", "--checkpoint", "x"], ["nonsense"],
                                  ["ppl", "--checkpoint", "x", "--overlap", "--stride", "two"],
                                  ["ppl", "--checkpoint", "x", "--stride", "0"]])
def test_cli_usage_errors_exit_2(argv):
  with pytest.raises(SystemExit) as e:
    eval_cli.main(argv)
  assert e.value.code == 2


@pytest.mark.parametrize("extra", [["ppl", "--checkpoint", "{missing}"],
                                   ["generate", "--checkpoint", "{run}", "--prompt", "hi", "--cache", "q3_k"]])
def test_cli_errors_exit_2_with_a_message(extra, workdir, tmp_path, capsys):
  argv = [a.format(missing=tmp_path / "nope", run=workdir) for a in extra]
  assert eval_cli.main(argv) == 2
  assert "dba-eval: error:" in capsys.readouterr().err
