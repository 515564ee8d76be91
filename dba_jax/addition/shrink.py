"""Start a smaller TinyDecoderLM from a trained one (the below-456-parameter experiments of the addition issue).

Every factorised product of the source (A·B, shared-A or shared-B q/k/v factors, the position table) is replaced
by its best approximation of the target rank (truncated SVD, the singular values split evenly between the two
factors); a target position table on a fixed sinusoidal basis gets its learned factor by least squares; RMSNorm
weights of ln1/ln2 fold exactly into the input rows of the linears they feed (block_norm_weight=False).
Widths, the norm kind and the tie mode must match: only ranks, the position basis and the block norm weights
may change. Fine-tuning then repairs what the truncation lost.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from dba_jax.addition.checkpoint import _leaf_paths
from dba_jax.addition.model import Arch, count_params, param_spec, position_table, sinusoids
from dba_jax.config import ConfigError

RESHAPEABLE = ("pos_rank", "pos_basis", "qkv_rank", "attn_out_rank", "ffn_rank", "block_norm_weight")


def factor(M: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """(m, n) -> A (m, rank), B (rank, n) with A·B the best rank-`rank` approximation of M."""
  U, S, Vt = np.linalg.svd(np.asarray(M, np.float64), full_matrices=False)
  if rank > S.size:
    raise ConfigError(f"rank {rank} exceeds the {M.shape} matrix's {S.size}")
  sq = np.sqrt(S[:rank])
  return (U[:, :rank] * sq).astype(np.float32), (sq[:, None] * Vt[:rank]).astype(np.float32)


def _matrix(p: dict) -> np.ndarray:
  return p["A"] @ p["B"] if "A" in p else p["kernel"]


def _linear(M: np.ndarray, rank: int) -> dict:
  if rank == 0:
    return {"kernel": np.asarray(M, np.float32)}
  A, B = factor(M, rank)
  return {"A": A, "B": B}


def _fold(w_D: np.ndarray, linears: dict) -> dict:
  """diag(w)·M for every input-side factor: a RMSNorm weight moved into what reads the norm's output."""
  scale = lambda k, x: x * w_D[:, None] if k in ("A", "kernel") or k.startswith("qkv_A") else x
  return {k: _fold(w_D, v) if isinstance(v, dict) else scale(k, v) for k, v in linears.items()}


def _fold_block(b: dict) -> dict:
  attn = {k: v for k, v in b["attn"].items() if k != "proj"}
  return {**b, "ln1": {}, "ln2": {}, "attn": {**_fold(b["ln1"]["weight"], attn), "proj": b["attn"]["proj"]},
          "mlp": {"fc1": _fold(b["ln2"]["weight"], b["mlp"]["fc1"]), "fc2": b["mlp"]["fc2"]}}


def _attn(src: dict, mode: str, dst: Arch) -> dict:
  r, d = dst.qkv_rank, dst.d_model
  out = {}
  if mode.startswith("shareA"):  # x·A·[B_q | B_k | ...]: one factorisation of the concatenated products
    names = sorted(k for k in src if k.startswith("qkv_B"))
    A, B = factor(src["qkv_A"] @ np.concatenate([src[n] for n in names], 1), r)
    out = {"qkv_A": A, **{n: B[:, i * d:(i + 1) * d] for i, n in enumerate(names)}}
  elif mode.startswith("shareB"):  # [A_q; A_k; ...]·B stacked along rows: one common right factor
    names = sorted(k for k in src if k.startswith("qkv_A"))
    A, B = factor(np.concatenate([src[n] @ src["qkv_B"] for n in names], 0), r)
    out = {"qkv_B": B, **{n: A[i * d:(i + 1) * d] for i, n in enumerate(names)}}
  else:
    out = {k: _linear(_matrix(v), r) for k, v in src.items() if k != "proj"}
  out["proj"] = _linear(_matrix(src["proj"]), dst.attn_out_rank)
  return out


def _positions(src_arch: Arch, src: dict, dst: Arch) -> dict:
  P_TD = np.asarray(position_table(src_arch, src), np.float64)
  if dst.pos_basis == "sinusoidal":
    if dst.pos_rank == 0:
      return {}
    S_TK = np.asarray(sinusoids(dst.max_seq_len, dst.pos_rank), np.float64)
    return {"B": np.linalg.lstsq(S_TK, P_TD, rcond=None)[0].astype(np.float32)}
  if dst.pos_rank == 0:
    return {"weight": P_TD.astype(np.float32)}
  A, B = factor(P_TD, dst.pos_rank)
  return {"A": A, "B": B}


def shrink(src_arch: Arch, src: dict, dst: Arch) -> dict:
  """Params for `dst` from trained params of `src_arch` (see the module docstring)."""
  fixed = [f.name for f in dataclasses.fields(Arch) if f.name not in RESHAPEABLE
           and getattr(src_arch, f.name) != getattr(dst, f.name)]
  if fixed:
    raise ConfigError("train.init_from: the checkpoint differs from the config in " + ", ".join(
        f"model.{n} ({getattr(src_arch, n)!r} vs {getattr(dst, n)!r})" for n in fixed) +
        f"; only {', '.join(RESHAPEABLE)} may change")
  out = {"token_emb": {"weight": np.asarray(src["token_emb"]["weight"], np.float32)},
         "pos_emb": _positions(src_arch, src.get("pos_emb", {}), dst), "ln_f": src["ln_f"], "blocks": {}}
  if src_arch.block_norm_weight and not dst.block_norm_weight:
    if src_arch.norm != "rmsnorm":
      raise ConfigError("train.init_from: only RMSNorm weights fold into the next linear")
  elif src_arch.block_norm_weight != dst.block_norm_weight:
    raise ConfigError("train.init_from: block norm weights can be folded away, not created")
  for i, b in src["blocks"].items():
    if not dst.block_norm_weight and "weight" in b.get("ln1", {}):
      b = _fold_block(b)
    out["blocks"][i] = {"ln1": b.get("ln1", {}), "ln2": b.get("ln2", {}), "attn": _attn(b["attn"], dst.tie_qkv, dst),
                        "mlp": {k: _linear(_matrix(v), dst.ffn_rank) for k, v in b["mlp"].items()}}
  if not out["pos_emb"]:
    del out["pos_emb"]
  # the result must have exactly the target's tree and shapes
  want = {"/".join(map(str, p)): s for p, (s, _) in _leaf_paths(param_spec(dst))}
  got = {"/".join(map(str, p)): tuple(np.shape(x)) for p, x in _leaf_paths(out)}
  if want != got:
    raise ConfigError(f"train.init_from: cannot map the checkpoint onto the config ({count_params(dst)} params): "
                      f"missing {sorted(set(want) - set(got))}, shape mismatches "
                      f"{sorted(k for k in want if k in got and want[k] != got[k])}")
  return out

