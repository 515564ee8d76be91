"""TinyDecoderLM (others.md A.3) as pure functions over a nested dict of arrays.

Pre-norm decoder, no biases in linear layers, tied head. Parameter paths follow the PyTorch state-dict names
(`blocks.0.attn.qkv_A`, `blocks.0.mlp.fc1.A`, ...) so conversion is a rename: a low-rank linear holds A (in, r)
and B (r, out) and computes x·A·B; a full linear holds `kernel` (in, out), the transpose of torch's `weight`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from dba_jax.addition import data
from dba_jax.layers import dense

# The original's modes, then ours: shareA_folded is shareA_tieKV with its products folded (see `qkv`).
TIE_MODES = ("none", "all", "qk", "kv", "shareA", "shareB", "shareB_tieQK", "shareB_tieKV", "shareA_tieKV",
             "shareA_tieQK", "shareA_folded")
SHARED_FACTOR_MODES = TIE_MODES[4:]  # built from raw A/B factors: need qkv_rank > 0
RMS_EPS, LN_EPS = 1e-8, 1e-5


@dataclasses.dataclass(frozen=True)
class Arch:
  """Hashable architecture (a static argument of the jitted functions)."""
  d_model: int = 7
  d_ff: int = 14
  n_layer: int = 1
  n_head: int = 1
  vocab_size: int = data.VOCAB
  max_seq_len: int = data.SEQ_LEN
  pos_rank: int = 0  # 0: full rank
  pos_basis: str = "learned"  # learned | sinusoidal: the (T, r) left factor (the whole table if r = 0) is fixed
  qkv_rank: int = 0
  attn_out_rank: int = 0
  ffn_rank: int = 0
  norm: str = "layernorm"  # layernorm | rmsnorm
  block_norm_weight: bool = True  # False (rmsnorm only): ln1/ln2 carry no weight (it folds into the next linear)
  tie_qkv: str = "none"

  @classmethod
  def from_config(cls, m) -> "Arch":
    return cls(**{f.name: m[f.name] for f in dataclasses.fields(cls)})


# ------------------------------------------------------------------------------------------ parameter specs


def _linear(n_in: int, n_out: int, rank: int) -> dict:
  """{name: (shape, init)}: init is a normal std, or 'ones' / 'zeros'."""
  if rank > 0:  # the low-rank init keeps Var(A·B) ~ 2/(in+out); torch's _init_weights never touches it
    return {"A": ((n_in, rank), math.sqrt(2.0 / (n_in + rank))), "B": ((rank, n_out), math.sqrt(2.0 / (rank + n_out)))}
  return {"kernel": ((n_in, n_out), 0.02)}


def _norm(a: Arch) -> dict:
  spec = {"weight": ((a.d_model,), "ones")}
  if a.norm == "layernorm":
    spec["bias"] = ((a.d_model,), "zeros")
  return spec


def _attn(a: Arch) -> dict:
  d, r, mode = a.d_model, a.qkv_rank, a.tie_qkv
  fa, fb = ((d, r), math.sqrt(2.0 / (d + r))), ((r, d), math.sqrt(2.0 / (r + d)))
  spec = {
      "none": lambda: {"qkv": _linear(d, 3 * d, r)},
      "all": lambda: {"qkv_shared": _linear(d, d, r)},
      "qk": lambda: {"qk_shared": _linear(d, d, r), "v_proj": _linear(d, d, r)},
      "kv": lambda: {"q_proj": _linear(d, d, r), "kv_shared": _linear(d, d, r)},
      "shareA": lambda: {"qkv_A": fa, "qkv_Bq": fb, "qkv_Bk": fb, "qkv_Bv": fb},
      "shareB": lambda: {"qkv_Aq": fa, "qkv_Ak": fa, "qkv_Av": fa, "qkv_B": fb},
      "shareB_tieQK": lambda: {"qkv_Aqk": fa, "qkv_Av": fa, "qkv_B": fb},
      "shareB_tieKV": lambda: {"qkv_Aq": fa, "qkv_Akv": fa, "qkv_B": fb},
      "shareA_tieKV": lambda: {"qkv_A": fa, "qkv_Bq": fb, "qkv_Bkv": fb},
      "shareA_tieQK": lambda: {"qkv_A": fa, "qkv_Bqk": fb, "qkv_Bv": fb},
      "shareA_folded": lambda: {"qkv_A": fa, "qk_M": ((r, r), math.sqrt(1.0 / r))},
  }[mode]()
  spec["proj"] = _linear(r if mode == "shareA_folded" else d, d, a.attn_out_rank)  # folded: values are r wide
  return spec


def param_spec(a: Arch) -> dict:
  """The nested parameter tree with (shape, init) leaves."""
  d, T = a.d_model, a.max_seq_len
  if a.pos_basis == "sinusoidal":  # only the right factor (if any) is learned
    pos = {"B": ((a.pos_rank, d), 0.02)} if a.pos_rank > 0 else {}
  elif a.pos_rank > 0:
    pos = {"A": ((T, a.pos_rank), 0.02), "B": ((a.pos_rank, d), 0.02)}
  else:
    pos = {"weight": ((T, d), 0.02)}
  block_norm = _norm(a) if a.block_norm_weight else {}
  block = {"ln1": block_norm, "attn": _attn(a), "ln2": dict(block_norm),
           "mlp": {"fc1": _linear(d, a.d_ff, a.ffn_rank), "fc2": _linear(a.d_ff, d, a.ffn_rank)}}
  return {"token_emb": {"weight": ((a.vocab_size, d), 0.02)}, "pos_emb": pos,
          "blocks": {str(i): block for i in range(a.n_layer)}, "ln_f": _norm(a)}


def _is_spec(x) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def count_params(a: Arch) -> int:
  """Unique parameters (the tied head is the token embedding, counted once)."""
  return sum(math.prod(s) for s, _ in jax.tree.leaves(param_spec(a), is_leaf=_is_spec))


def init_params(a: Arch, key: jax.Array) -> dict:
  """Fresh float32 parameters; every leaf draws from its own fold of `key` (by leaf order)."""
  leaves, treedef = jax.tree.flatten(param_spec(a), is_leaf=_is_spec)
  out = []
  for i, (shape, init) in enumerate(leaves):
    if init == "ones":
      out.append(jnp.ones(shape, jnp.float32))
    elif init == "zeros":
      out.append(jnp.zeros(shape, jnp.float32))
    else:
      out.append(init * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))
  return jax.tree.unflatten(treedef, out)


# --------------------------------------------------------------------------------------------------- forward


def linear(p: dict, x):
  return dense(dense(x, p["A"]), p["B"]) if "A" in p else dense(x, p["kernel"])


def norm(a: Arch, p: dict, x_BTD):
  lead = (1,) * (x_BTD.ndim - 1)
  if a.norm == "rmsnorm":  # eps inside the square root, weight only (if any)
    y = x_BTD / jnp.sqrt(jnp.mean(x_BTD * x_BTD, axis=-1, keepdims=True) + RMS_EPS)
    return y * p["weight"].reshape(lead + (-1,)) if "weight" in p else y
  w = p["weight"].reshape(lead + (-1,))
  mu = jnp.mean(x_BTD, axis=-1, keepdims=True)
  var = jnp.mean((x_BTD - mu) ** 2, axis=-1, keepdims=True)  # biased, as torch's LayerNorm
  return (x_BTD - mu) / jnp.sqrt(var + LN_EPS) * w + p["bias"].reshape(lead + (-1,))


def qkv(a: Arch, p: dict, x_BTD):
  """(q, k, v), each (B, T, D), for every tie mode; (B, T, r) for shareA_folded.

  shareA_folded: h = x·A; q = h·M, k = v = h. It is shareA_tieKV with M = B_q·B_kvᵀ (q·kᵀ only ever uses that
  product) and B_kv moved into the output projection (r -> d), so it computes the same functions with
  (d + r)·r + proj parameters instead of 3·d·r + proj."""
  mode = a.tie_qkv
  if mode == "none":
    return tuple(jnp.split(linear(p["qkv"], x_BTD), 3, axis=-1))
  if mode == "all":
    s = linear(p["qkv_shared"], x_BTD)
    return s, s, s
  if mode == "qk":
    s = linear(p["qk_shared"], x_BTD)
    return s, s, linear(p["v_proj"], x_BTD)
  if mode == "kv":
    s = linear(p["kv_shared"], x_BTD)
    return linear(p["q_proj"], x_BTD), s, s
  if mode.startswith("shareA"):
    h_BTR = dense(x_BTD, p["qkv_A"])
    if mode == "shareA_folded":
      return dense(h_BTR, p["qk_M"]), h_BTR, h_BTR
    if mode == "shareA":
      return dense(h_BTR, p["qkv_Bq"]), dense(h_BTR, p["qkv_Bk"]), dense(h_BTR, p["qkv_Bv"])
    if mode == "shareA_tieKV":
      kv = dense(h_BTR, p["qkv_Bkv"])
      return dense(h_BTR, p["qkv_Bq"]), kv, kv
    qk = dense(h_BTR, p["qkv_Bqk"])  # shareA_tieQK
    return qk, qk, dense(h_BTR, p["qkv_Bv"])
  B = p["qkv_B"]
  if mode == "shareB":
    return tuple(dense(dense(x_BTD, p[f"qkv_A{n}"]), B) for n in ("q", "k", "v"))
  if mode == "shareB_tieQK":
    qk = dense(dense(x_BTD, p["qkv_Aqk"]), B)
    return qk, qk, dense(dense(x_BTD, p["qkv_Av"]), B)
  kv = dense(dense(x_BTD, p["qkv_Akv"]), B)  # shareB_tieKV
  return dense(dense(x_BTD, p["qkv_Aq"]), B), kv, kv


def attention(a: Arch, p: dict, x_BTD, q_start: int = 0):
  """Causal self-attention outputs for query positions q_start.. (keys and values at every position)."""
  Bsz, T, D = x_BTD.shape
  H = a.n_head
  q, k, v = (t.reshape(Bsz, T, H, -1) for t in qkv(a, p, x_BTD))  # head width D/H (r for shareA_folded)
  q = q[:, q_start:]
  s_BHTS = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D // H)
  causal_TS = jnp.arange(T)[None, :] <= jnp.arange(q_start, T)[:, None]  # key s visible to query t iff s <= t
  s_BHTS = jnp.where(causal_TS[None, None], s_BHTS, -jnp.inf)
  y_BTHD = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s_BHTS, axis=-1), v)
  return linear(p["proj"], y_BTHD.reshape(Bsz, T - q_start, -1))


def sinusoids(T: int, k: int) -> jnp.ndarray:
  """(T, k) fixed features: pairs sin/cos at geometric frequencies 1 .. 1/10000 (the Transformer's table).
  Under AdderBoard's rules a fixed position encoding is not a parameter."""
  pos_T1 = jnp.arange(T, dtype=jnp.float32)[:, None]
  freq_K = 1.0 / 10000.0 ** (2 * (jnp.arange(k) // 2) / k)
  ang_TK = pos_T1 * freq_K[None, :]
  return jnp.where(jnp.arange(k) % 2 == 0, jnp.sin(ang_TK), jnp.cos(ang_TK))


def position_table(a: Arch, p: dict):
  """(T, d) position embeddings."""
  if a.pos_basis == "sinusoidal":
    S_TK = sinusoids(a.max_seq_len, a.pos_rank or a.d_model)
    return S_TK @ p["B"] if a.pos_rank > 0 else S_TK
  return p["A"] @ p["B"] if "A" in p else p["weight"]


def forward(a: Arch, params: dict, ids_BT, out_from: int = 0):
  """Logits (B, T - out_from, V) at positions out_from.. for int token ids (B, T), T <= max_seq_len.

  out_from > 0 gives exactly those rows of the full logits with less work: the last layer's attention queries,
  MLP and head run only there (earlier positions still serve as keys and values)."""
  T = ids_BT.shape[1]
  emb_VD = params["token_emb"]["weight"]
  x = emb_VD[ids_BT] + position_table(a, params.get("pos_emb", {}))[None, :T]
  for i in range(a.n_layer):
    p = params["blocks"][str(i)]
    start = out_from if i == a.n_layer - 1 else 0
    x = x[:, start:] + attention(a, p["attn"], norm(a, p.get("ln1", {}), x), start)
    h = jax.nn.gelu(linear(p["mlp"]["fc1"], norm(a, p.get("ln2", {}), x)), approximate=False)  # exact erf GELU
    x = x + linear(p["mlp"]["fc2"], h)
  return dense(norm(a, params["ln_f"], x), emb_VD, transpose_w=True)  # tied head


def loss_fn(a: Arch, params: dict, x_BT, y_BT, label_start: int = 0):
  """Mean cross-entropy over labelled positions (labels != IGNORE).

  label_start: the caller promises that every label before it is IGNORE (training data: data.PROMPT_LEN - 1).
  Only positions label_start.. are then computed (forward's out_from), which is the same loss and gradient:
  on the addition data 21 of the 33 positions carry no label, so the step does ~2.3x less work."""
  logits = forward(a, params, x_BT, label_start)
  y_BT = y_BT[:, label_start:]
  valid = y_BT != data.IGNORE
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, y_BT, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def greedy_decode(logits_fn, prompt_BP):
  """12 greedy tokens after a (B, 22) prompt. `logits_fn(ids (B, 33)) -> (B, 33, V)` must be causal: each
  step runs it on the 33-token buffer (unwritten slots hold PAD) and reads the last written position, which
  equals the original's full re-run on the growing sequence. A fori_loop keeps one forward in the program."""
  Bsz = prompt_BP.shape[0]
  buf = jnp.concatenate([prompt_BP.astype(jnp.int32), jnp.full((Bsz, data.SUM_DIGITS), data.PAD, jnp.int32)], 1)

  def step(i, carry):
    buf_BT, out_BK = carry
    pos = data.PROMPT_LEN - 1 + i
    logits_BV = jax.lax.dynamic_index_in_dim(logits_fn(buf_BT), pos, axis=1, keepdims=False)
    tok_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    out_BK = jax.lax.dynamic_update_index_in_dim(out_BK, tok_B, i, axis=1)
    # the 12th token has no slot (index clamps to 32, after its last read): harmless
    buf_BT = jax.lax.dynamic_update_index_in_dim(buf_BT, tok_B, jnp.minimum(pos + 1, data.SEQ_LEN - 1), axis=1)
    return buf_BT, out_BK

  _, out = jax.lax.fori_loop(0, data.TARGET_LEN, step, (buf, jnp.zeros((Bsz, data.TARGET_LEN), jnp.int32)))
  return out
