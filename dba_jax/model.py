"""The decoder: one Flax NNX module tree whose parts are chosen by config.

Parameters carry logical axis names in their `axes` metadata (mapped to mesh axes by `mesh.LOGICAL_RULES`).
Training is pure-functional: `graphdef, params = split(model)` once, then `nnx.merge(graphdef, params)` inside
the jitted step, with `params` a plain nested dict of arrays. `Decoder.forward` is the only forward pass: decoding,
pruning, attention probes and memory blocks reach into it through the extension points of dba_jax/layers.py
(Hooks, LayerIO).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dba_jax import attention, losses, ops
from dba_jax.configlib import Config, padded_vocab
from dba_jax.hope import titans_blocks, torch_init
from dba_jax.hope.blocks import HopeBlock
from dba_jax.hope.selfmod import HybridBlock, SelfModBlock
from dba_jax.layers import ACT_EMBED, Hooks, LayerIO, Linear, MLP, NO_HOOKS, Norm, dense, dropout, normal_init, tap
from dba_jax.mesh import constrain

ACT_HEADS = ops.ACT_HEADS
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def stream_names(m: Config) -> tuple[str, ...]:
  """The per-token streams a cache stores for this model (after RoPE), in this order."""
  return tuple(attention.get(m).head_dims(m))


def check_cacheable(m: Config):
  attention.get(m).check_cacheable(m)


def _unroll(m: Config):
  """lax.scan's unroll for the layer scan: model.scan_unroll layers per loop iteration (0: all of them)."""
  u = int(m.get("scan_unroll", 1))
  return True if u == 0 or u >= m.n_layers else u


def _aux(io: LayerIO):
  """A layer's (paper, repo) memory penalties; zeros when none is computed."""
  return jnp.zeros((2,), jnp.float32) if io.aux is None else io.aux


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). The only place the block math lives."""

  def __init__(self, m: Config, rngs: nnx.Rngs):
    out_std = m.init_std / math.sqrt(2 * m.n_layers) if m.scale_residual_init else m.init_std
    self.dropout = m.dropout
    self.attn_norm = Norm(m.d_model, m.norm, m.norm_eps, m.bias)
    self.attn = attention.get(m).module(m, out_std, rngs)
    self.mlp_norm = Norm(m.d_model, m.norm, m.norm_eps, m.bias)
    self.mlp = MLP(m, out_std, rngs)

  def __call__(self, x, positions_T, rng=None, io: LayerIO = LayerIO(), hooks: Hooks = NO_HOOKS):
    """(x, io): io.aux the layer's memory penalties [paper, repo] (zeros unless one is configured), io.res the
    logits residual_attention_masks hands to the next layer, io.state this layer's updated cache state."""
    keys = jax.random.split(rng, 2) if rng is not None else (None, None)
    x = constrain(x, ACT_EMBED)
    y, io = self.attn(self.attn_norm(x), positions_T, io, hooks)
    x = x + dropout(tap("attn", y), self.dropout, keys[0])
    return x + dropout(tap("mlp", self.mlp(self.mlp_norm(x))), self.dropout, keys[1]), io


BLOCKS = {"pre_norm": Block, "hope_attention": HopeBlock, "hope_transformer": HopeBlock,
          "hope_selfmod": SelfModBlock, "hope_hybrid": HybridBlock,
          # the Titans blocks build on this module's layers, handed in (dba_jax.hope never imports the model)
          **titans_blocks.registry(Norm, MLP, Linear, dropout)}


# Logical axes that grow with model width (muP's "infinite" dimensions); head_dim stays fixed.
WIDTH_AXES = ("embed", "heads", "kv_heads", "mlp")


def mup_matrix_like(axes: tuple) -> bool:
  """muP's matrix-like parameters: two width-growing dims (hidden weights). The rest are vector-like."""
  return sum(a in WIDTH_AXES for a in axes) >= 2


def _mup_init(decoder, m):
  """Matrix-like weights drawn with std / sqrt(width_mult) (scaling a normal draw is the same thing);
  `mup_zero_query` zeroes the query projections."""
  width_mult = m.d_model / m.mup_base_d_model
  for path, var in nnx.to_flat_state(nnx.state(decoder, nnx.Param)):
    axes = tuple(var.get_metadata()["axes"])
    if m.mup_zero_query and len(path) > 1 and path[-2] in ("q", "q_sem", "q_geo") and path[-1] == "kernel":
      var.set_value(jnp.zeros_like(var.get_value()))
    elif mup_matrix_like(axes):
      var.set_value(var.get_value() * width_mult ** -0.5)


class Output(NamedTuple):
  logits: jax.Array
  aux: dict
  cache_state: Any = None
  probs: Any = None
  hidden: Any = None  # the last block's output (the final norm's input) [B, T, d]


class Decoder(nnx.Module):
  """Token embedding -> [positions] -> blocks (scanned or unrolled) -> norm -> head. Returns padded-vocab logits."""

  def __init__(self, m: Config, rngs: nnx.Rngs):
    m = ml_collections.FrozenConfigDict(m)  # hashable, so it can live in the (static) graphdef
    self.m = m
    V = padded_vocab(m)
    self.embed = nnx.Param(normal_init(rngs, (V, m.d_model), m.init_std), axes=("vocab", "embed"))
    learned = m.positions == "learned"
    self.pos_embed = nnx.Param(normal_init(rngs, (m.max_seq_len, m.d_model), m.init_std), axes=(None, "embed")) \
        if learned else None
    if m.scan_layers:
      # Build one Block per key under vmap: every parameter gets a leading "layers" axis.
      keys = jax.random.split(rngs.params(), m.n_layers)
      block = BLOCKS[m.block]
      graphdef = nnx.graphdef(nnx.eval_shape(lambda: block(m, nnx.Rngs(0))))
      stacked = jax.vmap(lambda k: nnx.state(block(m, nnx.Rngs(k))))(keys)
      self.blocks = nnx.merge(graphdef, stacked)
    else:
      self.blocks = nnx.List([BLOCKS[m.block](m, rngs) for _ in range(m.n_layers)])
    self.final_norm = Norm(m.d_model, m.norm, m.norm_eps, m.bias)
    self.head = None if m.tie_embeddings else Linear(m.d_model, V, ("embed", "vocab"), bias=False,
                                                     std=m.init_std, rngs=rngs)
    if m.mup:
      _mup_init(self, m)
    if m.hope.init == "torch_default":  # the HOPE original's torch default draws (validate: HOPE blocks only)
      torch_init.apply(self, rngs)
    if m.param_dtype != "float32":  # stored narrow; the layers' matmuls promote them to the activations' dtype
      for _, p in nnx.iter_graph(self):
        if isinstance(p, nnx.Param):
          p.set_value(p.get_value().astype(DTYPES[m.param_dtype]))

  def __call__(self, tokens_BT, rng=None):
    return self.forward(tokens_BT, rng).logits

  def forward(self, tokens_BT, rng=None, *, positions_T=None, hooks: Hooks = NO_HOOKS, cache_state=None,
              logits_at=None, embeds_BPd=None) -> "Output":
    """The forward pass, the one every caller runs (training, evaluation, decoding, pruning, probes).

    positions_T: absolute positions of the tokens (default 0..T-1; a decoding chunk starts later).
    hooks, cache_state: the extension points above; cache_state is every layer's state stacked [L, ...].
    logits_at: read out only this position (a traced index): logits [B, padded vocab].
    embeds_BPd: input embeddings placed before the tokens' (LatentWire's soft tokens); positions_T, logits and
    hidden then cover P + T positions.
    Returns Output(logits, aux, cache_state, probs [L, B, H, T, S] with hooks.return_probs); aux holds both
    memory-penalty forms, {"memory_paper": mean over layers, "memory_repo": sum over layers} (zeros unless
    model.selective.memory_penalty is set)."""
    m = self.m
    dtype = DTYPES[m.compute_dtype]
    T = tokens_BT.shape[1] + (0 if embeds_BPd is None else embeds_BPd.shape[1])
    positions_T = jnp.arange(T) if positions_T is None else positions_T
    x = self.embed_tokens(tokens_BT, positions_T, embeds_BPd)
    use_rng = rng is not None and m.dropout > 0
    if use_rng:
      rng, k = jax.random.split(rng)
      x = dropout(x, m.dropout, k)
    layer_keys = jax.random.split(rng, m.n_layers) if use_rng else None
    tap("embed", x)
    kind = attention.get(m)
    res = kind.carry(m, x.shape[0], T, dtype)  # what a layer hands the next one (selective's residual masks)
    if m.scan_layers:
      graphdef, stacked = nnx.split(self.blocks)

      def body(carry, xs):
        (h, r), (params, key, state) = carry, xs
        h, io = nnx.merge(graphdef, params)(h, positions_T, key, LayerIO(res=r, state=state), hooks)
        return (h, io.res), (_aux(io), io.state, io.probs)

      # scan_unroll: the same stacked parameters, the loop unrolled in the program (XLA CPU runs a rolled
      # loop's backward far slower: issue 16)
      (x, _), (aux_L, cache_state, probs) = jax.lax.scan(body, (x, res), (stacked, layer_keys, cache_state),
                                                         unroll=_unroll(m))
      aux = aux_L.sum(0)
    else:
      aux, states, probs = _aux(LayerIO()), [], []
      for i, block in enumerate(self.blocks):
        state = None if cache_state is None else jax.tree.map(lambda a, i=i: a[i], cache_state)
        x, io = block(x, positions_T, None if layer_keys is None else layer_keys[i], LayerIO(res=res, state=state),
                      hooks)
        aux, res = aux + _aux(io), io.res
        states.append(io.state)
        probs.append(io.probs)
      stack = lambda xs: None if xs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *xs)
      cache_state, probs = stack(states), stack(probs)
    # The paper's penalty is averaged over layers; the original code summed its own form (selective.md §3.8).
    aux = {"memory_paper": aux[0] / m.n_layers, "memory_repo": aux[1]}
    if (penalty := kind.penalty(m)) is not None:  # the loss term of the kind's configured memory penalty
      aux["penalty"] = penalty(aux)
    if logits_at is not None:
      return Output(self.readout(jax.lax.dynamic_slice_in_dim(x, logits_at, 1, axis=1))[:, 0], aux, cache_state,
                    probs, x)
    logits = self.readout(constrain(x, ACT_EMBED))
    return Output(constrain(tap("logits", logits), ("batch", "seq", "act_vocab")), aux, cache_state, probs, x)

  def embed_tokens(self, tokens_BT, positions_T, embeds_BPd=None):
    """Token (+ learned position) embeddings in the compute dtype, after `embeds_BPd` if given; positions_T are
    absolute positions."""
    dtype = DTYPES[self.m.compute_dtype]
    x = jnp.take(self.embed[...], tokens_BT, axis=0).astype(dtype)
    if embeds_BPd is not None:
      x = jnp.concatenate([embeds_BPd.astype(dtype), x], axis=1)
    if self.pos_embed is not None:
      x = x + jnp.take(self.pos_embed[...], positions_T, axis=0)[None].astype(dtype)
    return x

  def readout(self, x_BTd):
    """Final norm and head: padded-vocab logits."""
    m = self.m
    x = self.final_norm(x_BTd)
    if self.head is None:
      logits = dense(x, self.embed[...], transpose_w=True)
    else:
      logits = self.head(x)
    if m.mup:  # MuReadout: output / width_mult
      logits = logits * (m.mup_base_d_model / m.d_model)
    return logits

  def readout_nll_mean(self, hidden_BTd, targets_BT, vocab: int, chunk: int):
    """Mean next-token NLL of `readout(hidden)` without materialising [B, T, V] logits: the head and the
    cross-entropy fused over chunks of `chunk` tokens (losses.fused_head_nll_mean)."""
    if self.m.mup:
      raise ValueError("the fused readout has no muP output multiplier: use the plain readout with model.mup")
    h_BTd = self.final_norm(hidden_BTd)
    w_Vd = self.embed[...] if self.head is None else self.head.kernel[...].T
    return losses.fused_head_nll_mean(h_BTd.reshape(-1, h_BTd.shape[-1]), w_Vd, targets_BT.reshape(-1), vocab, chunk)


# ----------------------------------------------------------------------------------------------- functional API

def abstract(m: Config):
  """(graphdef, abstract param State) without allocating anything."""
  return nnx.split(nnx.eval_shape(lambda: Decoder(m, nnx.Rngs(0))))


def init_params(m: Config, key) -> dict:
  """Parameters as a plain nested dict of float32 arrays (jit this with out_shardings to place them)."""
  return nnx.to_pure_dict(nnx.state(Decoder(m, nnx.Rngs(key))))


def param_axes(m: Config, state=None) -> dict:
  """Logical axis names per parameter, as a nested dict mirroring the params. Scanned blocks get "layers" first."""
  state = abstract(m)[1] if state is None else state

  def axes(path, var):
    names = tuple(var.get_metadata()["axes"])
    if m.scan_layers and path[0] == "blocks":
      names = ("layers",) + names
    if len(names) != var.get_value().ndim:
      raise ValueError(f"parameter {'/'.join(map(str, path))}: axes {names} do not match shape {var.get_value().shape}")
    return names

  flat = {path: axes(path, var) for path, var in nnx.to_flat_state(state)}
  return _unflatten(flat)


def _unflatten(flat: dict) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return out


def count_params(m: Config) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract(m)[1]))


def kv_elems_per_token(m: Config) -> int:
  """Cache elements per token over all layers: the kind's streams (DBA: k_sem, k_geo, v; null tokens excluded)."""
  return m.n_layers * sum(attention.get(m).stream_widths(m).values())


class Model:
  """A loaded model for users and notebooks: `model(tokens_BT) -> logits [B, T, padded vocab]`."""

  def __init__(self, config: Config, graphdef, params: dict):
    self.config, self.graphdef, self.params = config, graphdef, params
    self._apply = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))

  def __call__(self, tokens_BT):
    return self._apply(self.params, jnp.asarray(tokens_BT, jnp.int32))

  @property
  def module(self) -> Decoder:
    return nnx.merge(self.graphdef, self.params)
