"""Token readers, the embedded corpus and the grain pipeline."""
import numpy as np
import pytest

from dba_jax import data
from dba_jax.config import base_config


def test_bin_round_trip(tmp_path):
  tokens = np.random.default_rng(0).integers(0, 50257, 1000).astype(np.uint16)
  path = str(tmp_path / "shard.bin")
  data.write_bin(path, tokens)
  np.testing.assert_array_equal(data.read_bin(path), tokens)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_npy_round_trip(tmp_path, dtype):
  tokens = np.random.default_rng(1).integers(0, 60000, 500).astype(dtype)
  path = str(tmp_path / "tokens.npy")
  np.save(path, tokens)
  got = data.read_npy(path)
  assert got.dtype == dtype
  np.testing.assert_array_equal(got, tokens)


def test_bin_wrong_magic(tmp_path):
  path = tmp_path / "bad.bin"
  data.write_bin(str(path), np.arange(10))
  raw = bytearray(path.read_bytes())
  raw[0:4] = np.int32(12345).tobytes()
  path.write_bytes(bytes(raw))
  with pytest.raises(data.DataError, match=r"bad\.bin: wrong magic 12345"):
    data.read_bin(str(path))


def test_bin_truncated(tmp_path):
  path = tmp_path / "cut.bin"
  data.write_bin(str(path), np.arange(100))
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(data.DataError, match=r"cut\.bin: header says 100 tokens .*truncated"):
    data.read_bin(str(path))


def test_npy_truncated_and_wrong_dtype(tmp_path):
  path = tmp_path / "cut.npy"
  np.save(path, np.arange(1000, dtype=np.uint16))
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(data.DataError, match=r"cut\.npy"):
    data.read_npy(str(path))
  np.save(tmp_path / "f.npy", np.zeros(10, np.float32))
  with pytest.raises(data.DataError, match=r"f\.npy: expected a 1-D uint16 or uint32"):
    data.read_npy(str(tmp_path / "f.npy"))


def test_token_id_beyond_vocab(tmp_path):
  tokens = np.zeros(300, np.uint16)
  tokens[217] = 300
  np.save(tmp_path / "t.npy", tokens)
  c = base_config().data
  c.source, c.train_path = "npy", str(tmp_path / "t.npy")
  with pytest.raises(data.DataError, match=r"t\.npy: token id 300 at index 217 is >= model.vocab_size=256"):
    data.load_splits(c, 256)


def test_missing_file_names_the_key(tmp_path):
  c = base_config().data
  c.source, c.train_path = "bin", str(tmp_path / "nope_*.bin")
  with pytest.raises(data.DataError, match=r"nope_\*\.bin.*data\.train_path"):
    data.load_splits(c, 256)


def test_stdlib_corpus_split_is_disjoint_and_stable():
  files = data.stdlib_files()
  assert len(files) > 300 and not any("/test/" in f or f.startswith("test/") for f in files)
  val = [f for f in files if data.is_val_file(f, 0.05)]
  assert 0.01 < len(val) / len(files) < 0.12
  train, val_tokens = data.stdlib_corpus(0.05)
  assert train.size > 5_000_000 and val_tokens.size > 100_000
  train2, _ = data.stdlib_corpus(0.05)
  np.testing.assert_array_equal(train, train2)


def test_windows_and_resumable_order():
  shards = [np.arange(100), np.arange(1000, 1050)]
  w = data.Windows(shards, seq_len=9, stride=10)
  assert len(w) == 10 + 5  # no window crosses a shard boundary
  np.testing.assert_array_equal(w[10], np.arange(1000, 1010))
  c = base_config().data
  c.seq_len, c.sampling, c.seed = 9, "contiguous", 3
  splits = data.Splits(shards, shards)
  it = data.train_iterator(splits, c, 4)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  rest = [next(it) for _ in range(5)]
  it2 = data.train_iterator(splits, c, 4)
  it2.set_state(state)
  for a, b in zip(rest, [next(it2) for _ in range(5)]):
    np.testing.assert_array_equal(a, b)
  assert first[0].shape == (4, 10) and first[0].dtype == np.int32
  c.seed = 4  # and the seed matters
  assert not np.array_equal(next(data.train_iterator(splits, c, 4)), first[0])


def test_synthetic_source_is_seeded_and_mixes_stdlib_in_the_tokenizer_asked():
  c = base_config()
  c.data.source, c.data.generator, c.data.synthetic_chars, c.data.mix_stdlib = "synthetic", "passkey", 4000, 0.25
  a, b = data.load_splits(c.data, 256), data.load_splits(c.data, 256)
  np.testing.assert_array_equal(a.train[0], b.train[0])
  text = bytes(a.train[0].astype(np.uint8)).decode()
  c.data.mix_stdlib = 0.0
  alone = data.load_splits(c.data, 256).train[0]
  np.testing.assert_array_equal(a.train[0][:len(alone)], alone)  # the documents, then stdlib: a quarter of the whole
  assert "KEY-" in text and len(a.train[0]) == len(alone) + int(len(alone) * 0.25 / 0.75)
  stdlib = data.stdlib_corpus(c.data.val_fraction)[0]
  np.testing.assert_array_equal(a.train[0][len(alone):], stdlib[:len(a.train[0]) - len(alone)])
  c.data.mix_stdlib = 0.25
  c.data.seed = 1
  assert not np.array_equal(data.load_splits(c.data, 256).train[0][:500], a.train[0][:500])
  c.data.generator = "nope"
  with pytest.raises(data.DataError, match="data.generator='nope'"):
    data.load_splits(c.data, 256)
