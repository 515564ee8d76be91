""""bpe_qa" (data.tokenizer="bpe_qa"): a tiny byte-level BPE (256 bytes + up to 256 merges; 122 are found) trained
in-process, deterministic. (The byte and gpt2 tokenizers are in dba_jax.data.)

LatentWire's target LM uses it and the source uses raw bytes, so the bridge has to cross a tokeniser boundary as the
original's Mistral -> Llama one did. Text is first cut into pieces (an optional space and a word, one digit, a run of
punctuation, or whitespace); merges never cross pieces, and digits stay single tokens (as Mistral's do), so numbers
are spelled digit by digit. Merges are learned from the arith_qa train split (seed 0, 300k characters); stdlib text
(data.mix_stdlib) arrives as byte ids, which are valid ids of this vocabulary.
"""
from __future__ import annotations

import collections
import functools
import re

import numpy as np

from dba_jax.arith_qa import arith_qa_text

PIECES = re.compile(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+")
N_MERGES = 256


def _pieces(text: str) -> list[bytes]:
  return [p.encode("utf-8") for p in PIECES.findall(text)]


def learn_merges(text: str, n_merges: int) -> list[tuple[int, int]]:
  """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: the smallest pair) within pieces."""
  words = collections.Counter(tuple(p) for p in _pieces(text) if not p[-1:].isdigit())
  words = {w: c for w, c in words.items() if len(w) > 1}
  merges = []
  for new_id in range(256, 256 + n_merges):
    pairs = collections.Counter()
    for w, c in words.items():
      for pair in zip(w, w[1:]):
        pairs[pair] += c
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))
    if pairs[best] < 2:
      break
    merges.append(best)
    words = {_merge(w, best, new_id): c for w, c in words.items()}
  return merges


def _merge(word: tuple, pair: tuple, new_id: int) -> tuple:
  out, i = [], 0
  while i < len(word):
    if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
      out.append(new_id)
      i += 2
    else:
      out.append(word[i])
      i += 1
  return tuple(out)


class BPETokenizer:
  def __init__(self, merges: list[tuple[int, int]]):
    self.ranks = {pair: 256 + r for r, pair in enumerate(merges)}
    self.vocab_size = 256 + len(merges)
    self.bytes_of = [bytes([i]) for i in range(256)]
    for a, b in merges:
      self.bytes_of.append(self.bytes_of[a] + self.bytes_of[b])
    self._cache: dict[bytes, tuple] = {}

  def _encode_piece(self, piece: bytes) -> tuple:
    word = tuple(piece)
    while len(word) > 1:
      pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, 1 << 30))
      if pair not in self.ranks:
        break
      word = _merge(word, pair, self.ranks[pair])
    return word

  def encode(self, text: str) -> np.ndarray:
    ids = []
    for p in _pieces(text):
      if p not in self._cache:
        self._cache[p] = self._encode_piece(p)
      ids.extend(self._cache[p])
    return np.asarray(ids, np.uint16)

  def decode(self, ids) -> str:
    return b"".join(self.bytes_of[int(i)] for i in ids).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=1)
def bpe_qa() -> BPETokenizer:
  merges = learn_merges(arith_qa_text(300_000, 0), N_MERGES)
  return BPETokenizer(merges)
