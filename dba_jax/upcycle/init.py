"""The DBA student's parameters from a standard-attention (Llama-family) teacher's (docs/upcycle.md).

Copied unchanged: embeddings, head, every norm, the MLP. Per layer the attention is rebuilt by one initialiser:

  random       q_sem, k_sem, q_geo, k_geo keep the student's own random init; V / O copied as caramba does
  svd_caramba  caramba's attention surgery (loader/llama_upcycle.py): a rank-(sem + geo) truncated SVD of the
               teacher's Q weight, and separately of its K weight (randomized, 2 power iterations, oversampling 8;
               exact when the rank reaches the matrix's), the student's semantic rows = the first `sem` rows of the
               reconstruction from singular components [0, sem), its geometric rows = the first `geo` rows of the one
               from components [sem, sem + geo). V / O: the first min(widths) output rows of V and input columns
               of O copied (the flat prefix, whole heads first), the rest left at the student's init.
  svd_joint    ours: the geometric path takes the teacher's rotary pairs whose frequencies match its own, the
               semantic path the factored bilinear form x W_q,h W_k,g^T y^T of the remaining (slowly rotating)
               pairs, K shared by each KV group; V / O per head (exact when the value width is kept).

Everything is computed in float64 numpy on one layer at a time: [d, out] kernels as stored (Linear is x @ kernel).
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from dba_jax import attention, ops
from dba_jax.configlib import attn_dim, kv_heads
from dba_jax.upcycle.settings import INITS


class UpcycleError(ValueError):
  """The teacher or the student config cannot be upcycled as asked (one line)."""


@dataclasses.dataclass(frozen=True)
class Heads:
  """Per-head widths: H query heads in K groups; teacher head dim hd; student semantic ds, geometric dg, value dv."""
  H: int
  K: int
  hd: int
  ds: int
  dg: int
  dv: int

  @property
  def G(self) -> int:
    return self.H // self.K


def heads_of(t_model, s_model) -> Heads:
  H, K = s_model.n_heads, kv_heads(s_model)
  return Heads(H, K, attn_dim(t_model) // H, s_model.dba.sem_dim // H, s_model.dba.geo_dim // H,
               attn_dim(s_model) // H)


def score_scale(d: int, mup: bool) -> float:
  """The logit scale of a path of head width d (muP: 1/d)."""
  return float(d) ** (-1.0 if mup else -0.5)


# ------------------------------------------------------------------------------------------ caramba's surgery

def randomized_svd(a_MN: np.ndarray, rank: int, seed: str, n_iter: int = 2, oversample: int = 8):
  """(U, S, Vh) of rank `rank` by Halko-Martinsson-Tropp range finding, seeded from the text `seed` (caramba seeds
  its torch generator from the layer's name; the draws differ, the method is the same)."""
  rng = np.random.default_rng(zlib.crc32(seed.encode()))
  M, N = a_MN.shape
  width = min(rank + oversample, M, N)
  q, _ = np.linalg.qr(a_MN @ rng.standard_normal((N, width)))
  for _ in range(n_iter):  # power iterations, re-orthonormalised each time
    q, _ = np.linalg.qr(a_MN.T @ q)
    q, _ = np.linalg.qr(a_MN @ q)
  u, s, vh = np.linalg.svd(q.T @ a_MN, full_matrices=False)
  return (q @ u)[:, :rank], s[:rank], vh[:rank]


def caramba_split(w_OI: np.ndarray, sem_rows: int, geo_rows: int, seed: str):
  """(semantic [sem_rows, I] or None, geometric [geo_rows, I] or None) from a teacher weight [O, I] (PyTorch's
  layout), as caramba's _init_dba_projection_from_svd: None leaves the student's init where there is no
  component to take."""
  target = sem_rows + geo_rows
  if target >= min(w_OI.shape):
    u, s, vh = np.linalg.svd(w_OI, full_matrices=False)
  else:
    u, s, vh = randomized_svd(w_OI, target, seed)
  rank = min(len(s), target)
  sem_rank = min(sem_rows, rank)
  geo_rank = min(geo_rows, max(0, rank - sem_rows))
  # The first sem_rows / geo_rows *rows* of the rank-limited reconstructions (rows = the teacher's output channels:
  # head 0's dims first), which is why the logits are not preserved (docs/upcycle.md).
  sem = (u[:sem_rows, :sem_rank] * s[:sem_rank]) @ vh[:sem_rank] if sem_rank > 0 else None
  geo = (u[:geo_rows, sem_rank:sem_rank + geo_rank] * s[sem_rank:sem_rank + geo_rank]) @ \
      vh[sem_rank:sem_rank + geo_rank] if geo_rank > 0 else None
  return sem, geo


def _caramba_qk(t: dict, s: dict, layer: int) -> dict:
  out = {}
  for side, seed in (("q", f"model.layers.{layer}.self_attn.q"), ("k", f"model.layers.{layer}.self_attn.k")):
    sem_key, geo_key = f"{side}_sem", f"{side}_geo"
    sem, geo = caramba_split(t[side].T, s[sem_key].shape[1], s[geo_key].shape[1], seed)
    out[sem_key] = s[sem_key] if sem is None else sem.T
    out[geo_key] = s[geo_key] if geo is None else geo.T
  return out


def copy_prefix(t_v: np.ndarray, t_out: np.ndarray, s_v: np.ndarray, s_out: np.ndarray):
  """caramba's V / O copy: the leading min(widths) columns of the V kernel and rows of the O kernel (whole heads
  first); the rest keeps the student's init."""
  v, o = s_v.copy(), s_out.copy()
  n = min(t_v.shape[1], v.shape[1])
  v[:, :n] = t_v[:, :n]
  n = min(t_out.shape[0], o.shape[0])
  o[:n] = t_out[:n]
  return v, o


# ------------------------------------------------------------------------------------------------ svd_joint

def joint_factor(a_GDP: np.ndarray, b_DP: np.ndarray, width: int):
  """Rank-`width` factors of the G bilinear forms M_h = A_h B^T [D, D] with the right factor shared:
  (Q [G, D, width], K [D, width]) minimising sum_h ||M_h - Q_h K^T||_F, K with orthonormal columns. Exact when
  width >= rank(B) (then K spans B's column space and Q_h K^T = M_h).

  Computed in B's column space: B = U S V^T, C_h = A_h V S, so M_h = C_h U^T and sum_h M_h^T M_h = U N U^T with
  N = sum_h C_h^T C_h; K = U (top eigenvectors of N), Q_h = M_h K = C_h W."""
  u, s, vt = np.linalg.svd(b_DP, full_matrices=False)
  r = int(np.sum(s > s.max(initial=0.0) * max(b_DP.shape) * np.finfo(np.float64).eps)) if s.size else 0
  u, s, vt = u[:, :r], s[:r], vt[:r]
  c_GDR = np.einsum("gdp,rp,r->gdr", a_GDP, vt, s)
  n_RR = np.einsum("gdr,gds->rs", c_GDR, c_GDR)
  lam, w = np.linalg.eigh(n_RR)
  w = w[:, np.argsort(lam)[::-1][:width]]
  if w.shape[1] < width:  # fewer directions than slots: the rest are zero
    w = np.pad(w, ((0, 0), (0, width - w.shape[1])))
  return np.einsum("gdr,rw->gdw", c_GDR, w), u @ w


def _balance(q_GDW: np.ndarray, k_DW: np.ndarray):
  """The same product with Q and K of equal RMS size (one scalar per group): neither factor starts tiny."""
  nq, nk = np.sqrt(np.mean(q_GDW ** 2)), np.sqrt(np.mean(k_DW ** 2))
  if nq == 0 or nk == 0:
    return q_GDW, k_DW
  beta = np.sqrt(nq / nk)
  return q_GDW / beta, k_DW * beta


def rope_pairs(t_model, s_model, hd: int, dg: int, horizon: int, sem_pairs: str):
  """(geo: teacher pair index for each student geometric pair, exact: whether its frequency is the teacher's,
  sem: the teacher pairs the semantic path takes). Half-split RoPE: pair i is dims (i, i + d/2) at frequency
  base^(-2i/d) (the teacher's with its rope_scaling; DBA's geometric path runs unscaled, base^(-2j/dg)). Each
  student pair takes the unused teacher pair nearest in log frequency (every hd/dg-th pair when that divides). The
  semantic path takes the other pairs: all of them, or ('slow') those turning less than one radian over `horizon`
  tokens."""
  scaling = ops.RopeScaling(**t_model.rope_scaling) if t_model.rope_scaling.kind != "none" else None
  f_t = np.asarray(ops.rope_inv_freq(hd, t_model.rope_base, np.float32, scaling), np.float64)
  f_s = np.asarray(ops.rope_inv_freq(dg, s_model.rope_base, np.float32), np.float64)
  free, geo, exact = list(range(hd // 2)), [], []
  for f in f_s:
    i = min(free, key=lambda j: abs(np.log(f_t[j]) - np.log(f)))
    free.remove(i)
    geo.append(i)
    exact.append(bool(abs(f_t[i] / f - 1) < 1e-5))
  sem = [i for i in free if sem_pairs == "all" or f_t[i] * horizon <= 1.0]
  return geo, exact, sem


def _dims(pairs, d: int) -> np.ndarray:
  """The head dims of half-split rotary pairs: (i, i + d/2) for each pair i (first halves, then second halves)."""
  pairs = np.asarray(pairs, int)
  return np.concatenate([pairs, pairs + d // 2])


def _joint_qk(t: dict, n: Heads, plan: dict, q_fold_sem: float, q_fold_geo: float) -> dict:
  """svd_joint's q_sem, k_sem, q_geo, k_geo for one layer (kernels [d, width])."""
  D = t["q"].shape[0]
  q_HDd = t["q"].reshape(D, n.H, n.hd).transpose(1, 0, 2)
  k_KDd = t["k"].reshape(D, n.K, n.hd).transpose(1, 0, 2)
  geo_t, geo_s = _dims(plan["geo"], n.hd), _dims(np.arange(n.dg // 2), n.dg)
  sem_t = _dims(plan["sem"], n.hd) if plan["sem"] else np.zeros((0,), int)
  q_geo, k_geo = np.zeros((n.H, D, n.dg)), np.zeros((n.K, D, n.dg))
  q_geo[:, :, geo_s] = q_HDd[:, :, geo_t] * q_fold_geo
  k_geo[:, :, geo_s] = k_KDd[:, :, geo_t]
  q_sem, k_sem = np.zeros((n.H, D, n.ds)), np.zeros((n.K, D, n.ds))
  for g in range(n.K):
    heads = slice(g * n.G, (g + 1) * n.G)
    if sem_t.size:
      qg, kg = joint_factor(q_HDd[heads][:, :, sem_t], k_KDd[g][:, sem_t], n.ds)
      q_sem[heads], k_sem[g] = _balance(qg * q_fold_sem, kg)
  flat = lambda x: x.transpose(1, 0, 2).reshape(D, -1)  # [heads, D, w] -> [D, heads * w]
  return {"q_sem": flat(q_sem), "k_sem": flat(k_sem), "q_geo": flat(q_geo), "k_geo": flat(k_geo)}


def joint_vo(t_v: np.ndarray, t_out: np.ndarray, n: Heads):
  """V [d, K dv] and O [H dv, d] per head: the teacher's when dv >= hd (zero padded), else for each group the
  rank-dv joint factors of the value paths x W_v,g W_o,h (joint_factor with V the shared side): exact up to dv."""
  D = t_v.shape[0]
  v_KDd = t_v.reshape(D, n.K, n.hd).transpose(1, 0, 2)
  o_HdD = t_out.reshape(n.H, n.hd, D)
  v, o = np.zeros((n.K, D, n.dv)), np.zeros((n.H, n.dv, D))
  if n.dv >= n.hd:
    v[:, :, :n.hd], o[:, :n.hd] = v_KDd, o_HdD
  else:
    for g in range(n.K):
      heads = slice(g * n.G, (g + 1) * n.G)
      # M_h = W_v,g W_o,h = (W_o,h^T W_v,g^T)^T: A_h = W_o,h^T, B = W_v,g; returns Q_h = new W_o,h^T, K = new W_v,g
      o_t, v_new = joint_factor(o_HdD[heads].transpose(0, 2, 1), v_KDd[g], n.dv)
      v[g], o[heads] = v_new, o_t.transpose(0, 2, 1)
  return v.transpose(1, 0, 2).reshape(D, -1), o.reshape(-1, D)


# ---------------------------------------------------------------------------------------------- whole model

def plan_of(t_model, s_model, init: str, horizon: int, sem_pairs: str) -> dict:
  """What svd_joint does with the rotary pairs (also reported): {geo, exact, sem} or {} for the other inits."""
  if init != "svd_joint":
    return {}
  n = heads_of(t_model, s_model)
  if s_model.dba.rope_semantic or s_model.dba.tie_qk:
    raise UpcycleError("--init svd_joint needs model.dba.rope_semantic=False and model.dba.tie_qk=False (its "
                       "semantic path is the un-rotated bilinear form, K shared per group)")
  if n.hd % 2 or n.dg % 2 or n.dg > n.hd:
    raise UpcycleError(f"--init svd_joint copies rotary pairs: it needs even head dims and a geometric head dim "
                       f"({n.dg}) no wider than the teacher's ({n.hd})")
  geo, exact, sem = rope_pairs(t_model, s_model, n.hd, n.dg, horizon, sem_pairs)
  return {"geo": geo, "exact": exact, "sem": sem}


def init_attention(init: str, t: dict, s: dict, n: Heads, layer: int, plan: dict, t_mup: bool, s_mup: bool) -> dict:
  """The student's attention kernels for one layer from the teacher's (t: q, k, v, out kernels; s: the student's
  initial attention params, kernels only), float64 numpy."""
  if init == "svd_joint":
    qk = _joint_qk(t, n, plan, score_scale(n.hd, t_mup) / score_scale(n.ds, s_mup),
                   score_scale(n.hd, t_mup) / score_scale(n.dg, s_mup))
    v, o = joint_vo(t["v"], t["out"], n)
  else:
    qk = _caramba_qk(t, s, layer) if init == "svd_caramba" else {k: s[k] for k in ("q_sem", "k_sem", "q_geo",
                                                                                     "k_geo")}
    v, o = copy_prefix(t["v"], t["out"], s["v"], s["out"])
  return {**qk, "v": v, "out": o}


def check_teacher(m):
  """A teacher the upcycling reads: standard attention, RoPE, pre-norm blocks, no q/k/v or output biases, no sliding
  window (the DBA student has none of these)."""
  bad = [(k, v) for k, v, ok in (("attn_kind", m.attn_kind, attention.get(m) is attention.standard.KIND),
                                 ("positions", m.positions, m.positions == "rope"),
                                 ("block", m.block, m.block == "pre_norm"),
                                 ("qkv_bias", m.qkv_bias, not m.qkv_bias), ("bias", m.bias, not m.bias),
                                 ("sliding_window", m.sliding_window, m.sliding_window == 0)) if not ok]
  if bad:
    k, v = bad[0]
    raise UpcycleError(f"the teacher has model.{k}={v!r}; upcycling reads a Llama-family model (standard attention, "
                       "RoPE, pre-norm, no q/k/v or output biases, no sliding window)")


def stacked(params: dict, n_layers: int) -> dict:
  """A params tree with the blocks stacked [L, ...] (an unrolled model's {0: ..., 1: ...} stacked)."""
  blocks = params["blocks"]
  if "attn" in blocks:
    return params
  layers = [blocks[i] if i in blocks else blocks[str(i)] for i in range(n_layers)]
  return {**params, "blocks": _stack(layers)}


def _stack(trees):
  if isinstance(trees[0], dict):
    return {k: _stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack([np.asarray(t) for t in trees])


def upcycle_params(t_params: dict, t_model, s_params: dict, s_model, init: str, plan: dict) -> dict:
  """The student's params (numpy float32, stacked blocks): every non-attention leaf the teacher's, the attention
  from `init` layer by layer."""
  if init not in INITS:
    raise UpcycleError(f"--init {init!r} is not one of {list(INITS)}")
  t_params = stacked(t_params, t_model.n_layers)
  n = heads_of(t_model, s_model)
  f64 = lambda x: np.asarray(x, np.float64)
  out = {k: v for k, v in s_params.items() if k != "blocks"}
  for key in ("embed", "final_norm", "head"):
    if key in s_params and s_params[key] is not None:
      out[key] = _copy_like(t_params[key], s_params[key], key)
  blocks = {k: _copy_like(t_params["blocks"][k], v, f"blocks.{k}") for k, v in s_params["blocks"].items()
            if k != "attn"}
  s_attn = s_params["blocks"]["attn"]
  layers = []
  for i in range(s_model.n_layers):
    t = {k: f64(t_params["blocks"]["attn"][k]["kernel"][i]) for k in ("q", "k", "v", "out")}
    s = {k: f64(s_attn[k]["kernel"][i]) for k in ("q_sem", "k_sem", "q_geo", "k_geo", "v", "out")}
    layers.append(init_attention(init, t, s, n, i, plan, t_model.mup, s_model.mup))
  attn = {k: ({**v, "kernel": np.stack([lay[k] for lay in layers]).astype(np.float32)} if k in layers[0] else v)
          for k, v in s_attn.items()}
  blocks["attn"] = attn
  out["blocks"] = blocks
  return out


def _copy_like(t, s, where: str):
  """The teacher's leaf (or subtree) in the student's dtype; shapes must agree."""
  if isinstance(s, dict):
    return {k: _copy_like(t[k], v, f"{where}.{k}") for k, v in s.items()}
  t = np.asarray(t)
  if t.shape != np.shape(s):
    raise UpcycleError(f"{where}: the teacher's {t.shape} does not fit the student's {np.shape(s)}")
  return t.astype(np.asarray(s).dtype)
