"""LatentWire between two converted Hugging Face models (issue 28): a small random Llama (sentencepiece-style BPE that
opens every text with <s>) as the source and a small random GPT-2 (its own byte-level BPE, no BOS, <|endoftext|>)
as the target, each saved by transformers with a tokenizer.json trained here and converted by dba-convert. The
bridge trains a few steps on a GSM8K-style jsonl task with a configured prompt and dba-eval latentwire runs every
baseline, joint rescoring included."""
import json
import os

import numpy as np
import pytest

from dba_jax import arith_qa, convert, eval_cli
from dba_jax.latentwire import sides, tasks
from dba_jax.latentwire import train as lw_train

from test_convert_hf import _randomise, _save

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def _gpt2(tmp_path) -> str:
  """A GPT-2 with a byte-level BPE of 128 ids trained here (no BOS; <|endoftext|> is id 0 and its EOS)."""
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([arith_qa.arith_qa_text(3000, 1)], trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=128, n_embd=32, n_layer=2, n_head=4,
                                initializer_range=0.1, bos_token_id=0, eos_token_id=0)
  model = transformers.AutoModelForCausalLM.from_config(cfg)
  _randomise(model, 2)
  path = str(tmp_path / "gpt2_hf")
  model.save_pretrained(path)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "tokenizer_class": "GPT2TokenizerFast"}, f)
  return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("lwhf")
  out = {}
  for name, hf_dir in (("llama", _save(root, "llama")), ("gpt2", _gpt2(root))):
    out[name] = str(root / f"{name}_run")
    bf16 = ["--dtype", "bf16"] if name == "llama" else []  # a frozen side held in bf16, as a 7B source would be
    assert convert.main(["dba-convert", hf_dir, "--out", out[name], *bf16]) == 0
  rows = []
  for p in tasks.synthetic_problems(24, 3, "train"):
    q, a = arith_qa.render(p)
    rows.append({"question": q, "answer": a.split("####")[0].strip() + "\n#### " + arith_qa.gold(a)})
  files = {}
  for split, part in (("train", rows[:16]), ("dev", rows[16:20]), ("test", rows[20:])):
    files[split] = str(root / f"{split}.jsonl")
    with open(files[split], "w") as f:
      f.write("".join(json.dumps(r) + "\n" for r in part))
  return out, files, root


def _config(src, tgt, files, **over):
  c = lw_train.bridge_config("cpu")
  c.source, c.target = src, tgt
  d = c.data
  d.task, d.prompt, d.stub = "gsm8k", "Q: {question}\nA:", "\nA:"
  d.train_path, d.dev_path, d.test_path = files["train"], files["dev"], files["test"]
  d.src_len, d.tgt_len, d.prompt_len, d.max_new, d.dev_questions = 96, 48, 80, 4, 2
  c.train.steps, c.train.eval_every, c.train.ckpt_every = 3, 3, 3
  for k, v in over.items():
    sec, key = k.split("__")
    c[sec][key] = v
  return c


def test_converted_sides_use_their_own_tokenizers(converted):
  """Llama opens texts with <s> (the bridged input starts with its embedding too); GPT-2 has no BOS; each stops at
  its EOS; a gsm8k batch aligns the teacher with the student exactly."""
  (runs, files, _), task = converted, None
  src, tgt = sides.load_lm(runs["llama"], "source"), sides.load_lm(runs["gpt2"], "target")
  assert src.open_ids.tolist() == [1] and src.encode_prompt("Q: 3")[0] == 1 and 2 in src.stop_ids
  assert tgt.open_ids.tolist() == [] and tgt.tok.eos_id == 0 and 0 in tgt.stop_ids
  assert tgt.m.positions == "learned" and src.m.positions == "rope"
  assert str(src.model.params["embed"].dtype) == "bfloat16" and str(tgt.model.params["embed"].dtype) == "float32"
  task = tasks.Task(_config(runs["llama"], runs["gpt2"], files).data)
  exs = task.examples("train", 3)
  b = sides.bridge_batch(task, src, tgt, exs, 96, 48, 80)
  for i, ex in enumerate(exs):
    assert b["src_ids"][i, 0] == 1 and src.tok.decode(b["src_ids"][i][b["src_mask"][i]][1:]) == task.prompt(ex)
    assert tgt.tok.decode(b["tgt_ids"][i][b["label_mask"][i]]) == ex.answer + "\n\n"
    off = b["teacher_off"][i]
    assert tgt.tok.decode(b["teacher_ids"][i, :off]) == task.head(ex)
  br = lw_train.Bridge(lw_train.validate(_config(runs["llama"], runs["gpt2"], files)), src, src)
  soft = np.zeros((2, 4, src.width), np.float32)
  assert np.asarray(br._open(br.frozen["tgt"], soft)).shape == (2, 5, src.width)  # <s> then the K soft tokens


@pytest.mark.slow
def test_llama_to_gpt2_bridge_trains_and_every_baseline_runs(converted, capsys):
  runs, files, root = converted
  c = _config(runs["llama"], runs["gpt2"], files)
  out = lw_train.train(c, str(root / "bridge"), quiet=True)
  assert out["steps"] == 3 and np.isfinite(out["loss"]) and out["best_step"] == 3
  man = root / "manifest.json"
  man.write_text(json.dumps({"source": runs["llama"], "target": runs["gpt2"], "bridges": [str(root / "bridge")],
                             "questions": 3, "max_new": 4, "source_max_new": 4, "wire_formats": ["fp32", "q8"],
                             "batch_size": 2}))
  res = root / "r.json"
  assert eval_cli.main(["latentwire", "--manifest", str(man), "--out", str(res)]) == 0, capsys.readouterr().err
  r = json.loads(res.read_text())
  assert r["task"] == "gsm8k" and r["questions"] == 3 and r["bridges"][0]["best"]
  assert set(r["methods"]) == {"target_text", "source_text", "cascade", "joint_text", "bridge_k4_fp32",
                               "bridge_k4_q8", "budget_k4", "text_soft_k4", "joint_bridge_k4"}
  for name, m in r["methods"].items():
    assert m["n"] == 3 and 0 <= m["exact_match"] <= m.get("oracle_exact_match", 1), name
  assert r["kv_bytes_per_token"]["target"] == r["kv_bytes_per_token"]["target_formula"]
  # the bridged target's input: <no BOS for GPT-2> + 4 soft tokens + the stub's tokens
  stub = sides.load_lm(runs["gpt2"], "target").encode("\nA:")
  assert r["methods"]["bridge_k4_fp32"]["target_input_tokens"] == 4 + len(stub)
