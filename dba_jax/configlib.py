"""Typed config sections, and the shape helpers every module needs: a leaf (imports nothing from dba_jax).

A section declares each field once: its default (which fixes the type), its allowed choices or range, and one line
of documentation. `Section.defaults()` builds the ml_collections ConfigDict the presets in configs/ edit;
`Section.check(c)` validates every field of it from the same declarations, so no field goes unchecked and each
error names its key. Cross-field rules (divisibility, one option needing another) live with the concept that owns
them (config.py, dba_jax/attention/<kind>.py, dba_jax/hope/config.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import ml_collections

Config = ml_collections.ConfigDict


class ConfigError(ValueError):
  """A config value is impossible; the message names the key and the value."""


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field. The default's type is the field's type (an int field takes no float, a float field takes
  ints); a tuple default's entries fix the entries' type. `choices` may be a callable (a registry that grows)."""
  default: Any
  doc: str = ""
  choices: tuple | Callable[[], tuple] = ()
  ge: float | None = None
  gt: float | None = None
  le: float | None = None
  lt: float | None = None

  def problem(self, value) -> str | None:
    """Why `value` is not allowed, or None."""
    kind = type(self.default)
    if kind is tuple:
      if not isinstance(value, (tuple, list)):
        return f"must be a tuple, got {type(value).__name__}"
      item = type(self.default[0]) if self.default else None
      if item is not None and not all(_is(v, item) for v in value):
        return f"must hold {item.__name__} values"
      values = tuple(value)
    elif not _is(value, kind):
      return f"must be {kind.__name__}, got {type(value).__name__}"
    else:
      values = (value,)
    choices = self.choices() if callable(self.choices) else self.choices
    if choices and value not in choices:
      return f"is not one of {list(choices)}"
    for v in values:
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        for op, bound in (("<", self.lt), ("<=", self.le), (">", self.gt), (">=", self.ge)):
          if bound is not None and not _COMPARE[op](v, bound):
            return f"must be {op} {bound}"
        if isinstance(v, float) and not math.isfinite(v):
          return "must be finite"
    return None


_COMPARE = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


def _is(value, kind) -> bool:
  if kind is bool:
    return isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  return isinstance(value, kind)


class Section:
  """Named fields and subsections: `Section("doc", d_model=Field(128, ge=1), hope=Section(...))`."""

  def __init__(self, doc: str = "", **entries):
    self.doc, self.entries = doc, dict(entries)

  def defaults(self) -> Config:
    c = Config()
    for key, e in self.entries.items():
      c[key] = e.defaults() if isinstance(e, Section) else e.default
    return c

  def check(self, c: Config, prefix: str = ""):
    """Raises ConfigError naming the first field whose value its declaration does not allow, or an undeclared key."""
    for key in c.keys():
      if key not in self.entries:
        raise ConfigError(f"{prefix}{key} is not a config key (known: {', '.join(sorted(self.entries))})")
    for key, e in self.entries.items():
      if key not in c:
        raise ConfigError(f"{prefix}{key} is missing")
      if isinstance(e, Section):
        e.check(c[key], f"{prefix}{key}.")
      elif (why := e.problem(c[key])) is not None:
        raise ConfigError(f"{prefix}{key}={c[key]!r} {why}")

  def fields(self, prefix: str = "") -> dict:
    """{dotted key: Field} over every field, subsections included."""
    out = {}
    for key, e in self.entries.items():
      out.update(e.fields(f"{prefix}{key}.") if isinstance(e, Section) else {f"{prefix}{key}": e})
    return out


def lock(c: Config) -> Config:
  c.lock()
  return c


def need(cond: bool, msg: str):
  if not cond:
    raise ConfigError(msg)


# ------------------------------------------------------------------------------------ shapes from the model section

def padded_vocab(m: Config) -> int:
  return int(math.ceil(m.vocab_size / m.pad_vocab_to) * m.pad_vocab_to)


def kv_heads(m: Config) -> int:
  return m.n_kv_heads or m.n_heads


def attn_dim(m: Config) -> int:
  return m.attn_dim or m.d_model
