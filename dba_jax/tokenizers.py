"""The tokenizers `data.tokenizer` names, behind one interface (`Tokenizer`); `get(name)` builds one.

  byte     UTF-8 bytes, 256 ids
  gpt2     tiktoken's GPT-2 BPE, only from files already cached on this machine (dba_jax never downloads)
  bpe_qa   a tiny byte-level BPE trained in-process (LatentWire's target side, below)
  hf:PATH  a Hugging Face tokenizer: PATH is a tokenizer.json or a directory holding one (a `save_pretrained`
           directory), read offline by the `tokenizers` library. What it frames a text with (Llama's BOS) is
           tokenizer.json's own post-processor; its special tokens (BOS, EOS, pad) and the ids that end a generation
           come from the files beside it: tokenizer_config.json, special_tokens_map.json, generation_config.json.

`encode(text)` is the text alone (no special tokens), so encoded pieces concatenate; `encode_document` adds what the
tokenizer frames a text with (what transformers' `tokenizer(text)` returns): training files, synthetic splits and
`dba-eval generate`'s prompt go through it.

"bpe_qa": 256 bytes + up to 256 merges (122 are found), deterministic. LatentWire's target LM uses it and the source
uses raw bytes, so the bridge has to cross a tokeniser boundary as the original's Mistral -> Llama one did. Text is
first cut into pieces (an optional space and a word, one digit, a run of punctuation, or whitespace); merges never
cross pieces, and digits stay single tokens (as Mistral's do), so numbers are spelled digit by digit. Merges are
learned from the arith_qa train split (seed 0, 300k characters). Its first 256 ids are the bytes, so the stdlib
corpus's byte ids (data.source='stdlib') are valid, unmerged input for it.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
import re
import tempfile

import numpy as np

from dba_jax.arith_qa import arith_qa_text

HF = "hf:"


class TokenizerError(ValueError):
  """A tokenizer that cannot be built (a missing package, file or special token); the message names it."""


class _Names(tuple):
  """data.tokenizer's choices: the fixed names, and any "hf:PATH" (the path is checked when the tokenizer loads)."""

  def __contains__(self, value) -> bool:
    return tuple.__contains__(self, value) or (isinstance(value, str) and value.startswith(HF) and len(value) > 3)


NAMES = _Names(("byte", "gpt2", "bpe_qa", "hf:PATH"))


class Tokenizer:
  """What every tokenizer offers. `encode(text)` -> ids of the text alone; `decode(ids)` -> text; every id is below
  `vocab_size`. The special tokens, None or empty where a tokenizer has none: `bos_id`, `eos_id`, `pad_id` (their
  text in `specials`, {"bos": "<s>", ...}); `prefix_ids` / `suffix_ids` frame a document (a BOS the tokenizer adds);
  `stop_ids` end a generation."""
  vocab_size = 0
  bos_id = eos_id = pad_id = None
  specials: dict = {}
  prefix_ids: tuple = ()
  suffix_ids: tuple = ()
  stop_ids: tuple = ()

  def encode(self, text: str) -> np.ndarray:
    raise NotImplementedError

  def decode(self, ids) -> str:
    raise NotImplementedError

  def encode_document(self, text: str, end: bool = True) -> np.ndarray:
    """A text framed as the tokenizer frames one (end=False: a prompt the model continues, so no closing EOS)."""
    ids = self.encode(text)
    suffix = self.suffix_ids if end else ()
    if not (self.prefix_ids or suffix):
      return ids
    return np.concatenate([np.asarray(self.prefix_ids, ids.dtype), ids, np.asarray(suffix, ids.dtype)])


def get(name: str) -> Tokenizer:
  """The tokenizer data.tokenizer=`name` names; TokenizerError (one line) when it cannot be built."""
  if name == "byte":
    return ByteTokenizer()
  if name == "gpt2":
    return gpt2()
  if name == "bpe_qa":
    return bpe_qa()
  if name in NAMES:
    return HFTokenizer(name[len(HF):])
  raise TokenizerError(f"data.tokenizer={name!r} is not one of {list(NAMES)}")


# ------------------------------------------------------------------------------------------------ byte, gpt2

class ByteTokenizer(Tokenizer):
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.uint16)

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


_GPT2_FILES = ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
               "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json")


class _Gpt2(Tokenizer):
  def __init__(self, enc):
    self.enc, self.vocab_size = enc, enc.n_vocab

  def encode(self, text):
    return np.asarray(self.enc.encode_ordinary(text), np.uint16)

  def decode(self, ids):
    return self.enc.decode([int(i) for i in ids])


def gpt2() -> Tokenizer:
  """tiktoken's GPT-2 BPE, only when its files are already cached here: dba_jax never downloads."""
  try:
    import tiktoken  # lazy: optional (data.tokenizer='gpt2' only), and may be missing: the error says so
  except ImportError:
    raise TokenizerError("data.tokenizer='gpt2' needs the tiktoken package (pip install tiktoken) "
                         "and its GPT-2 files in TIKTOKEN_CACHE_DIR") from None
  cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "data-gym-cache")
  missing = [u for u in _GPT2_FILES if not os.path.exists(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest()))]
  if missing:
    raise TokenizerError(f"GPT-2 tokenizer files are not cached in {cache} (missing {missing}); dba_jax does not "
                         "download. Copy a tiktoken cache there or set TIKTOKEN_CACHE_DIR, or use pre-tokenised "
                         ".bin/.npy")
  return _Gpt2(tiktoken.get_encoding("gpt2"))


# ------------------------------------------------------------------------------------------ hf: tokenizer.json

# The files beside tokenizer.json that name its special tokens; a later one overrides an earlier (as in transformers).
SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")
SPECIALS = ("bos", "eos", "pad")


class HFTokenizer(Tokenizer):
  """A Hugging Face tokenizer.json read by the `tokenizers` library; nothing is downloaded. The framing of a document
  is the tokenizer's own post-processor (what transformers applies); `stop_ids` are EOS and any eos_token_id of a
  generation_config.json beside it (what transformers' generate stops at)."""

  def __init__(self, path: str):
    self.name = HF + path
    path = os.path.expanduser(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise self.error(f"{path} holds no tokenizer.json" if os.path.isdir(path) else f"{path} does not exist")
    folder = os.path.dirname(file)
    self.tok = self._load(file)
    vocab = self.tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values(), default=-1) + 1
    self.specials = {}
    for kind, (token, source) in self._special_names(folder).items():
      if token not in vocab:
        raise self.error(f"{kind}_token {token!r} ({source}) is not in {file}'s vocabulary")
      setattr(self, f"{kind}_id", vocab[token])
      self.specials[kind] = token
    self.prefix_ids, self.suffix_ids = self._framing()
    eos = [] if self.eos_id is None else [self.eos_id]
    self.stop_ids = tuple(dict.fromkeys(eos + self._generation_eos(folder)))

  def error(self, why: str) -> TokenizerError:
    return TokenizerError(f"data.tokenizer={self.name!r}: {why}")

  def _load(self, file: str):
    try:
      import tokenizers  # lazy: only data.tokenizer='hf:...' reads tokenizer.json (the package takes ~40 ms to import)
    except ImportError:
      raise self.error("needs the tokenizers package (pip install tokenizers)") from None
    try:
      return tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # the library raises a bare Exception for a file it cannot parse
      why = (str(e).splitlines() or [type(e).__name__])[0]
      raise self.error(f"{file} is not a readable tokenizer.json ({why})") from None

  def _json(self, file: str) -> dict:
    if not os.path.isfile(file):
      return {}
    try:
      with open(file, encoding="utf-8") as f:
        out = json.load(f)
    except (OSError, ValueError) as e:
      raise self.error(f"{file} is not readable JSON ({e})") from None
    if not isinstance(out, dict):
      raise self.error(f"{file} holds a {type(out).__name__}, not a JSON object")
    return out

  def _special_names(self, folder: str) -> dict:
    """{"bos" | "eos" | "pad": (token text, the file naming it)} from tokenizer_config.json / special_tokens_map.json;
    a token may be written as text or as a saved AddedToken ({"content": ...}); null means none."""
    out = {}
    for name in SPECIAL_FILES:
      settings = self._json(os.path.join(folder, name))
      for kind in SPECIALS:
        if f"{kind}_token" not in settings:
          continue
        value = settings[f"{kind}_token"]
        token = value.get("content") if isinstance(value, dict) else value
        if token is None:
          out.pop(kind, None)
        elif isinstance(token, str):
          out[kind] = (token, name)
        else:
          raise self.error(f"{name}: {kind}_token={value!r} is neither a token's text nor {{\"content\": text}}")
    return out

  def _framing(self) -> tuple[tuple, tuple]:
    """The ids the post-processor puts before and after a text (e.g. Llama's BOS; none for GPT-2)."""
    probe = "a b"
    plain = self.tok.encode(probe, add_special_tokens=False).ids
    full = self.tok.encode(probe, add_special_tokens=True).ids
    if not plain:  # the probe has no ids of its own: whatever the post-processor added opens the text
      return tuple(full), ()
    for i in range(len(full) - len(plain) + 1):
      if full[i:i + len(plain)] == plain:
        return tuple(full[:i]), tuple(full[i + len(plain):])
    return (), ()  # a post-processor that rewrites the text's own ids: frame nothing rather than guess

  def _generation_eos(self, folder: str) -> list:
    """generation_config.json's eos_token_id (one id or a list), when the tokenizer sits in a model directory."""
    ids = self._json(os.path.join(folder, "generation_config.json")).get("eos_token_id")
    ids = [] if ids is None else ids if isinstance(ids, list) else [ids]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size for i in ids):
      raise self.error(f"{folder}/generation_config.json: eos_token_id={ids} is not ids below the tokenizer's "
                       f"{self.vocab_size}")
    return ids

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.uint32)

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


# --------------------------------------------------------------------------------------------------- bpe_qa

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


class BPETokenizer(Tokenizer):
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
