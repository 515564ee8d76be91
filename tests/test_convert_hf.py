"""dba-convert on Hugging Face save_pretrained directories (formats/hf.py): GPT-2, Llama (llama3 RoPE scaling, tied
embeddings), Mistral (head_dim != hidden / heads, one KV head, a sliding window) and Qwen2 (q/k/v biases). Each
model is built by transformers from a small config with random weights, its norms and biases randomised too, saved,
converted in, compared by logits with transformers' eager forward (float32, 1e-4), exported back and loaded by
transformers with the same logits. GPT-2 is saved in shards, Qwen2 in bfloat16 (the reference then runs the same
bf16 values in float32). Lengths reach past the llama3 original context and the sliding window, and a check shows
each of those features changes the logits there (so the comparison would catch it missing). Each directory also
holds a tokenizer.json trained here, which becomes the converted run's data.tokenizer; `dba-eval generate` through it
decodes greedily exactly as transformers' generate does."""
import copy
import functools
import importlib.util
import json
import os
import re

import jax
import numpy as np
import pytest

from dba_jax import convert, data, eval_cli, loading, model as model_lib
from dba_jax.config import ConfigError, base_config, validate
from dba_jax.conversion import field_of
from dba_jax.formats import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
T = 32
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             initializer_range=0.1, bos_token_id=1, eos_token_id=2)
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
          "original_max_position_embeddings": 24}
# (config class, its arguments, how it is saved, model fields whose default value changes the logits at length T)
CASES = {
    "gpt2": ("GPT2Config", dict(vocab_size=96, n_positions=T, n_embd=32, n_layer=2, n_head=4, initializer_range=0.1,
                                bos_token_id=0, eos_token_id=0), dict(max_shard_size="40KB"), {}),
    # head_dim 16: RoPE wavelengths 6.3, 20, 63, ...: kept (< 24 / 2), ramped (12 .. 24), divided by the factor
    "llama": ("LlamaConfig", dict(SMALL, hidden_size=64, num_key_value_heads=2, tie_word_embeddings=True,
                                  rope_theta=10000.0, rope_scaling=LLAMA3), {}, {"rope_scaling.kind": "none"}),
    "mistral": ("MistralConfig", dict(SMALL, num_key_value_heads=1, head_dim=16, sliding_window=6), {},
                {"sliding_window": 0}),
    "qwen2": ("Qwen2Config", dict(SMALL, num_key_value_heads=2), dict(dtype="bfloat16"), {}),
}


def _randomise(model, seed: int):
  """Norm weights around 1 and every bias away from 0 (transformers initialises them to 1 and 0)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:  # norm weights (scales) and biases
        p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("weight") else 0.0))


def _hf_logits(path: str, tokens) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
  with torch.no_grad():
    return model.eval()(torch.tensor(tokens)).logits.numpy()


def _save(tmp_path, name: str, seed: int = 0) -> str:
  cls, kwargs, save, _ = CASES[name]
  torch.manual_seed(seed)
  # (a copy: transformers fills in the rope dict it is given)
  model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**copy.deepcopy(kwargs)))
  _randomise(model, seed + 1)
  path = str(tmp_path / f"{name}_hf")
  if save.get("dtype"):
    model = model.to(getattr(torch, save["dtype"]))
  model.save_pretrained(path, **{k: v for k, v in save.items() if k != "dtype"})
  _save_tokenizer(path)
  return path


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
  """A 96-token BPE (sentencepiece-style spaces) trained here by `tokenizers` (no download): <unk> <s> </s> <pad>
  are ids 0-3, BOS added in front of every text, as Llama's tokenizer does."""
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  from dba_jax.arith_qa import arith_qa_text
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
  tok.train_from_iterator([arith_qa_text(2000, 0)], trainers.BpeTrainer(
      vocab_size=96, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False))
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  return tok.to_str()


def _save_tokenizer(path: str):
  """tokenizer.json and tokenizer_config.json beside the weights, as AutoTokenizer.save_pretrained writes them."""
  with open(os.path.join(path, "tokenizer.json"), "w") as f:
    f.write(_tokenizer_json())
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
               "tokenizer_class": "PreTrainedTokenizerFast"}, f)


def _ours(model, c, tokens, **fields) -> np.ndarray:
  """Our logits for the converted params under the model config with `fields` changed (none: as converted)."""
  m = copy.deepcopy(c.model)
  for dotted, value in fields.items():
    node, name = field_of(m, dotted)
    node[name] = value
  logits = model_lib.Model(m, model_lib.abstract(m)[0], model.params)(tokens)
  return np.asarray(logits)[..., :c.model.vocab_size]


@pytest.mark.parametrize("name", list(CASES))
def test_hf_logits_both_ways(tmp_path, capsys, name):
  src = _save(tmp_path, name)
  tokens = np.random.RandomState(0).randint(0, 96, (2, T))
  want = _hf_logits(src, tokens)
  out, back = str(tmp_path / "run"), str(tmp_path / "back")
  assert convert.main(["dba-convert", src, "--out", out]) == 0, capsys.readouterr().err
  model, c = loading.load_model(out)
  got = np.asarray(model(tokens))
  assert c.data.tokenizer == f"hf:{os.path.abspath(src)}"  # the directory's own tokenizer.json, and its specials
  tok = data.get_tokenizer(c.data.tokenizer, c.model.vocab_size)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 96)
  assert got.shape[-1] == 128 and np.all(got[..., 96:] == 0)  # pad_vocab_to's rows: zero, never read
  got = got[..., :96]
  assert np.abs(got - want).max() < TOL, np.abs(got - want).max()
  assert np.abs(want).max() > 1.0  # logits large enough for 1e-4 to mean something
  for field, off in CASES[name][3].items():  # the feature changes the logits at this length
    assert np.abs(_ours(model, c, tokens, **{field: off}) - want).max() > 100 * TOL, field
  assert convert.main(["dba-convert", "--to-torch", out, "--out", back, "--format", "hf"]) == 0, \
      capsys.readouterr().err
  assert np.abs(_hf_logits(back, tokens) - want).max() < TOL
  # the tokenizer went along (AutoTokenizer would pick Qwen2's own class for qwen2, which rebuilds the pre-tokenizer)
  ids = transformers.PreTrainedTokenizerFast.from_pretrained(back)("Q: 25 - 8")["input_ids"]
  assert ids == list(tok.encode_document("Q: 25 - 8")) and ids[0] == 1, ids
  written = json.load(open(os.path.join(back, "config.json")))
  assert written["architectures"] == [json.load(open(os.path.join(src, "config.json")))["architectures"][0]]
  assert written["bos_token_id"] == CASES[name][1]["bos_token_id"]  # the recorded config's other entries kept


def test_transformers_4_and_5_configs_read_alike():
  """4.x writes rope_theta + rope_scaling ("type" or "rope_type"), 5.x rope_parameters: the same model fields."""
  v5 = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
        "rope_parameters": {"rope_theta": 500000.0, **LLAMA3}}
  v4 = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "rope_theta": 500000.0,
        "rope_scaling": {**{k: v for k, v in LLAMA3.items() if k != "rope_type"}, "type": "llama3"}}
  fields = hf.model_fields(v5, "llama", "config.json")
  assert fields == hf.model_fields(v4, "llama", "config.json")
  assert (fields["rope_base"], fields["rope_scaling.kind"], fields["rope_scaling.original_max_positions"]) == \
      (500000.0, "llama3", 24)


@pytest.mark.parametrize("change,error", [
    ({"architectures": ["GemmaForCausalLM"]}, "architectures ['GemmaForCausalLM'] not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope type 'yarn' is not supported"),
    ({"attention_bias": True}, "not supported: attention_bias=True"),
    ({"hidden_act": "gelu"}, "not supported: hidden_act='gelu'"),
])
def test_unsupported_configs_stop_with_one_line(tmp_path, capsys, change, error):
  cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16, "hidden_size": 8,
         "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
  src = tmp_path / "hf"
  src.mkdir()
  (src / "config.json").write_text(json.dumps({**cfg, **change}))
  (src / "model.safetensors").write_bytes(b"")  # never read: the config is refused first
  assert convert.main(["dba-convert", str(src), "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("dba-convert: error: ") and error in err[0], err
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("fields,error", [
    ({"attn_kind": "selective", "sliding_window": 8}, "model.sliding_window=8 is not supported by model.attn_kind="
                                                      "'selective'"),
    ({"attn_kind": "dba", "dba.sem_dim": 8, "dba.geo_dim": 8, "qkv_bias": True}, "model.qkv_bias=True is not "
                                                                                  "supported by model.attn_kind='dba'"),
    ({"positions": "learned", "rope_scaling.kind": "linear"}, "model.rope_scaling.kind='linear' needs "
                                                              "model.positions='rope'"),
    ({"rope_scaling.kind": "llama3", "rope_scaling.low_freq_factor": 4.0}, "high_freq_factor=4.0 must exceed"),
])
def test_hf_model_fields_are_refused_where_nothing_applies_them(fields, error):
  """qkv_bias, rope_scaling and sliding_window live in standard attention; elsewhere they would do nothing."""
  c = base_config()
  for dotted, value in fields.items():
    node, name = field_of(c.model, dotted)
    node[name] = value
  with pytest.raises(ConfigError, match=re.escape(error)):
    validate(c)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_greedy_decoding_equals_transformers(tmp_path, capsys, name):
  """`dba-eval generate` on the converted model (KV cache, float32, greedy; the prompt read by the HF directory's
  own tokenizer.json) equals transformers' generate(do_sample=False) on the same prompt ids, token for token:
  llama with llama3 scaling and GQA (2 kv heads), mistral with one kv head, head_dim 16 and a window of 6. 8 prompt
  + 24 new tokens reach past llama3's original context (24) and many windows. No stop token on either side (--stop
  999 is never generated; transformers' eos off), so all 24 tokens are compared."""
  src = _save(tmp_path, name, seed={"llama": 6}.get(name, 0))  # a seed whose random llama does not repeat at once
  out = str(tmp_path / "run")
  assert convert.main(["dba-convert", src, "--out", out]) == 0, capsys.readouterr().err
  capsys.readouterr()
  assert eval_cli.main(["generate", "--checkpoint", out, "--prompt", "Q: 25 - 8", "--max-new", "24", "--cache",
                        "float32", "--stop", "999"]) == 0
  g = json.loads(capsys.readouterr().out)
  # README's continued-training config: the converted run's model and tokenizer (dba-train then checks init_from)
  spec = importlib.util.spec_from_file_location("from_workdir", os.path.join(os.path.dirname(__file__), "..",
                                                                            "configs", "from_workdir.py"))
  preset = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(preset)
  c = preset.get_config(out)
  assert c.model.to_dict() == loading.read_config(out).model.to_dict()
  assert c.data.tokenizer == f"hf:{os.path.abspath(src)}"
  prompt = g["prompt_tokens"]
  assert prompt[0] == 1 and len(prompt) == 8  # BOS from the tokenizer's post-processor
  ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
  with torch.no_grad():
    want = ref.eval().generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                               eos_token_id=None, pad_token_id=3)[0, len(prompt):].tolist()
  assert len(want) == 24 and g["tokens"] == want, (g["tokens"], want)
  if name == "llama":  # the same ids given as ids decode the same; an id the model lacks is one line
    assert eval_cli.main(["generate", "--checkpoint", out, "--prompt-ids", ",".join(map(str, prompt)), "--max-new",
                          "24", "--cache", "float32", "--stop", "999"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == want
    assert eval_cli.main(["generate", "--checkpoint", out, "--prompt-ids", "1,96"]) == 2
    assert "--prompt-ids 96 is not a token id of this model (0 to 95)" in capsys.readouterr().err
  # Random tied-embedding models repeat tokens; this llama's output still switches token 4 times, three of them past
  # the original context (24 positions), and mistral's holds 13 distinct tokens
  assert len(set(want)) >= 5


def test_a_tokenizer_the_user_chose_is_kept():
  """The directory's tokenizer.json becomes data.tokenizer only when the config leaves data.tokenizer alone."""
  saved = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
           hf.TOKENIZER: "hf:/models/llama"}
  assert hf.config_from_saved(saved, base_config()).data.tokenizer == "hf:/models/llama"
  c = base_config()
  c.data.tokenizer = "bpe_qa"
  assert hf.config_from_saved(saved, c).data.tokenizer == "bpe_qa"
  assert hf.config_from_saved({k: v for k, v in saved.items() if k != hf.TOKENIZER},
                              base_config()).data.tokenizer == "byte"


def test_bf16_weights_kept_and_written_in_pieces(tmp_path, capsys, monkeypatch):
  """`--dtype bf16`: the bf16 file's weights are stored as they are (model.param_dtype=bfloat16; the forward
  promotes them, so the logits equal transformers' float32 forward of the same bf16 values), exported back
  bit-exact as BF16, and widened by dba-train's train.init_from. The checkpoint writer's pieces are made tiny here so
  that every stacked array is written in several row chunks, and read back whole."""
  from dba_jax import ckpt, torch_io, train
  writes = []
  monkeypatch.setattr(ckpt._Piecewise, "PIECE", 2048)
  original = ckpt._Piecewise._write
  monkeypatch.setattr(ckpt._Piecewise, "_write", lambda self, t, v: writes.append(v.shape) or original(self, t, v))
  src = _save(tmp_path, "qwen2")
  tokens = np.random.RandomState(0).randint(0, 96, (2, T))
  out, back = str(tmp_path / "run"), str(tmp_path / "back")
  assert convert.main(["dba-convert", src, "--out", out, "--dtype", "bf16"]) == 0, capsys.readouterr().err
  assert any(s[0] < 2 for s in writes if len(s) == 3)  # stacked [layers, ...] arrays went in pieces
  model, c = loading.load_model(out)
  assert c.model.param_dtype == "bfloat16"
  assert {str(x.dtype) for x in jax.tree.leaves(model.params)} == {"bfloat16"}
  got = np.asarray(model(tokens))[..., :96]
  assert np.abs(got - _hf_logits(src, tokens)).max() < TOL
  assert convert.main(["dba-convert", "--to-torch", out, "--out", back, "--format", "hf"]) == 0
  ours, theirs = (torch_io.read_safetensors(os.path.join(d, "model.safetensors"))[0] for d in (back, src))
  assert set(ours) == set(theirs) and all(ours[k].dtype == torch_io.BF16 for k in ours)
  assert all(np.array_equal(ours[k].view(np.int16), theirs[k].view(np.int16)) for k in ours)
  assert json.load(open(os.path.join(back, "config.json")))["dtype"] == "bfloat16"
  assert convert.main(["dba-convert", src, "--out", str(tmp_path / "x"), "--dtype", "bf16",
                                        "--to-torch", out]) == 2
  assert "--dtype applies to an import" in capsys.readouterr().err
  c.train.init_from = out
  with pytest.raises(ConfigError, match="param_dtype='bfloat16': dba-train trains float32"):
    train.train(c, str(tmp_path / "t"))
