"""Arithmetic word problems with checkable answers ("Q: Tom has 37 apples, gets 48 more. ...\nA: 37 + 48 = 85 #### 85").

Problems are (template, name, item, a, b). A hash of the fact they ask, (operator, a, b), puts each one in the train
or the held-out ("test") split: no held-out fact appears in the LM corpus or the bridge's training set under any
wording, whatever the seeds, so held-out accuracy measures transfer rather than recall of a fact seen in another
template. A seed picks the draw within a split. `arith_qa` (a data.generator) is the LM corpus of train-split documents, and the
text dba_jax.tokenizers.bpe_qa learns its merges from. LatentWire (dba_jax/latentwire) trains and scores on it.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np


NAMES = ("Tom", "Ann", "Ben", "Mia", "Sam", "Lea", "Max", "Zoe")
ITEMS = ("apples", "books", "coins", "cards", "shells", "pens", "stamps", "marbles")
# (question template, operator): the answer is "a op b".
TEMPLATES = (
    ("{n} has {a} {i} and gets {b} more. How many {i} does {n} have now?", "+"),
    ("{n} has {a} {i}. A friend gives {n} {b} more {i}. How many {i} does {n} have?", "+"),
    ("{n} has {a} {i} and gives away {b}. How many {i} are left?", "-"),
    ("There are {a} {i} in a box. {n} takes {b} of them. How many {i} stay in the box?", "-"),
)
MAX_NUMBER = 49
TEST_FRACTION = 0.1
PROMPT = "Q: {q}\nA:"  # the target's (and the source's) text prompt
STUB = "\nA:"          # what the target sees after the soft tokens: the prompt's tail, with no question in it
ANSWER_RE = re.compile(r"####\s*(-?[\d,]+)")


def fact(problem: tuple) -> tuple:
  """(operator, a, b): what the problem asks, whatever its template, name and item."""
  t, _, _, a, b = problem
  return TEMPLATES[t][1], a, b


def fact_split(fact_: tuple) -> str:
  """train | test of a fact (operator, a, b)."""
  h = int.from_bytes(hashlib.sha256(repr(fact_).encode()).digest()[:8], "little")
  return "test" if h / 2**64 < TEST_FRACTION else "train"


def draw(rng, split: str) -> tuple:
  """One problem of `split`, drawn as arith_qa draws them (train-split draws are what the LM corpus holds)."""
  while True:
    p = _draw(rng)
    if fact_split(fact(p)) == split:
      return p


def _draw(rng) -> tuple:
  t = int(rng.integers(len(TEMPLATES)))
  a, b = (int(x) for x in rng.integers(1, MAX_NUMBER + 1, size=2))
  if TEMPLATES[t][1] == "-" and a < b:
    a, b = b, a
  return t, int(rng.integers(len(NAMES))), int(rng.integers(len(ITEMS))), a, b


def render(problem: tuple) -> tuple[str, str]:
  """(question, answer text) of a problem; the answer text starts with a space and ends with the "#### n" line."""
  t, n, i, a, b = problem
  template, op = TEMPLATES[t]
  c = a + b if op == "+" else a - b
  return template.format(n=NAMES[n], i=ITEMS[i], a=a, b=b), f" {a} {op} {b} = {c} #### {c}"


def qa_pairs(n: int, seed: int, split: str = "train") -> list[tuple[str, str]]:
  """n (question, answer text) pairs of one split ("train" | "test"), deterministic in seed."""
  if split not in ("train", "test"):
    raise ValueError(f"split={split!r} is not 'train' or 'test'")
  rng = np.random.default_rng(seed)
  return [render(draw(rng, split)) for _ in range(n)]


def gold(answer: str) -> str:
  """The reference number of an answer text."""
  return extract(answer)


def extract(text: str) -> str | None:
  """Strict "####" extraction: the number after the first "####" (commas dropped), or None. No last-number
  fallback: an output without "####" scores wrong."""
  m = ANSWER_RE.search(text)
  return None if m is None else m.group(1).replace(",", "")


def document(question: str, answer: str) -> str:
  return PROMPT.format(q=question) + answer + "\n\n"


def arith_qa_text(n_chars: int, seed: int) -> str:
  """Train-split documents, about n_chars characters (the held-out problems never appear)."""
  rng = np.random.default_rng(seed)
  out, size = [], 0
  while size < n_chars:
    out.append(document(*render(draw(rng, "train"))))
    size += len(out[-1])
  return "".join(out)
