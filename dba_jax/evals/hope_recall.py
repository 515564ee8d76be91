"""`dba-eval hope recall`: train a tiny Titans model on the token-level passkey and score it at the training length
and beyond, with the memory as trained, its writes off and off, on the same fresh prompts.

Per length and arm: accuracy of the 2-way key choice with its Wilson interval and the exact binomial p against
chance (1/2); per length: exact McNemar tests of the memory against each baseline (paired: the same prompts). Every
p-value of the run is also Holm-adjusted over the whole table (`p_holm`), since one run makes many comparisons.

The task, token-level passkey ("recall"): a memory benchmark small enough to train in a test.

A sequence of T + 1 tokens is [NEEDLE, key, filler ..., QUERY, key]: the key is one of `n_keys` ids, the filler
uniform over the ids after them. Only the last token is scored (answer-only CE), so nothing but the key's recall is
learned. With the needle T − 2 tokens before the question, outside every local attention span of a titans block
(MAC segment, MAG / MAL window, LMM none) as long as T exceeds it, the memory is the only way to the key: with
hope.memory off the answer is a guess (chance 1 / n_keys; the 2-way choice of `score` has chance 1/2).

Training is the model's own forward with dba-train's optimiser (dba_jax.optim: clip, AdamW, warm-up + cosine); the
arms of `score` are the same weights with the memory as trained, its writes off (θ = 0, forgetting kept) and off.
`carry` = N (titans_mac): each batch row's memory continues from where the previous batch left it, N batches in a
row before it restarts from M_0 (truncated BPTT over batches: no gradient crosses), so training sees a memory that
already holds older keys and filler, as a longer prompt's memory does. (Carried forever, it diverged: NaN within
100 steps at titans_lr 0.2, BUILD_NOTES.)
"""
from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dba_jax import losses, model as model_lib, optim
from dba_jax.evals import stats
from dba_jax.evals.common import EvalError
from dba_jax.hope import blocks

NEEDLE, QUERY, FIRST_KEY = 1, 2, 3
ARMS = {"memory": {}, "writes_off": {"writes": False}, "memory_off": {"memory": False}}
CHANCE = 0.5  # the 2-way choice


def check(m, T: int, n_keys: int):
  """One line for a model or length the task cannot run on."""
  if n_keys < 2:
    raise ValueError(f"recall needs >= 2 keys (got {n_keys})")
  if m.vocab_size < FIRST_KEY + n_keys + 2:
    raise ValueError(f"model.vocab_size={m.vocab_size} leaves no filler ids after {n_keys} keys (needs >= "
                     f"{FIRST_KEY + n_keys + 2})")
  if T < 4:
    raise ValueError(f"recall sequences need >= 4 tokens (got {T})")


def sample(rng, B: int, T: int, vocab: int, n_keys: int):
  """(tokens [B, T + 1] int32, keys [B], distractor keys [B] (another key, uniform))."""
  tokens = rng.integers(FIRST_KEY + n_keys, vocab, size=(B, T + 1))
  keys = rng.integers(0, n_keys, size=B)
  other = (keys + rng.integers(1, n_keys, size=B)) % n_keys
  keys, other = keys + FIRST_KEY, other + FIRST_KEY
  tokens[:, 0], tokens[:, 1], tokens[:, -2], tokens[:, -1] = NEEDLE, keys, QUERY, keys
  return tokens.astype(np.int32), keys, other


def arm_config(m, arm: str):
  """The model config `m` with one arm's memory switches."""
  m = m.copy_and_resolve_references()
  for k, v in ARMS[arm].items():
    m.hope[k] = v
  return m


def _answer_logits(graphdef, params, tokens_BT1, state=None):
  """(answer logits [B, V], the memory state after, when one was given)."""
  out = nnx.merge(graphdef, params).forward(tokens_BT1[:, :-1], cache_state=state)
  return out.logits[:, -1].astype(jnp.float32), out.cache_state


def train(c, steps: int, batch: int, seed: int = 0, n_keys: int = 8, log=None, carry: int = 0):
  """(params, answer CE per step [steps]) after `steps` steps of answer-only CE on fresh batches of c.data.seq_len
  (`carry`: memory carried across batches, the module docstring)."""
  m, T = c.model, c.data.seq_len
  check(m, T, n_keys)
  if carry and m.block != "titans_mac":
    raise ValueError(f"carrying the memory across batches needs titans_mac (model.block={m.block!r} carries none)")
  graphdef = model_lib.abstract(m)[0]
  params = model_lib.init_params(m, jax.random.key(seed))
  tx = optim.make_optimizer(c, model_lib.param_axes(m))

  def loss_fn(p, tokens, state):
    logits, state = _answer_logits(graphdef, p, tokens, state)
    return losses.nll(logits[:, None], tokens[:, -1:], m.vocab_size).mean(), state

  @jax.jit
  def step(p, opt_state, tokens, state):
    (loss, state), g = jax.value_and_grad(loss_fn, has_aux=True)(p, tokens, state)
    updates, opt_state = tx.update(g, opt_state, p)
    return jax.tree.map(jnp.add, p, updates), opt_state, loss, jax.lax.stop_gradient(state)

  fresh = blocks.init_fast_state(m, nnx.merge(graphdef, params), batch) if carry else None
  opt_state, rng, out, t0 = tx.init(params), np.random.default_rng([seed, 1]), [], time.perf_counter()
  state = fresh
  for i in range(steps):
    state = fresh if not carry or i % carry == 0 else state
    tokens = sample(rng, batch, T, m.vocab_size, n_keys)[0]
    params, opt_state, loss, state = step(params, opt_state, jnp.asarray(tokens), state)
    out.append(loss)
    if log and (i % 100 == 0 or i == steps - 1):
      log(f"step {i}: answer CE {float(loss):.4f} ({time.perf_counter() - t0:.0f} s)")
  return params, np.asarray(jax.device_get(out), np.float64)


def score(c, params, T: int, samples: int, seed: int, n_keys: int = 8, arms=tuple(ARMS), chunk: int = 128) -> dict:
  """{arm: correct [samples] bool}: the 2-way choice key vs distractor on `samples` fresh prompts of T tokens
  (drawn from (seed, T)); every arm scores the same prompts, so arms compare paired."""
  m = c.model
  check(m, T, n_keys)
  tokens, keys, other = sample(np.random.default_rng([seed, T, 2]), samples, T, m.vocab_size, n_keys)
  rows = np.arange(samples)
  out = {}
  for arm in arms:
    graphdef = model_lib.abstract(arm_config(m, arm))[0]
    fn = jax.jit(lambda p, t, g=graphdef: _answer_logits(g, p, t)[0])
    logits = np.concatenate([np.asarray(fn(params, jnp.asarray(tokens[i:i + chunk])))
                             for i in range(0, samples, chunk)])
    out[arm] = logits[rows, keys] > logits[rows, other]
  return out


def results(c, params, lengths, samples: int, seed: int, n_keys: int) -> list[dict]:
  """One row per length: each arm's accuracy, interval and p against chance; McNemar of the memory vs the others."""
  rows, ps = [], []
  for T in lengths:
    right = score(c, params, T, samples, seed, n_keys)
    row = {"length": T, "samples": samples, "train_length": c.data.seq_len}
    for arm, r in right.items():
      k = int(r.sum())
      row[arm] = {"acc": k / samples, "ci95": stats.wilson_interval(k, samples),
                  "p_chance": stats.binomial_greater(k, samples, CHANCE)}
      ps.append((row[arm], "p_chance"))
    for arm in right:
      if arm != "memory":
        row[f"memory_vs_{arm}"] = stats.mcnemar_exact(right["memory"], right[arm])
        ps.append((row[f"memory_vs_{arm}"], "p"))
    rows.append(row)
  for (d, key), adj in zip(ps, stats.holm([d[key] for d, key in ps])):
    d[f"{key}_holm"] = adj
  return rows


def command(args, c) -> dict:
  """Train on c (one seed), then score every --lengths value (default 1x, 2x, 4x the training length)."""
  T = c.data.seq_len
  lengths = list(args.lengths) or [T, 2 * T, 4 * T]
  try:
    for n in lengths:
      check(c.model, n, args.keys)
  except ValueError as e:
    raise EvalError(str(e)) from None
  log = lambda s: print(f"recall {c.model.block}: {s}", file=sys.stderr, flush=True)
  try:
    params, loss = train(c, args.steps or c.train.steps, c.train.batch_size, args.seed, args.keys, log,
                                carry=args.carry)
  except ValueError as e:
    raise EvalError(str(e)) from None
  rows = results(c, params, lengths, args.samples, args.seed + 1000, args.keys)
  for r in rows:
    log(f"{r['length']} tokens: " + ", ".join(f"{a} {r[a]['acc']:.3f}" for a in ARMS) +
        f"; memory vs off McNemar p {r['memory_vs_memory_off']['p']:.2g}")
  return {"task": "recall", "block": c.model.block, "seed": args.seed, "keys": args.keys, "carry": args.carry,
          "titans_lr": c.model.hope.titans_lr, "memory_depth": c.model.hope.titans_memory_depth,
          "steps": int(len(loss)), "final_answer_ce": float(loss[-10:].mean()), "chance": CHANCE,
          "by_length": rows}
