"""Start a smaller TinyDecoderLM from a trained one (the below-456-parameter experiments of the addition issue).

Every factorised product of the source (A·B, shared-A or shared-B q/k/v factors, the position table) is replaced
by its best approximation of the target rank (truncated SVD, the singular values split evenly between the two
factors); a target position table on a fixed sinusoidal basis gets its learned factor by least squares; RMSNorm
weights of ln1/ln2 fold exactly into the input rows of the linears they feed (block_norm_weight=False).
shareA_tieKV becomes shareA_folded exactly (M = B_q·B_kvᵀ, the value factor B_kv moves into the output projection).
Widths and the norm kind must match. Fine-tuning then repairs what a truncation lost.

  python -m dba_jax.addition.shrink --config=configs/addition.py:456p+ft --checkpoint=SRC --out=DIR \
      --config.model.tie_qkv=shareA_folded --config.model.block_norm_weight=False [--force]

--out is a new directory, written whole under a temporary name and renamed at the end; --force replaces an
existing --out only when it holds an addition model (params.npz and meta.json) and nothing else.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import flags

from dba_jax.addition import checkpoint
from dba_jax.addition.checkpoint import _leaf_paths
from dba_jax.addition.config import validate
from dba_jax.addition.model import Arch, count_params, param_spec, position_table, sinusoids
from dba_jax.cli import command, entry, flags_of
from dba_jax.configlib import ConfigError

RESHAPEABLE = ("pos_rank", "pos_basis", "qkv_rank", "attn_out_rank", "ffn_rank", "block_norm_weight", "tie_qkv")
FOLDABLE = ("shareA_tieKV", "shareA_folded")  # the only tie-mode change: shareA_tieKV -> shareA_folded (exact)


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


def _folded_attn(src_arch: Arch, src: dict, dst: Arch) -> dict:
  """shareA_tieKV or shareA_folded params -> shareA_folded ones of the same qkv rank."""
  if src_arch.tie_qkv not in FOLDABLE or src_arch.qkv_rank != dst.qkv_rank:
    raise ConfigError(f"train.init_from: model.tie_qkv='shareA_folded' starts from shareA_tieKV or shareA_folded "
                      f"of the same qkv_rank, not {src_arch.tie_qkv!r} with qkv_rank {src_arch.qkv_rank}")
  if src_arch.tie_qkv == "shareA_folded":
    M, V = src["qk_M"], _matrix(src["proj"])
  else:
    M, V = src["qkv_Bq"] @ src["qkv_Bkv"].T, src["qkv_Bkv"] @ _matrix(src["proj"])
  return {"qkv_A": np.asarray(src["qkv_A"], np.float32), "qk_M": np.asarray(M, np.float32),
          "proj": _linear(V, dst.attn_out_rank)}


def _attn(src_arch: Arch, src: dict, dst: Arch) -> dict:
  r, d, mode = dst.qkv_rank, dst.d_model, dst.tie_qkv
  if mode == "shareA_folded":
    return _folded_attn(src_arch, src, dst)
  if src_arch.tie_qkv != mode:
    raise ConfigError(f"train.init_from: the checkpoint's model.tie_qkv={src_arch.tie_qkv!r} cannot become "
                      f"{mode!r} (only shareA_tieKV -> shareA_folded)")
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
    out["blocks"][i] = {"ln1": b.get("ln1", {}), "ln2": b.get("ln2", {}), "attn": _attn(src_arch, b["attn"], dst),
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


def _flags(fv):
  flags.DEFINE_string("checkpoint", None, "trained model: a .pt file or a best/ / last/ directory", flag_values=fv)
  flags.DEFINE_string("out", None, "new directory for the shrunk model (params.npz, meta.json)", flag_values=fv)
  flags.DEFINE_bool("force", False, "replace an existing --out that holds an addition model", flag_values=fv)


MODEL_FILES = {"params.npz", "meta.json"}


def check_out(out: str, force: bool):
  """Before any work: --out is new, or with --force an addition model directory (nothing else is ever replaced)."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise ConfigError(f"--out {out} is a file; give a new directory")
  if os.path.isdir(out):
    if not force:
      raise ConfigError(f"--out {out} already exists; refusing to overwrite it (pass --force to replace the model "
                        "in it)")
    if set(os.listdir(out)) != MODEL_FILES:
      raise ConfigError(f"--out {out} holds {sorted(os.listdir(out))[:5]}, not an addition model (params.npz, "
                        "meta.json); refusing to replace it even with --force")
  parent = os.path.dirname(os.path.abspath(out))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ConfigError(f"--out {out}: {parent} is a file, not a directory")


@command("dba-addition-shrink", errors=(ValueError, OSError))  # ConfigError, ConversionError, CheckpointReadError
def main(argv) -> int:
  """Shrink without training: the config's model (ranks, tie mode, norm folding) from --checkpoint, into --out."""
  fv = flags_of(argv, _flags, doc=__doc__, bad="bad flag or override")
  if fv.config is None or not fv.checkpoint or not fv.out:
    raise ConfigError("--config=configs/addition.py:VARIANT, --checkpoint and --out are required")
  check_out(fv.out, fv.force)
  dst = Arch.from_config(validate(fv.config).model)
  src = checkpoint.load(fv.checkpoint)[0]
  params = shrink(src.arch, src.params, dst)
  checkpoint.save(fv.out, params, dst, {**{k: src.meta.get(k) for k in ("step", "val_exact", "seed")},
                                        "params": count_params(dst), "shrunk_from": os.path.abspath(fv.checkpoint)})
  print(f"{count_params(src.arch)} -> {count_params(dst)} params: {fv.out}")
  return 0


cli = entry(main)


if __name__ == "__main__":
  cli()
