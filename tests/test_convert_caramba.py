"""caramba checkpoints (dba.md §4, §2.3): small models built here in PyTorch from the key/shape spec, run by a torch
forward written here from dba.md §1 (not by dba_jax), saved the way caramba's trainer saves them, converted, and
required to give the same logits (fp32, 1e-5 max abs) and to come back bit-for-bit."""
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dba_jax import formats, model as model_lib  # noqa: E402
from dba_jax.config import base_config, padded_vocab  # noqa: E402
from dba_jax.formats import ConversionError, caramba  # noqa: E402
from helpers import load_preset, set_model  # noqa: E402

L, d, H, SEM, GEO, V_DIM, VOCAB, D_FF = 2, 64, 4, 16, 32, 48, 100, 96
B, T = 2, 12
EMBED = "embedder.token_embedding.weight"


@dataclasses.dataclass(frozen=True)
class Spec:
  kind: str = "dba"  # fused | separate (legacy q/k/v) | dba
  layout: str = "paper"  # paper (22-layer keys) | opgraph (12-layer OpGraph keys)
  kv_heads: int = H
  gate: str = ""  # "" | static | dynamic
  null: bool = False
  tie: bool = False
  bias: bool = False


VARIANTS = {
    "baseline": Spec(kind="fused"),
    "baseline_legacy_qkv": Spec(kind="separate"),
    "baseline_gqa": Spec(kind="fused", kv_heads=2),
    "baseline_bias": Spec(kind="fused", bias=True),
    "decoupled": Spec(),
    "gated": Spec(gate="static"),
    "gated_dynamic_bias": Spec(gate="dynamic", bias=True),
    "null": Spec(null=True),
    "tied_qk": Spec(tie=True),
    "opgraph_baseline_gqa": Spec(kind="fused", layout="opgraph", kv_heads=2),
    "opgraph_decoupled": Spec(layout="opgraph"),
    "opgraph_null": Spec(layout="opgraph", null=True),
    "opgraph_tie_qk": Spec(layout="opgraph", tie=True),
}


# ------------------------------------------------------------------------------------- the caramba-side model

def attn_prefix(i):
  return f"topology.layers.0.layers.{2 * i}.layers."


def ffn_prefix(i):
  return f"topology.layers.0.layers.{2 * i + 1}.layers."


def node(s: Spec, name: str) -> str:
  return f"{name}." if s.layout == "paper" else f"modules_by_id.{name}.linear."


def final_keys(s: Spec):
  if s.layout == "paper":
    return "topology.layers.1.weight", "topology.layers.2.linear."
  return "topology.layers.1.layers.0.weight", "topology.layers.1.layers.1.linear."


def make_state_dict(s: Spec, seed: int = 0) -> dict:
  """Random caramba weights with the key names and shapes of dba.md §4 / §2.3 (scaled so every path matters)."""
  g = torch.Generator().manual_seed(seed)
  rnd = lambda *shape, std=0.1: torch.randn(*shape, generator=g) * std
  sd = {EMBED: rnd(VOCAB, d, std=1.0)}

  def linear(prefix, d_out, d_in):
    sd[prefix + "weight"] = rnd(d_out, d_in)
    if s.bias:
      sd[prefix + "bias"] = rnd(d_out)

  for i in range(L):
    a = attn_prefix(i) + "1."
    sd[attn_prefix(i) + "0.weight"] = 1.0 + rnd(d)
    if s.kind in ("fused", "separate"):
      D = d // H
      if s.kind == "fused":
        linear(a + node(s, "qkv_proj"), (H + 2 * s.kv_heads) * D, d)
      else:
        for name, heads in (("q_proj", H), ("k_proj", s.kv_heads), ("v_proj", s.kv_heads)):
          linear(a + f"{name}.", heads * D, d)
      linear(a + node(s, "out_proj"), d, H * D)
    elif s.layout == "paper":
      linear(a + "q_sem.", SEM, d)
      if s.tie:  # one module under two names, as caramba's state_dict lists it
        sd[a + "k_sem.weight"] = sd[a + "q_sem.weight"]
        if s.bias:
          sd[a + "k_sem.bias"] = sd[a + "q_sem.bias"]
      else:
        linear(a + "k_sem.", SEM, d)
      linear(a + "q_geo.", GEO, d), linear(a + "k_geo.", GEO, d), linear(a + "v_proj.", V_DIM, d)
      linear(a + "out_proj.", d, V_DIM)
      if s.gate:
        sd[a + "decoupled_gate_logit"] = rnd(H, std=1.0)
      if s.gate == "dynamic":
        sd[a + "decoupled_gate_proj.weight"] = rnd(H, d)
      if s.null:
        sd[a + "k_sem_null"], sd[a + "k_geo_null"], sd[a + "v_null"] = \
            rnd(H, SEM // H, std=0.5), rnd(H, GEO // H, std=0.5), rnd(H, V_DIM // H, std=0.5)
    else:
      assert not s.gate and V_DIM == SEM + GEO
      if s.tie:
        linear(a + node(s, "qk_proj"), SEM + GEO, d)
      else:
        linear(a + node(s, "q_proj"), SEM + GEO, d), linear(a + node(s, "k_proj"), SEM + GEO, d)
      linear(a + node(s, "v_proj"), V_DIM, d), linear(a + node(s, "out_proj"), d, V_DIM)
      if s.null:
        for name, width in (("null_k_sem_lin", SEM), ("null_k_geo_lin", GEO), ("null_v_lin", V_DIM)):
          sd[a + f"modules_by_id.{name}.param"] = rnd(1, 1, width, std=0.5)
    f = ffn_prefix(i) + "1."
    sd[ffn_prefix(i) + "0.weight"] = 1.0 + rnd(d)
    linear(f + "w_gate_up.", 2 * D_FF, d)
    linear(f + "w_down.", d, D_FF)
  norm, head = final_keys(s)
  sd[norm] = 1.0 + rnd(d)
  sd[head + "weight"] = rnd(VOCAB, d)
  return sd


def rms_norm(x, w):
  return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w


def rope(x_BHTD, interleaved: bool):
  """RoPE base 10000 over the head dim: rotate-half (caramba layer/rope.py), or the OpGraph's ApplyRoPEOperation,
  which rotates pairs (2j, 2j+1) and writes them back as [evens | odds]."""
  D, T_ = x_BHTD.shape[-1], x_BHTD.shape[-2]
  inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
  ang = torch.arange(T_, dtype=torch.float32)[:, None] * inv[None, :]
  cos, sin = ang.cos(), ang.sin()
  if interleaved:
    x1, x2 = x_BHTD[..., ::2], x_BHTD[..., 1::2]
  else:
    x1, x2 = x_BHTD[..., : D // 2], x_BHTD[..., D // 2:]
  return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def torch_attention(sd, a, x, s: Spec):
  Bx, Tx, _ = x.shape
  lin = lambda name, inp=x: linear_fwd(sd, a + node(s, name), inp)
  heads = lambda y, n: y.view(Bx, Tx, n, -1).transpose(1, 2)  # head-major contiguous
  interleaved = s.layout == "opgraph"
  null_score = null_v = None
  if s.kind in ("fused", "separate"):
    D, K = d // H, s.kv_heads
    if s.kind == "fused":
      q, k, v = lin("qkv_proj").split([H * D, K * D, K * D], -1)
    else:
      q, k, v = lin("q_proj"), lin("k_proj"), lin("v_proj")
    q, k, v = heads(q, H), heads(k, K), heads(v, K)
    q, k = rope(q, interleaved), rope(k, interleaved)
    k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
    score = q @ k.transpose(-1, -2) / D ** 0.5
  else:
    ds, dg = SEM // H, GEO // H
    if s.layout == "paper":
      qs, ks, qg, kg = lin("q_sem"), lin("k_sem"), lin("q_geo"), lin("k_geo")
    else:
      qq = lin("qk_proj" if s.tie else "q_proj")
      kk = qq if s.tie else lin("k_proj")
      (qs, qg), (ks, kg) = qq.split([SEM, GEO], -1), kk.split([SEM, GEO], -1)
    qs, ks, qg, kg, v = heads(qs, H), heads(ks, H), heads(qg, H), heads(kg, H), heads(lin("v_proj"), H)
    qg, kg = rope(qg, interleaved), rope(kg, interleaved)
    wa = wb = 1.0
    if s.gate:
      logit = sd[a + "decoupled_gate_logit"].view(1, H, 1, 1)
      if s.gate == "dynamic":
        logit = logit + (x @ sd[a + "decoupled_gate_proj.weight"].T).transpose(1, 2)[..., None]
      wa = 2.0 * torch.sigmoid(logit)
      wb = 2.0 - wa
    score = wa * (qs @ ks.transpose(-1, -2)) / ds ** 0.5 + wb * (qg @ kg.transpose(-1, -2)) / dg ** 0.5
    if s.null:
      if s.layout == "paper":
        ns, ng, nv = sd[a + "k_sem_null"], sd[a + "k_geo_null"], sd[a + "v_null"]
      else:
        ns, ng, nv = (sd[a + f"modules_by_id.{n}.param"].view(H, -1)
                      for n in ("null_k_sem_lin", "null_k_geo_lin", "null_v_lin"))
      null_score = wa * (qs * ns[None, :, None]).sum(-1, keepdim=True) / ds ** 0.5 + \
          wb * (qg * ng[None, :, None]).sum(-1, keepdim=True) / dg ** 0.5
      null_v = nv[None, :, None].expand(Bx, H, 1, -1)
  causal = torch.ones(Tx, Tx, dtype=torch.bool).tril()
  score = score.masked_fill(~causal, float("-inf"))
  if null_score is not None:  # key position 0, always visible
    score, v = torch.cat([null_score.expand(Bx, H, Tx, 1), score], -1), torch.cat([null_v, v], 2)
  o = (score.softmax(-1) @ v).transpose(1, 2).reshape(Bx, Tx, -1)
  return lin("out_proj", o)


def linear_fwd(sd, prefix, x):
  y = x @ sd[prefix + "weight"].T
  return y + sd[prefix + "bias"] if prefix + "bias" in sd else y


def torch_forward(sd, s: Spec, tokens) -> np.ndarray:
  """dba.md §1-2.1: pre-norm blocks, RMSNorm eps 1e-5, SwiGLU silu(gate) * up, untied head; all fp32."""
  with torch.no_grad():
    x = sd[EMBED][torch.as_tensor(tokens)]
    for i in range(L):
      x = x + torch_attention(sd, attn_prefix(i) + "1.", rms_norm(x, sd[attn_prefix(i) + "0.weight"]), s)
      h = rms_norm(x, sd[ffn_prefix(i) + "0.weight"])
      gate, up = linear_fwd(sd, ffn_prefix(i) + "1.w_gate_up.", h).chunk(2, -1)
      x = x + linear_fwd(sd, ffn_prefix(i) + "1.w_down.", torch.nn.functional.silu(gate) * up)
    norm, head = final_keys(s)
    return linear_fwd(sd, head, rms_norm(x, sd[norm])).numpy()


# ------------------------------------------------------------------------------------------------ the dba_jax side

def save_and_load(sd, path, prefix=""):
  """Saved as caramba's trainer saves (dba.md §4) and read back as numpy arrays."""
  torch.save({"system_state_dict": {prefix + k: v for k, v in sd.items()}, "run_id": "x", "step": 7}, path)
  obj = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.numpy() for k, v in obj["system_state_dict"].items()}


def user_config(s: Spec, scan=True, **model):
  """What --config gives: the head count (the file stores none); the OpGraph DBA split sizes too."""
  c = base_config()
  c.model.n_heads, c.model.scan_layers = H, scan
  if s.layout == "opgraph" and s.kind == "dba":
    c.model.dba.sem_dim, c.model.dba.geo_dim = SEM, GEO
  set_model(c.model, **model)
  return c


def dba_jax_logits(c, params, tokens) -> np.ndarray:
  m = model_lib.Model(c.model, model_lib.abstract(c.model)[0], params)
  return np.asarray(m(tokens))


def expected_state_dict(sd, s: Spec):
  """What from_params must give back: the same tensors, legacy separate q/k/v fused as [q; k; v]."""
  want = {k: v.numpy() for k, v in sd.items()}
  if s.kind == "separate":
    for i in range(L):
      a = attn_prefix(i) + "1."
      for leaf in ("weight", "bias") if s.bias else ("weight",):
        want[a + f"qkv_proj.{leaf}"] = np.concatenate([want.pop(a + f"{p}_proj.{leaf}") for p in "qkv"])
  return want


def tokens_BT():
  return np.random.default_rng(0).integers(0, VOCAB, size=(B, T))


CASES = [(name, True) for name in VARIANTS] + [("null", False), ("opgraph_baseline_gqa", False)]


@pytest.mark.parametrize("variant,scan", CASES, ids=[f"{n}-{'scan' if s else 'unrolled'}" for n, s in CASES])
def test_logits_match_and_round_trip_is_exact(variant, scan, tmp_path):
  s = VARIANTS[variant]
  sd = make_state_dict(s)
  tensors = save_and_load(sd, tmp_path / "ckpt.pt")
  assert caramba.detect(set(tensors))

  c = caramba.config_from(tensors, user_config(s, scan))
  m = c.model
  assert (m.d_model, m.n_layers, m.d_ff, padded_vocab(m), m.n_heads) == (d, L, D_FF, VOCAB, H)
  assert m.bias == s.bias and not m.tie_embeddings
  if s.kind == "dba":
    assert (m.attn_kind, m.dba.sem_dim, m.dba.geo_dim, m.attn_dim) == ("dba", SEM, GEO, V_DIM)
    assert (m.dba.gate, m.dba.gate_dynamic, m.dba.null_attn, m.dba.tie_qk) == \
        (bool(s.gate), s.gate == "dynamic", s.null, s.tie)
  else:
    assert (m.attn_kind, m.attn_dim, m.n_kv_heads or H) == ("standard", d, s.kv_heads)

  params = caramba.to_params(tensors, c)
  tokens = tokens_BT()
  got = dba_jax_logits(c, params, tokens)
  want = torch_forward(sd, s, tokens)
  assert got.shape == want.shape == (B, T, VOCAB)
  err = float(np.abs(got - want).max())
  assert err <= 1e-5, f"{variant}: max |logit error| {err:.3g}"

  back = caramba.from_params(params, c, layout=s.layout)
  expected = expected_state_dict(sd, s)
  assert sorted(back) == sorted(expected)
  for k, v in expected.items():
    assert back[k].dtype == np.float32 and back[k].shape == v.shape, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_orig_mod_prefix_and_container(tmp_path):
  s = VARIANTS["gated"]
  sd = make_state_dict(s, seed=3)
  tensors = save_and_load(sd, tmp_path / "compiled.pt", prefix="_orig_mod.")
  assert all(k.startswith("_orig_mod.") for k in tensors) and caramba.detect(set(tensors))
  c = caramba.config_from(tensors, user_config(s))
  params = caramba.to_params(tensors, c)
  tokens = tokens_BT()
  assert np.abs(dba_jax_logits(c, params, tokens) - torch_forward(sd, s, tokens)).max() <= 1e-5
  back = caramba.from_params(params, c)
  assert sorted(back) == sorted(sd)  # written without the prefix, as the original loads after stripping it
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
  # unwrap: the trainer container and the prefix, as the original's _extract_state_dict does
  raw = torch.load(tmp_path / "compiled.pt", weights_only=True)
  assert sorted(caramba.unwrap(raw)) == sorted(sd)


def test_legacy_qkv_conversion_is_logged(tmp_path, caplog):
  s = VARIANTS["baseline_legacy_qkv"]
  tensors = {k: v.numpy() for k, v in make_state_dict(s).items()}
  c = caramba.config_from(tensors, user_config(s))
  with caplog.at_level("INFO", logger="dba_jax"):
    caramba.to_params(tensors, c)
  assert f"Converted {L} separate Q/K/V projections to fused qkv_proj" in caplog.text


def test_wrong_config_names_the_field():
  s = VARIANTS["decoupled"]
  tensors = {k: v.numpy() for k, v in make_state_dict(s).items()}
  with pytest.raises(ConversionError, match=r"q_sem\.weight.*\(16, 64\).*model\.n_heads=3"):
    caramba.config_from(tensors, user_config(s, n_heads=3))  # 3 does not divide sem_dim 16
  base = {k: v.numpy() for k, v in make_state_dict(VARIANTS["baseline"]).items()}
  with pytest.raises(ConversionError, match=r"out_proj\.weight.*model\.n_heads=5"):
    caramba.config_from(base, user_config(VARIANTS["baseline"], n_heads=5))
  og = VARIANTS["opgraph_decoupled"]
  og_tensors = {k: v.numpy() for k, v in make_state_dict(og).items()}
  with pytest.raises(ConversionError, match=r"q_proj\.linear\.weight.*model\.dba\.sem_dim=0"):
    caramba.config_from(og_tensors, user_config(og, sem_dim=0, geo_dim=0))  # the OpGraph cannot tell the split
  with pytest.raises(ConversionError, match=r"model\.positions='learned'"):
    caramba.config_from(tensors, user_config(s, positions="learned"))


def test_missing_and_unexpected_keys_are_all_listed():
  s = VARIANTS["null"]
  tensors = {k: v.numpy() for k, v in make_state_dict(s).items()}
  c = caramba.config_from(tensors, user_config(s))
  dropped = attn_prefix(1) + "1.v_null"
  del tensors[dropped]
  tensors[attn_prefix(0) + "1.logit_scale"] = np.zeros((H,), np.float32)  # learned_temp: no dba_jax counterpart
  tensors[ffn_prefix(1) + "1.w_down.weight"] = np.zeros((d, D_FF + 1), np.float32)
  with pytest.raises(ConversionError) as e:
    caramba.to_params(tensors, c)
  msg = str(e.value)
  assert "missing key " + dropped in msg and "unexpected key " + attn_prefix(0) + "1.logit_scale" in msg
  assert "w_down.weight: shape (64, 97)" in msg and "3 problem(s)" in msg


def test_detect():
  nanogpt = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
             "transformer.h.0.attn.bias", "transformer.h.0.mlp.c_fc.weight", "transformer.ln_f.weight",
             "lm_head.weight"}
  assert not caramba.detect(nanogpt)
  assert not caramba.detect({"_orig_mod." + k for k in nanogpt})
  for s in (VARIANTS["decoupled"], VARIANTS["opgraph_baseline_gqa"]):
    keys = set(make_state_dict(s))
    assert caramba.detect(keys) and caramba.detect({"_orig_mod." + k for k in keys})


def test_config_contradicting_the_file_is_an_error():
  s = VARIANTS["decoupled"]
  tensors = {k: v.numpy() for k, v in make_state_dict(s).items()}
  with pytest.raises(ConversionError, match=r"q_sem\.weight has shape \(16, 64\).*model\.dba\.sem_dim=32"):
    caramba.config_from(tensors, user_config(s, sem_dim=32))  # differs from base_config: the user's choice
  with pytest.raises(ConversionError, match=r"embedder\.token_embedding\.weight.*model\.d_model=2048"):
    caramba.config_from(tensors, load_preset("dba_paper_1b.py", "sem16"))
  try:  # a field named on the command line counts even when it equals the default
    formats.GIVEN.add("model.d_model")
    with pytest.raises(ConversionError, match=r"model\.d_model=128"):
      caramba.config_from(tensors, user_config(s))
  finally:
    formats.GIVEN.clear()
  agreeing = user_config(s, d_model=d, n_layers=L, d_ff=D_FF, vocab_size=VOCAB, pad_vocab_to=4, attn_kind="dba",
                         sem_dim=SEM, geo_dim=GEO, attn_dim=V_DIM)
  assert caramba.config_from(tensors, agreeing).model.to_dict() == agreeing.model.to_dict()


@pytest.mark.parametrize("variant", ["decoupled", "opgraph_decoupled"])
def test_end_to_end_through_dba_convert(tmp_path, variant):
  """dba-convert INPUT --out DIR, dba_jax.load_model(DIR), dba-convert --to-torch DIR --out FILE.pt; the export
  keeps the key layout the file came in (22-layer paper naming or 12-layer OpGraph naming)."""
  convert = pytest.importorskip("dba_jax.convert")
  from dba_jax import load_model
  s = VARIANTS[variant]
  sd = make_state_dict(s, seed=5)
  torch.save({"system_state_dict": {"_orig_mod." + k: v for k, v in sd.items()}, "run_id": "x", "step": 7},
             tmp_path / "dba.pt")
  assert convert.main(["dba-convert", str(tmp_path / "dba.pt"), "--out", str(tmp_path / "wd"),
                       "--config.model.n_heads=4", f"--config.model.dba.sem_dim={SEM}", f"--config.model.dba.geo_dim={GEO}"]) == 0
  model, c = load_model(str(tmp_path / "wd"))
  assert (c.model.attn_kind, c.model.dba.sem_dim, c.model.dba.geo_dim, c.model.attn_dim) == ("dba", SEM, GEO, V_DIM)
  tokens = tokens_BT()
  assert np.abs(np.asarray(model(tokens)) - torch_forward(sd, s, tokens)).max() <= 1e-5
  assert convert.main(["dba-convert", "--to-torch", str(tmp_path / "wd"), "--out", str(tmp_path / "back.pt")]) == 0
  back = torch.load(tmp_path / "back.pt", weights_only=True)["system_state_dict"]
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    assert back[k].dtype == torch.float32 and torch.equal(back[k], v), k
