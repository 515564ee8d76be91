"""dba-convert for nested_learning (HOPE) state dicts: a PyTorch HOPE-attention / transformer model written here
from the spec (hope_latentwire.md A), converted, gives the same eval-mode logits (1e-5), and --to-torch gives the
state dict back bit for bit."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import dba_jax  # noqa: E402
from dba_jax import convert  # noqa: E402

V, D, H, L = 61, 32, 4, 2
TOKENS = np.random.default_rng(0).integers(0, V, (2, 19)).astype(np.int32)


class Attention(nn.Module):
  def __init__(self):
    super().__init__()
    self.qkv, self.out_proj, self.norm = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D, bias=False), nn.LayerNorm(D)

  def forward(self, x):
    B, T, _ = x.shape
    q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
    o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.norm(x + self.out_proj(o.transpose(1, 2).reshape(B, T, D)))


class Level(nn.Module):  # CMS level (eval mode: no clip): x + W2 GELU(W1 LN(x) + b1) + b2
  def __init__(self):
    super().__init__()
    self.net = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

  def forward(self, x):
    return x + self.net(x)


class FeedForward(nn.Module):  # the transformer baseline: x + W2 GELU(W1 LN(x)), no biases
  def __init__(self):
    super().__init__()
    self.norm = nn.LayerNorm(D)
    self.net = nn.Sequential(nn.Linear(D, 4 * D, bias=False), nn.GELU(), nn.Linear(4 * D, D, bias=False))

  def forward(self, x):
    return x + self.net(self.norm(x))


class CMS(nn.Module):
  def __init__(self, names):
    super().__init__()
    self.blocks = nn.ModuleDict({n: Level() for n in names})

  def forward(self, x):
    for blk in self.blocks.values():
      x = blk(x)
    return x


class Block(nn.Module):
  def __init__(self, variant):
    super().__init__()
    self.attn = Attention()
    if variant == "attention":
      self.cms = CMS(["cms_fast", "cms_slow"])
    else:
      self.mlp = FeedForward()

  def forward(self, x):
    a = self.attn(x)
    return self.cms(a) if hasattr(self, "cms") else self.mlp(a)


class HOPE(nn.Module):
  def __init__(self, variant):
    super().__init__()
    self.embed = nn.Embedding(V, D)
    self.blocks = nn.ModuleList([Block(variant) for _ in range(L)])
    self.norm = nn.LayerNorm(D)
    self.lm_head = nn.Linear(D, V, bias=False)
    self.lm_head.weight = self.embed.weight

  def forward(self, tokens):
    x = self.embed(tokens)
    for blk in self.blocks:
      x = blk(x)
    return self.lm_head(self.norm(x))


@pytest.mark.parametrize("variant,scan", [("attention", True), ("transformer", False)])
def test_hope_checkpoint_converts_to_the_same_logits_and_back(tmp_path, variant, scan):
  torch.manual_seed(0)
  model = HOPE(variant).eval()
  with torch.no_grad():  # non-trivial norms and biases; embeddings at std 0.1 (logits of a few units, not ~40)
    model.embed.weight.mul_(0.1)
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias") or "net.0" in name:
        p.add_(0.1 * torch.randn_like(p))
  src = tmp_path / "step_000100.pt"
  torch.save({"model": model.state_dict(), "step": 100, "config": {"model": {"dim": D}}}, src)
  out = tmp_path / "run"
  argv = ["dba-convert", str(src), "--out", str(out), f"--config.model.n_heads={H}", f"--config.model.scan_layers={scan}"]
  assert convert.main(argv + ["--config.model.hope.cms_periods=(1, 4)"]) == 0
  got = np.asarray(dba_jax.load_model(str(out))[0](TOKENS))[..., :V]
  with torch.no_grad():
    want = model(torch.as_tensor(TOKENS, dtype=torch.long)).numpy()
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  back = tmp_path / "back.pt"
  assert convert.main(["dba-convert", "--to-torch", str(out), "--out", str(back)]) == 0
  sd, ref = torch.load(back, weights_only=True), model.state_dict()
  assert sorted(sd) == sorted(ref)
  for k in ref:
    assert torch.equal(sd[k], ref[k]), k


def test_missing_head_count_and_unbuilt_variants_are_refused(tmp_path, capsys):
  torch.manual_seed(0)
  sd = HOPE("attention").state_dict()
  src = tmp_path / "m.pt"
  torch.save(sd, src)
  assert convert.main(["dba-convert", str(src), "--out", str(tmp_path / "a")]) == 2
  err = capsys.readouterr().err
  assert "--config.model.n_heads" in err and "(heads of 8)" in err
  sd["blocks.0.titan_memory.net.0.weight"] = torch.zeros(4, 4)
  torch.save(sd, src)
  assert convert.main(["dba-convert", str(src), "--out", str(tmp_path / "b"), f"--config.model.n_heads={H}"]) == 2
  assert "titan_memory" in capsys.readouterr().err and not os.path.exists(tmp_path / "b")
