"""LatentWire's tasks: where the questions come from, how a prompt is written, what the model is trained to answer,
when its answer ends and how it is scored. A bridge config's data section names one (`data.task`):

  synthetic  dba_jax/arith_qa.py's arithmetic word problems, drawn in-process. arith_qa holds out whole (op, a, b)
             facts (a hash of the fact, 10%): no held-out fact is in the LMs' corpus or the bridge's training pool
             in any wording. Here a second hash of the fact puts each held-out fact in dev or test (half each), so
             early stopping never selects on a test fact.
  gsm8k      local jsonl, one {"question": ..., "answer": "... #### 72"} per line (GSM8K's own files). The reference
             is the number after "####"; scored by the strict "####" match, as synthetic (commas dropped, no
             last-number fallback).
  squad      local jsonl, one {"context": ..., "question": ..., "answers": {"text": [...]} | [...]} per line (the
             datasets library's SQuAD rows, or a plain list of answer strings). Scored as the original scored it
             (latentwire/metrics.py): lower case, punctuation and the articles a/an/the dropped, whitespace collapsed;
             exact match and token F1, here the best over the row's reference answers (SQuAD's own rule; the
             original kept only the first, which gives the same score where a row has one). The prediction is the
             answer's first line.

The prompt (data.prompt, "" = the task's default) is a str.format template over the example's fields ({question};
{context} for squad) and must end with data.stub ("" = the default), the tail the target sees after the soft
tokens, so the question reaches the bridged target only through them. Nothing is downloaded: data.train_path,
dev_path, test_path name the files; a missing or malformed file, line or field is a one-line TaskError.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import string

import numpy as np

from dba_jax import arith_qa

TASKS = ("synthetic", "gsm8k", "squad")
DEFAULT_PROMPT = {
    "synthetic": arith_qa.PROMPT.replace("{q}", "{question}"),
    # the original's GSM8K prompt (paper_writing/cross_attention.py)
    "gsm8k": "You are a helpful math tutor. Solve the problem step by step, then end your final line with "
             "'#### <number>'.\n\nProblem:\n{question}\n\nAnswer:",
    "squad": "Context: {context}\nQuestion: {question}\nAnswer:",
}
DEFAULT_STUB = {"synthetic": arith_qa.STUB, "gsm8k": "\n\nAnswer:", "squad": "\nAnswer:"}
# what follows the answer in a training row: the end the model learns to produce (and decoding stops at)
ANSWER_END = {"synthetic": "\n\n", "gsm8k": "\n\n", "squad": "\n"}
FIELDS = {"synthetic": ("question",), "gsm8k": ("question",), "squad": ("context", "question")}
DEV_SHARE = 0.5  # of arith_qa's held-out facts, the share that is dev (the rest is test)


class TaskError(ValueError):
  """A task's config, file, line or field is unusable; the message names it (one line)."""


@dataclasses.dataclass(frozen=True)
class Example:
  fields: tuple   # ((name, text), ...): what the prompt template reads
  answer: str     # the training target after the stub (starts with a space)
  golds: tuple    # reference answers (a number for the "####" tasks)

  @property
  def question(self) -> str:
    return dict(self.fields)["question"]


def add_fields(d) -> None:
  """The task fields of a data section (bridge and interlingua configs)."""
  d.task = "synthetic"  # synthetic | gsm8k | squad
  d.prompt = ""  # str.format template over {question} ({context} for squad); "" = the task's default
  d.stub = ""  # the prompt's tail, what the bridged target sees after the soft tokens; "" = the task's default
  d.train_path = ""  # gsm8k / squad: local jsonl files (nothing is downloaded)
  d.dev_path = ""
  d.test_path = ""


# ------------------------------------------------------------------------------------------------- scoring

ANSWER_RE = arith_qa.ANSWER_RE
_ARTICLES = {"a", "an", "the"}
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(s: str) -> str:
  """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
  s = (s or "").strip().lower().translate(_PUNCT)
  return " ".join(t for t in s.split() if t not in _ARTICLES)


def token_f1(pred: str, gold: str) -> float:
  p, g = normalize(pred).split(), normalize(gold).split()
  if not p or not g:
    return float(p == g)
  common, left = 0, {}
  for t in p:
    left[t] = left.get(t, 0) + 1
  for t in g:
    if left.get(t, 0) > 0:
      common, left[t] = common + 1, left[t] - 1
  if common == 0:
    return 0.0
  prec, rec = common / len(p), common / len(g)
  return 2 * prec * rec / (prec + rec)


def first_line(text: str) -> str:
  return text.strip().split("\n")[0].strip()


class Task:
  """One configured task: prompts, examples, stopping and scoring (see the module docstring)."""

  def __init__(self, d):
    self.name = d.get("task", "synthetic")
    if self.name not in TASKS:
      raise TaskError(f"data.task={self.name!r} is not one of {list(TASKS)}")
    self.template = d.get("prompt", "") or DEFAULT_PROMPT[self.name]
    self.stub = d.get("stub", "") or DEFAULT_STUB[self.name]
    self.paths = {s: d.get(f"{s}_path", "") for s in ("train", "dev", "test")}
    if not self.template.endswith(self.stub):
      raise TaskError(f"data.prompt={self.template!r} does not end with data.stub={self.stub!r} (the bridged "
                      "target sees only the stub after the soft tokens)")
    try:
      self.head_template = self.template[:len(self.template) - len(self.stub)]
      self.head_template.format(**{f: "" for f in FIELDS[self.name]})
    except (KeyError, IndexError, ValueError) as e:
      raise TaskError(f"data.prompt={self.template!r}: not a template over {list(FIELDS[self.name])} ({e!r})") \
          from None
    if self.name != "synthetic":
      missing = [f"data.{s}_path" for s in ("train", "dev", "test") if not self.paths[s]]
      if "data.test_path" in missing and "data.train_path" in missing:
        raise TaskError(f"data.task={self.name!r} reads local jsonl files: set data.train_path (training), "
                        "data.dev_path (early stopping) and data.test_path (dba-eval latentwire)")
    self.end = ANSWER_END[self.name]

  # -- prompts
  def prompt(self, ex: Example) -> str:
    """The full text prompt (the source's input, the text baselines' prompt)."""
    return self.template.format(**dict(ex.fields))

  def head(self, ex: Example) -> str:
    """The prompt without its stub (the teacher's and the token budget's question part)."""
    return self.head_template.format(**dict(ex.fields))

  def target_text(self, ex: Example) -> str:
    """What follows the stub in a training row: the answer and its end."""
    return ex.answer + self.end

  # -- stopping and scoring
  @property
  def stops_at_newline(self) -> bool:
    """Answers of one line end at a newline token; GSM8K's solutions run over lines and end after "#### n"."""
    return self.name != "gsm8k"

  def finished(self, text: str) -> bool:
    """A multi-line answer (gsm8k) is complete once its "#### n" line or a blank line has ended."""
    return bool(re.search(r"####[^\n]*\n", text)) or "\n\n" in text

  def extract(self, text: str):
    """The answer a prediction gives, normalised: the "####" number (None without one), or SQuAD's first line."""
    if self.name == "squad":
      return normalize(first_line(text))
    return arith_qa.extract(text)

  def score(self, text: str, ex: Example) -> tuple[bool, float]:
    """(exact match, F1); F1 is the exact match for the "####" tasks."""
    if self.name == "squad":
      pred = first_line(text)
      em = max(normalize(pred) == normalize(g) for g in ex.golds)
      return bool(em), max(token_f1(pred, g) for g in ex.golds)
    got = arith_qa.extract(text)
    ok = got is not None and got in ex.golds
    return ok, float(ok)

  def working(self, text: str) -> str:
    """The part of a source answer a cascade hands the target: the working before "####" (all of it for squad)."""
    return first_line(text) if self.name == "squad" else text.split("####")[0]

  @property
  def has_f1(self) -> bool:
    return self.name == "squad"

  # -- examples
  def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
    """n examples of a split (train | dev | test). synthetic draws n with `seed`; a file gives its first n rows
    (all of them with n None)."""
    if self.name == "synthetic":
      return synthetic_examples(n if n is not None else 0, seed, split)
    rows = load_jsonl(self.paths[split], self.name, f"data.{split}_path")
    return rows if n is None else rows[:n]


# ---------------------------------------------------------------------------------------------- synthetic

def _hash01(key) -> float:
  return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") / 2**64


_TEMPLATES_OF = {op: [t for t, (_, o) in enumerate(arith_qa.TEMPLATES) if o == op] for op in ("+", "-")}


def fact_split(fact: tuple) -> str:
  """train | dev | test: arith_qa's split of the fact, its held-out facts halved by a second hash."""
  op, a, b = fact
  if arith_qa.fact_split(fact) == "train":
    return "train"
  return "dev" if _hash01(("dev", op, a, b)) < DEV_SHARE else "test"


@functools.lru_cache(maxsize=None)
def facts(split: str) -> tuple:
  """Every (op, a, b) arith_qa can draw that falls in `split` (subtraction keeps a >= b, as arith_qa draws it)."""
  n = arith_qa.MAX_NUMBER
  out = [(op, a, b) for op in ("+", "-") for a in range(1, n + 1) for b in range(1, n + 1) if op == "+" or a >= b]
  return tuple(f for f in out if fact_split(f) == split)


def _example(problem: tuple) -> Example:
  q, a = arith_qa.render(problem)
  return Example((("question", q),), a, (arith_qa.gold(a),))


def synthetic_problems(n: int, seed: int, split: str) -> list[tuple]:
  """n arith_qa problems of a split: train problems as arith_qa draws them (train facts); a dev / test problem is a
  dev / test fact, uniformly, in a random wording (template of its operator, name, item)."""
  if split not in ("train", "dev", "test"):
    raise TaskError(f"split={split!r} is not one of ['train', 'dev', 'test']")
  rng = np.random.default_rng(seed)
  if split == "train":
    return _train_problems(n, rng)
  pool, out = facts(split), []
  for _ in range(n):
    op, a, b = pool[int(rng.integers(len(pool)))]
    t = _TEMPLATES_OF[op][int(rng.integers(len(_TEMPLATES_OF[op])))]
    out.append((t, int(rng.integers(len(arith_qa.NAMES))), int(rng.integers(len(arith_qa.ITEMS))), a, b))
  return out


def _train_problems(n: int, rng) -> list[tuple]:
  return [arith_qa.draw(rng, "train") for _ in range(n)]


def synthetic_examples(n: int, seed: int, split: str) -> list[Example]:
  return [_example(p) for p in synthetic_problems(n, seed, split)]


# ------------------------------------------------------------------------------------------------- files

def _text(row: dict, key: str, where: str) -> str:
  if key not in row:
    raise TaskError(f"{where}: no {key!r} field (have {sorted(row)})")
  if not isinstance(row[key], str) or not row[key].strip():
    raise TaskError(f"{where}: {key!r} is not a non-empty string")
  return row[key]


def _gsm8k(row: dict, where: str) -> Example:
  q, a = _text(row, "question", where), _text(row, "answer", where)
  gold = arith_qa.extract(a)
  if gold is None:
    raise TaskError(f"{where}: 'answer' has no '#### <number>' line")
  return Example((("question", q.strip()),), " " + a.strip(), (gold,))


def _squad(row: dict, where: str) -> Example:
  c, q = _text(row, "context", where), _text(row, "question", where)
  if "answers" not in row:
    raise TaskError(f"{where}: no 'answers' field (have {sorted(row)})")
  ans = row["answers"]
  texts = ans.get("text") if isinstance(ans, dict) else ans
  if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
    raise TaskError(f"{where}: 'answers' must be {{\"text\": [answers]}} or a list of answer strings, non-empty")
  return Example((("context", c.strip()), ("question", q.strip())), " " + texts[0].strip(),
                 tuple(t.strip() for t in texts))


@functools.lru_cache(maxsize=16)
def _read(path: str, mtime: float, task: str, what: str) -> tuple:
  parse = _gsm8k if task == "gsm8k" else _squad
  out = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{what}={path} line {i}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise TaskError(f"{where}: not JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise TaskError(f"{where}: not a JSON object")
      out.append(parse(row, where))
  if not out:
    raise TaskError(f"{what}={path}: no examples in the file")
  return tuple(out)


def load_jsonl(path: str, task: str, what: str = "path") -> list[Example]:
  """Examples of a gsm8k or squad jsonl file (read once per path and modification time)."""
  if not path:
    raise TaskError(f"{what} is not set (data.task={task!r} reads local jsonl files; nothing is downloaded)")
  if not os.path.isfile(path):
    raise TaskError(f"{what}={path}: no such file")
  try:
    return list(_read(os.path.abspath(path), os.path.getmtime(path), task, what))
  except (OSError, UnicodeDecodeError) as e:
    raise TaskError(f"{what}={path}: cannot be read ({e})") from None


def from_config(d) -> Task:
  return Task(d)


def as_examples(items) -> list[Example]:
  """Examples, with synthetic (question, answer text) pairs (arith_qa.qa_pairs, what dba-aot builds a batch from)
  turned into Examples."""
  return [x if isinstance(x, Example) else Example((("question", x[0]),), x[1], (arith_qa.gold(x[1]),))
          for x in items]
