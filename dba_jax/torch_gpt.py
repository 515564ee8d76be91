"""An eager-PyTorch GPT with dba_jax's nanoGPT-layout parameters: the speed baseline of `dba-bench gpt --torch`.

Written from selective.md (§3.1, §3.3): pre-LN blocks (ln_1 -> attention -> residual, ln_2 -> GELU(tanh) MLP 4d ->
residual), learned positions, a final LayerNorm and a head tied to the token embedding. Attention is causal
softmax(q k^T / sqrt(hd)) v; the selective kind subtracts one shared F per layer from every head's logits, with
S = ReLU(head 0's causally masked logits), S[:, 0] = 0 (BOS), S[i, i] = 0 (no self-masking) and
F[i, j] = sum_{k < i} S[k, j]. Parameter names are nanoGPT's state-dict names, so dba_jax parameters load through
`dba_jax.formats.nanogpt.from_params` and both models start identical.

Only the layout dba_jax exports to nanoGPT is covered (learned positions, LayerNorm, GELU, biases, all heads kv,
standard or plain head-0 selective attention); `check_config` refuses the rest by name.
"""
from __future__ import annotations

import math

import jax
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dba_jax.attention import selective as selective_kind
from dba_jax.configlib import padded_vocab
from dba_jax.formats import nanogpt


VARIANT_FIELDS = ("selection_heads", "combo", "latent_masks", "residual_masks", "protection", "selection_head",
                  "protect_bos", "allow_self_mask", "relu_leak", "relu_after_cumsum", "disable_selection",
                  "memory_penalty")


def check_config(m) -> None:
  """Raise ValueError naming every model field this torch model does not implement."""
  want = dict(positions="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True, mup=False,
              dropout=0.0)
  bad = [f"model.{k}={m[k]!r} (needs {v!r})" for k, v in want.items() if m[k] != v]
  # The torch baseline implements the default selective variant only.
  s, defaults = m.selective, selective_kind.SECTION.defaults()
  bad += [f"model.selective.{k}={s[k]!r} (needs {defaults[k]!r})" for k in VARIANT_FIELDS if s[k] != defaults[k]]
  if m.attn_kind not in ("standard", "selective"):
    bad.append(f"model.attn_kind={m.attn_kind!r} (needs 'standard' or 'selective')")
  if m.n_kv_heads not in (0, m.n_heads):
    bad.append(f"model.n_kv_heads={m.n_kv_heads} (needs every head to be a kv head)")
  if bad:
    raise ValueError("torch_gpt covers the nanoGPT layout only: " + "; ".join(bad))


class Attention(nn.Module):
  def __init__(self, d: int, A: int, H: int, selective: bool):
    super().__init__()
    self.H, self.hd, self.selective = H, A // H, selective
    self.c_attn = nn.Linear(d, 3 * A)  # [q | k | v], each head-major
    self.c_proj = nn.Linear(A, d)

  def forward(self, x_BTd):
    B, T, _ = x_BTd.shape
    q, k, v = self.c_attn(x_BTd).split(self.H * self.hd, dim=-1)
    q, k, v = (t.view(B, T, self.H, self.hd).transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
    if not self.selective:
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
      causal_TS = torch.ones(T, T, dtype=torch.bool, device=x_BTd.device).tril()
      logits_BHTS = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(self.hd)
      # S from head 0 with future entries zeroed first; key 0 (BOS) and the diagonal never select.
      keep_TS = causal_TS.clone()
      keep_TS[:, 0] = False
      keep_TS.fill_diagonal_(False)
      s_BTS = torch.where(keep_TS, torch.relu(logits_BHTS[:, 0]), 0.0)
      f_BTS = torch.cumsum(s_BTS, dim=1)  # inclusive over queries; shifted down one row: strictly earlier queries
      f_BTS = torch.cat([torch.zeros_like(f_BTS[:, :1]), f_BTS[:, :-1]], dim=1)
      logits_BHTS = (logits_BHTS - f_BTS[:, None]).masked_fill(~causal_TS, float("-inf"))
      y = torch.einsum("bhts,bhsd->bhtd", logits_BHTS.softmax(-1), v)
    return self.c_proj(y.transpose(1, 2).reshape(B, T, self.H * self.hd))


class MLP(nn.Module):
  def __init__(self, d: int, F_: int):
    super().__init__()
    self.c_fc, self.c_proj = nn.Linear(d, F_), nn.Linear(F_, d)

  def forward(self, x):
    return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
  def __init__(self, m):
    super().__init__()
    self.ln_1 = nn.LayerNorm(m.d_model, eps=m.norm_eps)
    self.attn = Attention(m.d_model, m.attn_dim or m.d_model, m.n_heads, m.attn_kind == "selective")
    self.ln_2 = nn.LayerNorm(m.d_model, eps=m.norm_eps)
    self.mlp = MLP(m.d_model, m.d_ff)

  def forward(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
  """GPT(model config); forward(tokens [B, T]) -> logits [B, T, padded vocab]."""

  def __init__(self, m):
    super().__init__()
    check_config(m)
    self.vocab = m.vocab_size
    self.transformer = nn.ModuleDict(dict(
        wte=nn.Embedding(padded_vocab(m), m.d_model), wpe=nn.Embedding(m.max_seq_len, m.d_model),
        h=nn.ModuleList([Block(m) for _ in range(m.n_layers)]), ln_f=nn.LayerNorm(m.d_model, eps=m.norm_eps)))
    self.lm_head = nn.Linear(m.d_model, padded_vocab(m), bias=False)
    self.lm_head.weight = self.transformer.wte.weight  # tied: one parameter, gradients of both uses summed

  def forward(self, tokens_BT):
    T = tokens_BT.shape[1]
    x = self.transformer.wte(tokens_BT) + self.transformer.wpe(torch.arange(T, device=tokens_BT.device))
    for block in self.transformer.h:
      x = block(x)
    return self.lm_head(self.transformer.ln_f(x))

  def loss(self, tokens_BT1):
    """Mean next-token cross-entropy of [B, T + 1] tokens over the real (unpadded) vocab, as losses.nll."""
    logits_BTV = self(tokens_BT1[:, :-1])
    if logits_BTV.shape[-1] > self.vocab:
      logits_BTV = logits_BTV[..., :self.vocab]
    return F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]), tokens_BT1[:, 1:].reshape(-1))


def from_jax(params: dict, c) -> GPT:
  """A GPT holding exactly dba_jax's `params` (float32), mapped by the nanoGPT converter."""
  model = GPT(c.model)
  sd = nanogpt.from_params(jax_to_numpy(params), c)
  own = model.state_dict()
  extra = sorted(k for k in sd if k not in own and not nanogpt.MASK_BUFFER.match(k))
  missing = sorted(k for k in own if k not in sd)
  if extra or missing:
    raise ValueError(f"torch_gpt and the nanoGPT mapping disagree: extra {extra}, missing {missing}")
  model.load_state_dict({k: torch.from_numpy(np.array(sd[k], np.float32)) for k in own})
  return model


def jax_to_numpy(tree):
  return jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), tree)


def make_optimizer(model: GPT, o):
  """torch AdamW with the optax chain's hyperparameters: decay on >= 2-D parameters (model.optim.decay
  'matrices'), or on all when o.decay == 'all'. The learning rate is set per step by `set_lr`."""
  params = list(model.parameters())
  decay = [p for p in params if p.dim() >= 2 or o.decay == "all"]
  rest = [p for p in params if not (p.dim() >= 2 or o.decay == "all")]
  groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)


def train_step(model: GPT, opt, tokens_BT1, lr: float, clip_norm: float) -> float:
  """One AdamW step (global-norm clip first, as the optax chain); returns the loss before the step."""
  for g in opt.param_groups:
    g["lr"] = lr
  opt.zero_grad(set_to_none=True)
  loss = model.loss(tokens_BT1)
  loss.backward()
  if clip_norm > 0:
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
  opt.step()
  return float(loss.detach())
