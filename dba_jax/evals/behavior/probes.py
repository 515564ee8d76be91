"""What a behaviour probe is: the `Probe` record, the match constants and the canonical JSONL form whose
SHA-256 names a suite (so a report says exactly which probes it ran)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

EXACT, CONTAINED, NONE = "exact", "contained", "none"
RAW_SCORE = {EXACT: 1.0, CONTAINED: 0.5, NONE: 0.0}
# Baseline match -> weight: probes the baseline already solves count least (dba.md §5.1).
DIFFICULTY_WEIGHT = {EXACT: 1, CONTAINED: 2, NONE: 3}
DIFFICULTY_NAME = {EXACT: "easy", CONTAINED: "medium", NONE: "hard"}
KINDS = ("exact", "integer", "multiple_choice")


@dataclass(frozen=True)
class Probe:
  """One test. `answer` is a str (exact, multiple_choice) or an int (integer); `choices` only for multiple_choice,
  written as completions of the prompt (usually with a leading space, e.g. " Paris")."""
  id: str
  category: str
  kind: str
  prompt: str
  answer: Any
  choices: tuple = ()
  metadata: dict = field(default_factory=dict)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"{self.id}: kind must be one of {KINDS}, got {self.kind!r}")
    if self.kind == "multiple_choice" and self.answer not in self.choices:
      raise ValueError(f"{self.id}: answer {self.answer!r} is not one of its choices {self.choices!r}")
    if self.kind == "integer" and not isinstance(self.answer, int):
      raise ValueError(f"{self.id}: integer probes need an int answer, got {self.answer!r}")

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["choices"] = list(self.choices)
    return d


def to_jsonl(probes: Iterable[Probe]) -> str:
  """One JSON object per line with sorted keys and ASCII escapes, so the text (and its hash) is canonical."""
  return "".join(json.dumps(p.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n"
                 for p in probes)


def from_jsonl(text: str) -> list[Probe]:
  """Inverse of `to_jsonl`, e.g. to rerun exactly the suite a past report used."""
  rows = [json.loads(line) for line in text.splitlines() if line.strip()]
  return [Probe(**{**r, "choices": tuple(r["choices"])}) for r in rows]


def suite_sha256(probes: Iterable[Probe]) -> str:
  return hashlib.sha256(to_jsonl(probes).encode("ascii")).hexdigest()


def categories(probes: Iterable[Probe]) -> list[str]:
  """Categories in first-seen order."""
  return list(dict.fromkeys(p.category for p in probes))
