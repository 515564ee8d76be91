"""Context pruning (selective.md §1.3, §3.4, §9) by an attention kind's per-key eviction score (selective: F),
evaluation only.

(a) Keep-ratio simulation (`keep_mask`, `pruned_loss`): a whole forward pass in which every layer's heads see,
    per query row, only the keys with the smallest selection mask F. Rule "original" (the original inference
    class, §3.4): budget = max(1, int(T * ratio)) for a window of T tokens; row i keeps the min(budget - 1, i + 1)
    causal keys with the smallest F[i, :] (stable order, so ties go to the lower key index) plus the diagonal
    (self may already be one of them, so a row keeps min(budget - 1, i + 1) or one more keys). BOS has
    F[i, 0] = 0 <= every other F (protected and non-negative) and the lowest index, so it is kept whenever
    budget >= 2; ratio 0 keeps only self. Rule "per_row": row i keeps the ceil(ratio * (i + 1)) smallest-F causal
    keys plus self and BOS. Ratio >= 1 keeps every causal key (the original pruned only below 1; its
    budget - 1 rule would otherwise drop one key of the last row). A key dropped from one row may reappear in a later one (no persistent eviction).
(b) Per-layer KV budgets during cached decoding (`KVBudgetEval`): layer l holds at most budgets[l] tokens. Each
    step writes the new token into a free slot; if the layer then holds more than its budget it evicts the token
    with the largest F (the running column sum of S, i.e. the row F[t, :] the new query is about to use; ties to
    the oldest), never BOS and never the new token itself, then the query attends over what is left. The buffer
    has a fixed number of slots (`capacity`, at least min(max budget + 1, T)), reused after eviction, so memory
    really is bounded. `search_budgets` finds the smallest budgets whose loss meets a target.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dba_jax import attention, data, losses, model as model_lib
from dba_jax.configlib import kv_heads
from dba_jax.evals import perplexity
from dba_jax.evals.common import EvalError, load_checkpoint, read_checkpoint_config
from dba_jax.ops import base

RULES = ("original", "per_row")


def check_prunable(m):
  """Pruning needs the attention kind's per-key eviction score, and its cached decoding."""
  attention.get(m).check_prunable(m)


# ------------------------------------------------------------------------------------- (a) keep-ratio masks

def keep_mask(f_TS, ratio: float, rule: str = "original"):
  """Boolean keep mask [..., T, S] (causal included) for the F rows f_TS (see the module docstring)."""
  if rule not in RULES:
    raise ValueError(f"pruning rule {rule!r} is not one of {RULES}")
  T, S = f_TS.shape[-2:]
  lead = (1,) * (f_TS.ndim - 2)  # explicit broadcasting (the tests raise on rank promotion)
  row_T = jnp.arange(T).reshape(lead + (T, 1))
  key_S = jnp.arange(S).reshape(lead + (1, S))
  causal = base.causal_mask(T, S).reshape(lead + (T, S)) & jnp.ones(f_TS.shape, bool)
  # Future keys sort last; a stable argsort of the argsort gives each key's rank within its row.
  rank = jnp.argsort(jnp.argsort(jnp.where(causal, f_TS, jnp.inf), axis=-1, stable=True), axis=-1, stable=True)
  if ratio >= 1:  # the original pruned only below ratio 1 (its budget - 1 rule would drop a key at ratio 1)
    return causal
  if rule == "original":
    budget = max(1, int(T * ratio))
    n_keep_T1 = jnp.minimum(budget - 1, row_T + 1)
    forced = key_S == row_T
  else:
    n_keep_T1 = jnp.ceil(ratio * (row_T + 1)).astype(jnp.int32)
    forced = (key_S == row_T) | (key_S == 0)
  return causal & ((rank < n_keep_T1) | forced)


def pruned_loss(model, windows_BL1, ratio: float | None, rule: str = "original", batch_size: int = 8) -> float:
  """Mean next-token NLL over windows [N, T + 1] (inputs the first T tokens); ratio None: the unpruned model."""
  check_prunable(model.config)
  hooks = model_lib.NO_HOOKS if ratio is None else model_lib.Hooks(keep_fn=lambda f: keep_mask(f, ratio, rule))
  return window_loss(model, windows_BL1, hooks, batch_size)


def window_loss(model, windows_BL1, hooks=model_lib.NO_HOOKS, batch_size: int = 8) -> float:
  """Mean next-token NLL of any model over windows [N, T + 1], full context unless `hooks` prune it (the
  baseline side of the paper's criterion is an unselective model's full-context loss on the same windows)."""
  m = model.config
  windows = np.asarray(windows_BL1, np.int32)
  fn = jax.jit(lambda p, w: losses.nll(nnx.merge(model.graphdef, p).forward(w[:, :-1], hooks=hooks).logits,
                                       w[:, 1:], m.vocab_size).sum())
  total = sum(float(fn(model.params, jnp.asarray(windows[i:i + batch_size])))
              for i in range(0, len(windows), batch_size))
  return total / (windows.shape[0] * (windows.shape[1] - 1))


# -------------------------------------------------------------------------------- (b) KV budgets in decoding

@dataclasses.dataclass(frozen=True)
class SlotCache:
  """The model's cache extension point (model.Hooks.cache) for a fixed number of reusable slots: one token per
  step is admitted, then the layer evicts down to its budget by the attention kind's eviction score (`evict_by`,
  a per-key state the kind's module keeps; selective: the column sums of S, i.e. the F row before any ReLU).
  A layer's state: the kind's streams [B, C, K, D] and per-key states [B, C], pos [B, C] (-1 free), its budget,
  and for traces pos_before and f (the score the eviction used; traces report the penalty it implies)."""
  streams: tuple
  key_state: tuple
  evict_by: str

  def update(self, c, new, q_pos_T, valid_T):
    del valid_T  # one real token per step
    t = q_pos_T[0]
    C = c["pos"].shape[1]
    before = c["pos"]
    slot = jax.nn.one_hot(jnp.argmax(c["pos"] < 0, axis=1), C, dtype=bool)  # [B, C]: the first free slot
    c = {**c, **{s: jnp.where(slot[:, :, None, None], new[s][:, :1].astype(c[s].dtype), c[s]) for s in self.streams},
         **{k: jnp.where(slot, 0, c[k]).astype(c[k].dtype) for k in self.key_state},
         "pos": jnp.where(slot, t, c["pos"])}
    # Evict down to the budget: the largest score, oldest on ties; never BOS, never the new token.
    alive = c["pos"] >= 0
    candidate = alive & (c["pos"] != 0) & (c["pos"] != t)
    f = jnp.where(candidate, c[self.evict_by], -jnp.inf)
    tied = candidate & (f == f.max(1, keepdims=True))
    oldest = jnp.argmin(jnp.where(tied, c["pos"], jnp.iinfo(jnp.int32).max), axis=1)
    over = (alive.sum(1) > c["budget"]) & candidate.any(1)
    evict = jax.nn.one_hot(oldest, C, dtype=bool) & over[:, None]
    c = {**c, "pos": jnp.where(evict, -1, c["pos"]), "pos_before": before, "f": c[self.evict_by]}
    return c, {s: c[s] for s in self.streams}, c["pos"]


def _decode_window(graphdef, m, capacity, trace, params, windows_BL1, budgets_L):
  """Teacher-forced decoding of windows [B, T + 1] under per-layer budgets: (NLL sum, trace or None)."""
  decoder = nnx.merge(graphdef, params)
  B, T = windows_BL1.shape[0], windows_BL1.shape[1] - 1
  kind, K, L = attention.get(m), kv_heads(m), m.n_layers
  dtype = model_lib.DTYPES[m.compute_dtype]
  key_state = kind.key_state(m)
  empty = {**{s: jnp.zeros((L, B, capacity, K, D), dtype) for s, D in kind.head_dims(m).items()},
           **{k: jnp.zeros((L, B, capacity), d) for k, d in key_state.items()},
           "pos": jnp.full((L, B, capacity), -1, jnp.int32), "pos_before": jnp.full((L, B, capacity), -1, jnp.int32),
           "f": jnp.zeros((L, B, capacity), key_state[kind.evict_by]), "budget": jnp.asarray(budgets_L, jnp.int32)}
  hooks = model_lib.Hooks(cache=SlotCache(tuple(kind.head_dims(m)), tuple(key_state), kind.evict_by))

  def step(state, xs):
    tok_B, target_B, t = xs
    out = decoder.forward(tok_B[:, None], positions_T=t[None], hooks=hooks, cache_state=state)
    nll = losses.nll(out.logits[:, 0], target_B, m.vocab_size).sum()
    s = out.cache_state
    seen = None
    if trace:
      seen = {"pos_before": s["pos_before"], "pos": s["pos"], "f": kind.score_penalty(m, s["f"])}
    return s, (nll, seen)

  xs = (windows_BL1[:, :-1].T, windows_BL1[:, 1:].T, jnp.arange(T, dtype=jnp.int32))
  _, (nll_T, seen_T) = jax.lax.scan(step, empty, xs)
  if trace:  # [T, L, B, C] -> per layer [T, B, C]
    seen_T = [jax.tree.map(lambda a, l=l: a[:, l], seen_T) for l in range(L)]
  return nll_T.sum(), seen_T


class KVBudgetEval:
  """Loss of a selective model decoded token by token under per-layer KV budgets, on fixed windows [N, T + 1].

    ev = KVBudgetEval(model, windows)
    ev.loss([64] * n_layers); ev.kept_fraction([64] * n_layers)
  One compile per evaluator: budgets are traced, the slot count is `capacity` (default T)."""

  def __init__(self, model, windows_BL1, batch_size: int = 8, capacity: int | None = None):
    self.m = model.config
    check_prunable(self.m)
    self.model, self.windows = model, np.asarray(windows_BL1, np.int32)
    self.T = self.windows.shape[1] - 1
    self.capacity = int(capacity or self.T)
    self.batch_size = batch_size
    self.evals: list[dict] = []  # every loss() call, for reports
    self._fn = {trace: jax.jit(lambda p, w, b, trace=trace: _decode_window(model.graphdef, self.m, self.capacity,
                                                                           trace, p, w, b))
                for trace in (False, True)}

  def _budgets(self, budgets):
    b = np.broadcast_to(np.asarray(budgets, np.int32), (self.m.n_layers,))
    if (b < 2).any():
      raise ValueError(f"budgets {b.tolist()} must be >= 2 (BOS and the current token are never evicted)")
    if self.capacity < min(int(b.max()) + 1, self.T):
      raise ValueError(f"capacity {self.capacity} < min(max budget + 1, T={self.T})")
    return jnp.asarray(b)

  def loss(self, budgets) -> float:
    """Mean next-token NLL with layer l holding at most budgets[l] tokens (an int: the same for all layers)."""
    b = self._budgets(budgets)
    total = sum(float(self._fn[False](self.model.params, jnp.asarray(self.windows[i:i + self.batch_size]), b)[0])
                for i in range(0, len(self.windows), self.batch_size))
    loss = total / (self.windows.shape[0] * self.T)
    self.evals.append({"budgets": np.asarray(b).tolist(), "loss": loss, "kept_fraction": self.kept_fraction(b)})
    return loss

  def trace(self, budgets, windows_BL1=None) -> dict:
    """Per step t and layer l: "pos_before"/"pos" (slot positions before and after eviction, -1 free) and "f"
    (the F row used to evict and attend), as numpy [T, B, capacity], in a list over layers."""
    w = self.windows[:self.batch_size] if windows_BL1 is None else np.asarray(windows_BL1, np.int32)
    _, seen = self._fn[True](self.model.params, jnp.asarray(w), self._budgets(budgets))
    return [jax.tree.map(np.asarray, layer) for layer in seen]

  def kept_fraction(self, budgets) -> float:
    """Peak KV slots kept, over all layers, relative to the full cache of T tokens per layer."""
    b = np.broadcast_to(np.asarray(budgets), (self.m.n_layers,))
    return float(np.minimum(b, self.T).sum() / (self.m.n_layers * self.T))


def _smallest_meeting(loss_of, lo: int, hi: int, target: float):
  """Bisection for the smallest b in [lo, hi] with loss_of(b) <= target, given loss_of(hi) <= target (assumes the
  loss does not increase with the budget): (b, its loss)."""
  best = (hi, loss_of(hi))
  while lo < best[0]:
    mid = (lo + best[0]) // 2
    loss = loss_of(mid)
    if loss <= target:
      best = (mid, loss)
    else:
      lo = mid + 1
  return best


def search_budgets(ev: KVBudgetEval, target: float, per_layer: bool = False) -> dict:
  """The smallest shared budget whose loss <= target (bisection over [2, T]); with per_layer, then each layer's
  budget bisected down in turn with the others fixed (greedy, last layer first). "met" False: even the full
  cache misses the target."""
  L, T = ev.m.n_layers, ev.T
  full = ev.loss(T)
  if full > target:
    return {"met": False, "target": target, "budgets": [T] * L, "loss": full, "kept_fraction": 1.0}
  shared, loss = _smallest_meeting(lambda b: ev.loss(b), 2, T, target)
  budgets = [shared] * L
  if per_layer:
    for layer in reversed(range(L)):
      def loss_of(b, layer=layer):
        return ev.loss(budgets[:layer] + [b] + budgets[layer + 1:])
      budgets[layer], loss = _smallest_meeting(loss_of, 2, budgets[layer], target)
  slots = int(np.minimum(budgets, T).sum())
  return {"met": True, "target": target, "shared_budget": shared, "budgets": budgets, "loss": loss,
          "kept_fraction": ev.kept_fraction(budgets), "kv_slots": slots, "full_kv_slots": L * T,
          "reduction": L * T / slots}


def ratio_sweep(model, windows_BL1, ratios, rule: str = "original", target: float | None = None,
                batch_size: int = 8) -> dict:
  """Loss per keep ratio (a), the unpruned loss, and the smallest ratio meeting `target` (parity) if given."""
  rows = [{"ratio": float(r), "loss": pruned_loss(model, windows_BL1, float(r), rule, batch_size),
           "budget": max(1, int((np.shape(windows_BL1)[1] - 1) * float(r))) if rule == "original" else None}
          for r in ratios]
  out = {"rule": rule, "unpruned_loss": pruned_loss(model, windows_BL1, None, batch_size=batch_size), "ratios": rows}
  if target is not None:
    meeting = [r["ratio"] for r in rows if r["loss"] <= target]
    out["ratio_at_parity"] = min(meeting) if meeting else None
  return out


def prune_main(model, config, tokens, args, baseline=None) -> dict:
  """The `dba-eval prune` report: keep-ratio sweep, shared budgets, and (with a target) the budget search. A
  `baseline` model (--target-from) sets the target: its full-context loss on the same windows. args.within > 0
  adds a second search against the model's own full-cache loss times (1 + within)."""
  seq_len = args.seq_len or config.data.seq_len
  if args.max_windows < 1:
    raise ValueError("--max-windows must be >= 1")
  w = perplexity.windows(tokens, seq_len, seq_len)
  if len(w) == 0:
    raise ValueError(f"the split holds no window of {seq_len + 1} tokens; give a smaller --seq-len")
  n = min(len(w), args.max_windows)
  windows = np.stack([w[int(i)] for i in np.linspace(0, len(w) - 1, n).astype(int)])
  target = args.target_loss if args.target_loss > 0 else None
  baseline_loss = None
  if baseline is not None:
    if seq_len > baseline.config.max_seq_len:
      raise ValueError(f"--target-from model has max_seq_len {baseline.config.max_seq_len} < --seq-len {seq_len}")
    target = baseline_loss = window_loss(baseline, windows, batch_size=args.batch_size)
  out = {"seq_len": seq_len, "windows": n, "target_loss": target, "baseline_loss": baseline_loss,
         **ratio_sweep(model, windows, args.ratios, args.rule, target, args.batch_size)}
  ev = KVBudgetEval(model, windows, batch_size=args.batch_size)
  out["budgets"] = [{"budget": b, "loss": ev.loss(b), "kept_fraction": ev.kept_fraction(b)} for b in args.budgets]
  if target is not None:
    out["search"] = search_budgets(ev, target, per_layer=args.per_layer)
  within = getattr(args, "within", 0.0)
  if within > 0:  # a stricter target: the model's own full-cache decoding loss, relatively `within` worse
    full = ev.loss(ev.T)
    out["search_within"] = {"within": within, "full_cache_loss": full,
                            **search_budgets(ev, full * (1 + within), per_layer=args.per_layer)}
  out["budget_evals"] = ev.evals
  return out


def command(args) -> dict:
  """`dba-eval prune`: keep ratios, shared budgets and the budget search of evals/pruning.py on --split. The ratios
  (in (0, 1]) and budgets (>= 2) come range-checked from dba-eval's argument types; what depends on the run (a budget
  above the window length, an attention kind without an eviction score) is refused here, before the model loads."""
  if args.target_from and args.target_loss > 0:
    raise EvalError("give --target-loss or --target-from, not both")
  c = read_checkpoint_config(args.checkpoint)
  seq_len = args.seq_len or c.data.seq_len
  over = [b for b in args.budgets if b > seq_len]
  if over:
    raise EvalError(f"--budgets {','.join(map(str, over))}: larger than the window length T={seq_len} (--seq-len, "
                    "default the run's data.seq_len); a budget keeps at most T tokens")
  try:
    check_prunable(c.model)
  except (ValueError, NotImplementedError) as e:
    raise EvalError(str(e)) from None
  model, c = load_checkpoint(args.checkpoint)
  baseline = None
  if args.target_from:
    baseline, bc = load_checkpoint(args.target_from)
    mine, theirs = (c.data.source, c.data.tokenizer, c.model.vocab_size), (bc.data.source, bc.data.tokenizer,
                                                                           bc.model.vocab_size)
    if mine != theirs:
      raise EvalError(f"--target-from {args.target_from} reads other data (source, tokenizer, vocab {theirs}) than "
                      f"{args.checkpoint} {mine}; the criterion compares losses on the same windows")
  try:
    splits = data.load_splits(c.data, c.model.vocab_size)
    return {"checkpoint": args.checkpoint, "step": model.step, "checkpoint_dir": model.checkpoint_dir,
            "split": args.split, "target_from": args.target_from or None,
            **prune_main(model, c, getattr(splits, args.split), args, baseline)}
  except (data.DataError, ValueError, NotImplementedError) as e:
    raise EvalError(str(e)) from None


__all__ = ["keep_mask", "pruned_loss", "window_loss", "KVBudgetEval", "search_budgets", "ratio_sweep", "prune_main",
           "RULES"]
