"""What an attention kind tells the rest of the framework, and the helpers every kind's module shares.

The model, KV-cache decoding, pruning, the config and the benchmarks ask a `Kind` instead of testing its name:
a new kind is one module that builds a `Kind` and registers it (dba_jax/attention/__init__.py).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from dba_jax import ops
from dba_jax.configlib import Config, ConfigError, Section, attn_dim, kv_heads
from dba_jax.layers import Hooks, LayerIO


@dataclasses.dataclass(frozen=True)
class Kind:
  """One attention kind.

  module: the nnx.Module, built as module(m, out_std, rngs), called as (x_BTd, positions_T, io, hooks) -> (y, io).
  section: its config fields under model.<name> (None: it has none).
  validate(m): cross-field rules of the model section that concern this kind (ConfigError naming the key).
  head_dims(m): the per-token streams a KV cache stores, {name: width per kv head}, in order.
  key_state(m): per-key values the kind carries in a cache besides its streams, {name: dtype} (selective's
    column sums of S); a cache resets them when it admits a token into a slot.
  evict_by: the key_state entry that scores keys for eviction and keep-ratio pruning (larger: dropped first);
    None when the kind has no such score (then it cannot be pruned).
  uncached(m): the configured variants cached decoding does not support (empty: it does).
  unprunable(m): configured variants that leave nothing to prune by (beyond `uncached`).
  score_penalty(m, score): the logit penalty a query pays from a key's eviction score (selective: F, ReLU'd with
    relu_after_cumsum); pruning traces report it.
  carry(m, B, T, dtype): the value handed from layer to layer in LayerIO.res, initial value (None: nothing).
  penalty(m): None, or aux -> the loss term its configured memory penalty adds (aux: the forward's
    {"memory_paper", "memory_repo"}).
  lr_groups(m): {parameter name: lr multiplier} for parameters with their own optimizer group (never decayed).
  score_dims(m): (q·k width, v width) summed over heads, for FLOP counts.
  """
  name: str
  module: type
  section: Section | None = None
  validate: Callable[[Config], None] = lambda m: None
  head_dims: Callable[[Config], dict] = lambda m: {"k": attn_dim(m) // m.n_heads, "v": attn_dim(m) // m.n_heads}
  key_state: Callable[[Config], dict] = lambda m: {}
  evict_by: str | None = None
  uncached: Callable[[Config], list] = lambda m: []
  unprunable: Callable[[Config], list] = lambda m: []
  score_penalty: Callable = lambda m, score: score
  carry: Callable = lambda m, B, T, dtype: None
  penalty: Callable = lambda m: None
  lr_groups: Callable[[Config], dict] = lambda m: {}
  score_dims: Callable[[Config], tuple] = lambda m: (attn_dim(m), attn_dim(m))

  def stream_widths(self, m: Config) -> dict:
    """{stream: merged width K*D per layer}, the layout a KV cache stores."""
    return {name: kv_heads(m) * d for name, d in self.head_dims(m).items()}

  def check_cacheable(self, m: Config):
    bad = self.uncached(m)
    if bad:
      raise NotImplementedError(f"cached decoding of {self.name} attention does not support {', '.join(bad)}")

  def check_prunable(self, m: Config):
    if self.evict_by is None:
      raise ValueError(f"context pruning needs an attention kind with a per-key eviction score; model.attn_kind="
                       f"{self.name!r} has none")
    bad = self.unprunable(m)
    if bad:
      raise ValueError(f"context pruning of {self.name} attention needs selection on; not {', '.join(bad)}")
    self.check_cacheable(m)


def through_cache(hooks: Hooks, io: LayerIO, new: dict, positions_T):
  """(streams to attend over, (key positions [B, S], visibility [B, T, S]) or None, io with the new state)."""
  if hooks.cache is None:
    return new, None, io
  state, streams, k_pos_BS = hooks.cache.update(io.state, new, positions_T, hooks.valid_T)
  return streams, (k_pos_BS, ops.positions_mask(positions_T, k_pos_BS)), dataclasses.replace(io, state=state)


def no_keep_hook(hooks: Hooks, kind: str):
  if hooks.keep_fn is not None:
    raise NotImplementedError(f"the key keep hook needs a per-key score; {kind} attention has none")


def with_probs(o, io: LayerIO, hooks: Hooks):
  """Split an op's (out, probs) when the hooks asked for probabilities: (out, io carrying them)."""
  if not hooks.return_probs:
    return o, io
  o, probs = o
  return o, dataclasses.replace(io, probs=probs)


def even_rope(m: Config, width: int, key: str):
  if m.positions == "rope":
    if width % 2:
      raise ConfigError(f"RoPE needs an even head dim; {key} = {width}")
