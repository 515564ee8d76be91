"""Token data: readers (llm.c .bin, .npy, raw text, the embedded stdlib corpus), windows, grain pipelines.

Everything is token arrays ("shards") cut into (seq_len + 1)-token windows: every start offset for random
sampling (what the DBA runs did), non-overlapping for contiguous sampling (nanoGPT). Order comes from grain's
seeded shuffle, so the iterator state is one index and resuming continues the exact order.
"""
from __future__ import annotations

import bisect
import glob
import hashlib
import importlib
import os
import sysconfig
from dataclasses import dataclass

import grain
import numpy as np

from dba_jax import tokenizers

BIN_MAGIC = 20240520
BIN_HEADER_INTS = 256


class DataError(ValueError):
  """Bad or missing data; the message names the file."""


# --------------------------------------------------------------------------------------------------- readers

def write_bin(path: str, tokens: np.ndarray):
  """llm.c / nanoGPT shard: 256 x int32 header (magic, version 1, token count), then uint16 tokens."""
  tokens = np.asarray(tokens)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
    raise DataError(f"{path}: .bin shards hold uint16 tokens; got ids in [{tokens.min()}, {tokens.max()}]")
  header = np.zeros(BIN_HEADER_INTS, np.int32)
  header[:3] = BIN_MAGIC, 1, tokens.size
  with open(path, "wb") as f:
    f.write(header.tobytes())
    f.write(tokens.astype(np.uint16).tobytes())


def read_bin(path: str) -> np.ndarray:
  size = os.path.getsize(path)
  if size < BIN_HEADER_INTS * 4:
    raise DataError(f"{path}: {size} bytes is shorter than the {BIN_HEADER_INTS * 4}-byte .bin header")
  header = np.fromfile(path, np.int32, BIN_HEADER_INTS)
  if header[0] != BIN_MAGIC:
    raise DataError(f"{path}: wrong magic {header[0]} (expected {BIN_MAGIC}); not an llm.c token shard")
  if header[1] != 1:
    raise DataError(f"{path}: unsupported .bin version {header[1]} (expected 1, uint16 tokens)")
  n = int(header[2])
  expected = BIN_HEADER_INTS * 4 + 2 * n
  if size != expected:
    raise DataError(f"{path}: header says {n} tokens ({expected} bytes) but the file has {size} bytes (truncated?)")
  return np.memmap(path, np.uint16, "r", offset=BIN_HEADER_INTS * 4, shape=(n,))


def read_npy(path: str) -> np.ndarray:
  try:
    arr = np.load(path, mmap_mode="r")
  except (ValueError, EOFError) as e:  # truncation: "cannot reshape" / "mmap length is greater"; 0 bytes: EOFError
    raise DataError(f"{path}: not a readable .npy token array ({e or type(e).__name__})") from None
  if not isinstance(arr, np.ndarray):  # an .npz archive
    arr.close()
    raise DataError(f"{path}: an .npz archive, not a .npy token array")
  if arr.ndim != 1 or arr.dtype not in (np.uint16, np.uint32):
    raise DataError(f"{path}: expected a 1-D uint16 or uint32 token array, got {arr.dtype} shape {arr.shape}")
  return arr


def check_vocab(path: str, tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 26):
  """Raise if any token id >= vocab_size; scans in chunks so huge memmaps stay out of RAM."""
  for start in range(0, tokens.size, chunk):
    top = int(tokens[start:start + chunk].max(initial=0))
    if top >= vocab_size:
      where = start + int(np.argmax(tokens[start:start + chunk] >= vocab_size))
      raise DataError(f"{path}: token id {int(tokens[where])} at index {where} is >= model.vocab_size={vocab_size}")


# ------------------------------------------------------------------------------------------------ tokenizers

def get_tokenizer(name: str, vocab_size: int | None = None) -> tokenizers.Tokenizer:
  """The tokenizer data.tokenizer=`name` names (dba_jax/tokenizers.py: byte, gpt2, bpe_qa, hf:PATH). With
  `vocab_size` (model.vocab_size) every id it can produce must be an id of the model. DataError (one line) if not."""
  try:
    tok = tokenizers.get(name)
  except tokenizers.TokenizerError as e:
    raise DataError(str(e)) from None
  if vocab_size is not None and tok.vocab_size > vocab_size:
    ids = {k: getattr(tok, f"{k}_id") for k in tok.specials}  # the special tokens that fall outside, by name
    over = [f"{k} {tok.specials[k]!r} is id {i}" for k, i in ids.items() if i >= vocab_size]
    raise DataError(f"data.tokenizer={name!r} has {tok.vocab_size} ids but model.vocab_size={vocab_size}"
                    + (f" ({', '.join(over)})" if over else ""))
  return tok


# ----------------------------------------------------------------------------------------- the stdlib corpus

STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> list[str]:
  """The running Python's standard-library .py sources without test suites or installed packages, sorted."""
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS)
    out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
  return sorted(os.path.relpath(p, root) for p in out)


def is_val_file(relpath: str, val_fraction: float) -> bool:
  """Split by a hash of the path: stable across machines with the same Python, independent of file order."""
  h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "little")
  return h / 2**64 < val_fraction


def stdlib_corpus(val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train, val) byte tokens of the stdlib sources, files joined by a blank line."""
  root = sysconfig.get_paths()["stdlib"]
  parts: dict[bool, list[bytes]] = {False: [], True: []}
  for rel in stdlib_files():
    with open(os.path.join(root, rel), "rb") as f:
      parts[is_val_file(rel, val_fraction)].append(f.read() + b"\n\n")
  train, val = (np.frombuffer(b"".join(parts[k]), np.uint8).astype(np.uint16) for k in (False, True))
  return train, val


# -------------------------------------------------------------------------------------------------- windows

@dataclass
class Windows:
  """Random-access (seq_len + 1)-token windows over shards; a window never crosses a shard boundary."""
  shards: list
  seq_len: int
  stride: int

  def __post_init__(self):
    counts = [max(0, (len(s) - self.seq_len - 1) // self.stride + 1) for s in self.shards]
    self._ends = np.cumsum(counts).tolist()
    if not self._ends or self._ends[-1] == 0:
      raise DataError(f"no {self.seq_len + 1}-token window fits in shards of lengths {[len(s) for s in self.shards]}")

  def __len__(self):
    return self._ends[-1]

  def __getitem__(self, i: int) -> np.ndarray:
    s = bisect.bisect_right(self._ends, i)
    start = (i - (self._ends[s - 1] if s else 0)) * self.stride
    return np.asarray(self.shards[s][start:start + self.seq_len + 1], np.int32)

  def __repr__(self):  # grain checks the source's repr when restoring an iterator
    return f"Windows(n={len(self)}, seq_len={self.seq_len}, stride={self.stride})"


@dataclass
class Splits:
  train: list
  val: list


def _files(pattern: str, key: str) -> list[str]:
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise DataError(f"data file not found: {pattern!r} (config key data.{key})")
  return paths


def _read_split(pattern: str, key: str, source: str, tokenizer, vocab_size: int) -> list:
  shards = []
  for path in _files(pattern, key):
    if source == "bin":
      arr = read_bin(path)
    elif source == "npy":
      arr = read_npy(path)
    else:
      with open(path, encoding="utf-8", errors="replace") as f:
        arr = tokenizer.encode_document(f.read())  # a file is one document: framed as its tokenizer frames one
    if len(arr) == 0:
      raise DataError(f"data.{key}: {path} holds no tokens")
    check_vocab(path, arr, vocab_size)
    shards.append(arr)
  return shards


# ---------------------------------------------------------------------------------------------- synthetic

# data.source = "synthetic": text made in-process from data.seed, so nothing is downloaded. A generator is
# fn(n_chars: int, seed: int) -> str (about n_chars characters, deterministic in seed), named in data.generator: one of
# GENERATORS or any "module:function". data.synthetic_chars sizes the train split (val: a val_fraction share, from
# another seed); data.mix_stdlib > 0 appends stdlib text as that fraction of the tokens. The generators live with
# their research code and are imported by name, so this module depends on none of them.
GENERATORS = {"passkey": "dba_jax.hope.synthetic:passkey_text",
              "passkey_long": "dba_jax.hope.synthetic:passkey_long_text",
              "arith_qa": "dba_jax.arith_qa:arith_qa_text"}


def generator(name: str):
  path = GENERATORS.get(name, name)
  module, _, fn = path.partition(":")
  try:
    return getattr(importlib.import_module(module), fn)
  except (ImportError, AttributeError, ValueError):
    raise DataError(f"data.generator={name!r} is not a synthetic generator; choose one of {sorted(GENERATORS)} or "
                    "give module:function") from None


def synthetic_corpus(d, tokenizer) -> tuple[np.ndarray, np.ndarray]:
  fn = generator(d.generator)
  n_val = max(1, int(d.synthetic_chars * d.val_fraction))
  train, val = (tokenizer.encode_document(fn(n, seed))
                for n, seed in ((d.synthetic_chars, d.seed), (n_val, d.seed + 10_000)))
  if d.mix_stdlib > 0:
    def mix(part, stdlib_bytes):
      want = int(len(part) * d.mix_stdlib / (1 - d.mix_stdlib))  # tokens, so that stdlib is mix_stdlib of the whole
      if d.tokenizer != "byte":  # the corpus comes as bytes: other tokenizers get its text (>= 1 byte per token)
        text = bytes(stdlib_bytes[:4 * want].astype(np.uint8)).decode("utf-8", "replace")
        stdlib_bytes = np.asarray(tokenizer.encode(text))
      return np.concatenate([part, stdlib_bytes[:want]])
    train, val = (mix(a, b) for a, b in zip((train, val), stdlib_corpus(d.val_fraction)))
  return np.asarray(train, np.int32), np.asarray(val, np.int32)


# Tokenizers whose first 256 ids are the bytes: the stdlib corpus's byte ids are valid (unmerged) input for them.
BYTE_IDS = ("byte", "bpe_qa")


def load_splits(d, vocab_size: int) -> Splits:
  """Train/val shards for config.data `d`; every token id is checked against the model's vocab."""
  tokenizer = get_tokenizer(d.tokenizer, vocab_size) if d.source in ("text", "stdlib", "synthetic") else None
  if d.source == "stdlib":
    train, val = stdlib_corpus(d.val_fraction)
    if d.tokenizer not in BYTE_IDS:  # the corpus comes as byte ids: another tokenizer reads its text
      train, val = (tokenizer.encode_document(bytes(s.astype(np.uint8)).decode("utf-8", "replace"))
                    for s in (train, val))
    return Splits([train], [val])
  if d.source == "synthetic":
    train, val = synthetic_corpus(d, tokenizer)
    check_vocab(f"data.generator={d.generator}", train, vocab_size)
    return Splits([train], [val])
  train = _read_split(d.train_path, "train_path", d.source, tokenizer, vocab_size)
  if d.val_path:
    return Splits(train, _read_split(d.val_path, "val_path", d.source, tokenizer, vocab_size))
  cut = [int(len(s) * (1 - d.val_fraction)) for s in train]  # hold out each shard's tail
  return Splits([s[:c] for s, c in zip(train, cut)], [s[c:] for s, c in zip(train, cut)])


def train_iterator(splits: Splits, d, global_batch: int, process_index: int = 0, process_count: int = 1):
  """Endless iterator of this process's int32 [global_batch / process_count, seq_len + 1] slice of each global
  batch; `get_state`/`set_state` checkpoint it. Global batch i holds shuffled windows i*B .. i*B+B-1 and
  process p reads only its contiguous rows, so any process count sees the same global batches."""
  stride = 1 if d.sampling == "random" else d.seq_len
  windows = grain.MapDataset.source(Windows(splits.train, d.seq_len, stride)).shuffle(seed=d.seed).repeat()
  local = global_batch // process_count
  first = process_index * local

  def rows(i):
    return np.stack([windows[i * global_batch + first + k] for k in range(local)])

  return iter(grain.MapDataset.range(len(windows) // global_batch).map(rows))


def eval_batches(splits: Splits, seq_len: int, batch_size: int, n_batches: int) -> np.ndarray:
  """A fixed set of non-overlapping validation windows spread evenly over the split: [n, batch, seq_len + 1]."""
  w = Windows(splits.val, seq_len, seq_len)
  want = n_batches * batch_size
  if len(w) < batch_size:
    raise DataError(f"validation data holds {len(w)} windows of {seq_len + 1} tokens, fewer than one batch "
                    f"({batch_size}); add data.val_path or raise data.val_fraction")
  n = min(want, len(w)) // batch_size * batch_size
  idx = np.linspace(0, len(w) - 1, n).astype(int)
  return np.stack([w[int(i)] for i in idx]).reshape(-1, batch_size, seq_len + 1)
