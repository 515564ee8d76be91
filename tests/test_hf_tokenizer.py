"""data.tokenizer=hf:PATH (issue 27): a Hugging Face tokenizer.json read offline by the `tokenizers` library drives
training data, `dba-eval ppl` / `generate` and LatentWire's sides; its special tokens come from the files beside it.
Every tokenizer here is trained in tmp_path by `tokenizers` itself: nothing is downloaded."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

import dba_jax  # noqa: E402
from dba_jax import data, eval_cli, main as train_cli  # noqa: E402
from dba_jax.arith_qa import arith_qa_text  # noqa: E402
from dba_jax.config import ConfigError, base_config, validate  # noqa: E402
from dba_jax.latentwire import sides, tasks  # noqa: E402
from dba_jax.latentwire.train import bridge_config  # noqa: E402
from dba_jax.tokenizers import HFTokenizer  # noqa: E402
from helpers import tiny, untrained_run  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CORPUS = arith_qa_text(6000, 0)  # questions, answers, digits, punctuation and newlines: what LatentWire reads

# A tiny tmp config for an in-process dba-train: the data path and tokenizer come as overrides.
CONFIG = '''
from dba_jax.config import base_config

def get_config():
  c = base_config()
  m = c.model
  m.d_model, m.n_layers, m.n_heads, m.d_ff, m.max_seq_len, m.vocab_size = 32, 2, 4, 64, 32, 128
  c.data.source, c.data.seq_len = "text", 16
  t = c.train
  t.batch_size, t.steps, t.log_every, t.eval_every, t.ckpt_every, t.eval_batches = 8, 2, 1, 2, 2, 1
  c.optim.warmup_steps = 2
  return c
'''


def _metaspace_bpe(vocab: int = 120):
  """A sentencepiece-style BPE (Llama 2 / Mistral: ▁ for spaces, BOS added by the post-processor)."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
  tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False))
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
  return tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A save_pretrained-style tokenizer directory: tokenizer.json, tokenizer_config.json naming BOS / EOS (EOS as a
  saved AddedToken) and no pad, special_tokens_map.json adding the pad."""
  d = tmp_path_factory.mktemp("tok")
  _metaspace_bpe().save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": False, "__type": "AddedToken"},
       "pad_token": None, "tokenizer_class": "PreTrainedTokenizerFast"}))
  (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
  return d


def test_round_trip_and_special_tokens_from_the_files(hf_dir):
  tok = data.get_tokenizer(f"hf:{hf_dir}", 128)
  raw = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
  vocab = raw.get_vocab()
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (vocab["<s>"], vocab["</s>"], vocab["<pad>"])
  assert tok.specials == {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}
  assert tok.vocab_size == max(vocab.values()) + 1 <= 120
  text = CORPUS[:400]
  ids = tok.encode(text)
  assert ids.dtype == np.uint32 and len(ids) < len(text) / 2  # merges were learned
  assert tok.decode(ids) == text
  assert list(ids) == raw.encode(text, add_special_tokens=False).ids
  # A document is framed as the tokenizer's post-processor frames one: BOS first, no EOS; a prompt the same.
  assert tok.prefix_ids == (tok.bos_id,) and tok.suffix_ids == ()
  np.testing.assert_array_equal(tok.encode_document(text), [tok.bos_id, *ids])
  assert tok.stop_ids == (tok.eos_id,)
  # The file itself names the same tokenizer; a generation_config.json beside it adds its eos ids to the stop ids.
  assert HFTokenizer(str(hf_dir / "tokenizer.json")).bos_id == tok.bos_id
  (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_id, 7]}))
  try:
    assert HFTokenizer(str(hf_dir)).stop_ids == (tok.eos_id, 7)
  finally:
    (hf_dir / "generation_config.json").unlink()


def test_stdlib_and_synthetic_sources_are_read_by_the_tokenizer(hf_dir, monkeypatch):
  """The stdlib corpus comes as byte ids: an hf: tokenizer reads its text (bytes are not its ids)."""
  text = CORPUS[:3000]
  as_bytes = np.frombuffer(text.encode(), np.uint8).astype(np.uint16)
  monkeypatch.setattr(data, "stdlib_corpus", lambda val_fraction: (as_bytes, as_bytes[:500]))
  c = base_config().data
  c.tokenizer = f"hf:{hf_dir}"
  tok = data.get_tokenizer(c.tokenizer)
  np.testing.assert_array_equal(data.load_splits(c, 128).train[0], tok.encode_document(text))
  c.source, c.generator, c.synthetic_chars = "synthetic", "arith_qa", 2000
  np.testing.assert_array_equal(data.load_splits(c, 128).train[0], tok.encode_document(arith_qa_text(2000, 0)))


def test_byte_level_tokenizer_round_trips_any_text(tmp_path):
  """GPT-2 / Llama 3 / Qwen2 style: byte-level pieces, no post-processor framing, exact on any UTF-8 text."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>",
                                                              "eos_token": "<|endoftext|>"}))
  hf = data.get_tokenizer(f"hf:{tmp_path}")
  text = "naïve café — 日本語 ✓\n\tQ: 12 + 30?  A: 42 #### 42\n"
  assert hf.decode(hf.encode(text)) == text
  assert hf.prefix_ids == () and hf.bos_id == hf.eos_id == 0 and hf.stop_ids == (0,)
  np.testing.assert_array_equal(hf.encode_document(text), hf.encode(text))
  # GPT-2's <|endoftext|> sits after the merges: a model cut below it is told which special token falls outside.
  tok.add_special_tokens(["<|eot|>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot|>"}))
  with pytest.raises(data.DataError, match=rf"^data\.tokenizer='hf:{tmp_path}' has 301 ids but model\.vocab_size=300 "
                     r"\(eos '<\|eot\|>' is id 300\)$"):
    data.get_tokenizer(f"hf:{tmp_path}", 300)


def test_framing_and_specials_equal_transformers(hf_dir):
  transformers = pytest.importorskip("transformers")
  ref = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  tok = data.get_tokenizer(f"hf:{hf_dir}")
  text = CORPUS[:300]
  assert list(tok.encode_document(text)) == ref(text)["input_ids"]
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
  ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
  assert tok.decode(ids) == ref.decode(ids)  # special tokens kept, as transformers' default


def test_train_ppl_generate_and_latentwire_sides(hf_dir, tmp_path, capsys):
  """dba-train on a text file, dba-eval ppl on another, dba-eval generate and LatentWire's LM, all through hf:."""
  train_txt, val_txt = tmp_path / "train.txt", tmp_path / "val.txt"
  train_txt.write_text(CORPUS)
  val_txt.write_text(arith_qa_text(1200, 5))
  (tmp_path / "tiny.py").write_text(CONFIG)
  wd = tmp_path / "run"
  name = f"hf:{hf_dir}"
  assert train_cli.main(["dba-train", f"--config={tmp_path / 'tiny.py'}", f"--config.data.tokenizer={name}",
                         f"--config.data.train_path={train_txt}", f"--config.data.val_path={val_txt}",
                         f"--workdir={wd}"]) == 0, capsys.readouterr().err
  tok = data.get_tokenizer(name)
  _, c = dba_jax.load_model(str(wd))
  assert c.data.tokenizer == name
  splits = data.load_splits(c.data, c.model.vocab_size)  # what the run trained on: the file as one document
  np.testing.assert_array_equal(splits.train[0], tok.encode_document(CORPUS))
  rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
  capsys.readouterr()

  assert eval_cli.main(["ppl", "--checkpoint", str(wd)]) == 0
  r = json.loads(capsys.readouterr().out)
  val = tok.encode_document(val_txt.read_text())
  assert r["scored_tokens"] == (len(val) - 1) // 16 * 16 and 1 < r["ppl"] < 200

  prompt = "Q: Tom has 12 apples"
  assert eval_cli.main(["generate", "--checkpoint", str(wd), "--prompt", prompt, "--max-new", "6",
                        "--cache", "float32"]) == 0
  g = json.loads(capsys.readouterr().out)
  assert g["stop_tokens"] == [tok.eos_id] and g["completion"] == tok.decode(g["tokens"])
  with_bos = np.asarray(tok.encode_document(prompt, end=False), np.int32)
  assert g["prompt_tokens"] == [tok.bos_id, *tok.encode(prompt)] == list(with_bos)
  model, _ = dba_jax.load_model(str(wd))
  logits = model._apply(model.params, jnp.asarray(with_bos[None]))[0, -1, :c.model.vocab_size]
  first = int(jnp.argmax(logits))  # the prompt went in with its BOS: the first new token is the full forward's
  assert g["tokens"][0] == first or (first == tok.eos_id and g["tokens"] == [])

  lm = sides.load_lm(str(wd), "target")
  q = lm.encode_prompt("Q: 1 + 2?")
  assert q[0] == tok.bos_id and list(q[1:]) == list(lm.encode("Q: 1 + 2?"))
  assert tok.eos_id in lm.stop_ids and all("\n" in tok.decode([i]) for i in lm.stop_ids if i != tok.eos_id)
  task = tasks.from_config(bridge_config("cpu").data)
  b = sides.bridge_batch(task, lm, lm, tasks.as_examples([("Tom has 1 apple. How many?", "1 #### 1")]), 32, 24, 32)
  assert b["src_ids"][0, 0] == b["teacher_ids"][0, 0] == tok.bos_id
  assert tok.bos_id not in b["tgt_ids"][0]  # what follows the soft tokens continues the sequence: no BOS inside
  out = sides.Speaker(lm, 64).greedy(q, 4)
  assert out["text"] == tok.decode(out["ids"]) and not set(out["ids"]) & set(lm.stop_ids)


def _bad_config(d):
  d.mkdir()
  _metaspace_bpe().save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text("{not json")


def _missing_special(d):
  d.mkdir()
  _metaspace_bpe().save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))


@pytest.mark.parametrize("make, why", [
    (lambda d: None, "{p} does not exist"),
    (lambda d: d.mkdir(), "{p} holds no tokenizer.json"),
    (lambda d: d.write_text('{"model": 3}'), "{p} is not a readable tokenizer.json ("),
    (_bad_config, "{p}/tokenizer_config.json is not readable JSON (Expecting property name"),
    (_missing_special,
     "bos_token '<|begin_of_text|>' (tokenizer_config.json) is not in {p}/tokenizer.json's vocabulary"),
])
def test_bad_tokenizer_files_are_one_line(make, why, tmp_path):
  p = tmp_path / "nope"
  make(p)
  with pytest.raises(data.DataError) as e:
    data.get_tokenizer(f"hf:{p}")
  assert str(e.value).startswith(f"data.tokenizer='hf:{p}': " + why.format(p=p)) and "\n" not in str(e.value)


def test_config_and_commands_refuse_in_one_line(hf_dir, tmp_path, capsys):
  c = base_config()
  c.data.tokenizer = f"hf:{hf_dir}"
  validate(c)
  for bad in ("hf:", "sentencepiece"):
    c.data.tokenizer = bad
    with pytest.raises(ConfigError, match=r"data\.tokenizer=.* is not one of \['byte', 'gpt2', 'bpe_qa', 'hf:PATH'\]"):
      validate(c)
  # A model narrower than the tokenizer: dba-train stops before writing anything.
  (tmp_path / "tiny.py").write_text(CONFIG)
  (tmp_path / "t.txt").write_text(CORPUS[:2000])
  wd = tmp_path / "run"
  argv = ["dba-train", f"--config={tmp_path / 'tiny.py'}", f"--config.data.tokenizer=hf:{hf_dir}",
          f"--config.data.train_path={tmp_path / 't.txt'}", "--config.model.vocab_size=8", f"--workdir={wd}"]
  assert train_cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and not (wd / "config.json").exists()
  assert err.startswith(f"dba-train: error: data.tokenizer='hf:{hf_dir}' has ")
  assert err.endswith(" has 120 ids but model.vocab_size=8")
  # A checkpoint whose tokenizer has gone: dba-eval generate says so in one line.
  gone = tiny("standard", vocab_size=128)
  gone.data.tokenizer = f"hf:{tmp_path / 'moved'}"
  run = untrained_run(tmp_path / "gone", validate(gone))
  assert eval_cli.main(["generate", "--checkpoint", run, "--prompt", "hi", "--max-new", "2"]) == 2
  err = capsys.readouterr().err.strip()
  assert err == f"dba-eval: error: data.tokenizer='hf:{tmp_path / 'moved'}': {tmp_path / 'moved'} does not exist"
