"""dba-convert on nanoGPT / context-compression checkpoints: a small GPT built here in PyTorch from the key/shape
spec (selective.md §6, §8), saved, converted, compared by logits, and written back bit for bit."""
import dataclasses
import json
import os
import sys

import jax
import numpy as np
import pytest

from dba_jax import convert, torch_io
from dba_jax.formats import nanogpt

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


@dataclasses.dataclass
class GPTConfig:  # pickled as __main__.GPTConfig, like the context-compression runs
  n_layer: int = 2
  n_head: int = 3
  head_dim: int = 16
  n_embd: int = 48
  vocab_size: int = 96
  block_size: int = 24
  selective: bool = False


class Attention(nn.Module):
  def __init__(self, g: GPTConfig):
    super().__init__()
    self.g, A = g, g.n_head * g.head_dim
    self.c_attn = nn.Linear(g.n_embd, 3 * A)
    self.c_proj = nn.Linear(A, g.n_embd)
    if g.selective:  # the selective class keeps a causal-mask buffer in its state dict
      self.register_buffer("bias", torch.tril(torch.ones(g.block_size, g.block_size)).view(1, 1, g.block_size,
                                                                                             g.block_size))

  def forward(self, x):
    B, T, _ = x.shape
    H, D = self.g.n_head, self.g.head_dim
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in self.c_attn(x).split(H * D, dim=2))
    att = (q @ k.transpose(-2, -1)) * D ** -0.5
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    att = att.masked_fill(future, float("-inf"))
    if self.g.selective:  # selection from head 0: BOS and self protected, exclusive cumsum over queries
      s = F.relu(att[:, 0].masked_fill(future, 0))
      s[..., 0] = 0
      s = s * (1 - torch.eye(T))
      f = torch.roll(torch.cumsum(s, dim=-2), 1, dims=-2)
      f[..., 0, :] = 0
      att = att - f[:, None]
    y = F.softmax(att, dim=-1) @ v
    return self.c_proj(y.transpose(1, 2).reshape(B, T, H * D))


class Block(nn.Module):
  def __init__(self, g):
    super().__init__()
    self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(g.n_embd), Attention(g), nn.LayerNorm(g.n_embd)
    self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(g.n_embd, 4 * g.n_embd), c_proj=nn.Linear(4 * g.n_embd, g.n_embd)))

  def forward(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
  def __init__(self, g: GPTConfig):
    super().__init__()
    self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(g.vocab_size, g.n_embd),
                                          wpe=nn.Embedding(g.block_size, g.n_embd),
                                          h=nn.ModuleList([Block(g) for _ in range(g.n_layer)]),
                                          ln_f=nn.LayerNorm(g.n_embd)))
    self.lm_head = nn.Linear(g.n_embd, g.vocab_size, bias=False)
    self.transformer.wte.weight = self.lm_head.weight  # tied, as nanoGPT
    with torch.no_grad():  # random everything, non-zero biases and LayerNorm affine
      for name, p in self.named_parameters():
        p.copy_(torch.randn_like(p) * (0.3 if p.dim() >= 2 else 0.1) + (1.0 if name.endswith("ln_1.weight") or
                                                                          name.endswith("ln_2.weight") else 0.0))

  def forward(self, idx):
    x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1]))
    for block in self.transformer.h:
      x = block(x)
    return self.lm_head(self.transformer.ln_f(x))


def make_gpt(seed=0, **kw) -> tuple[GPT, GPTConfig]:
  torch.manual_seed(seed)
  g = GPTConfig(**kw)
  return GPT(g).eval(), g


def save_model(path, model, g, step=100):
  """torch.save of a context-compression `model_XXXXX.pt`, with the config pickled as __main__.GPTConfig."""
  main = sys.modules["__main__"]
  saved = (GPTConfig.__module__, getattr(main, "GPTConfig", None))
  GPTConfig.__module__, main.GPTConfig = "__main__", GPTConfig
  try:
    torch.save({"model": model.state_dict(), "config": g, "step": step, "val_loss": 3.5}, path)
  finally:
    GPTConfig.__module__ = saved[0]
    if saved[1] is None:
      del main.GPTConfig
    else:
      main.GPTConfig = saved[1]


def run(*args) -> int:
  return convert.main(["dba-convert", *map(str, args)])


def torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).numpy()


TOKENS = np.random.default_rng(0).integers(0, 96, (2, 24)).astype(np.int32)


@pytest.mark.parametrize("kw, flags, rows", [
    # n_embd = heads x head_dim, vocab unpadded, scanned layers; heads from the pickled GPTConfig
    (dict(), [], 96),
    # n_embd 40 != 3 x 16, wte padded to 128 rows for a 96-token vocab, unrolled layers
    (dict(n_embd=40, vocab_size=128), ["--config.model.n_heads=3", "--config.model.vocab_size=96",
                                       "--config.model.scan_layers=False"], 128),
])
def test_logits_and_exact_round_trip(tmp_path, kw, flags, rows):
  from dba_jax import load_model
  model, g = make_gpt(**kw)
  src = tmp_path / "model_00100.pt"
  save_model(src, model, g)
  out = tmp_path / "run"
  assert run(src, "--out", out, *flags) == 0
  jmodel, c = load_model(str(out))
  assert c.model.n_heads == 3 and c.model.d_model == g.n_embd and c.model.attn_dim in (0, 48)
  assert c.model.vocab_size == (96 if rows == 128 else g.vocab_size)
  from dba_jax.config import padded_vocab
  assert padded_vocab(c.model) == rows
  err = np.abs(np.asarray(jmodel(TOKENS)) - torch_logits(model, TOKENS)).max()
  print(f"max |logit diff| = {err:.2e}")
  assert err < 1e-5

  back = tmp_path / "back.pt"
  assert run("--to-torch", out, "--out", back) == 0
  sd, ref = torch.load(back, weights_only=True), model.state_dict()
  assert list(sd) == list(ref)
  for k in ref:
    assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k
  assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()  # still one tied storage
  model2, _ = make_gpt(seed=1, **kw)
  model2.load_state_dict(sd)  # strict: the original module loads it


def test_selective_checkpoint(tmp_path):
  from dba_jax import load_model
  model, g = make_gpt(selective=True)
  src = tmp_path / "model_02499.pt"
  save_model(src, model, g)
  out = tmp_path / "run"
  assert run(src, "--out", out, "--config.model.attn_kind=selective", "--config.model.n_heads=3") == 0
  jmodel, c = load_model(str(out))
  assert c.model.attn_kind == "selective"
  err = np.abs(np.asarray(jmodel(TOKENS)) - torch_logits(model, TOKENS)).max()
  print(f"selective: max |logit diff| = {err:.2e}")
  assert err < 1e-5
  back = tmp_path / "back.safetensors"
  assert run("--to-torch", out, "--out", back) == 0
  sd, ref = torch_io.read_safetensors(str(back))[0], model.state_dict()
  assert list(sd) == list(ref)  # the causal-mask buffers come back too
  for k in ref:
    assert np.array_equal(sd[k], ref[k].numpy()), k


def test_optimizer_and_dataloader_trio(tmp_path, capsys):
  from dba_jax import ckpt, model as model_lib, train
  model, g = make_gpt()
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
  for _ in range(2):
    opt.zero_grad()
    x = torch.randint(0, 96, (2, 24))
    F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
    opt.step()
  src = tmp_path / "model_00001.pt"
  save_model(src, model, g, step=1)
  torch.save({"optimizer": opt.state_dict(), "rng_state": torch.get_rng_state()}, tmp_path / "optimizer_00001.pt")
  torch.save({"current_shard": 3, "current_position": 4096}, tmp_path / "dataloader_00001.pt")
  out = tmp_path / "run"
  assert run(src, "--out", out, "--config.optim.b2=0.95") == 0
  assert "no dba_jax iterator equivalent" in capsys.readouterr().err

  from dba_jax.loading import read_config
  c = read_config(str(out))
  graphdef, state = model_lib.abstract(c.model)
  from flax import nnx
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  sds = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev)
  abs_params = jax.tree.map(sds, nnx.to_pure_dict(state))
  tx = train.make_optimizer(c, model_lib.param_axes(c.model))
  abs_opt = jax.tree.map(sds, jax.eval_shape(tx.init, abs_params))
  ckpts = ckpt.Checkpointer(str(out / "checkpoints"), read_only=True)
  assert ckpts.all_steps() == [2]
  params, opt_state, meta = ckpts.restore(2, abs_params, abs_opt)
  ckpts.close()
  assert meta["step"] == 2 and meta["torch_step"] == 1
  assert meta["torch_dataloader"] == {"current_shard": 3, "current_position": 4096}
  adam = next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu"))
  assert int(adam.count) == 2
  names = {p: n for n, p in model.named_parameters()}
  st = {names[p]: s for p, s in opt.state.items()}
  A = 48
  for moment, tree in (("exp_avg", adam.mu), ("exp_avg_sq", adam.nu)):
    get = lambda n: st[n][moment].numpy()
    np.testing.assert_array_equal(tree["embed"], get("transformer.wte.weight"))
    np.testing.assert_array_equal(tree["pos_embed"], get("transformer.wpe.weight"))
    qkv = get("transformer.h.1.attn.c_attn.weight")
    np.testing.assert_array_equal(tree["blocks"]["attn"]["k"]["kernel"][1], qkv[A:2 * A].T)
    blocks = tree["blocks"]
    np.testing.assert_array_equal(blocks["attn"]["v"]["bias"][0], get("transformer.h.0.attn.c_attn.bias")[2 * A:])
    np.testing.assert_array_equal(blocks["mlp"]["w_out"]["kernel"][1], get("transformer.h.1.mlp.c_proj.weight").T)
    np.testing.assert_array_equal(tree["blocks"]["mlp_norm"]["scale"][0], get("transformer.h.0.ln_2.weight"))
    np.testing.assert_array_equal(tree["final_norm"]["bias"], get("transformer.ln_f.bias"))
  # the optimizer order the converter assumes is configure_optimizers's
  order = [k for k, _ in nanogpt.parameter_order(c)]
  assert order == [n for n, p in model.named_parameters() if p.dim() >= 2] + \
      [n for n, p in model.named_parameters() if p.dim() < 2]


def test_other_format_with_forced_nanogpt_lists_keys(tmp_path, capsys):
  sd = {"embedder.token_embedding.weight": torch.zeros(8, 4), "topology.layers.0.layers.0.layers.0.weight":
        torch.ones(4)}
  src = tmp_path / "caramba.pt"
  torch.save({"system_state_dict": sd, "step": 3}, src)
  out = tmp_path / "run"
  assert run(src, "--out", out, "--format", "nanogpt") == 2
  err = capsys.readouterr().err
  assert "dba-convert: error: not a nanoGPT checkpoint" in err and "embedder.token_embedding.weight" in err
  assert "transformer.wte.weight" in err and not out.exists()


def test_wrong_config_and_missing_heads(tmp_path, capsys):
  model, g = make_gpt()
  src = tmp_path / "weights.pt"
  torch.save(model.state_dict(), src)  # a raw state dict: no pickled config to take the heads from
  out = tmp_path / "run"
  assert run(src, "--out", out) == 2
  assert "--config.model.n_heads" in capsys.readouterr().err
  assert run(src, "--out", out, "--config.model.n_heads=5") == 2
  err = capsys.readouterr().err
  assert "transformer.h.0.attn.c_attn.weight" in err and "n_heads=5" in err
  assert run(src, "--out", out, "--config.model.n_heads=3", "--config.model.d_model=64") == 2
  assert "model.d_model=64" in capsys.readouterr().err
  assert run(src, "--out", out, "--config.model.n_heads=3", "--config.model.vocab_size=97") == 2
  assert "model.vocab_size=97" in capsys.readouterr().err
  preset = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "selective_gpt2.py")
  assert run(src, "--out", out, f"--config={preset}:unselective") == 2  # a 768-wide GPT-2 preset
  assert "model.d_model=768" in capsys.readouterr().err
  assert run(src, "--out", out, "--config.model.n_head=3") == 2  # a misspelled override
  assert "n_heads" in capsys.readouterr().err
  assert not out.exists()
  assert run(src, "--out", out, "--config.model.n_heads=3", "--format=nanogpt") == 0
  assert run(src, "--out", out, "--config.model.n_heads=3") == 2  # never into an existing workdir
  assert "refusing to overwrite" in capsys.readouterr().err
  cfg = json.load(open(out / "config.json"))
  assert cfg["model"]["n_heads"] == 3 and cfg["model"]["positions"] == "learned"


def test_prefixed_untied_and_init_from(tmp_path):
  """`_orig_mod.` keys, an untied head, and the workdir as dba-train's train.init_from."""
  from dba_jax import load_model
  from dba_jax.train import initial_params
  model, g = make_gpt()
  sd = {"_orig_mod." + k: v.clone() for k, v in model.state_dict().items()}
  sd["_orig_mod.lm_head.weight"] += 1.0
  src = tmp_path / "compiled.pt"
  torch.save({"model": sd}, src)
  out = tmp_path / "run"
  assert run(src, "--out", out, "--config.model.n_heads=3") == 0
  jmodel, c = load_model(str(out))
  assert not c.model.tie_embeddings
  np.testing.assert_array_equal(np.asarray(jmodel.params["head"]["kernel"]), sd["_orig_mod.lm_head.weight"].numpy().T)

  class FakeTrainer:
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), jmodel.params)
    param_shardings = jax.tree.map(lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[0]), jmodel.params)

  c.train.init_from = str(out)
  params = initial_params(c, FakeTrainer)
  np.testing.assert_array_equal(np.asarray(params["embed"]), sd["_orig_mod.transformer.wte.weight"].numpy())
