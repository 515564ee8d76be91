"""dba-upcycle (dba_jax/upcycle/, docs/upcycle.md): the three initialisers on a small GQA teacher, the distillation
phases, and the command end to end on a Hugging Face Llama directory built by transformers with random weights.

The initialisers are checked in float64 numpy against formulas recomputed here: svd_joint's semantic path gives the
teacher's un-rotated logits exactly when its width reaches the head's rank (and the optimal truncation below it),
its geometric path the teacher's rotated logits on the copied pairs; svd_caramba is the anchor's construction
(loader/llama_upcycle.py: the first rows of the rank-limited reconstructions)."""
import copy
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dba_jax import loading, model as model_lib
from dba_jax.config import base_config, validate
from dba_jax.upcycle import cli, distill, init as init_lib, settings
from helpers import tiny, untrained_run

TIGHT = 1e-10  # float64


def _teacher(seed: int = 0):
  """A 2-layer GQA teacher (d_model 32, 4 heads of 8, 2 KV heads) with weights larger than the init's, numpy."""
  c = tiny("gqa")
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), model_lib.init_params(c.model, jax.random.key(seed)))
  params["blocks"]["attn"] = jax.tree.map(lambda x: x * 10, params["blocks"]["attn"])
  return c, params


def _student(t_c, sem: int, geo: int, v: int):
  c = copy.deepcopy(t_c)
  m = c.model
  m.attn_kind, m.dba.sem_dim, m.dba.geo_dim, m.attn_dim = "dba", 4 * sem, 4 * geo, 4 * v
  return validate(c)


def _layer(params, i: int = 0) -> dict:
  return {k: params["blocks"]["attn"][k]["kernel"][i] for k in ("q", "k", "v", "out")}


def _rotate(x, pos, freqs):
  """Half-split RoPE of the last axis of x at position pos (float64)."""
  h = x.shape[-1] // 2
  c, s = np.cos(pos * freqs), np.sin(pos * freqs)
  return np.concatenate([x[..., :h] * c - x[..., h:] * s, x[..., :h] * s + x[..., h:] * c], -1)


def _joint(t_c, t_params, sem, geo, v=8, sem_pairs="all"):
  s_c = _student(t_c, sem, geo, v)
  plan = init_lib.plan_of(t_c.model, s_c.model, "svd_joint", 32, sem_pairs)
  s = {k: None for k in ("q_sem", "k_sem", "q_geo", "k_geo", "v", "out")}
  n = init_lib.heads_of(t_c.model, s_c.model)
  return init_lib.init_attention("svd_joint", _layer(t_params), s, n, 0, plan, False, False), plan, n


def test_joint_factor_is_exact_at_full_rank_and_optimal_below():
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((3, 20, 6)), rng.standard_normal((20, 6))
  m = np.einsum("gdp,ep->gde", a, b)
  q, k = init_lib.joint_factor(a, b, 6)
  assert np.abs(np.einsum("gdw,ew->gde", q, k) - m).max() < TIGHT * np.abs(m).max()
  q, k = init_lib.joint_factor(a, b, 8)  # more slots than the rank: the extra ones are zero
  assert np.abs(np.einsum("gdw,ew->gde", q, k) - m).max() < TIGHT * np.abs(m).max()
  # Below the rank: the error is the dropped part of sum_h M_h^T M_h's spectrum (no shared K does better).
  q, k = init_lib.joint_factor(a, b, 2)
  err = np.sum((np.einsum("gdw,ew->gde", q, k) - m) ** 2)
  lam = np.sort(np.linalg.eigvalsh(np.einsum("gde,gdf->ef", m, m)))[::-1]
  assert abs(err - lam[2:].sum()) < 1e-8 * lam.sum()


def test_svd_joint_reproduces_the_teachers_semantic_logits_exactly():
  """Head dim 8 = 4 rotary pairs; the geometric path (2 per head = 1 pair, frequency 1 = the teacher's pair 0) and
  the semantic path the other 3 pairs: 6 dims, so semantic width 6 reaches the rank. Logits of every head (GQA: two
  heads per K group) for random x, y, in float64."""
  t_c, t_params = _teacher()
  w, plan, n = _joint(t_c, t_params, sem=6, geo=2)
  assert plan["geo"] == [0] and plan["exact"] == [True] and sorted(plan["sem"]) == [1, 2, 3]
  t = _layer(t_params)
  rng = np.random.default_rng(1)
  x, y = rng.standard_normal((5, 32)), rng.standard_normal((7, 32))
  sem_dims = np.array([1, 2, 3, 5, 6, 7])
  for h in range(4):
    g = h // 2
    qt, kt = (x @ t["q"])[:, h * 8:(h + 1) * 8], (y @ t["k"])[:, g * 8:(g + 1) * 8]
    want = qt[:, sem_dims] @ kt[:, sem_dims].T / np.sqrt(8)
    got = (x @ w["q_sem"])[:, h * 6:(h + 1) * 6] @ ((y @ w["k_sem"])[:, g * 6:(g + 1) * 6]).T / np.sqrt(6)
    assert np.abs(got - want).max() < TIGHT * np.abs(want).max()


def test_svd_joint_geometric_pairs_rotate_as_the_teachers():
  """With the semantic pairs un-rotated and the geometric ones rotated at their positions, the student's whole logit
  (semantic + geometric) is the teacher's with RoPE on the copied pairs only: the frequencies match exactly."""
  t_c, t_params = _teacher()
  w, plan, _ = _joint(t_c, t_params, sem=4, geo=4, sem_pairs="all")  # geo pairs 0 and 2 (every 2nd of 4)
  assert plan["geo"] == [0, 2] and all(plan["exact"])
  t = _layer(t_params)
  f_t = 10000.0 ** (-np.arange(0, 8, 2) / 8)
  f_s = 10000.0 ** (-np.arange(0, 4, 2) / 4)
  rng = np.random.default_rng(2)
  x, y = rng.standard_normal(32), rng.standard_normal(32)
  geo = np.array([0, 2, 4, 6])
  for pq, pk in ((3, 0), (17, 5), (9, 9)):
    qt, kt = _rotate((x @ t["q"])[:8], pq, f_t), _rotate((y @ t["k"])[:8], pk, f_t)  # head 0, group 0
    want = qt[geo] @ kt[geo] / np.sqrt(8)
    got = _rotate((x @ w["q_geo"])[:4], pq, f_s) @ _rotate((y @ w["k_geo"])[:4], pk, f_s) / np.sqrt(4)
    assert abs(got - want) < TIGHT * max(1.0, abs(want))


def test_svd_caramba_is_the_anchors_construction():
  """caramba: A = U S Vh (rank sem + geo); semantic = first `sem` rows of U[:, :sem] S Vh[:sem], geometric = first
  `geo` rows of U[:, sem:sem+geo] S Vh[sem:sem+geo]. A matrix of exactly that rank makes the randomized SVD exact."""
  rng = np.random.default_rng(3)
  u0, _ = np.linalg.qr(rng.standard_normal((32, 12)))
  v0, _ = np.linalg.qr(rng.standard_normal((48, 12)))
  a = (u0 * np.linspace(5.0, 1.0, 12)) @ v0.T  # [O 32, I 48], rank 12
  u, s, vh = np.linalg.svd(a)
  sem, geo = init_lib.caramba_split(a, 4, 8, "layer.q")  # randomized path: 12 < 32
  assert np.abs(sem - (u[:4, :4] * s[:4]) @ vh[:4]).max() < 1e-9
  assert np.abs(geo - (u[:8, 4:12] * s[4:12]) @ vh[4:12]).max() < 1e-9
  sem, geo = init_lib.caramba_split(a[:8], 6, 4, "layer.k")  # exact path: the rank asked reaches 8
  u, s, vh = np.linalg.svd(a[:8])
  assert np.abs(sem - (u[:6, :6] * s[:6]) @ vh[:6]).max() < 1e-9
  assert np.abs(geo - (u[:4, 6:8] * s[6:8]) @ vh[6:8]).max() < 1e-9  # only 2 components left: rows from both
  # caramba's rows are the teacher's first output channels (head 0 first), so the logits are not kept.


@pytest.mark.parametrize("init,v", [("svd_caramba", 8), ("svd_caramba", 4), ("svd_joint", 8), ("random", 8)])
def test_everything_but_attention_is_the_teachers(init, v):
  t_c, t_params = _teacher()
  s_c = _student(t_c, 4, 2, v)
  s0 = jax.tree.map(np.asarray, model_lib.init_params(s_c.model, jax.random.key(5)))
  plan = init_lib.plan_of(t_c.model, s_c.model, init, 32, "slow")
  s = init_lib.upcycle_params(t_params, t_c.model, s0, s_c.model, init, plan)
  for key in ("embed", "final_norm", "head"):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.float32(b)), s[key], t_params[key])
  for key in ("attn_norm", "mlp_norm", "mlp"):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.float32(b)), s["blocks"][key],
                 t_params["blocks"][key])
  tv, to, sv, so = (x["kernel"] for x in (t_params["blocks"]["attn"]["v"], t_params["blocks"]["attn"]["out"],
                                          s["blocks"]["attn"]["v"], s["blocks"]["attn"]["out"]))
  if v == 8 or init != "svd_joint":  # a kept width is copied; a narrower one, caramba's prefix (whole heads first)
    np.testing.assert_array_equal(sv, np.float32(tv[..., :sv.shape[-1]]))
    np.testing.assert_array_equal(so, np.float32(to[:, :so.shape[1]]))
  if init == "random":
    np.testing.assert_array_equal(s["blocks"]["attn"]["q_sem"]["kernel"], s0["blocks"]["attn"]["q_sem"]["kernel"])
  jax.tree.map(lambda a, b: None if a.shape == b.shape else pytest.fail(f"{a.shape} != {b.shape}"), s, s0)


def _batch(vocab: int, B: int = 4, T: int = 16, seed: int = 0):
  """A repeating pattern with some noise: [B, T + 1] tokens."""
  rng = np.random.default_rng(seed)
  base = np.tile(np.arange(T + 1) % 7, (B, 1)) * 3 % vocab
  return np.where(rng.random((B, T + 1)) < 0.2, rng.integers(0, vocab, (B, T + 1)), base).astype(np.int32)


def _distiller(**phases):
  t_c, t_params = _teacher()
  s_c = _student(t_c, 2, 2, 8)
  s0 = jax.tree.map(np.asarray, model_lib.init_params(s_c.model, jax.random.key(1)))
  s = init_lib.upcycle_params(t_params, t_c.model, s0, s_c.model, "random", {})
  u = settings.defaults()
  u.log_every = 4
  for key, value in phases.items():
    phase, field = key.split("_", 1)
    u[phase][field] = value
  f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  return distill.Distiller(distill.Net(t_c.model, model_lib.abstract(t_c.model)[0]), f32(t_params),
                           distill.Net(s_c.model, model_lib.abstract(s_c.model)[0]), f32(s), u, t_c.model.vocab_size)


def test_blockwise_distillation_lowers_the_blockwise_loss():
  """12 steps on one batch (the teacher's hidden states of it): the student layers' relative error falls."""
  d = _distiller(blockwise_steps=12, blockwise_lr=1e-2)
  x = jnp.asarray(_batch(d.vocab)[:, :-1])
  h_in, h_out, _ = d._trace(d.t_params, x)
  rel = lambda: float(jnp.mean(distill.layer_errors(d._student_blocks(d.params["blocks"], h_in), h_out, h_in,
                                                    "mse")[1]))
  before = rel()
  log = d.blockwise(itertools.repeat(_batch(d.vocab)))
  assert [s for s, _ in log] == [4, 8, 12] and rel() < 0.5 * before, (before, rel(), log)


@pytest.mark.slow  # ~15 s: the KD step and the full evaluation compile too
def test_kd_lowers_the_kd_loss_and_never_trains_the_teacher():
  d = _distiller(blockwise_steps=0, kd_steps=8, kd_lr=1e-3)
  evals = [_batch(d.vocab)]
  before = d.evaluate(evals)
  d.kd(itertools.repeat(_batch(d.vocab)))
  after = d.evaluate(evals)
  assert after["kd_kl"] < 0.8 * before["kd_kl"], (before, after)
  assert before["teacher_loss"] == after["teacher_loss"]


def test_a_teacher_that_is_not_llama_family_is_refused_in_one_line(tmp_path, capsys):
  run = untrained_run(tmp_path / "dba", tiny("dba"))
  rc = cli.main(["dba-upcycle", run, "--config=configs/dba_upcycle.py:tiny", f"--out={tmp_path}/o"])
  err = capsys.readouterr().err
  assert rc == 2 and "model.attn_kind='dba'" in err and len(err.strip().splitlines()) == 1, err
  assert not os.path.exists(tmp_path / "o")


def _hf_llama(path: str) -> str:
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 rope_theta=10000.0, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
  transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
  return path


@pytest.mark.slow  # ~20 s: five programs compiled (teacher trace, student, blockwise and KD steps)
def test_the_command_upcycles_a_hugging_face_llama_directory(tmp_path, capsys):
  src = _hf_llama(str(tmp_path / "hf"))
  out = str(tmp_path / "dba")
  args = ["dba-upcycle", src, "--config=configs/dba_upcycle.py:tiny", f"--out={out}", "--init=svd_caramba",
          "--config.data.seq_len=16", "--upcycle.blockwise.steps=6", "--upcycle.kd.steps=2",
          "--upcycle.eval_batches=1", "--upcycle.kd.params=attention"]  # KD leaves the copied weights alone
  assert cli.main(args) == 0, capsys.readouterr().err
  report = json.load(open(os.path.join(out, "upcycle.json")))
  assert report["init"] == "svd_caramba" and report["teacher_read_as"] == "hf"
  assert report["shapes"]["student"] == {"sem_dim": 8, "geo_dim": 8, "attn_dim": 32}  # head dim 8: 2 + 2 + 8
  assert report["kv"]["student"]["elems_per_token"] == 2 * 2 * (2 + 2 + 8)
  assert report["kv"]["teacher"]["elems_per_token"] == 2 * 2 * (8 + 8)
  assert report["after_blockwise"]["blockwise_rel_err"] < report["at_init"]["blockwise_rel_err"]
  model, c = loading.load_model(out)
  assert c.model.attn_kind == "dba" and model.step == 0
  safetensors = pytest.importorskip("safetensors.numpy")
  emb = safetensors.load_file(os.path.join(src, "model.safetensors"))["model.embed_tokens.weight"]
  np.testing.assert_array_equal(np.asarray(model.params["embed"])[:256], emb)
  assert os.path.exists(os.path.join(out, "upcycle.md"))
  # The same command again: the workdir exists, refused before any work.
  assert cli.main(args) == 2 and "is not empty" in capsys.readouterr().err


def test_the_llama32_1b_config_has_the_real_shapes_and_validates():
  from helpers import load_preset
  c = load_preset("dba_upcycle.py", "llama32_1b_sem8")
  m = c.model
  assert (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.d_ff, m.vocab_size, m.rope_base, m.tie_embeddings) == \
      (16, 2048, 32, 8, 8192, 128256, 500000.0, True)
  assert model_lib.kv_elems_per_token(m) == 16 * 8 * (8 + 8 + 64)
  t = copy.deepcopy(base_config())
  for k in cli.SHAPES:
    t.model[k] = m[k]
  t.model.n_kv_heads = 8
  t.model.rope_scaling.kind, t.model.rope_scaling.factor = "llama3", 32.0
  s = cli.student_config(c, validate(t), settings.defaults(), False)
  assert s.model.rope_scaling.kind == "none" and s.model.dba.sem_dim == 256
