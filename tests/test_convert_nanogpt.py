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
from helpers import owner

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


@dataclasses.dataclass
class GPTConfig:  # pickled as __main__.GPTConfig, like the context-compression runs (its selective field names)
  n_layer: int = 2
  n_head: int = 3
  head_dim: int = 16
  n_embd: int = 48
  vocab_size: int = 96
  block_size: int = 24
  selective: bool = False
  selection_head_linear_combo: str = "none"
  n_sliced_masks: int = 0
  n_latent_masks: int = 0
  protection_kind: str = "none"
  residual_attention_masks: bool = False


# Selection-only heads in front of the attending ones, per selection_head_linear_combo (attn.py's n_c_attn_heads).
EXTRA_HEADS = {"none_with_no_head": 1, "n_sliced_masks": 1, "n_latent_masks": 1, "two_masks": 2}


def protect_attack(S, P):
  """Accumulated damage along the query axis, the sequential recurrence (selective.md §5.4): attack first,
  then the pool gains this query's protection."""
  pool, damage, out = torch.zeros_like(S[..., 0, :]), torch.zeros_like(S[..., 0, :]), []
  for t in range(S.shape[-2]):
    damage = damage + F.relu(S[..., t, :] - pool)
    pool = F.relu(pool - S[..., t, :]) + P[..., t, :]
    out.append(damage)
  return torch.stack(out, -2)


class Attention(nn.Module):
  """context_compression/attn.py's CausalSelectiveSelfAttention (HEAD), the variants the converter maps."""

  def __init__(self, g: GPTConfig):
    super().__init__()
    kind, H, D = g.selection_head_linear_combo, g.n_head, g.head_dim
    self.g, self.m = g, EXTRA_HEADS.get(kind, 0)
    self.c_attn = nn.Linear(g.n_embd, 3 * (H + self.m) * D)
    self.c_proj = nn.Linear(H * D, g.n_embd)
    if g.selective:  # the selective class keeps a causal-mask buffer in its state dict
      self.register_buffer("bias", torch.tril(torch.ones(g.block_size, g.block_size)).view(1, 1, g.block_size,
                                                                                             g.block_size))
    if kind in ("true", "with_head_zero_and_bias"):
      self.selection_head = nn.Linear(H, 1, bias=kind == "with_head_zero_and_bias")
    elif kind == "n_latent_masks":
      self.selection_head = nn.Linear(g.n_latent_masks, H)
    if g.protection_kind == "linear_combo":
      self.protection_head = nn.Linear(H, 1)
    if g.residual_attention_masks:
      self.raw_att_head = nn.Linear(H + self.m, H + self.m, bias=False)

  def forward(self, x, old_raw=None):
    g, B, T, _ = self.g, *x.shape
    H, D, kind = g.n_head, g.head_dim, g.selection_head_linear_combo
    n = g.n_sliced_masks or g.n_latent_masks or 1  # q / k slices per head
    q, k, v = self.c_attn(x).split((H + self.m) * D, dim=2)
    q, k = (t.view(B, T, (H + self.m) * n, D // n).transpose(1, 2) for t in (q, k))
    v = v.view(B, T, H + self.m, D).transpose(1, 2)
    att = (q @ k.transpose(-2, -1)) * D ** -0.5  # the full head's scale, also for slices
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    att = att.masked_fill(future, float("-inf"))
    raw = None
    if g.residual_attention_masks:
      if old_raw is not None:
        mixed = self.raw_att_head(old_raw.masked_fill(future, 0).transpose(1, 3)).transpose(1, 3)
        att = mixed.masked_fill(future, 0) + att
      raw = att
    if g.selective:
      mix = lambda lin, a: lin(a.masked_fill(future, 0).transpose(1, 3)).transpose(1, 3).masked_fill(future, 0)
      if kind == "n_latent_masks":  # latents zeroed at query <= key, mixed to one mask per head, not re-masked
        latent = att[:, :n].masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool)), 0)
        S = self.selection_head(latent.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        att, v = att[:, n:].view(B, H, n, T, T).sum(2), v[:, 1:]
      elif kind == "n_sliced_masks":
        S, att, v = att[:, :n], att[:, n:].view(B, H, n, T, T).sum(2), v[:, 1:]
      elif self.m:
        S, att, v = att[:, :self.m], att[:, self.m:], v[:, self.m:]
      elif kind != "none":
        S = mix(self.selection_head, att)
      else:
        S = att[:, :1]
      S = F.relu(S).clone()
      S[..., 0] = 0  # BOS protected, nobody masks itself
      S = S * (1 - torch.eye(T))
      if g.protection_kind == "linear_combo":
        FF = protect_attack(S, F.relu(mix(self.protection_head, att)))
      else:
        FF = torch.cumsum(S, dim=-2)
      FF = torch.roll(FF, 1, -2)
      FF[..., 0, :] = 0
      per = H // FF.shape[1]  # masks to heads: repeat-interleave, the remainder wraps to the first masks
      FF = FF[:, [i // per for i in range(per * FF.shape[1])] + list(range(H % FF.shape[1]))]
      att = att - FF
    y = F.softmax(att, dim=-1) @ v
    return self.c_proj(y.transpose(1, 2).reshape(B, T, H * D)), raw


class Block(nn.Module):
  def __init__(self, g):
    super().__init__()
    self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(g.n_embd), Attention(g), nn.LayerNorm(g.n_embd)
    self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(g.n_embd, 4 * g.n_embd), c_proj=nn.Linear(4 * g.n_embd, g.n_embd)))

  def forward(self, x, raw=None):
    y, raw = self.attn(self.ln_1(x), raw)
    x = x + y
    return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh")), raw


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
    x, raw = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1])), None
    for block in self.transformer.h:
      x, raw = block(x, raw)
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


def _back_to_torch(tmp_path, out, model):
  """`--to-torch` must give back the original state dict exactly: names, order, dtypes and bits."""
  back = tmp_path / "back.pt"
  assert run("--to-torch", out, "--out", back) == 0
  sd, ref = torch.load(back, weights_only=True), model.state_dict()
  assert list(sd) == list(ref)
  for k in ref:
    assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k
  return sd


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

  sd = _back_to_torch(tmp_path, out, model)
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


# (GPTConfig fields, the dba_jax selective config the converter must infer from the tensors / pickled config)
VARIANTS = [
    (dict(selection_head_linear_combo="with_head_zero_and_bias", residual_attention_masks=True),
     dict(combo="with_head_zero_and_bias", residual_masks=True)),
    (dict(selection_head_linear_combo="true", protection_kind="linear_combo"),
     dict(combo="with_head_zero", protection="linear_combo")),
    (dict(selection_head_linear_combo="n_latent_masks", n_latent_masks=2),
     dict(selection_heads=1, selection_slices=2, latent_masks=2)),
    (dict(selection_head_linear_combo="n_sliced_masks", n_sliced_masks=2),  # slices only from the pickled config
     dict(selection_heads=1, selection_slices=2)),
    (dict(selection_head_linear_combo="two_masks", residual_attention_masks=True),
     dict(selection_heads=2, residual_masks=True)),
]


@pytest.mark.parametrize("kw, want", VARIANTS, ids=[v[0]["selection_head_linear_combo"] for v in VARIANTS])
def test_selective_variants_with_extra_parameters(tmp_path, kw, want):
  """Selection heads, latent / sliced masks, linear protection and residual masks: logits match the torch
  reference and the export is the original state dict, bit for bit."""
  from dba_jax import load_model
  model, g = make_gpt(selective=True, **kw)
  if g.n_latent_masks:  # negative biases: the original's bias at future positions stays inert (see nanogpt.py)
    with torch.no_grad():
      for block in model.transformer.h:
        block.attn.selection_head.bias.copy_(-block.attn.selection_head.bias.abs())
  src = tmp_path / "model_00100.pt"
  save_model(src, model, g)
  out = tmp_path / "run"
  assert run(src, "--out", out) == 0
  jmodel, c = load_model(str(out))
  assert c.model.attn_kind == "selective" and {k: owner(c.model, k)[k] for k in want} == want
  err = np.abs(np.asarray(jmodel(TOKENS)) - torch_logits(model, TOKENS)).max()
  print(f"{kw}: max |logit diff| = {err:.2e}")
  assert err < 1e-5
  sd = _back_to_torch(tmp_path, out, model)
  make_gpt(seed=1, selective=True, **kw)[0].load_state_dict(sd)


def test_selective_variants_that_cannot_map(tmp_path, capsys):
  model, g = make_gpt(selective=True, selection_head_linear_combo="none_with_no_head")
  sd = dict(model.state_dict())
  torch.save(sd, tmp_path / "no_config.pt")  # one selection-only head: sliced or not is not in the shapes
  assert run(tmp_path / "no_config.pt", "--out", tmp_path / "a", "--config.model.n_heads=3") == 2
  err = capsys.readouterr().err
  assert "transformer.h.0.attn.c_attn.weight" in err and "--config.model.selective.selection_slices" in err
  sd["transformer.h.1.attn.mask_layernorm.weight"] = torch.ones(3, 24)
  torch.save(sd, tmp_path / "layernorm.pt")
  assert run(tmp_path / "layernorm.pt", "--out", tmp_path / "b", "--config.model.n_heads=3",
             "--config.model.selective.selection_slices=1") == 2
  assert "transformer.h.1.attn.mask_layernorm.weight (3, 24)" in capsys.readouterr().err
  plain, _ = make_gpt(selective=True)
  torch.save(plain.state_dict(), tmp_path / "plain.pt")  # the config asks for a selection head the file lacks
  assert run(tmp_path / "plain.pt", "--out", tmp_path / "c", "--config.model.n_heads=3",
             "--config.model.attn_kind=selective", "--config.model.selective.combo=with_head_zero") == 2
  assert "model.selective.combo='with_head_zero'" in capsys.readouterr().err
  assert not any((tmp_path / d).exists() for d in "abc")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickled_main_config_in_zip_and_legacy_files(tmp_path, zip_format, capsys):
  """A model file whose config is a `__main__.GPTConfig` that does not exist here, saved by torch.save in the
  zip and the legacy (pre-1.6) format: read without the class; its sizes are checked and its n_head used."""
  from dba_jax import load_model
  model, g = make_gpt()
  main = sys.modules["__main__"]

  def save(path, **changes):
    fields = [(f.name, f.type, dataclasses.field(default=getattr(g, f.name))) for f in dataclasses.fields(g)]
    config = dataclasses.make_dataclass("GPTConfig", fields)
    config.__module__ = "__main__"
    main.GPTConfig = config
    try:
      torch.save({"model": model.state_dict(), "config": config(**changes), "step": 5}, path,
                 _use_new_zipfile_serialization=zip_format)
    finally:
      del main.GPTConfig

  src = tmp_path / "model_00005.pt"
  save(src)
  with open(src, "rb") as f:
    assert (f.read(2) == b"PK") == zip_format
  assert run(src, "--out", tmp_path / "run") == 0  # no --config.model.n_heads: the pickled n_head
  jmodel, c = load_model(str(tmp_path / "run"))
  assert (c.model.n_heads, c.model.n_layers, c.model.d_model) == (g.n_head, g.n_layer, g.n_embd)
  assert np.abs(np.asarray(jmodel(TOKENS)) - torch_logits(model, TOKENS)).max() < 1e-5
  bad = tmp_path / "bad.pt"
  save(bad, n_layer=5, block_size=32)
  assert run(bad, "--out", tmp_path / "bad") == 2
  err = capsys.readouterr().err
  assert "GPTConfig says n_layer=5" in err and "block_size=32" in err and "transformer.wpe.weight" in err


def adamw(model):
  """nanoGPT's configure_optimizers: decay group (dim >= 2), then no-decay group."""
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                           lr=1e-3, betas=(0.9, 0.95), eps=1e-8)


def train_step(model, opt, seed):
  torch.manual_seed(seed)
  opt.zero_grad()
  x = torch.randint(0, 96, (2, 24))
  F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
  opt.step()


def save_trio(folder, steps=2):
  """model_00001.pt / optimizer_00001.pt / dataloader_00001.pt after `steps` AdamW steps (loop index 1)."""
  model, g = make_gpt()
  opt = adamw(model)
  for i in range(steps):
    train_step(model, opt, i)
  save_model(folder / "model_00001.pt", model, g, step=1)
  torch.save({"optimizer": opt.state_dict(), "rng_state": torch.get_rng_state()}, folder / "optimizer_00001.pt")
  torch.save({"current_shard": 3, "current_position": 4096}, folder / "dataloader_00001.pt")
  return model, opt


def test_optimizer_and_dataloader_trio(tmp_path, capsys):
  from dba_jax import ckpt, model as model_lib, optim
  model, opt = save_trio(tmp_path)
  src = tmp_path / "model_00001.pt"
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
  tx = optim.make_optimizer(c, model_lib.param_axes(c.model))
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


def test_trio_round_trip_is_bitwise_and_resumable(tmp_path, capsys):
  """trio -> dba_jax -> trio: params, AdamW moments, steps and groups bit for bit, and torch continues from the
  exported files exactly as from its own."""
  model, opt = save_trio(tmp_path)
  out, back = tmp_path / "run", tmp_path / "back"
  assert run(tmp_path / "model_00001.pt", "--out", out, "--config.optim.b2=0.95") == 0
  back.mkdir()
  assert run("--to-torch", out, "--out", back / "model_00001.pt") == 0
  assert sorted(os.listdir(back)) == ["dataloader_00001.pt", "model_00001.pt", "optimizer_00001.pt"]
  saved = torch.load(back / "model_00001.pt", weights_only=True)
  ref = model.state_dict()
  assert saved["step"] == 1 and list(saved["model"]) == list(ref)
  for k in ref:
    assert torch.equal(saved["model"][k], ref[k]), k
  got, want = torch.load(back / "optimizer_00001.pt", weights_only=True)["optimizer"], opt.state_dict()
  assert got["param_groups"] == want["param_groups"] and sorted(got["state"]) == sorted(want["state"])
  for i, st in want["state"].items():
    for k in ("step", "exp_avg", "exp_avg_sq"):
      assert got["state"][i][k].dtype == st[k].dtype and torch.equal(got["state"][i][k], st[k]), (i, k)
  assert torch.load(back / "dataloader_00001.pt", weights_only=True) == {"current_shard": 3, "current_position": 4096}
  model2, _ = make_gpt(seed=1)
  opt2 = adamw(model2)
  model2.load_state_dict(saved["model"])
  opt2.load_state_dict(got)
  train_step(model, opt, 7)
  train_step(model2, opt2, 7)
  for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
    assert torch.equal(p, p2), name

  # never overwritten: the same export again, or a folder where only the optimizer file exists
  before = {n: (back / n).read_bytes() for n in os.listdir(back)}
  assert run("--to-torch", out, "--out", back / "model_00001.pt") == 2
  assert "refusing to overwrite" in capsys.readouterr().err
  assert {n: (back / n).read_bytes() for n in os.listdir(back)} == before
  other = tmp_path / "other"
  other.mkdir()
  (other / "optimizer_00007.pt").write_bytes(b"keep")
  assert run("--to-torch", out, "--out", other / "model_00007.pt") == 2
  assert "optimizer_00007.pt" in capsys.readouterr().err
  assert os.listdir(other) == ["optimizer_00007.pt"] and (other / "optimizer_00007.pt").read_bytes() == b"keep"


def test_optimizer_order_of_selective_variants():
  """context-compression's configure_optimizers: decay (dim >= 2), no decay, then the selection_head group."""
  from dba_jax import formats
  from dba_jax.config import base_config
  model, _ = make_gpt(selective=True, selection_head_linear_combo="with_head_zero_and_bias",
                      protection_kind="linear_combo", residual_attention_masks=True)
  c = base_config()
  c.model.n_heads = 3
  try:
    c = nanogpt.config_from({k: v.numpy() for k, v in model.state_dict().items()}, c)
  finally:
    formats.GIVEN.clear()
  named = [(n, p.dim()) for n, p in model.named_parameters()]
  want = [n for n, dim in named if dim >= 2 and "selection_head" not in n] + \
      [n for n, dim in named if dim < 2 and "selection_head" not in n] + [n for n, _ in named if "selection_head" in n]
  assert [k for k, _ in nanogpt.parameter_order(c)] == want


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

  # the fresh optimizer state written beside the params is dba-train's own tx.init, zeros and counts
  from dba_jax import model as model_lib, optim
  params_np, c2, opt, meta = convert._restore_all(str(out))
  fresh = optim.make_optimizer(c2, model_lib.param_axes(c2.model)).init(params_np)
  assert jax.tree.structure(opt) == jax.tree.structure(fresh) and meta["step"] == 0
  for a, b in zip(jax.tree.leaves(opt), jax.tree.leaves(fresh)):
    assert a.dtype == b.dtype and np.array_equal(a, b)

  c.train.init_from = str(out)
  params = initial_params(c, FakeTrainer)
  np.testing.assert_array_equal(np.asarray(params["embed"]), sd["_orig_mod.transformer.wte.weight"].numpy())
