"""10-digit addition data (others.md A.2): encoding, curriculum, held-out splits, vectorised sampling.

A problem A + B (0 <= A, B < 10^10) becomes 34 tokens: A's 10 digits (most significant first, zero-padded),
`+`, B's 10 digits, `=`, then the sum's 11 digits least significant first, then EOS. The model reads
full[:33] and predicts full[1:]; only the last 12 labels (11 sum digits and EOS) count in the loss.

Random streams are ours (numpy PCG64), not torch's: the splits and batches have the same distributions as
the original code's, but not the same numbers. Everything is vectorised; nothing loops per example.
"""
from __future__ import annotations

import numpy as np

VOCAB = 14
PLUS, EQUALS, PAD, EOS = 10, 11, 12, 13  # PAD is in the vocabulary but never emitted by the data
N_DIGITS, SUM_DIGITS = 10, 11
PROMPT_LEN = 2 * N_DIGITS + 2  # 22
TARGET_LEN = SUM_DIGITS + 1  # 12
SEQ_LEN = PROMPT_LEN + SUM_DIGITS  # 33: the model input length
FULL_LEN = PROMPT_LEN + TARGET_LEN  # 34
IGNORE = -100  # label of prompt positions
MAX_OPERAND = 10**N_DIGITS

# (min_digits, max_digits, steps); the last phase lasts to the end of training whatever its step count.
CURRICULUM = ((1, 3, 2000), (1, 6, 5000), (1, 10, 20000))
EVAL_SEEDS = (41, 100, 200, 300, 400, 500, 999, 1234, 7777, 31415)  # evaluate_checkpoints' test splits

_POW_MSD = 10 ** np.arange(N_DIGITS - 1, -1, -1, dtype=np.int64)  # digit j of the prompt is (x // 10^(9-j)) % 10
_POW_LSD = 10 ** np.arange(SUM_DIGITS, dtype=np.int64)


def encode(a_B, b_B) -> np.ndarray:
  """(B,) int64 operands -> (B, 34) int32 full sequences."""
  a_B, b_B = np.asarray(a_B, np.int64), np.asarray(b_B, np.int64)
  n = a_B.shape[0]
  a_BD = (a_B[:, None] // _POW_MSD[None, :]) % 10
  b_BD = (b_B[:, None] // _POW_MSD[None, :]) % 10
  s_BS = ((a_B + b_B)[:, None] // _POW_LSD[None, :]) % 10
  col = lambda tok: np.full((n, 1), tok, np.int64)
  return np.concatenate([a_BD, col(PLUS), b_BD, col(EQUALS), s_BS, col(EOS)], axis=1).astype(np.int32)


def inputs_labels(full_BL: np.ndarray):
  """(B, 34) -> inputs (B, 33) and labels (B, 33), prompt labels set to IGNORE."""
  y_BT = full_BL[:, 1:].copy()
  y_BT[:, :PROMPT_LEN - 1] = IGNORE
  return full_BL[:, :-1], y_BT


def decode_prompt(prompt_BP: np.ndarray):
  """(B, 22) prompts -> operands (a, b) as int64."""
  p = np.asarray(prompt_BP, np.int64)
  return p[:, :N_DIGITS] @ _POW_MSD, p[:, N_DIGITS + 1:2 * N_DIGITS + 1] @ _POW_MSD


def decode_sum(digits_BS: np.ndarray) -> np.ndarray:
  """(B, 11) reversed sum digits -> int64 sums (digits outside 0-9 are the caller's concern)."""
  return np.asarray(digits_BS, np.int64) @ _POW_LSD


def pair_hash(a, b) -> np.ndarray:
  """A*10^10 + B wrapped to 64 bits. Wrapping can only merge distinct pairs (a rare spurious redraw of a
  training pair), never split equal ones, so exclusion stays exact in the direction that matters."""
  with np.errstate(over="ignore"):
    return np.asarray(a, np.int64).astype(np.uint64) * np.uint64(MAX_OPERAND) + np.asarray(b, np.int64).astype(np.uint64)


def phase_at(step: int, phases=CURRICULUM) -> tuple[int, int]:
  """(min_digits, max_digits) at 0-based training step `step`."""
  end = 0
  for lo, hi, n in phases:
    end += n
    if step < end:
      return lo, hi
  return phases[-1][0], phases[-1][1]


def parse_curriculum(spec: str):
  """'1-3:2000,1-6:5000,1-10:20000' -> phases; '' -> CURRICULUM."""
  if not spec:
    return CURRICULUM
  phases = []
  for part in spec.split(","):
    rng, _, n = part.strip().partition(":")
    lo, _, hi = rng.partition("-")
    phases.append((int(lo), int(hi), int(n or 0)))
  return tuple(phases)


def holdout_splits(val_size: int, test_size: int, seed: int) -> dict:
  """Unique uniformly random 10-digit pairs: the first `val_size` are validation, the next `test_size` test."""
  rng = np.random.default_rng(seed)
  total = val_size + test_size
  a, b = np.zeros(0, np.int64), np.zeros(0, np.int64)
  while a.size < total:
    n = max(2 * (total - a.size), 4096)
    a = np.concatenate([a, rng.integers(0, MAX_OPERAND, n, dtype=np.int64)])
    b = np.concatenate([b, rng.integers(0, MAX_OPERAND, n, dtype=np.int64)])
    _, first = np.unique(np.stack([a, b], 1), axis=0, return_index=True)  # keep first occurrences, in order
    keep = np.sort(first)
    a, b = a[keep], b[keep]
  a, b = a[:total], b[:total]
  return {"val_a": a[:val_size], "val_b": b[:val_size], "test_a": a[val_size:], "test_b": b[val_size:]}


def reserved_hashes(splits: dict) -> np.ndarray:
  """Sorted hashes of every validation and test pair (what training must never draw)."""
  return np.sort(pair_hash(np.concatenate([splits["val_a"], splits["test_a"]]),
                           np.concatenate([splits["val_b"], splits["test_b"]])))


def _is_reserved(a, b, reserved: np.ndarray) -> np.ndarray:
  if reserved.size == 0:
    return np.zeros(a.shape, bool)
  h = pair_hash(a, b)
  i = np.minimum(np.searchsorted(reserved, h), reserved.size - 1)
  return reserved[i] == h


class Sampler:
  """Training batches for one model: curriculum-phase operands, held-out pairs redrawn (vectorised)."""

  def __init__(self, batch_size: int, seed: int, reserved: np.ndarray, phases=CURRICULUM):
    self.batch_size, self.reserved, self.phases = batch_size, reserved, phases
    self.rng = np.random.default_rng(seed)

  def operands(self, step: int):
    lo, hi = phase_at(step, self.phases)
    n_B = self.rng.integers(lo, hi + 1, self.batch_size)
    top_B = 10 ** n_B.astype(np.int64)  # both operands uniform in [0, 10^n)
    a_B = self.rng.integers(0, top_B, dtype=np.int64)
    b_B = self.rng.integers(0, top_B, dtype=np.int64)
    bad = _is_reserved(a_B, b_B, self.reserved)
    while bad.any():  # redraw only the offending pairs, within their own digit count
      a_B[bad] = self.rng.integers(0, top_B[bad], dtype=np.int64)
      b_B[bad] = self.rng.integers(0, top_B[bad], dtype=np.int64)
      bad = _is_reserved(a_B, b_B, self.reserved)
    return a_B, b_B

  def batch(self, step: int):
    """(inputs (B, 33), labels (B, 33)) int32 for 0-based step `step`."""
    return inputs_labels(encode(*self.operands(step)))
