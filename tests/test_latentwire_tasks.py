"""LatentWire tasks, batched decoding, rescoring and early stopping (issue 28): the fact-level synthetic split, the
GSM8K / SQuAD jsonl loaders and their scores, batched greedy decoding equal to one-at-a-time decoding token for
token, log-likelihood scoring against a float64 reference, the joint-rescoring rows, and early stopping with the best
state kept and read back."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from dba_jax import arith_qa
from dba_jax.evals import latentwire as harness
from dba_jax.latentwire import sides, tasks
from dba_jax.latentwire import train as lw_train

from test_latentwire import _cpu_config, _lm_config, _write_lm


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
  root = tmp_path_factory.mktemp("lwt")
  src = _write_lm(root / "source", _lm_config("byte", 256, 32), 0)
  tgt = _write_lm(root / "target", _lm_config("bpe_qa", 384, 24, n_kv=2), 1)
  return src, tgt


# ---------------------------------------------------------------------------------------------- synthetic

def test_fact_level_split_holds_out_whole_facts():
  """No (op, a, b) of a dev or test question is in the bridge's training pool or the LMs' corpus, in any wording;
  dev and test facts differ too (early stopping never selects on a test fact)."""
  train = tasks.synthetic_problems(20_000, 0, "train")
  dev, test = tasks.synthetic_problems(300, 1, "dev"), tasks.synthetic_problems(500, 12345, "test")
  train_facts = {arith_qa.fact(p) for p in train}
  dev_facts, test_facts = {arith_qa.fact(p) for p in dev}, {arith_qa.fact(p) for p in test}
  assert not train_facts & test_facts and not train_facts & dev_facts and not dev_facts & test_facts
  assert len(test_facts) > 100 and len(dev_facts) > 100 and len(train_facts) > 3000  # not vacuous
  assert all(arith_qa.fact_split(arith_qa.fact(p)) == "test" for p in dev + test)  # arith_qa's held-out facts, halved
  assert len(tasks.facts("dev")) + len(tasks.facts("test")) == len({arith_qa.fact(p) for p in (
      (t, 0, 0, a, b) for t in (0, 2) for a in range(1, 50) for b in range(1, 50) if t == 0 or a >= b)
      if arith_qa.fact_split(arith_qa.fact(p)) == "test"})
  corpus = arith_qa.arith_qa_text(50_000, 3)
  assert not any(f" {a} {op} {b} = " in corpus for op, a, b in dev_facts | test_facts)
  assert sum(f" {a} {op} {b} = " in corpus for op, a, b in list(train_facts)[:200]) > 10  # the probe finds facts
  exs = tasks.Task({"task": "synthetic"}).examples("test", 5, 12345)
  assert exs == tasks.Task({"task": "synthetic"}).examples("test", 5, 12345)
  assert [ex.question for ex in exs] == [arith_qa.render(p)[0] for p in test[:5]]


# ------------------------------------------------------------------------------------------------- files

def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_gsm8k_and_squad_files_load_prompt_and_score(tmp_path):
  g = _jsonl(tmp_path / "g.jsonl", [{"question": "Tom has 3 pens and buys 4. How many?",
                                     "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
                                    {"question": "Big sums?", "answer": "#### 1,234"}])
  t = tasks.Task({"task": "gsm8k", "train_path": g, "test_path": g})
  ex = t.examples("test")
  assert [e.golds for e in ex] == [("7",), ("1234",)] and ex[0].answer == " 3 + 4 = <<3+4=7>>7\n#### 7"
  assert t.prompt(ex[0]).endswith("Problem:\nTom has 3 pens and buys 4. How many?\n\nAnswer:")
  assert t.prompt(ex[0]) == t.head(ex[0]) + t.stub and not t.stops_at_newline
  assert t.score(" 3 + 4 = 7\n#### 7", ex[0]) == (True, 1.0) and t.score("the answer is 7", ex[0])[0] is False
  assert t.score("#### 1234", ex[1])[0] and t.finished("x\n#### 7\n") and not t.finished("x\n#### 7")
  s = _jsonl(tmp_path / "s.jsonl", [
      {"context": "The Eiffel Tower is in Paris.", "question": "Where is the tower?",
       "answers": {"text": ["Paris", "in Paris, France"], "answer_start": [24, 21]}},
      {"context": "c", "question": "q", "answers": ["the Big  Apple!"]}])
  t = tasks.Task({"task": "squad", "test_path": s, "prompt": "{context} Q: {question}\nA:", "stub": "\nA:"})
  ex = t.examples("test", 2)
  assert t.prompt(ex[0]) == "The Eiffel Tower is in Paris. Q: Where is the tower?\nA:"
  assert t.score(" paris.\nmore", ex[0]) == (True, 1.0)  # first line, normalised
  em, f1 = t.score("Paris France", ex[0])  # vs "in paris france": P 2/2, R 2/3
  assert not em and f1 == pytest.approx(0.8)
  assert t.score("big apple", ex[1]) == (True, 1.0) and tasks.normalize("The  Big, Apple!") == "big apple"
  assert t.extract(" Big Apple\n") == t.extract("the big apple") and t.has_f1


@pytest.mark.parametrize("kind, rows, error", [
    ("gsm8k", None, "no such file"),
    ("gsm8k", "{not json\n", "line 1: not JSON"),
    ("gsm8k", [{"question": "q"}], "line 1: no 'answer' field"),
    ("gsm8k", [{"question": "q", "answer": "42"}], "no '#### <number>' line"),
    ("squad", [{"context": "c", "question": "q", "answers": {"text": []}}], "'answers' must be"),
    ("squad", [{"context": "c", "question": ""}], "'question' is not a non-empty string"),
    ("squad", "\n\n", "no examples"),
])
def test_bad_task_files_are_one_line_errors(tmp_path, kind, rows, error):
  path = tmp_path / "f.jsonl"
  if isinstance(rows, str):
    path.write_text(rows)
  elif rows is not None:
    _jsonl(path, rows)
  with pytest.raises(tasks.TaskError, match=error) as e:
    tasks.Task({"task": kind, "test_path": str(path)}).examples("test")
  assert "\n" not in str(e.value) and "data.test_path" in str(e.value)


@pytest.mark.parametrize("fields, error", [
    ({"task": "trivia"}, "data.task='trivia'"),
    ({"task": "gsm8k"}, "set data.train_path"),
    ({"task": "synthetic", "prompt": "Q: {question}\nAnswer:"}, "does not end with data.stub"),
    ({"task": "synthetic", "prompt": "Q: {query}\nA:"}, "not a template"),
])
def test_bad_task_configs_are_refused(fields, error):
  with pytest.raises(tasks.TaskError, match=error):
    tasks.Task(fields)


# ----------------------------------------------------------------------------------- decoding and scoring

@pytest.mark.parametrize("role, cache", [("target", "float32"), ("source", "q8_0")])
def test_batched_greedy_equals_one_at_a_time(lms, role, cache):
  """Rows of different lengths (sorted and run by position), with and without a soft prefix, a filler row in the
  last batch: the same tokens and cache counts as batch-1 decoding; the source (MHA) with a quantised cache, the
  target with GQA."""
  lm = sides.load_lm(lms[0] if role == "source" else lms[1], role)
  rng = np.random.default_rng(0)
  rows = [rng.integers(0, lm.vocab, size=n) for n in (5, 9, 3, 12, 7)]
  one, many = sides.Speaker(lm, 64, cache, batch=1), sides.Speaker(lm, 64, cache, batch=3)
  task = tasks.Task({"task": "gsm8k", "train_path": "x"})  # multi-line: stops only at EOS / a "####" line
  for prefix in (None, rng.normal(size=(5, 2, lm.width)).astype(np.float32)):
    want = [one.generate([r], 10, None if prefix is None else prefix[i:i + 1], task)[0] for i, r in enumerate(rows)]
    got = many.generate(rows, 10, prefix, task)
    assert [g["ids"] for g in got] == [w["ids"] for w in want] and [g["cached"] for g in got] == \
        [w["cached"] for w in want]
    assert sum(len(w["ids"]) for w in want) > 20  # tokens were generated, not stopped at once
  assert many.greedy(rows[1], 10)["ids"] == one.generate([rows[1]], 10)[0]["ids"]


def test_logprob_equals_a_float64_reference(lms):
  lm = sides.load_lm(lms[1], "target")
  spk = sides.Speaker(lm, 64, batch=2)
  rng = np.random.default_rng(1)
  ctx = [rng.integers(0, lm.vocab, size=n) for n in (4, 7, 2)]
  cont = [rng.integers(0, lm.vocab, size=n) for n in (3, 1, 5)]
  prefix = rng.normal(size=(3, 2, lm.width)).astype(np.float32)
  fwd = jax.jit(lambda t, e: nnx.merge(lm.model.graphdef, lm.model.params).forward(t, embeds_BPd=e).logits)
  for pre in (None, prefix):
    got = spk.logprob(ctx, cont, pre)
    for i in range(3):
      seq = np.concatenate([ctx[i], cont[i]])[None]
      P = 0 if pre is None else 2
      logits = np.asarray(fwd(seq, None if pre is None else pre[i:i + 1]), np.float64)[0, :, :lm.vocab]
      lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
          logits.max(-1, keepdims=True)
      want = sum(lp[P + j - 1, seq[0, j]] for j in range(len(ctx[i]), seq.shape[1]))
      assert got[i] == pytest.approx(want, abs=1e-4)


def test_joint_rows_pick_the_higher_sum_and_report_oracle_and_agreement():
  t = tasks.Task({"task": "synthetic"})
  ex = [tasks.Example((("question", "q"),), " #### 1", ("1",)) for _ in range(3)]
  a, b = ["#### 1", "#### 2", "#### 5"], ["#### 2", "#### 1", "#### 5"]
  tally = harness.Tally(False)
  score_a = lambda texts: np.array([0.0 if x == "#### 1" else -1.0 for x in texts])  # model 1 likes "1"
  score_b = lambda texts: np.array([-0.5] * len(texts))
  harness.joint_rows(tally, "joint", t, ex, (a, b), (score_a, score_b), lambda i: (0, 0, 0, 0))
  r = tally.summary()["joint"]
  assert r["exact_match"] == pytest.approx(2 / 3)  # picks "1", "1", then "5" (a tie: A)
  assert r["oracle_exact_match"] == pytest.approx(2 / 3) and r["agreement"] == pytest.approx(1 / 3)
  assert [x["text"] for x in tally.rows["joint"]] == ["A|#### 1", "B|#### 1", "A|#### 5"]


# ------------------------------------------------------------------------------------------ early stopping

@pytest.mark.slow
def test_early_stopping_keeps_the_best_state_and_a_resume_stays_stopped(lms, tmp_path, monkeypatch):
  c = _cpu_config(*lms, train__steps=12, train__eval_every=2, train__patience=1, train__ckpt_every=4)
  scores = iter([0.5, 0.25, 0.75, 0.5, 0.0, 1.0])  # dev exact match per evaluation (the LMs are untrained)
  monkeypatch.setattr(lw_train.Bridge, "dev_eval",
                      lambda self, params, examples, max_new: {"dev_exact_match": next(scores)})
  out = lw_train.train(c, str(tmp_path / "b"), quiet=True)
  evals = [json.loads(x) for x in open(tmp_path / "b" / "eval.jsonl")]
  assert [e["step"] for e in evals] == [2, 4] and out["early_stopped"] and out["best_step"] == 2
  assert [json.loads(x)["step"] for x in open(tmp_path / "b" / "metrics.jsonl")][-1] == 4
  br, params, _ = lw_train.load_bridge(str(tmp_path / "b"))
  assert br.loaded == {"step": 2, "best": True}
  again = lw_train.train(c, str(tmp_path / "b"), quiet=True)  # resumes at 4: already stopped
  assert again["early_stopped"] and again["best_step"] == 2
  assert [json.loads(x)["step"] for x in open(tmp_path / "b" / "eval.jsonl")] == [2, 4]


def test_early_stop_counts_evaluations_without_improvement():
  es = lw_train.EarlyStop(2)
  assert [es.update(s, v) for s, v in ((1, 0.1), (2, 0.1), (3, 0.3), (4, 0.2))] == [True, False, True, False]
  assert not es.stop and (es.best, es.best_step) == (0.3, 3) and es.update(5, 0.0) is False and es.stop
