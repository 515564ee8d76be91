"""Attention kinds: each is one module holding its nnx module, its config section (model.<kind>), its validation,
its KV-cache streams and per-key state, and its op dispatch (through dba_jax.ops). This registry is the only list
of them; the model, decoding, pruning, the config and the benchmarks ask `get(m)` and never test a kind's name.

  standard   dba_jax.attention.standard   MHA / GQA / bottleneck                     op: dba_jax.ops.standard
  dba        dba_jax.attention.dba        decoupled semantic + geometric paths       op: dba_jax.ops.dba
  selective  dba_jax.attention.selective  logits minus the selection mask F          op: dba_jax.ops.selective

A new kind: a module that builds a `Kind` (dba_jax.attention.base) and `register(KIND)`s it, and a config that
sets model.attn_kind to its name.
"""
from __future__ import annotations

from dba_jax.attention import dba, selective, standard
from dba_jax.attention.base import Kind
from dba_jax.configlib import Config, ConfigError

KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
  if kind.name in KINDS and KINDS[kind.name] is not kind:
    raise ValueError(f"attention kind {kind.name!r} is already registered")
  KINDS[kind.name] = kind
  return kind


def names() -> tuple:
  return tuple(KINDS)


def get(m: Config) -> Kind:
  """The kind of the model section `m`."""
  if m.attn_kind not in KINDS:
    raise ConfigError(f"model.attn_kind={m.attn_kind!r} is not one of {list(KINDS)}")
  return KINDS[m.attn_kind]


for _module in (standard, dba, selective):
  register(_module.KIND)

__all__ = ["KINDS", "Kind", "get", "names", "register"]
