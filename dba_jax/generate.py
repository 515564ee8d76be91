"""KV-cache generation: prefill + decode through the Decoder's own forward pass, with `KVCache` as its cache hook.

The cache holds, per layer, the streams the model's attention kind lists (`Kind.head_dims`: standard / GQA /
selective k (after RoPE), v; DBA k_sem, k_geo (after RoPE), v), with heads merged along the feature axis (B, S, K*D,
as dba.md §1.9 stores them), and the kind's per-key state (`Kind.key_state`: selective's column sums of S, the next
query's F row), which the kind's own module updates.

Storage kinds per stream ("policy"): float32, bfloat16, float16, or block-quantised along the merged feature
axis in blocks of 32 (zero-padded), with one float16 absmax scale per block:
  q8_0  int8 q = round(x / s), s = amax / 127 (values in [-127, 127]);
  q4_0  q = clip(round(x / s), -8, 7), s = amax / 7, stored as q + 8 nibbles, two per byte (high nibble = even index);
  nf4   the 16 NormalFloat levels (QLoRA) times s = amax, nearest level's index as a nibble.
A policy is one kind for every stream, or one per stream joined by "/" (DBA "q4/q8/q4" = k_sem q4_0, k_geo q8_0,
v q4_0). `window=W` keeps the W most recent tokens of every non-float32 stream in a float32 ring as well; reads
take those tokens from the ring.

Positions: a prompt is padded up to a bucket (powers of two from 16, capped at the cache length `max_len`) so
prefill compiles once per bucket; decode compiles once per cache. Every attention reads the cache (dequantised),
so prefill and decode see the same keys. Prompts in a batch share one length.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dba_jax import attention, model as model_lib, sampling

QBLOCK = 32
FLOAT_KINDS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
QUANT_KINDS = ("q8_0", "q4_0", "nf4")
ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16",
           "q8": "q8_0", "q4": "q4_0"}
# QLoRA's NormalFloat-4 levels (quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0).
NF4_LEVELS = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
QMAX = {"q8_0": 127.0, "q4_0": 7.0, "nf4": 1.0}


# ------------------------------------------------------------------------------------------------ policies

def stream_dims(m) -> dict:
  """The attention kind's cached streams and their merged widths K*D per layer."""
  return attention.get(m).stream_widths(m)


def parse_policy(spec: str, m) -> dict:
  """{stream: kind} from "q8_0", "fp16" or per-stream "q4/q8/q4" (streams in stream_dims order)."""
  names = list(stream_dims(m))
  parts = [ALIASES.get(p.strip().lower(), p.strip().lower()) for p in str(spec).split("/")]
  bad = [p for p in parts if p not in FLOAT_KINDS and p not in QUANT_KINDS]
  if bad:
    raise ValueError(f"cache kind {bad[0]!r} is not one of {sorted(FLOAT_KINDS) + list(QUANT_KINDS)} "
                     f"(or {sorted(ALIASES)})")
  if len(parts) == 1:
    parts = parts * len(names)
  if len(parts) != len(names):
    raise ValueError(f"cache policy {spec!r} has {len(parts)} parts; this model caches {len(names)} streams "
                     f"({'/'.join(names)})")
  return dict(zip(names, parts))


def stream_bytes_per_token(kind: str, width: int) -> int:
  if kind in FLOAT_KINDS:
    return width * jnp.dtype(FLOAT_KINDS[kind]).itemsize
  nb = -(-width // QBLOCK)
  return nb * ((QBLOCK if kind == "q8_0" else QBLOCK // 2) + 2)  # payload + one float16 scale per block


def kv_bytes_per_token(m, cache: str = "float16") -> int:
  """Analytic bytes one cached token takes over all layers (the kind's per-key state included, e.g. selective's F
  carry, 4 B/layer; the full-precision window and DBA null tokens excluded: they do not grow with the context)."""
  policy = parse_policy(cache, m)
  per_layer = sum(stream_bytes_per_token(policy[s], w) for s, w in stream_dims(m).items())
  per_layer += sum(jnp.dtype(d).itemsize for d in attention.get(m).key_state(m).values())
  return m.n_layers * per_layer


def window_bytes_per_token(m, cache: str = "float16") -> int:
  """Bytes per token of the float32 recent-token window (streams stored in anything but float32)."""
  policy = parse_policy(cache, m)
  return m.n_layers * sum(4 * w for s, w in stream_dims(m).items() if policy[s] != "float32")


def cache_bytes(cache) -> int:
  """Measured bytes of an allocated cache (every array in it)."""
  return int(sum(x.nbytes for x in jax.tree.leaves(cache)))


# -------------------------------------------------------------------------------------------- quantisation

def _blocks(x_NF):
  """[..., F] -> float32 [..., nb, 32], zero-padded."""
  F = x_NF.shape[-1]
  nb = -(-F // QBLOCK)
  x = jnp.pad(x_NF.astype(jnp.float32), [(0, 0)] * (x_NF.ndim - 1) + [(0, nb * QBLOCK - F)])
  return x.reshape(x.shape[:-1] + (nb, QBLOCK))


def _pack(nib_NB32):
  return (nib_NB32[..., 0::2] << 4) | nib_NB32[..., 1::2]


def _unpack(byte_NB16):
  return jnp.stack([byte_NB16 >> 4, byte_NB16 & 15], axis=-1).reshape(byte_NB16.shape[:-1] + (QBLOCK,))


def quantize(x_NF, kind: str) -> dict:
  """{"q": int8 [..., nb, 32] (q8_0) or packed uint8 [..., nb, 16], "s": float16 [..., nb]}."""
  xb = _blocks(x_NF)
  amax = jnp.abs(xb).max(-1)
  qmax = QMAX[kind]
  s16 = (amax / qmax).astype(jnp.float16)
  # A scale rounded down by float16 would push the block's largest entry past qmax into the clamp; one ulp up.
  s16 = jnp.where(s16.astype(jnp.float32) * qmax < amax, jnp.nextafter(s16, jnp.float16(jnp.inf)), s16)
  s = s16.astype(jnp.float32)[..., None]
  y = xb * jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
  if kind == "q8_0":
    q = jnp.clip(jnp.round(y), -127, 127).astype(jnp.int8)
  elif kind == "q4_0":
    q = _pack((jnp.clip(jnp.round(y), -8, 7) + 8).astype(jnp.uint8))
  else:
    levels = jnp.asarray(NF4_LEVELS).reshape((1,) * y.ndim + (16,))
    q = _pack(jnp.argmin(jnp.abs(y[..., None] - levels), axis=-1).astype(jnp.uint8))
  return {"q": q, "s": s16}


def dequantize(store: dict, kind: str, width: int):
  """float32 [..., width] from a quantize() result."""
  s = store["s"].astype(jnp.float32)[..., None]
  if kind == "q8_0":
    y = store["q"].astype(jnp.float32)
  elif kind == "q4_0":
    y = _unpack(store["q"]).astype(jnp.float32) - 8.0
  else:
    y = jnp.asarray(NF4_LEVELS)[_unpack(store["q"]).astype(jnp.int32)]
  x = y * s
  return x.reshape(x.shape[:-2] + (-1,))[..., :width]


def half_step(store: dict, kind: str):
  """The largest round-trip error per block, [..., nb]: half the widest gap between neighbouring levels."""
  gap = {"q8_0": 1.0, "q4_0": 1.0, "nf4": float(np.diff(NF4_LEVELS).max())}[kind]
  return 0.5 * gap * store["s"].astype(jnp.float32)


# --------------------------------------------------------------------------------------------- cache store

def _empty_stream(kind, B, S, F, window):
  if kind in FLOAT_KINDS:
    st = {"x": jnp.zeros((B, S, F), FLOAT_KINDS[kind])}
  else:
    nb = -(-F // QBLOCK)
    q = jnp.zeros((B, S, nb, QBLOCK), jnp.int8) if kind == "q8_0" else jnp.zeros((B, S, nb, QBLOCK // 2), jnp.uint8)
    st = {"q": q, "s": jnp.zeros((B, S, nb), jnp.float16)}
  if window and kind != "float32":
    st["win"] = jnp.zeros((B, window, F), jnp.float32)
  return st


def _ring_write(win_BWF, new_BTF, pos0, n_valid):
  """Slot s holds the latest valid position p < n_valid with p % W == s; take it from this chunk when it is here."""
  W, T = win_BWF.shape[1], new_BTF.shape[1]
  last = n_valid - 1
  p_W = last - jnp.mod(last - jnp.arange(W), W)
  here = p_W >= jnp.maximum(pos0, 0)
  vals = jnp.take(new_BTF, jnp.clip(p_W - pos0, 0, T - 1), axis=1).astype(win_BWF.dtype)
  return jnp.where(here[None, :, None], vals, win_BWF)


def _write(st: dict, kind: str, new_BTF, pos0, n_valid) -> dict:
  st = dict(st)
  if kind in FLOAT_KINDS:
    st["x"] = jax.lax.dynamic_update_slice(st["x"], new_BTF.astype(st["x"].dtype), (0, pos0, 0))
  else:
    qd = quantize(new_BTF, kind)
    st["q"] = jax.lax.dynamic_update_slice(st["q"], qd["q"], (0, pos0, 0, 0))
    st["s"] = jax.lax.dynamic_update_slice(st["s"], qd["s"], (0, pos0, 0))
  if "win" in st:
    st["win"] = _ring_write(st["win"], new_BTF, pos0, n_valid)
  return st


def _read(st: dict, kind: str, width: int, n_valid, dtype):
  """[B, S, width] in `dtype`; positions in the window come from the float32 ring."""
  x = st["x"].astype(jnp.float32) if kind in FLOAT_KINDS else dequantize(st, kind, width)
  if "win" in st:
    W, S = st["win"].shape[1], x.shape[1]
    p_S = jnp.arange(S)
    recent = (p_S > n_valid - 1 - W) & (p_S < n_valid)
    x = jnp.where(recent[None, :, None], jnp.take(st["win"], p_S % W, axis=1), x)
  return x.astype(dtype)


# ----------------------------------------------------------------------------------------------- the cache

@dataclasses.dataclass(frozen=True)
class KVCache:
  """The model's cache extension point (model.Hooks.cache) for positional caches: slot s holds position s.
  A layer's state is {stream: store} plus the kind's per-key state (kept by the attention module)."""
  policy: tuple   # ((stream, kind), ...)
  widths: tuple   # ((stream, K * D), ...)

  def update(self, state, new, q_pos_T, valid_T):
    """Write the chunk at positions q_pos_T[0] ... (rows valid_T are real), read every stored token back."""
    policy, widths = dict(self.policy), dict(self.widths)
    pos0, n_valid = q_pos_T[0], q_pos_T[0] + valid_T.sum()
    state, streams = dict(state), {}
    for name, t in new.items():
      B, T, K, D = t.shape
      state[name] = _write(state[name], policy[name], t.reshape(B, T, K * D), pos0, n_valid)
      x = _read(state[name], policy[name], widths[name], n_valid, t.dtype)
      streams[name] = x.reshape(B, x.shape[1], K, D)
    S = streams[next(iter(streams))].shape[1]
    return state, streams, jnp.broadcast_to(jnp.arange(S), (B, S))


def _run(graphdef, cache: KVCache, params, state, tokens_BT, pos0, n_valid):
  """Logits [B, padded vocab] at position n_valid - 1 and the updated cache, for a chunk starting at pos0."""
  positions_T = pos0 + jnp.arange(tokens_BT.shape[1])
  hooks = model_lib.Hooks(cache=cache, valid_T=positions_T < n_valid)
  out = nnx.merge(graphdef, params).forward(tokens_BT, positions_T=positions_T, hooks=hooks, cache_state=state,
                                            logits_at=n_valid - 1 - pos0)
  return out.logits, out.cache_state


class Generator:
  """Cached generation for one loaded model (dba_jax.model.Model) with a fixed cache length and batch.

    gen = Generator(model, cache="q4/q8/q4", window=128, max_len=1024)
    out = gen.generate([prompt_ids], max_new=64, temperature=0.0, stop_tokens=[10])
  """

  def __init__(self, model, cache: str = "float32", window: int = 0, max_len: int | None = None, batch: int = 1):
    m = model.config
    model_lib.check_cacheable(m)
    self.m, self.graphdef, self.params = m, model.graphdef, model.params
    self.cache_spec, self.policy = cache, parse_policy(cache, m)
    self.cache = KVCache(tuple(self.policy.items()), tuple(stream_dims(m).items()))
    self.window, self.batch = int(window), int(batch)
    self.max_len = int(max_len or m.max_seq_len)
    if m.positions == "learned" and self.max_len > m.max_seq_len:
      raise ValueError(f"max_len={self.max_len} exceeds the learned position table ({m.max_seq_len})")
    if self.window < 0:
      raise ValueError(f"window={window} must be >= 0")
    self.traces = {"prefill": 0, "decode": 0}  # compilations, for tests and progress messages
    run = functools.partial(_run, model.graphdef, self.cache)

    def prefill(params, cache, tokens_BP, n_valid):
      self.traces["prefill"] += 1
      return run(params, cache, tokens_BP, 0, n_valid)

    def decode(params, cache, token_B, pos, key, temperature):
      self.traces["decode"] += 1
      logits, cache = run(params, cache, token_B[:, None], pos, pos + 1)
      return logits, cache, sampling.pick(logits, key, temperature, m.vocab_size)

    self._prefill = jax.jit(prefill, donate_argnums=1)
    self._decode = jax.jit(decode, donate_argnums=1)

  def init_cache(self):
    B, S, W = self.batch, self.max_len, self.window
    layer = {name: _empty_stream(self.policy[name], B, S, F, W) for name, F in stream_dims(self.m).items()}
    layer.update({name: jnp.zeros((B, S), dtype) for name, dtype in attention.get(self.m).key_state(self.m).items()})
    return jax.tree.map(lambda a: jnp.zeros((self.m.n_layers,) + a.shape, a.dtype), layer)

  def bucket(self, n: int) -> int:
    if not 0 < n <= self.max_len:
      raise ValueError(f"prompt length {n} must be in [1, max_len={self.max_len}]")
    return min(self.max_len, max(16, 1 << (n - 1).bit_length()))

  def prefill(self, prompt_BP):
    """(logits [B, padded vocab] after the prompt, state); state = (cache, next position)."""
    prompt = np.asarray(prompt_BP, np.int32).reshape(self.batch, -1)
    n = prompt.shape[1]
    padded = np.zeros((self.batch, self.bucket(n)), np.int32)
    padded[:, :n] = prompt
    logits, cache = self._prefill(self.params, self.init_cache(), jnp.asarray(padded), jnp.int32(n))
    return logits, (cache, n)

  def decode(self, state, token_B, key=None, temperature: float = 0.0):
    """Feed one token per row at the next position: (logits, state, next token picked from the logits)."""
    cache, pos = state
    if pos >= self.max_len:
      raise ValueError(f"the cache is full (max_len={self.max_len})")
    key = jax.random.key(0) if key is None else key
    logits, cache, nxt = self._decode(self.params, cache, jnp.asarray(token_B, jnp.int32).reshape(self.batch),
                                      jnp.int32(pos), key, jnp.float32(temperature))
    return logits, (cache, pos + 1), nxt

  def generate(self, prompt_BP, max_new: int, temperature: float = 0.0, seed: int = 0, stop_tokens=(),
               progress: bool = False) -> dict:
    """New tokens per row, each cut before its first stop token (dba_jax.sampling.generate: the dict it returns)."""
    return sampling.generate(self, prompt_BP, max_new, temperature, seed, stop_tokens, progress)


def teacher_forced_logits(gen: Generator, tokens_BT, n_prompt: int):
  """Logits [B, T - n_prompt + 1, padded vocab] for positions n_prompt - 1 .. T - 1: prefill the first n_prompt
  tokens, then feed the rest one by one (what the tests compare against model(tokens))."""
  tokens = np.asarray(tokens_BT, np.int32)
  logits, state = gen.prefill(tokens[:, :n_prompt])
  out = [logits]
  for t in range(n_prompt, tokens.shape[1]):
    logits, state, _ = gen.decode(state, tokens[:, t])
    out.append(logits)
  return jnp.stack(out, axis=1)
