"""A PyTorch version of the original addition training loop, written from others.md A.2, A.3 and A.5. It is the
baseline that `dba-bench addition` times against our JAX step.

This module imports torch when it is imported. Nothing in the package imports it at load time: dba-bench loads it
inside its addition mode, and the tests load it after importorskip. It has:
  * TinyDecoderLM: pre-norm, 1 head, no biases, tied head, exact GELU. Its state-dict names equal
    checkpoint.from_params(...), so `load_params` copies our parameters in and the two implementations run the
    same computation from the same numbers. Tie modes: none and the shareA family. Norms: LayerNorm and RMSNorm.
    Ranks: full or low-rank.
  * make_optimizer / train_step: AdamW (decoupled decay on every parameter), clip_grad_norm_, LambdaLR
    warmup + cosine, and cross-entropy with ignore_index=-100.
  * LoopSampler: the original's data path. A torch.Generator draws n, then A, then B, for one example at a time
    in a Python loop, redraws held-out pairs through a Python set, and encodes with string formatting.
    VectorSampler draws the same distribution with batched torch ops. It is a second baseline.
  * BatchedTinyDecoderLM / batched_train_step: the original HEAD's N-seed trainer (stacked params with a leading
    model axis, one AdamW, per-model clipping), the baseline of `dba-bench addition --torch-batched`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dba_jax.addition import checkpoint, data
from dba_jax.addition.model import LN_EPS, RMS_EPS, Arch

TORCH_TIE_MODES = ("none", "shareA", "shareA_tieKV", "shareA_tieQK")


class LowRank(nn.Module):
  """y = x·A·B, where A is (in, r) and B is (r, out). These are the original's names and orientation."""

  def __init__(self, n_in: int, n_out: int, rank: int):
    super().__init__()
    self.A = nn.Parameter(torch.randn(n_in, rank) * math.sqrt(2.0 / (n_in + rank)))
    self.B = nn.Parameter(torch.randn(rank, n_out) * math.sqrt(2.0 / (rank + n_out)))

  def forward(self, x):
    return (x @ self.A) @ self.B


def _linear(n_in: int, n_out: int, rank: int) -> nn.Module:
  return LowRank(n_in, n_out, rank) if rank > 0 else nn.Linear(n_in, n_out, bias=False)


class RMSNorm(nn.Module):
  def __init__(self, d: int):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(d))

  def forward(self, x):  # eps goes inside the sqrt, as in the original
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * self.weight


def _norm(a: Arch) -> nn.Module:
  return RMSNorm(a.d_model) if a.norm == "rmsnorm" else nn.LayerNorm(a.d_model, eps=LN_EPS)


class Attention(nn.Module):
  def __init__(self, a: Arch):
    super().__init__()
    if a.tie_qkv not in TORCH_TIE_MODES:
      raise NotImplementedError(f"torch_ref supports tie_qkv in {TORCH_TIE_MODES}, not {a.tie_qkv!r}")
    d, r = a.d_model, a.qkv_rank
    self.mode, self.n_head = a.tie_qkv, a.n_head
    if self.mode == "none":
      self.qkv = _linear(d, 3 * d, r)
    else:  # shareA*: one shared A (d, r), then one B (r, d) per distinct output
      bs = {"shareA": ("Bq", "Bk", "Bv"), "shareA_tieKV": ("Bq", "Bkv"), "shareA_tieQK": ("Bqk", "Bv")}[self.mode]
      self.qkv_A = nn.Parameter(torch.randn(d, r) * math.sqrt(2.0 / (d + r)))
      for b in bs:
        setattr(self, f"qkv_{b}", nn.Parameter(torch.randn(r, d) * math.sqrt(2.0 / (r + d))))
    self.proj = _linear(d, d, a.attn_out_rank)
    self.register_buffer("causal_TT", torch.tril(torch.ones(a.max_seq_len, a.max_seq_len, dtype=torch.bool)),
                         persistent=False)

  def _qkv(self, x_BTD):
    if self.mode == "none":
      return self.qkv(x_BTD).chunk(3, dim=-1)
    h_BTR = x_BTD @ self.qkv_A
    if self.mode == "shareA":
      return h_BTR @ self.qkv_Bq, h_BTR @ self.qkv_Bk, h_BTR @ self.qkv_Bv
    if self.mode == "shareA_tieKV":
      kv = h_BTR @ self.qkv_Bkv
      return h_BTR @ self.qkv_Bq, kv, kv
    qk = h_BTR @ self.qkv_Bqk
    return qk, qk, h_BTR @ self.qkv_Bv

  def forward(self, x_BTD):
    Bsz, T, D = x_BTD.shape
    H = self.n_head
    q, k, v = (t.view(Bsz, T, H, D // H).transpose(1, 2) for t in self._qkv(x_BTD))
    s_BHTT = (q @ k.transpose(-2, -1)) / math.sqrt(D // H)
    s_BHTT = s_BHTT.masked_fill(~self.causal_TT[:T, :T], float("-inf"))  # A.3 writes the mask out explicitly
    y_BTD = (F.softmax(s_BHTT, dim=-1) @ v).transpose(1, 2).reshape(Bsz, T, D)
    return self.proj(y_BTD)


class MLP(nn.Module):
  def __init__(self, a: Arch):
    super().__init__()
    self.fc1 = _linear(a.d_model, a.d_ff, a.ffn_rank)
    self.fc2 = _linear(a.d_ff, a.d_model, a.ffn_rank)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))  # torch's default GELU is the exact erf form


class Block(nn.Module):
  def __init__(self, a: Arch):
    super().__init__()
    self.ln1, self.attn, self.ln2, self.mlp = _norm(a), Attention(a), _norm(a), MLP(a)

  def forward(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class PosLowRank(nn.Module):
  def __init__(self, T: int, d: int, rank: int):
    super().__init__()
    self.A = nn.Parameter(torch.randn(T, rank) * 0.02)
    self.B = nn.Parameter(torch.randn(rank, d) * 0.02)

  def table(self):
    return self.A @ self.B


class TinyDecoderLM(nn.Module):
  """Parameters start random. `load_params` overwrites them with ours, so the init scheme does not matter here."""

  def __init__(self, a: Arch):
    super().__init__()
    self.arch = a
    self.token_emb = nn.Embedding(a.vocab_size, a.d_model)
    self.pos_emb = PosLowRank(a.max_seq_len, a.d_model, a.pos_rank) if a.pos_rank > 0 else nn.Embedding(
        a.max_seq_len, a.d_model)
    self.blocks = nn.ModuleList(Block(a) for _ in range(a.n_layer))
    self.ln_f = _norm(a)

  def forward(self, ids_BT):
    T = ids_BT.shape[1]
    pos_TD = self.pos_emb.table() if isinstance(self.pos_emb, PosLowRank) else self.pos_emb.weight
    x = self.token_emb(ids_BT) + pos_TD[:T]
    for block in self.blocks:
      x = block(x)
    return F.linear(self.ln_f(x), self.token_emb.weight)  # tied head: lm_head.weight is token_emb.weight


def load_params(model: TinyDecoderLM, params: dict) -> TinyDecoderLM:
  """Copies our nested params (one model, no leading axis) into `model`. strict=True: every name must match."""
  sd = checkpoint.from_params(params)
  sd.pop("lm_head.weight")  # the tied head is token_emb.weight, not a separate parameter here
  model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()}, strict=True)
  return model


def to_params(model: TinyDecoderLM) -> dict:
  """The model's parameters in our nested layout (for comparing with a JAX step)."""
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  sd["lm_head.weight"] = sd["token_emb.weight"]
  return checkpoint.to_params(sd, model.arch, "torch_ref")


# ------------------------------------------------------------------------------------------------- training


def lr_factor(o, total_steps: int, step: int) -> float:
  """A.5: linear warmup (step+1)/W, then a cosine from 1 down to min_lr_ratio at total_steps, flat after that."""
  W = max(0, int(o.warmup_steps))
  if step < W:
    return (step + 1) / W
  t = min(1.0, (step - W) / max(1, total_steps - W))
  return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def make_optimizer(model: nn.Module, o, total_steps: int):
  """(AdamW, LambdaLR). Weight decay applies to every parameter: one group with no exclusions, as in A.5."""
  opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
  return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(o, total_steps, s))


def train_step(model, opt, sched, x_BT, y_BT, clip_norm: float = 1.0):
  """One step of the original loop. Returns the loss tensor (detached; .item() is the caller's choice)."""
  logits = model(x_BT)
  loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y_BT.reshape(-1), ignore_index=data.IGNORE)
  opt.zero_grad(set_to_none=True)
  loss.backward()
  if clip_norm > 0:
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
  opt.step()
  sched.step()
  return loss.detach()


# ------------------------------------------------------------------------------------------------- sampling


class LoopSampler:
  """The original's data path (A.2): a Python loop over examples with scalar draws from a torch.Generator."""

  def __init__(self, batch_size: int, seed: int, splits: dict, phases=data.CURRICULUM):
    self.batch_size, self.phases = batch_size, phases
    self.g = torch.Generator().manual_seed(seed)
    self.reserved = {int(a) * data.MAX_OPERAND + int(b) for a, b in  # exact Python-int hashes A·10^10+B
                     zip(np.concatenate([splits["val_a"], splits["test_a"]]),
                         np.concatenate([splits["val_b"], splits["test_b"]]))}

  def _draw(self, lo: int, hi: int) -> tuple[int, int]:
    while True:
      n = int(torch.randint(lo, hi + 1, (1,), generator=self.g).item())
      a = int(torch.randint(0, 10**n, (1,), generator=self.g).item())
      b = int(torch.randint(0, 10**n, (1,), generator=self.g).item())
      if a * data.MAX_OPERAND + b not in self.reserved:
        return a, b

  def batch(self, step: int):
    lo, hi = data.phase_at(step, self.phases)
    xs, ys = [], []
    for _ in range(self.batch_size):
      a, b = self._draw(lo, hi)
      full = ([int(c) for c in f"{a:010d}"] + [data.PLUS] + [int(c) for c in f"{b:010d}"] + [data.EQUALS] +
              [int(c) for c in f"{a + b:011d}"[::-1]] + [data.EOS])
      xs.append(full[:-1])
      ys.append([data.IGNORE] * (data.PROMPT_LEN - 1) + full[data.PROMPT_LEN:])
    return torch.tensor(xs, dtype=torch.long), torch.tensor(ys, dtype=torch.long)


class VectorSampler:
  """The same distribution as LoopSampler, drawn with batched torch ops (a second baseline, not the original)."""

  def __init__(self, batch_size: int, seed: int, splits: dict, phases=data.CURRICULUM):
    self.batch_size, self.phases = batch_size, phases
    self.g = torch.Generator().manual_seed(seed)
    # data.pair_hash wraps at 2^64, and int64 arithmetic below wraps the same way, so the bits agree
    self.reserved = torch.from_numpy(data.reserved_hashes(splits).view(np.int64))
    self.pow_msd = 10 ** torch.arange(data.N_DIGITS - 1, -1, -1, dtype=torch.long)
    self.pow_lsd = 10 ** torch.arange(data.SUM_DIGITS, dtype=torch.long)

  def _operand(self, top_B):  # uniform in [0, top); torch.randint takes no per-element bound, float64 is exact here
    return (torch.rand(top_B.shape, generator=self.g, dtype=torch.float64) * top_B).long()

  def batch(self, step: int):
    lo, hi = data.phase_at(step, self.phases)
    top_B = 10 ** torch.randint(lo, hi + 1, (self.batch_size,), generator=self.g)
    a_B, b_B = self._operand(top_B), self._operand(top_B)
    bad = torch.isin(a_B * data.MAX_OPERAND + b_B, self.reserved)
    while bad.any():
      a_B[bad], b_B[bad] = self._operand(top_B[bad]), self._operand(top_B[bad])
      bad = torch.isin(a_B * data.MAX_OPERAND + b_B, self.reserved)
    n = self.batch_size
    col = lambda tok: torch.full((n, 1), tok, dtype=torch.long)
    full_BL = torch.cat([a_B[:, None] // self.pow_msd % 10, col(data.PLUS), b_B[:, None] // self.pow_msd % 10,
                         col(data.EQUALS), (a_B + b_B)[:, None] // self.pow_lsd % 10, col(data.EOS)], dim=1)
    y_BT = full_BL[:, 1:].clone()
    y_BT[:, :data.PROMPT_LEN - 1] = data.IGNORE
    return full_BL[:, :-1], y_BT


# ------------------------------------------------------------------------------- N models in one step (batched)


class BatchedTinyDecoderLM(nn.Module):
  """N TinyDecoderLMs in one module, the layout of the original's HEAD trainer (others.md A.1: a leading model
  axis, `--num-models` seeds in one vectorised run). Every parameter is the single model's tensor with a leading
  axis of N, under the same state-dict name ('.' -> '__', which ParameterDict needs). Matmuls are batched over
  the model axis (torch.matmul on (N, B·T, in) x (N, in, out) is one bmm), attention runs on N·B sequences with
  SDPA, and norms take per-model weights. One AdamW over the stacked tensors is N AdamWs (the update is
  elementwise); `batched_train_step` clips each model's gradient norm separately and sums the per-model mean
  losses, so model i's gradient is exactly its own. `sdpa=False` writes the masked softmax out as TinyDecoderLM
  does (bitwise the same gradients); SDPA rounds differently, which sharp attention can amplify to 1e-5."""

  def __init__(self, a: Arch, num_models: int, sdpa: bool = True):
    super().__init__()
    self.arch, self.N, self.sdpa = a, num_models, sdpa
    one = TinyDecoderLM(a)
    self._qkv_mode = one.blocks[0].attn.mode
    self.p = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v.detach()[None].repeat(num_models, *([1] * v.ndim)))
                               for k, v in one.state_dict().items()})

  def _w(self, name: str):
    return self.p[name.replace(".", "__")]

  def _has(self, name: str) -> bool:
    return name.replace(".", "__") in self.p

  def _mm(self, x, w_NIO):  # x (N, ..., in) @ per-model (N, in, out): one batched matmul over the model axis
    lead = x.shape[:-1]
    return torch.matmul(x.reshape(self.N, -1, x.shape[-1]), w_NIO).reshape(*lead, w_NIO.shape[-1])

  def _linear(self, name: str, x):
    if self._has(name + ".A"):
      return self._mm(self._mm(x, self._w(name + ".A")), self._w(name + ".B"))
    return self._mm(x, self._w(name + ".weight").transpose(1, 2))  # torch Linear weights are (out, in)

  def _norm(self, name: str, x_NBTD):
    w = self._w(name + ".weight")[:, None, None, :]
    if self.arch.norm == "rmsnorm":
      return x_NBTD / torch.sqrt(x_NBTD.pow(2).mean(-1, keepdim=True) + RMS_EPS) * w
    y = F.layer_norm(x_NBTD, x_NBTD.shape[-1:], eps=LN_EPS)  # normalise only; the affine part is per model
    return y * w + self._w(name + ".bias")[:, None, None, :]

  def _qkv(self, pre: str, x):
    mode = self._qkv_mode
    if mode == "none":
      return self._linear(pre + "qkv", x).chunk(3, dim=-1)
    h = self._mm(x, self._w(pre + "qkv_A"))
    B = lambda n: self._mm(h, self._w(pre + "qkv_" + n))
    if mode == "shareA":
      return B("Bq"), B("Bk"), B("Bv")
    if mode == "shareA_tieKV":
      kv = B("Bkv")
      return B("Bq"), kv, kv
    qk = B("Bqk")
    return qk, qk, B("Bv")

  def forward(self, ids_NBT):
    a, (N, Bsz, T) = self.arch, ids_NBT.shape
    V, D, H = a.vocab_size, a.d_model, a.n_head
    emb_NVD = self._w("token_emb.weight")
    # one embedding lookup for all models: model n's rows sit at n·V in the flattened (N·V, D) table
    offs = (torch.arange(N, device=ids_NBT.device) * V).view(N, 1, 1)
    pos_NTD = (torch.matmul(self._w("pos_emb.A"), self._w("pos_emb.B")) if self._has("pos_emb.A")
               else self._w("pos_emb.weight"))
    x = F.embedding(ids_NBT + offs, emb_NVD.reshape(N * V, D)) + pos_NTD[:, None, :T]
    for i in range(a.n_layer):
      pre = f"blocks.{i}."
      q, k, v = (t.reshape(N * Bsz, T, H, D // H).transpose(1, 2)
                 for t in self._qkv(pre + "attn.", self._norm(pre + "ln1", x)))
      if self.sdpa:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(D/H), as the explicit form
      else:
        s = (q @ k.transpose(-2, -1)) / math.sqrt(D // H)
        y = F.softmax(s.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=s.device)), float("-inf")),
                      dim=-1) @ v
      x = x + self._linear(pre + "attn.proj", y.transpose(1, 2).reshape(N, Bsz, T, D))
      x = x + self._linear(pre + "mlp.fc2", F.gelu(self._linear(pre + "mlp.fc1", self._norm(pre + "ln2", x))))
    return self._mm(self._norm("ln_f", x), emb_NVD.transpose(1, 2))  # tied head, per model


def load_params_batched(model: BatchedTinyDecoderLM, params_N: dict) -> BatchedTinyDecoderLM:
  """Copies our stacked (N, ...) params into `model` (every name must match, as load_params)."""
  per = []
  for i in range(model.N):
    sd = checkpoint.from_params(jax_tree_index(params_N, i))
    sd.pop("lm_head.weight")
    per.append(sd)
  with torch.no_grad():
    for k in per[0]:
      model._w(k).copy_(torch.from_numpy(np.stack([np.asarray(sd[k], np.float32) for sd in per])))
  return model


def to_params_batched(model: BatchedTinyDecoderLM) -> list[dict]:
  """Model i's parameters in our nested layout, for i < N."""
  out = []
  for i in range(model.N):
    sd = {k.replace("__", "."): v.detach()[i].numpy() for k, v in model.p.items()}
    sd["lm_head.weight"] = sd["token_emb.weight"]
    out.append(checkpoint.to_params(sd, model.arch, "torch_ref"))
  return out


def jax_tree_index(tree, i: int):
  """tree[..][i] on every leaf (numpy; nested dicts only, so no JAX import is needed)."""
  if isinstance(tree, dict):
    return {k: jax_tree_index(v, i) for k, v in tree.items()}
  return np.asarray(tree)[i]


def batched_train_step(model: BatchedTinyDecoderLM, opt, sched, x_NBT, y_NBT, clip_norm: float = 1.0):
  """One step for all N models: loss = Σ_n mean CE of model n; each model's gradient clipped to its own global
  norm (what clip_grad_norm_ does to one model: coef = clip / (norm + 1e-6), at most 1). Returns (N,) losses."""
  logits = model(x_NBT)
  N = x_NBT.shape[0]
  nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y_NBT.reshape(-1), ignore_index=data.IGNORE,
                        reduction="none").view(N, -1)
  valid = (y_NBT != data.IGNORE).view(N, -1)
  loss_N = nll.sum(1) / valid.sum(1).clamp_min(1)
  opt.zero_grad(set_to_none=True)
  loss_N.sum().backward()
  if clip_norm > 0:
    grads = [p.grad for p in model.parameters()]
    norm_N = torch.sqrt(sum(g.reshape(N, -1).pow(2).sum(1) for g in grads))
    coef_N = (clip_norm / (norm_N + 1e-6)).clamp(max=1.0)
    for g in grads:
      g.mul_(coef_N.view(N, *([1] * (g.ndim - 1))))
  opt.step()
  sched.step()
  return loss_N.detach()
