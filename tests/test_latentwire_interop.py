"""LatentWire interop (issue 15): the original translator's bare state dict through `dba-convert --format latentwire`
and back. The PyTorch translator here is written from the spec (hope_latentwire.md B, others.md C.2), not imported."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dba_jax import convert, torch_io
from dba_jax.formats import latentwire as lw_format
from dba_jax.latentwire import bridge

torch = pytest.importorskip("torch")
nn = torch.nn
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TorchBlock(nn.Module):
  """Pre-LN self-attention (ungated), tanh-gated cross-attention to LN_src(source), tanh-gated GELU FFN."""

  def __init__(self, b, s, heads, ffn_mult):
    super().__init__()
    self.q_norm, self.src_norm = nn.LayerNorm(b), nn.LayerNorm(s)
    self.self_attn = nn.MultiheadAttention(b, heads, batch_first=True)
    self.cross_attn = nn.MultiheadAttention(b, heads, kdim=s, vdim=s, batch_first=True, dropout=0.1)
    self.cross_gate = nn.Parameter(torch.zeros(1))
    self.dropout = nn.Dropout(0.1)
    self.ffn = nn.Sequential(nn.Linear(b, ffn_mult * b), nn.GELU(), nn.Dropout(0.1), nn.Linear(ffn_mult * b, b))
    self.ffn_norm = nn.LayerNorm(b)
    self.ffn_gate = nn.Parameter(torch.zeros(1))

  def forward(self, q, src, keep):
    qn = self.q_norm(q)
    q = q + self.self_attn(qn, qn, qn, need_weights=False)[0]
    qn, sn = self.q_norm(q), self.src_norm(src)
    cross = self.cross_attn(qn, sn, sn, key_padding_mask=~keep, need_weights=False)[0]
    q = q + torch.tanh(self.cross_gate) * self.dropout(cross)
    return q + torch.tanh(self.ffn_gate) * self.ffn(self.ffn_norm(q))


class TorchTranslator(nn.Module):
  def __init__(self, s, t, b, K, depth, heads, ffn_mult=4):
    super().__init__()
    self.query_tokens = nn.Parameter(torch.randn(1, K, b) / b ** 0.5)
    self.blocks = nn.ModuleList([TorchBlock(b, s, heads, ffn_mult) for _ in range(depth)])
    self.output_norm = nn.LayerNorm(b)
    self.output_proj = nn.Linear(b, t)

  def forward(self, src, keep):
    q = self.query_tokens.expand(src.shape[0], -1, -1)
    for blk in self.blocks:
      q = blk(q, src, keep)
    return self.output_proj(self.output_norm(q))


def _translator(s, t, b, K, depth, heads, ffn_mult=4, seed=0):
  """Every parameter random and non-zero (gates in ±[0.3, 1], LayerNorm affines off 1 / 0, in-projection biases)."""
  torch.manual_seed(seed)
  tr = TorchTranslator(s, t, b, K, depth, heads, ffn_mult)
  with torch.no_grad():
    for name, p in tr.named_parameters():
      if name.endswith("_gate"):
        p.copy_(torch.sign(torch.randn(1)) * (0.3 + 0.7 * torch.rand(1)))
      elif p.ndim == 1:
        p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm.weight" in name else 0.0))
      elif name != "query_tokens":
        p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
  return tr.eval()


def _convert(argv):
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    return convert.main(["dba-convert", *argv])
  finally:
    os.chdir(cwd)


@pytest.mark.parametrize("s,t,b,K,depth,heads,ffn_mult", [(12, 10, 16, 5, 2, 2, 4), (16, 24, 16, 3, 1, 4, 2)])
def test_translator_round_trip_and_soft_tokens_match_torch(tmp_path, s, t, b, K, depth, heads, ffn_mult):
  tr = _translator(s, t, b, K, depth, heads, ffn_mult)
  sd = {k: v.detach().clone() for k, v in tr.state_dict().items()}
  packed = s == b  # torch packs q/k/v into in_proj_weight only when kdim == vdim == embed_dim
  assert ("blocks.0.cross_attn.in_proj_weight" in sd) == packed
  assert ("blocks.0.cross_attn.k_proj_weight" in sd) == (not packed)
  src = tmp_path / "translator.pt"
  torch.save(sd, src)
  wd = tmp_path / "bridge"
  assert _convert([str(src), f"--out={wd}", "--config=configs/latentwire.py:bridge_k8",
                   f"--config.model.heads={heads}"]) == 0
  params, c, s_, t_ = lw_format.load_translator(str(wd))
  assert (c.model.K, c.model.b, c.model.depth, c.model.ffn_mult, c.model.heads, s_, t_) == (K, b, depth, ffn_mult,
                                                                                          heads, s, t)
  assert bridge.param_count(s, t, b, K, depth) == sum(v.numel() for v in sd.values()) or ffn_mult != 4
  # Soft tokens: the same source states, one row padded (the mask reaches the cross-attention).
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 9, s)).astype(np.float32)
  keep = np.arange(9)[None] < np.array([[9], [4], [7]])
  with torch.no_grad():
    want = tr(torch.from_numpy(x), torch.from_numpy(keep)).numpy()
  graphdef, state = nnx.split(bridge.Translator(s, t, b, K, depth, heads, ffn_mult, rngs=nnx.Rngs(0)))
  nnx.replace_by_pure_dict(state, params)
  got = np.asarray(nnx.merge(graphdef, state)(jnp.asarray(x), jnp.asarray(keep)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(want[0] - want[1]).max() > 1e-3  # the source (and its padding) matters: gates are open
  # Back to torch: the same keys, shapes and bits; the original module loads it strictly.
  for out in (tmp_path / "back.pt", tmp_path / "back.safetensors"):
    assert _convert([f"--to-torch={wd}", f"--out={out}"]) == 0
  back = torch.load(tmp_path / "back.pt", weights_only=True)
  assert set(back) == set(sd)
  for k in sd:
    assert back[k].dtype == torch.float32 and torch.equal(back[k], sd[k]), k
  TorchTranslator(s, t, b, K, depth, heads, ffn_mult).load_state_dict(back, strict=True)
  st = torch_io.load(str(tmp_path / "back.safetensors"))  # the project's own reader (no safetensors package)
  assert set(st) == set(sd) and all(np.array_equal(np.asarray(st[k]), sd[k].numpy()) for k in sd)


def test_bad_translator_files_are_refused_naming_the_key(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    _convert(["--help"])
  assert e.value.code == 0 and "latentwire" in capsys.readouterr().out
  sd = _translator(12, 10, 16, 3, 1, 2).state_dict()
  good = tmp_path / "t.pt"
  torch.save(sd, good)
  # No bridge config: the head count is not in the file.
  assert _convert([str(good), f"--out={tmp_path / 'a'}"]) == 2
  assert "heads" in capsys.readouterr().err and not os.path.exists(tmp_path / "a")
  cfg = "--config=configs/latentwire.py:bridge_k8"
  assert _convert([str(good), f"--out={tmp_path / 'b'}", cfg, "--config.model.heads=3"]) == 2  # 3 does not divide 16
  assert "model.heads=3" in capsys.readouterr().err and not os.path.exists(tmp_path / "b")
  assert _convert([str(good), f"--out={tmp_path / 'c'}", cfg, "--config.model.K=8"]) == 2  # the file has K=3
  assert "K=3" in capsys.readouterr().err
  broken = {k: v for k, v in sd.items() if k != "blocks.0.cross_attn.v_proj_weight"}
  broken["blocks.0.ffn.3.bias"] = torch.zeros(7)
  torch.save(broken, tmp_path / "broken.pt")
  assert _convert([str(tmp_path / "broken.pt"), f"--out={tmp_path / 'd'}", cfg, "--config.model.heads=2"]) == 2
  err = capsys.readouterr().err
  assert "missing key blocks.0.cross_attn.v_proj_weight" in err and "blocks.0.ffn.3.bias: shape (7,)" in err
  assert not os.path.exists(tmp_path / "d")
  # Never into a used directory, never over an existing file.
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep")
  assert _convert([str(good), f"--out={mine}", cfg, "--config.model.heads=2"]) == 2
  assert os.listdir(mine) == ["notes.txt"]
  wd = tmp_path / "ok"
  assert _convert([str(good), f"--out={wd}", cfg, "--config.model.heads=2"]) == 0
  (tmp_path / "taken.pt").write_bytes(b"x")
  assert _convert([f"--to-torch={wd}", f"--out={tmp_path / 'taken.pt'}"]) == 2
  assert (tmp_path / "taken.pt").read_bytes() == b"x"
