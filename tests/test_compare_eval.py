"""`dba-eval compare` on two tiny untrained checkpoints: every output file, the baseline's zero deltas, the panels;
and the last-layer attention probabilities behind the heat-maps, against a softmax computed here."""
import csv
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dba_jax import eval_cli, layers, model as model_lib, plots
from dba_jax.config import validate
from dba_jax.evals import attention_probes, compare_checkpoints
from helpers import layer, tiny, untrained_run

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
  c.attention = {{"probes": 2, "max_tokens": 20}}
  return c
'''


@pytest.fixture(scope="module")
def out(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("compare")
  # Initial parameters, not a training run: compare reads only config.json and the checkpoint.
  paths = {kind: untrained_run(tmp / kind, validate(tiny(kind)), seed) for seed, kind in enumerate(("standard", "dba"))}
  manifest = tmp / "manifest.py"
  manifest.write_text(MANIFEST.format(std=paths["standard"], dba=paths["dba"]))
  out_dir = tmp / "out"
  # Through the dba-eval entry point, so the subcommand wiring is exercised too.
  assert eval_cli.main(["compare", "--manifest", str(manifest), "--out", str(out_dir)]) == 0
  return out_dir


PANELS = {"scores", "difficulty", "match_types", "category_deltas", "memory", "decode", "ttft", "attention_mass",
          "attention_heatmaps"}
PNGS = ["compare.png"] + [f"panel_{k}.png" for k in sorted(PANELS)]
FILES = ["results.json", "results.csv", "results.md", "results.tex", "compare.svg"] + PNGS


def test_every_output_file_is_written(out):
  for name in FILES:
    assert (out / name).is_file() and (out / name).stat().st_size > 0, name
  for name in PNGS:
    head = (out / name).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", name
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert width >= 300 and height >= 300 and (out / name).stat().st_size > 10_000, (name, width, height)
  assert not list(out.glob("panel_*.svg"))  # panels are PNGs now; only the aggregate is also an SVG


def test_every_output_is_protected_and_replaced_whole(out, tmp_path, monkeypatch, capsys):
  """Every file compare writes is refused without --force; a write that fails half-way leaves each file as it was,
  a finished one replaces them and keeps what else the directory holds."""
  assert sorted(compare_checkpoints.output_files()) == sorted(FILES)
  d = tmp_path / "out"
  d.mkdir()
  for name in FILES:
    (d / name).write_bytes((out / name).read_bytes())
  (d / "notes.txt").write_text("the user's own file\n")
  before = {p.name: p.read_bytes() for p in d.iterdir()}
  result = json.loads((out / "results.json").read_text())

  def half_drawn(result, stage):
    (tmp_path / "stage").write_text(stage)
    with open(f"{stage}/panel_scores.png", "wb") as f:
      f.write(b"half")
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(plots, "write_figures", half_drawn)
  with pytest.raises(OSError):
    compare_checkpoints.write_outputs(result, str(d))
  assert {p.name: p.read_bytes() for p in d.iterdir()} == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stage"]  # the staging directory is gone
  monkeypatch.setattr(plots, "write_figures", lambda result, stage: {"files": []})
  compare_checkpoints.write_outputs(result, str(d))
  assert (d / "notes.txt").read_bytes() == before["notes.txt"] and (d / "panel_scores.png").read_bytes() == \
      before["panel_scores.png"]
  assert json.loads((d / "results.json").read_text())["figure"] == {"files": []}
  man = tmp_path / "m.py"
  man.write_text(MANIFEST.format(std="a", dba="b"))
  (d / "results.json").unlink()  # another of its files still there: refused all the same
  with pytest.raises(SystemExit):
    compare_checkpoints.main(["--manifest", str(man), "--out", str(d)])
  assert "results.csv" in capsys.readouterr().err


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
  r = json.loads((out / "results.json").read_text())
  assert set(plots.PANEL_TITLES) == PANELS
  fig = r["figure"]  # read back from the matplotlib figure that wrote compare.png
  assert set(fig["panels"]) == PANELS and set(fig["files"]) == set(PNGS + ["compare.svg"])
  for key, panel in fig["panels"].items():
    assert panel["title"] == plots.PANEL_TITLES[key] and panel["file"] == f"panel_{key}.png"
    if key != "attention_heatmaps":
      assert panel["axes_titles"] == [panel["title"]] and panel["images"] == 0, key
  heat = fig["panels"]["attention_heatmaps"]
  probe_ids = [a["id"] for a in r["models"][0]["attention"]]
  assert heat["images"] == 2 * 2  # one row per checkpoint, one column per probe
  assert heat["axes_titles"] == [f"{m}: {p}" for m in ("std", "dba_tiny") for p in probe_ids]
  svg = (out / "compare.svg").read_text()
  assert svg.lstrip().startswith("<?xml") and svg.rstrip().endswith("</svg>")
  for title in plots.PANEL_TITLES.values():
    assert title in svg, title
  for color in plots.PALETTE[:2]:  # two checkpoints: the first two palette colours
    assert color.lower() in svg.lower()


def test_attention_records(out):
  r = json.loads((out / "results.json").read_text())
  std, dba = r["models"]
  assert [a["id"] for a in std["attention"]] == [a["id"] for a in dba["attention"]] and len(std["attention"]) == 2
  for m in r["models"]:
    for a in m["attention"]:
      probs_TS = np.asarray(a["probs_TS"])
      T = len(a["query_tokens"])
      assert probs_TS.shape == (T, T) and T == 20  # the prompt's last max_tokens bytes
      np.testing.assert_allclose(probs_TS.sum(-1), 1.0, atol=1e-5)
      assert np.all(np.triu(probs_TS, 1) == 0)  # causal
      assert a["layer"] == 1 and a["n_prefix"] == 0
      assert math.isclose(sum(a["mass"].values()), 1.0, abs_tol=1e-5)
      span = a["span"]  # empty when the answer lies before the kept tokens
      assert a["answer"].strip() in "".join(a["query_tokens"][i] for i in span) if span else \
          a["answer"].strip() not in "".join(a["query_tokens"])
      assert math.isclose(a["mass"]["answer span"], probs_TS[-1, span].sum(), abs_tol=1e-5)
    assert any(a["span"] for a in m["attention"])


def test_answer_span():
  assert attention_probes.answer_span(["In", ":", " qu", "artz", "\n", "Out", ":"], "quartz") == [2, 3]
  assert attention_probes.answer_span(["a", " red", " b", " red"], " red") == [3]  # the last occurrence
  assert attention_probes.answer_span(["abc"], "zz") == []


def _decoder(kind: str, **model):
  """A random-init 2-layer decoder; unrolled unless asked (faster to build, and taps need it)."""
  model = {"scan_layers": False, **({"attn_kind": "selective"} if kind == "selective" else {}), **model}
  return model_lib.Decoder(tiny("standard" if kind == "selective" else kind, **model).model, nnx.Rngs(0))


TOKENS_BT = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)


def _last_layer_input(decoder, tokens_BT):
  """(last block, its attention input, positions, residual logits for it), through the public Block API."""
  positions_T = jnp.arange(tokens_BT.shape[1])
  x, io = decoder.embed_tokens(tokens_BT, positions_T), model_lib.LayerIO()
  m = decoder.m
  if m.attn_kind == "selective" and m.selective.residual_masks:  # as Decoder.forward: layer 0 mixes zeros
    T = tokens_BT.shape[1]
    io = model_lib.LayerIO(res=jnp.zeros((tokens_BT.shape[0], m.n_heads + m.selective.selection_heads, T, T)))
  for i in range(m.n_layers - 1):
    x, io = layer(decoder, i)(x, positions_T, None, model_lib.LayerIO(res=io.res))
  last = layer(decoder, m.n_layers - 1)
  return last, last.attn_norm(x), positions_T, io.res


def test_attention_probs_equal_softmax_of_q_k():
  decoder = _decoder("standard")
  block, h, positions_T, res = _last_layer_input(decoder, TOKENS_BT)
  probs_BHTS, n_prefix = attention_probes.last_layer_probs(decoder, TOKENS_BT)
  q_BTHD, k_BTKD, _ = block.attn.project(h, positions_T)
  H, K, T = q_BTHD.shape[2], k_BTKD.shape[2], TOKENS_BT.shape[1]
  logits = np.einsum("bthd,bshd->bhts", np.asarray(q_BTHD, np.float64),
                     np.repeat(np.asarray(k_BTKD, np.float64), H // K, axis=2)) * block.attn.scale
  logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
  want = np.exp(logits - logits.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  assert n_prefix == 0 and probs_BHTS.shape == (2, 4, T, T)
  np.testing.assert_allclose(np.asarray(probs_BHTS), want, atol=2e-6)
  np.testing.assert_allclose(np.asarray(probs_BHTS).sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("kind,model", [
    ("gqa", {"scan_layers": True}),  # the last block sliced out of the stacked parameters
    ("dba", {"null_attn": True}),
    ("selective", {}),
    ("selective", {"selection_heads": 1, "residual_masks": True}),
])
def test_attention_probs_reproduce_the_layer(kind, model):
  """probs @ v through the out projection is the layer's own output, and the last layer's input is the one the
  full forward uses (its mean |attention output| matches the forward's coordinate-check tap)."""
  decoder = _decoder(kind, **model)
  block, h, positions_T, res = _last_layer_input(decoder, TOKENS_BT)
  attn = block.attn
  probs_BHTS, n_prefix = attention_probes.last_layer_probs(decoder, TOKENS_BT)
  np.testing.assert_allclose(np.asarray(probs_BHTS).sum(-1), 1.0, atol=1e-5)
  B, T = TOKENS_BT.shape
  if kind == "dba":
    v_BSKE = attn.streams(h, positions_T)[4]
    null_v = attn.null_kv(v_BSKE.dtype)[1]
    v_BSKE = jnp.concatenate([jnp.broadcast_to(null_v, (B, 1) + null_v.shape), v_BSKE], axis=1)
    assert n_prefix == 1
  else:
    v_BSKE = attn.project(h, positions_T)[2][:, :, attn.Hp - attn.H:]  # selection-only heads carry no values
    assert n_prefix == 0
  H = probs_BHTS.shape[1]
  v_BSHE = jnp.repeat(v_BSKE, H // v_BSKE.shape[2], axis=2)
  o_BTHE = jnp.einsum("bhts,bshe->bthe", probs_BHTS, v_BSHE, precision=jax.lax.Precision.HIGHEST)
  y_BTd = attn(h, positions_T, model_lib.LayerIO(res=res))[0]
  np.testing.assert_allclose(np.asarray(attn.out(o_BTHE.reshape(B, T, -1))), np.asarray(y_BTd), atol=1e-5)
  if not decoder.m.scan_layers:  # taps are recorded only with unrolled layers
    with layers.record_taps() as taps:
      decoder(TOKENS_BT)
    last_attn_tap = [v for name, v in taps if name == "attn"][-1]
    np.testing.assert_allclose(float(jnp.abs(y_BTd).mean()), float(last_attn_tap), rtol=1e-5)


def test_manifest_needs_exactly_one_baseline(tmp_path):
  p = tmp_path / "m.py"
  p.write_text(MANIFEST.format(std="a", dba="b").replace('"baseline": False', '"baseline": True'))
  with pytest.raises(ValueError, match="exactly one"):
    compare_checkpoints.load_manifest(str(p))
  assert compare_checkpoints.main(["--manifest", str(p)]) == 2
