"""dba-convert for nested_learning (HOPE) state dicts: PyTorch HOPE models (attention, transformer, selfmod, hybrid)
written here from the spec (hope_latentwire.md A, others.md B.2 / B.5), converted, give the same eval-mode logits
(1e-5; the selfmod block's in-sequence learning too), and --to-torch gives the state dict back bit for bit."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import dba_jax  # noqa: E402
from dba_jax import convert, model as model_lib  # noqa: E402
from dba_jax.hope import selfmod  # noqa: E402

V, D, H, L = 61, 32, 4, 2
C_OTHER, C_MEMORY, LR = 4, 8, 0.05  # the selfmod write's chunks and η scale (in the file's config)
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


def mem_apply(W, x):
  """A self-modifying memory with weights W (torch layout): x + W1 GELU(W2 x) (d → d), W1 GELU(W2 x) + W_skip x."""
  y = F.linear(F.gelu(F.linear(x, W["w2"])), W["w1"])
  if "w_skip" in W:
    return y + F.linear(x, W["w_skip"])
  return y + x if y.shape == x.shape else y


class Memory(nn.Module):
  def __init__(self, out):
    super().__init__()
    self.w2, self.w1 = nn.Linear(D, D, bias=False), nn.Linear(D, out, bias=False)
    if out != D:  # the package's default use_skip=True
      self.w_skip = nn.Linear(D, out, bias=False)

  def weights(self):
    return {name.split(".")[0]: p.detach().clone() for name, p in self.named_parameters()}


class SelfModTitans(nn.Module):
  """B.5: causal depthwise conv (window 4), fixed W_q, o = M_memory(W_q x); with `learn`, the in-sequence write."""

  def __init__(self):
    super().__init__()
    self.local_conv = nn.Conv1d(D, D, 4, groups=D, bias=False)
    self.w_q = nn.Linear(D, D, bias=False)
    for name in ("k", "v", "q", "memory", "eta", "alpha"):
      setattr(self, f"m_{name}", Memory(1 if name in ("eta", "alpha") else D))

  def forward(self, x, learn=False):
    x = self.local_conv(F.pad(x.transpose(1, 2), (3, 0))).transpose(1, 2)
    q = self.w_q(x)
    if not learn:
      return mem_apply(self.m_memory.weights(), q)
    return torch.stack([self.learn_row(x_, q_) for x_, q_ in zip(x, q)])

  def learn_row(self, x, q):
    """Tokens read the memories as of the last boundary; at a boundary of C_OTHER (k, v, η, α) or C_MEMORY
    (memory) tokens, or the end, each buffered token's gradient at the boundary weights is applied in order."""
    W = {n: getattr(self, f"m_{n}").weights() for n in ("k", "v", "eta", "alpha", "memory")}
    outs, others, memory = [], [], []
    for t in range(x.shape[0]):
      k, v = mem_apply(W["k"], x[t]), mem_apply(W["v"], x[t])
      eta, alpha = F.softplus(mem_apply(W["eta"], x[t]))[0] * LR, torch.sigmoid(mem_apply(W["alpha"], x[t]))[0]
      outs.append(mem_apply(W["memory"], q[t]))
      others.append((k, v, eta, alpha))
      memory.append((k, v, eta, alpha))
      last = t + 1 == x.shape[0]
      if (t + 1) % C_OTHER == 0 or last:
        self.step(W, ("k", "v", "eta", "alpha"), others)
        others = []
      if (t + 1) % C_MEMORY == 0 or last:
        self.step(W, ("memory",), memory)
        memory = []
    return torch.stack(outs)

  @staticmethod
  def step(W, names, tokens):
    """W2 ← W2 (α I − η k kᵀ) − η G2, W1 ← α W1 − η G1, G of ‖M(k) − sg(M(v))‖² at the boundary weights."""
    def grad(Wn, k, v):
      with torch.enable_grad():
        Wr = {n: w.clone().requires_grad_(True) for n, w in Wn.items()}
        loss = ((mem_apply(Wr, k) - mem_apply(Wr, v).detach()) ** 2).sum()
        return dict(zip(Wr, torch.autograd.grad(loss, list(Wr.values()))))

    grads = {n: [grad(W[n], k, v) for k, v, _, _ in tokens] for n in names}
    for t, (k, _, eta, alpha) in enumerate(tokens):
      P = alpha * torch.eye(D) - eta * torch.outer(k, k)
      for n in names:
        W[n] = {p: (alpha * w if p == "w1" else w @ P) - eta * grads[n][t][p] for p, w in W[n].items()}


class TitanMemory(nn.Module):  # eval mode (no clip): LN(W2 GELU(W1 a + b1) + b2)
  def __init__(self):
    super().__init__()
    self.net = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
    self.norm = nn.LayerNorm(D)

  def forward(self, a):
    return self.norm(self.net(a))


class SelfModifier(nn.Module):
  def __init__(self):
    super().__init__()
    self.net = nn.Sequential(nn.Linear(3 * D, 4 * D), nn.GELU(), nn.Linear(4 * D, 4 * D), nn.GELU(),
                             nn.Linear(4 * D, D))


class Block(nn.Module):
  def __init__(self, variant):
    super().__init__()
    if variant == "selfmod":
      self.selfmod = SelfModTitans()
    else:
      self.attn = Attention()
    if variant == "hybrid":
      self.titan_memory, self.self_modifier = TitanMemory(), SelfModifier()
    if variant == "transformer":
      self.mlp = FeedForward()
    else:
      self.cms = CMS(["cms_fast", "cms_slow"])

  def forward(self, x, learn=False):
    if hasattr(self, "selfmod"):
      return self.cms(self.selfmod(x, learn))
    a = self.attn(x)
    if hasattr(self, "titan_memory"):
      return self.cms(a + self.titan_memory(a))
    return self.cms(a) if hasattr(self, "cms") else self.mlp(a)


class HOPE(nn.Module):
  def __init__(self, variant):
    super().__init__()
    self.embed = nn.Embedding(V, D)
    self.blocks = nn.ModuleList([Block(variant) for _ in range(L)])
    self.norm = nn.LayerNorm(D)
    self.lm_head = nn.Linear(D, V, bias=False)
    self.lm_head.weight = self.embed.weight

  def forward(self, tokens, learn=False):
    x = self.embed(tokens)
    for blk in self.blocks:
      x = blk(x, learn)
    return self.lm_head(self.norm(x))


def _spec_model(variant):
  torch.manual_seed(0)
  model = HOPE(variant).eval()
  with torch.no_grad():  # non-trivial norms and biases; embeddings at std 0.1 (logits of a few units, not ~40)
    model.embed.weight.mul_(0.1)
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias") or "net.0" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _round_trip(tmp_path, out, model):
  back = tmp_path / "back.pt"
  assert convert.main(["dba-convert", "--to-torch", str(out), "--out", str(back)]) == 0
  sd, ref = torch.load(back, weights_only=True), model.state_dict()
  assert sorted(sd) == sorted(ref)
  for k in ref:
    assert torch.equal(sd[k], ref[k]), k


@pytest.mark.parametrize("variant,scan", [("attention", True), ("transformer", False)])
def test_hope_checkpoint_converts_to_the_same_logits_and_back(tmp_path, variant, scan):
  model = _spec_model(variant)
  src = tmp_path / "step_000100.pt"
  torch.save({"model": model.state_dict(), "step": 100, "config": {"model": {"dim": D}}}, src)
  out = tmp_path / "run"
  argv = ["dba-convert", str(src), "--out", str(out), f"--config.model.n_heads={H}", f"--config.model.scan_layers={scan}"]
  assert convert.main(argv + ["--config.model.hope.cms_periods=(1, 4)"]) == 0
  got = np.asarray(dba_jax.load_model(str(out))[0](TOKENS))[..., :V]
  with torch.no_grad():
    want = model(torch.as_tensor(TOKENS, dtype=torch.long)).numpy()
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  _round_trip(tmp_path, out, model)


@pytest.mark.parametrize("variant", ["selfmod", "hybrid"])
def test_selfmod_and_hybrid_checkpoints_convert(tmp_path, variant):
  """Block, sizes and W_skip from the keys; heads, periods and the write's settings from the file's config. The
  logits of the original's plain forward (selfmod: no write, selfmod_learn=update_pass) match, the selfmod write
  (dba_jax's default: every forward learns) matches the spec's loop, the SelfModifier maps the same, and the state
  dict comes back bit for bit."""
  model = _spec_model(variant)
  saved = {"dim": D, "heads": H, "self_mod_chunk_size": C_OTHER, "self_mod_chunk_size_memory": C_MEMORY,
           "self_mod_lr": LR, "titan_level": {"name": "titan", "update_period": 4},
           "cms_levels": [{"name": "cms_fast", "update_period": 1}, {"name": "cms_slow", "update_period": 4}]}
  src = tmp_path / "step_000100.pt"
  torch.save({"model": model.state_dict(), "step": 100, "config": {"model": saved}}, src)
  out = tmp_path / "run"
  argv = ["dba-convert", str(src), "--out", str(out), "--config.model.hope.selfmod_learn=update_pass"]
  assert convert.main(argv) == 0
  loaded, c = dba_jax.load_model(str(out))
  h = c.model.hope
  assert (c.model.block, tuple(h.cms_periods), h.titan_period) == (f"hope_{variant}", (1, 4), 4)
  tokens = torch.as_tensor(TOKENS, dtype=torch.long)
  with torch.no_grad():
    np.testing.assert_allclose(np.asarray(loaded(TOKENS))[..., :V], model(tokens).numpy(), atol=1e-5, rtol=0)
    block0 = {k: np.asarray(v)[0] for k, v in loaded.params["blocks"].get("modifier", {}).items()}
    if variant == "selfmod":
      assert (h.selfmod_chunk, h.selfmod_chunk_memory, h.selfmod_lr, h.selfmod_skip) == (C_OTHER, C_MEMORY, LR, True)
      m = c.model.copy_and_resolve_references()
      m.hope.selfmod_learn = "always"
      learned = np.asarray(model_lib.Model(c, model_lib.abstract(m)[0], loaded.params)(TOKENS))[..., :V]
      want = model(tokens, learn=True).numpy()
      np.testing.assert_allclose(learned, want, atol=1e-5, rtol=0)
      assert np.abs(want - model(tokens).numpy()).max() > 1e-3  # the write moved the logits
    else:
      z = np.random.default_rng(1).normal(size=(5, 3 * D)).astype(np.float32)
      np.testing.assert_allclose(np.asarray(selfmod.modifier_apply(block0, z)),
                                 model.blocks[0].self_modifier.net(torch.as_tensor(z)).numpy(), atol=1e-5, rtol=0)
  _round_trip(tmp_path, out, model)


def test_missing_head_count_and_broken_files_are_refused(tmp_path, capsys):
  torch.manual_seed(0)
  sd = HOPE("attention").state_dict()
  src = tmp_path / "m.pt"
  torch.save(sd, src)
  assert convert.main(["dba-convert", str(src), "--out", str(tmp_path / "a")]) == 2
  err = capsys.readouterr().err
  assert "--config.model.n_heads" in err and "(heads of 8)" in err
  sd["blocks.0.titan_memory.net.0.weight"] = torch.zeros(4 * D, D)  # a hybrid block with only part of its Titan
  torch.save(sd, src)
  assert convert.main(["dba-convert", str(src), "--out", str(tmp_path / "b"), f"--config.model.n_heads={H}",
                       "--config.model.hope.cms_periods=(1, 4)"]) == 2
  err = capsys.readouterr().err
  assert "missing key blocks.0.titan_memory.net.0.bias" in err and "self_modifier" in err
  assert not os.path.exists(tmp_path / "b")
