"""caramba checkpoints (the DBA paper's PyTorch code, dba.md §4 and §2.3) <-> dba_jax parameters.

A caramba checkpoint is `torch.save({"system_state_dict": state_dict, "run_id", "step"})`; `unwrap` takes the state
dict out of that (or of a `model_state_dict` / `state_dict` container, or a raw state dict) and drops torch.compile's
`_orig_mod.` prefix. Every function here also accepts prefixed keys. No config is stored, so the head count comes
from the user's config; everything else that the shapes tell is set from them (`config_from`), and a field the user
chose (`conversion.given`: on the command line, or differing from base_config) that the shapes contradict is an error.

Two key layouts, told apart by the LM-head key:
  "paper"   the 22-layer runs: StackedTopology[NestedTopology(L x [attn block, ffn block]), RMSNorm, LinearLayer],
            attention is caramba's AttentionLayer (`qkv_proj`, or DBA's q_sem / k_sem / q_geo / k_geo / v_proj).
  "opgraph" the 12-layer local ablations: the same blocks, attention an OpGraphLayer whose nodes live under
            `modules_by_id.<node id>`, and the final RMSNorm + head wrapped in a SequentialTopology.

Key map (i = layer; A = `topology.layers.0.layers.{2i}.layers.1.`, F = `topology.layers.0.layers.{2i+1}.layers.1.`;
PyTorch Linear weights [out, in] become dba_jax kernels [in, out]; a `.bias` beside any Linear weight when
model.bias; dba_jax params are `blocks[i]…`, or `blocks…[i]` with scan_layers):

  caramba key (paper layout)                         shape               dba_jax param
  embedder.token_embedding.weight                    [V, d]              embed
  topology.layers.0.layers.{2i}.layers.0.weight      [d]                 attn_norm.scale
  A qkv_proj.weight                                  [(H+2K)·D, d]       attn.q / k / v .kernel (rows [q | k | v])
  A q_proj / k_proj / v_proj .weight  (legacy)       [H·D | K·D, d]      attn.q / k / v .kernel (written back fused)
  A out_proj.weight                                  [d, H·D]            attn.out.kernel
  A q_sem / k_sem .weight                            [sem, d]            attn.q_sem / k_sem .kernel
  A q_geo / k_geo .weight                            [geo, d]            attn.q_geo / k_geo .kernel
  A v_proj.weight (DBA)                              [attn, d]           attn.v.kernel
  A decoupled_gate_logit                             [H]                 attn.gate_logit
  A decoupled_gate_proj.weight                       [H, d]              attn.gate_proj.kernel
  A k_sem_null / k_geo_null / v_null                 [H, d_head]         attn.k_sem_null / k_geo_null / v_null
  topology.layers.0.layers.{2i+1}.layers.0.weight    [d]                 mlp_norm.scale
  F w_gate_up.weight                                 [2·d_ff, d]         mlp.w_in [d, 2, d_ff] (rows: gate, then up)
  F w_down.weight                                    [d, d_ff]           mlp.w_out.kernel
  topology.layers.1.weight                           [d]                 final_norm.scale
  topology.layers.2.linear.weight                    [V, d]              head.kernel

  OpGraph layout (A += `modules_by_id.`; Linear nodes hold a `LinearLayer`, hence `.linear.weight`)
  A qkv_proj.linear.weight                           [(H+2K)·D, d]       attn.q / k / v .kernel  (q, k rows reordered*)
  A q_proj.linear.weight / k_proj.linear.weight      [sem+geo, d]        rows [sem | geo]: q_sem, q_geo* / k_sem, k_geo*
  A qk_proj.linear.weight  (tie-QK ablation)         [sem+geo, d]        q_sem = k_sem (tie_qk), q_geo* = k_geo*
  A v_proj.linear.weight / out_proj.linear.weight                        attn.v / attn.out .kernel
  A null_k_sem_lin.param / null_k_geo_lin.param / null_v_lin.param  [1, 1, sem | geo | attn]  k_sem_null … [H, d_head]
  topology.layers.1.layers.0.weight                  [d]                 final_norm.scale
  topology.layers.1.layers.1.linear.weight           [V, d]              head.kernel

  * The OpGraph's ApplyRoPEOperation rotates the pairs (2j, 2j+1) and writes them back as [evens | odds]: that is
    rotate-half RoPE (dba_jax's) of each head's features reordered [0, 2, 4, …, 1, 3, 5, …]. So those rows are
    reordered per head on the way in and back on the way out (a permutation: exact both ways). The null keys are
    concatenated after RoPE, in the rotated layout already, and are not reordered.

Legacy checkpoints (before caramba fd9ca98) store baseline attention as separate q/k/v; like the original loader this
fuses each layer's triple as [q; k; v] and logs "Converted N separate Q/K/V projections to fused qkv_proj".
`from_params` always writes the fused `qkv_proj`, in the paper layout unless `layout="opgraph"`.

Assumptions (names and semantics dba.md does not pin down, read from the caramba sources at 3f9a1d8 / 443b167):
  - null-token and gate keys are the attribute names of caramba's DecoupledSetup: `k_sem_null`, `k_geo_null`,
    `v_null` ([H, head dim] each) and `decoupled_gate_proj.weight` ([H, d], never a bias) beside
    `decoupled_gate_logit`; dba_jax's gate_proj bias (model.bias) is zero on import and must be zero on export.
  - tied QK (paper): the state dict lists the shared weight as both `q_sem.weight` and `k_sem.weight`; a file is
    tied when the two are equal in every layer (or `k_sem` is absent, if a reader de-duplicated shared storage).
  - OpGraph names: node ids of config/blocks/attention/{standard,dba,dba_null,dba_tieqk}_opgraph.yml under
    `modules_by_id`, Linear nodes as `<id>.linear.weight`, ParameterOperation nodes as `<id>.param`; the final
    SequentialTopology gives `topology.layers.1.layers.{0,1}`. The OpGraph tie-QK ablation ties the geometric
    projections too; dba_jax keeps q_geo and k_geo (equal on import; export needs them still equal).
  - The OpGraph's fused q_proj does not say where sem ends: sem_dim and geo_dim come from the config (or from the
    null-token shapes); the OpGraph has no gated variant, and DBA with n_kv_heads < n_heads (whose per-head widths
    in caramba differ from dba_jax's) is refused.
"""
from __future__ import annotations

import copy
import logging
import re

import numpy as np
from flax import nnx

from dba_jax import conversion, model as model_lib
from dba_jax.configlib import attn_dim, kv_heads, padded_vocab
from dba_jax.conversion import ConversionError, Keys

NAME = "caramba"
log = logging.getLogger("dba_jax")

EMBED = "embedder.token_embedding.weight"
BLOCKS = "topology.layers.0.layers."
COMPILED = "_orig_mod."  # torch.compile's wrapper prefix
CONTAINERS = ("system_state_dict", "model_state_dict", "state_dict")
FINAL = {  # layout: (final RMSNorm weight, LM head weight)
    "paper": ("topology.layers.1.weight", "topology.layers.2.linear.weight"),
    "opgraph": ("topology.layers.1.layers.0.weight", "topology.layers.1.layers.1.linear.weight"),
}


# --------------------------------------------------------------------------------------------- keys and layout

def strip_prefix(tensors: dict) -> dict:
  return {(k[len(COMPILED):] if k.startswith(COMPILED) else k): v for k, v in tensors.items()}


def unwrap(obj) -> dict:
  """The state dict inside a loaded caramba checkpoint (trainer container or raw), `_orig_mod.` stripped."""
  if isinstance(obj, dict):
    for name in CONTAINERS:
      if isinstance(obj.get(name), dict):
        return strip_prefix(obj[name])
  return strip_prefix(obj)


def detect(keys) -> bool:
  keys = {k[len(COMPILED):] if k.startswith(COMPILED) else k for k in keys}
  return EMBED in keys and any(k.startswith(BLOCKS) for k in keys)


def _layout(t: dict) -> str:
  for layout, (_, head) in FINAL.items():
    if head in t:
      return layout
  raise ConversionError(f"caramba checkpoint has no LM head: expected {FINAL['paper'][1]} (22-layer paper layout) "
                        f"or {FINAL['opgraph'][1]} (12-layer OpGraph layout)")


layout_of = _layout  # convert.py records it, so --to-torch writes the key layout the file came in


def _attn(i: int) -> str:
  return f"{BLOCKS}{2 * i}.layers."


def _ffn(i: int) -> str:
  return f"{BLOCKS}{2 * i + 1}.layers."


def _node(layout: str, name: str) -> str:
  """Key prefix of a Linear inside the attention module."""
  return f"{name}." if layout == "paper" else f"modules_by_id.{name}.linear."


def _param_node(layout: str, name: str) -> str:
  return name if layout == "paper" else f"modules_by_id.{name}.param"


def _n_layers(t: dict) -> int:
  found = {int(m.group(1)) for k in t if (m := re.match(re.escape(BLOCKS) + r"(\d+)\.", k))}
  if not found or (max(found) + 1) % 2:
    raise ConversionError(f"caramba checkpoint: blocks {BLOCKS}N found for N in {sorted(found)}; expected "
                          "an attention and an FFN block per layer (N = 0 .. 2 * n_layers - 1)")
  return (max(found) + 1) // 2


def _attn_form(t: dict, layout: str, i: int = 0) -> str:
  """fused | separate (legacy q/k/v) | dba | dba_tied (OpGraph qk_proj), from layer i's keys."""
  a = _attn(i) + "1."
  if layout == "paper":
    if a + "qkv_proj.weight" in t:
      return "fused"
    if all(a + f"{p}_proj.weight" in t for p in "qkv"):
      return "separate"
    if a + "q_sem.weight" in t:
      return "dba"
  else:
    for node, form in (("qkv_proj", "fused"), ("q_proj", "dba"), ("qk_proj", "dba_tied")):
      if a + _node(layout, node) + "weight" in t:
        return form
  raise ConversionError(f"caramba checkpoint: layer {i} has no attention projection under {a} "
                        "(qkv_proj, q_proj/k_proj/v_proj, q_sem, or the OpGraph's qkv_proj / q_proj / qk_proj)")


def _deinterleave(w, n_heads: int):
  """Rows of each head reordered [0, 2, 4, …, 1, 3, 5, …] (w [heads * D, ...] or [heads * D])."""
  D = w.shape[0] // n_heads
  perm = np.concatenate([np.arange(0, D, 2), np.arange(1, D, 2)])
  return w.reshape((n_heads, D) + w.shape[1:])[:, perm].reshape(w.shape)


def _interleave(w, n_heads: int):
  D = w.shape[0] // n_heads
  inv = np.argsort(np.concatenate([np.arange(0, D, 2), np.arange(1, D, 2)]))
  return w.reshape((n_heads, D) + w.shape[1:])[:, inv].reshape(w.shape)


# ------------------------------------------------------------------------------------------------- config_from

def _no_fit(key, shape, field, why):
  return ConversionError(f"caramba checkpoint: {key} has shape {tuple(shape)} but {field} {why}")


def _set(c, field: str, value, key: str, shape, current=None):
  """model.<field> = value (what the file says), unless the user chose something else: then an error."""
  node, name = conversion.field_of(c.model, field)
  current = node[name] if current is None else current
  if current != value and conversion.given(c, f"model.{field}"):
    raise _no_fit(key, shape, f"the config's model.{field}={current!r}", f"contradicts it: the file says {value!r}")
  node[name] = value


def config_from(tensors: dict, c):
  t = strip_prefix(tensors)
  layout = _layout(t)
  c = copy.deepcopy(c)
  m = c.model

  def shape(key):
    if key not in t:
      raise ConversionError(f"caramba checkpoint: missing key {key}")
    return tuple(t[key].shape)

  if m.positions == "learned":
    raise ConversionError("model.positions='learned' but caramba models have no position table (RoPE or none)")
  if m.mup:
    raise ConversionError("model.mup=True but caramba models are standard-parametrised (set model.mup=False)")

  V, d = shape(EMBED)
  _set(c, "d_model", d, EMBED, (V, d))
  if padded_vocab(m) != V:  # keep the tokenizer vocab when its padding already gives the embedding rows
    if conversion.given(c, "model.vocab_size") or conversion.given(c, "model.pad_vocab_to"):
      raise _no_fit(EMBED, (V, d), f"model.vocab_size={m.vocab_size} padded to model.pad_vocab_to={m.pad_vocab_to}",
                    f"gives {padded_vocab(m)} rows")
    m.vocab_size = V
    m.pad_vocab_to = m.pad_vocab_to if V % m.pad_vocab_to == 0 else 1
  n_layers = _n_layers(t)
  _set(c, "n_layers", n_layers, f"{BLOCKS}{2 * n_layers - 1}.layers.0.weight", (d,))
  for field, value in (("norm", "rmsnorm"), ("mlp", "swiglu"), ("tie_embeddings", False)):
    _set(c, field, value, FINAL[layout][1], shape(FINAL[layout][1]))
  gate_up = _ffn(0) + "1.w_gate_up.weight"
  rows = shape(gate_up)[0]
  if rows % 2:
    raise _no_fit(gate_up, shape(gate_up), "model.d_ff", "must be half its rows (gate rows, then up rows)")
  _set(c, "d_ff", rows // 2, gate_up, shape(gate_up))
  a = _attn(0) + "1."
  out_key = a + _node(layout, "out_proj") + "weight"
  down = _ffn(0) + "1.w_down.weight"
  has_bias = out_key[:-len("weight")] + "bias" in t or _ffn(0) + "1.w_down.bias" in t
  _set(c, "bias", has_bias, down, shape(down))

  H = m.n_heads
  A = shape(out_key)[1]
  if A % H:
    raise _no_fit(out_key, shape(out_key), f"model.n_heads={H}", f"does not divide its attention width {A}")
  form = _attn_form(t, layout)
  if form in ("fused", "separate"):
    D = A // H
    if form == "fused":
      key = a + _node(layout, "qkv_proj") + "weight"
      rows = shape(key)[0] - A  # k and v rows
      kv = rows // 2 if rows > 0 and rows % 2 == 0 else 0
    else:
      key = a + "k_proj.weight"
      kv = shape(key)[0]
    if kv <= 0 or kv % D or H % (kv // D):
      raise _no_fit(key, shape(key), f"model.n_heads={H}",
                    f"(head dim {D}) gives no whole number of kv heads dividing the query heads")
    K = kv // D
    _set(c, "attn_kind", "standard", key, shape(key))
    _set(c, "attn_dim", A, out_key, shape(out_key), current=attn_dim(m))
    _set(c, "n_kv_heads", 0 if K == H else K, key, shape(key), current=0 if kv_heads(m) == H else kv_heads(m))
    for field in ("dba.gate", "dba.gate_dynamic", "dba.null_attn", "dba.tie_qk", "dba.rope_semantic"):
      _set(c, field, False, key, shape(key))
    m.dba.sem_dim = m.dba.geo_dim = 0
    if m.positions == "rope" and D % 2:
      raise _no_fit(key, shape(key), f"model.n_heads={H}", f"gives an odd head dim {D}; RoPE needs it even")
    return c

  # DBA
  if kv_heads(m) != H:
    raise ConversionError(f"model.n_kv_heads={m.n_kv_heads}: caramba DBA with fewer kv heads than model.n_heads={H} "
                          "has other per-head widths than dba_jax's and is not supported; set model.n_kv_heads=0")
  if layout == "paper":
    sem_key, geo_key = a + "q_sem.weight", a + "q_geo.weight"
    sem, geo = shape(sem_key)[0], shape(geo_key)[0]
    v_key = a + "v_proj.weight"
    tied = all(_attn(i) + "1.k_sem.weight" not in t or
               np.array_equal(t[_attn(i) + "1.k_sem.weight"], t[_attn(i) + "1.q_sem.weight"])
               for i in range(n_layers) if _attn(i) + "1.q_sem.weight" in t)
    flags = {"dba.gate": a + "decoupled_gate_logit" in t, "dba.gate_dynamic": a + "decoupled_gate_proj.weight" in t,
             "dba.null_attn": a + "k_sem_null" in t}
  else:
    sem_key = geo_key = a + _node(layout, "qk_proj" if form == "dba_tied" else "q_proj") + "weight"
    width = shape(sem_key)[0]
    null_key = a + _param_node(layout, "null_k_sem_lin")
    if null_key in t:  # the null token's semantic key tells the split
      sem, geo = shape(null_key)[-1], width - shape(null_key)[-1]
    elif m.dba.sem_dim and m.dba.geo_dim and m.dba.sem_dim + m.dba.geo_dim == width:
      sem, geo = m.dba.sem_dim, m.dba.geo_dim
    else:
      raise _no_fit(sem_key, shape(sem_key), f"model.dba.sem_dim={m.dba.sem_dim} + model.dba.geo_dim={m.dba.geo_dim}",
                    f"must give its {width} rows (the OpGraph splits them [sem | geo]; the file cannot tell where)")
    v_key = a + _node(layout, "v_proj") + "weight"
    tied = form == "dba_tied"
    flags = {"dba.gate": False, "dba.gate_dynamic": False, "dba.null_attn": null_key in t}
    if m.dba.rope_semantic:
      raise ConversionError("model.dba.rope_semantic=True but the OpGraph DBA rotates the geometric path only")
  if shape(v_key)[0] != A:
    raise _no_fit(out_key, shape(out_key), "model.attn_dim", f"(its input width {A}) differs from {v_key}'s rows")
  for key, width, name in ((sem_key, sem, "dba.sem_dim"), (geo_key, geo, "dba.geo_dim")):
    if width % H:
      raise _no_fit(key, shape(key), f"model.n_heads={H}", f"does not divide model.{name}={width}")
  if m.positions == "rope" and (geo // H) % 2:
    raise _no_fit(geo_key, shape(geo_key), f"model.n_heads={H}", f"gives an odd geometric head dim {geo // H}")
  _set(c, "attn_kind", "dba", sem_key, shape(sem_key))
  _set(c, "dba.sem_dim", sem, sem_key, shape(sem_key))
  _set(c, "dba.geo_dim", geo, geo_key, shape(geo_key))
  _set(c, "attn_dim", A, v_key, shape(v_key), current=attn_dim(m))
  m.n_kv_heads = 0
  _set(c, "dba.tie_qk", tied, a + ("k_sem.weight" if layout == "paper" else _node(layout, "qk_proj") + "weight"),
       shape(sem_key))
  for field, value in flags.items():
    _set(c, field, value, sem_key, shape(sem_key))
  return c


# --------------------------------------------------------------------------------------------------- to_params

def _take(keys: Keys, key: str, shape) -> np.ndarray:
  """Keys.take, with zeros standing in for a missing or misshapen tensor so every problem is listed at the end."""
  x = keys.take(key, shape)
  return np.zeros(shape, np.float32) if x is None else x


def _linear(keys: Keys, prefix: str, d_out: int, d_in: int, bias: bool):
  """(weight [out, in], bias [out] or None) of the PyTorch Linear at `prefix`."""
  return _take(keys, prefix + "weight", (d_out, d_in)), (_take(keys, prefix + "bias", (d_out,)) if bias else None)


def _dense(w, b) -> dict:
  return {"kernel": w.T} if b is None else {"kernel": w.T, "bias": b}


def _split(wb, sizes):
  w, b = wb
  cuts = np.cumsum(sizes)[:-1]
  ws = np.split(w, cuts)
  bs = np.split(b, cuts) if b is not None else [None] * len(sizes)
  return list(zip(ws, bs))


def _reorder(wb, n_heads):
  w, b = wb
  return _deinterleave(w, n_heads), (None if b is None else _deinterleave(b, n_heads))


def _attn_to_params(keys: Keys, t: dict, i: int, m, layout: str) -> tuple[dict, bool]:
  """One layer's attention params, and whether it was stored as separate legacy q/k/v."""
  a = _attn(i) + "1."
  lin = lambda name, d_out, d_in=m.d_model: _linear(keys, a + _node(layout, name), d_out, d_in, m.bias)
  H, K, d = m.n_heads, kv_heads(m), m.d_model
  rope = m.positions == "rope"
  if m.attn_kind == "standard":
    D = attn_dim(m) // H
    separate = layout == "paper" and all(a + f"{p}_proj.weight" in t for p in "qkv") and a + "qkv_proj.weight" not in t
    if separate:
      q, k, v = lin("q_proj", H * D), lin("k_proj", K * D), lin("v_proj", K * D)
    else:
      q, k, v = _split(lin("qkv_proj", (H + 2 * K) * D), [H * D, K * D, K * D])
    if layout == "opgraph" and rope:
      q, k = _reorder(q, H), _reorder(k, K)
    p = {"q": _dense(*q), "k": _dense(*k), "v": _dense(*v), "out": _dense(*lin("out_proj", d, H * D))}
    return p, separate

  sem, geo, A = m.dba.sem_dim, m.dba.geo_dim, attn_dim(m)
  ds, dg, dv = sem // H, geo // H, A // H
  if layout == "paper":
    q_sem, q_geo, k_geo = lin("q_sem", sem), lin("q_geo", geo), lin("k_geo", geo)
    k_sem = q_sem
    if not m.dba.tie_qk:
      k_sem = lin("k_sem", sem)
    elif a + "k_sem.weight" in t:  # the tied module is listed under both names
      k_sem = lin("k_sem", sem)
      if not all(x is None or np.array_equal(x, y) for x, y in zip(k_sem, q_sem)):
        keys.problems.append(f"{a}k_sem differs from {a}q_sem but model.dba.tie_qk=True")
  else:
    if m.dba.tie_qk:
      q_sem, q_geo = _split(lin("qk_proj", sem + geo), [sem, geo])
      k_sem, k_geo = q_sem, q_geo
    else:
      q_sem, q_geo = _split(lin("q_proj", sem + geo), [sem, geo])
      k_sem, k_geo = _split(lin("k_proj", sem + geo), [sem, geo])
    if rope:
      q_geo, k_geo = _reorder(q_geo, H), _reorder(k_geo, K)
  p = {"q_sem": _dense(*q_sem), "q_geo": _dense(*q_geo), "k_geo": _dense(*k_geo),
       "v": _dense(*lin("v_proj", A)), "out": _dense(*lin("out_proj", d, A))}
  if not m.dba.tie_qk:
    p["k_sem"] = _dense(*k_sem)
  if m.dba.gate:
    p["gate_logit"] = _take(keys, a + "decoupled_gate_logit", (H,))
  if m.dba.gate_dynamic:
    w = _take(keys, a + "decoupled_gate_proj.weight", (H, d))
    p["gate_proj"] = _dense(w, np.zeros((H,), np.float32) if m.bias else None)  # caramba's has no bias
  if m.dba.null_attn:
    for name, width, dh in (("k_sem_null", sem, ds), ("k_geo_null", geo, dg), ("v_null", A, dv)):
      if layout == "paper":
        p[name] = _take(keys, a + name, (H, dh))
      else:  # ParameterOperation [1, 1, width], viewed as heads (head-major)
        node = {"k_sem_null": "null_k_sem_lin", "k_geo_null": "null_k_geo_lin", "v_null": "null_v_lin"}[name]
        p[name] = _take(keys, a + _param_node(layout, node), (1, 1, width)).reshape(H, dh)
  return p, False


def _block_to_params(keys: Keys, t: dict, i: int, m, layout: str) -> tuple[dict, bool]:
  d, F = m.d_model, m.d_ff
  attn, separate = _attn_to_params(keys, t, i, m, layout)
  f = _ffn(i) + "1."
  w_gu, b_gu = _linear(keys, f + "w_gate_up.", 2 * F, d, m.bias)
  mlp = {"w_in": w_gu.reshape(2, F, d).transpose(2, 0, 1), "w_out": _dense(*_linear(keys, f + "w_down.", d, F, m.bias))}
  if m.bias:
    mlp["b_in"] = b_gu.reshape(2, F)
  block = {"attn_norm": {"scale": _take(keys, _attn(i) + "0.weight", (d,))}, "attn": attn,
           "mlp_norm": {"scale": _take(keys, _ffn(i) + "0.weight", (d,))}, "mlp": mlp}
  return block, separate


def _map(fn, *trees):
  if isinstance(trees[0], dict):
    return {k: _map(fn, *(tr[k] for tr in trees)) for k in trees[0]}
  return fn(*trees)


def _shapes(tree, path=()) -> dict:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_shapes(v, path + (k,)))
    return out
  return {path: tuple(tree.shape)}


def _check_tree(params: dict, m):
  """The built tree must be exactly init_params's (same paths and shapes); checked abstractly, nothing allocated."""
  want = _shapes(nnx.to_pure_dict(model_lib.abstract(m)[1]))
  got = _shapes(params)
  diff = [f"{'/'.join(map(str, p))}: built {got.get(p)}, model needs {want.get(p)}"
          for p in sorted(set(want) | set(got), key=str) if want.get(p) != got.get(p)]
  if diff:
    raise ConversionError("caramba conversion does not match the model's parameter tree:\n  " + "\n  ".join(diff))


def _stack(*xs) -> np.ndarray:
  out = np.empty((len(xs),) + np.shape(xs[0]), np.float32)
  for i, x in enumerate(xs):
    out[i] = x
  return out


def to_params(tensors: dict, c) -> dict:
  t = strip_prefix(tensors)
  layout = _layout(t)
  m = c.model
  keys = Keys(t, f"caramba checkpoint ({layout} layout)")
  V, d = padded_vocab(m), m.d_model
  blocks, n_separate = [], 0
  for i in range(m.n_layers):
    block, separate = _block_to_params(keys, t, i, m, layout)
    blocks.append(block)
    n_separate += separate
  norm_key, head_key = FINAL[layout]
  params = {"embed": _take(keys, EMBED, (V, d)), "final_norm": {"scale": _take(keys, norm_key, (d,))},
            "head": {"kernel": _take(keys, head_key, (V, d)).T}}
  keys.finish()
  if n_separate:
    log.info("Converted %d separate Q/K/V projections to fused qkv_proj", n_separate)
  if m.scan_layers:  # one C-ordered copy per leaf, filled layer by layer (np.stack of transposed views would
    params["blocks"] = _map(_stack, *blocks)  # keep their column-major order and need a second copy)
  else:
    params["blocks"] = {i: _map(np.ascontiguousarray, b) for i, b in enumerate(blocks)}
  params = _map(np.ascontiguousarray, params)
  _check_tree(params, m)
  return params


# ------------------------------------------------------------------------------------------------- from_params

def _f32(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, np.float32))


def _torch_linear(out: dict, prefix: str, p: dict):
  out[prefix + "weight"] = _f32(np.asarray(p["kernel"]).T)
  if "bias" in p:
    out[prefix + "bias"] = _f32(p["bias"])


def _fuse(out: dict, prefix: str, parts: list[dict]):
  """One PyTorch Linear whose rows are the given dba_jax Linears' outputs, in order."""
  out[prefix + "weight"] = _f32(np.concatenate([np.asarray(p["kernel"]).T for p in parts], axis=0))
  if "bias" in parts[0]:
    out[prefix + "bias"] = _f32(np.concatenate([np.asarray(p["bias"]) for p in parts]))


def _reordered(p: dict, n_heads: int) -> dict:
  """A dba_jax Linear with its output columns put back in the OpGraph's interleaved RoPE order."""
  q = {"kernel": _interleave(np.asarray(p["kernel"]).T, n_heads).T}
  if "bias" in p:
    q["bias"] = _interleave(np.asarray(p["bias"]), n_heads)
  return q


def _attn_from_params(out: dict, a: str, p: dict, m, layout: str):
  H, K = m.n_heads, kv_heads(m)
  node = lambda name: a + _node(layout, name)
  rope = layout == "opgraph" and m.positions == "rope"
  if m.attn_kind == "standard":
    q, k = (_reordered(p["q"], H), _reordered(p["k"], K)) if rope else (p["q"], p["k"])
    _fuse(out, node("qkv_proj"), [q, k, p["v"]])
    _torch_linear(out, node("out_proj"), p["out"])
    return
  if layout == "paper":
    _torch_linear(out, node("q_sem"), p["q_sem"])
    _torch_linear(out, node("k_sem"), p["q_sem"] if m.dba.tie_qk else p["k_sem"])
    _torch_linear(out, node("q_geo"), p["q_geo"])
    _torch_linear(out, node("k_geo"), p["k_geo"])
  else:
    if m.dba.gate or m.dba.rope_semantic or m.dba.sem_dim + m.dba.geo_dim != attn_dim(m):
      raise ConversionError("the 12-layer OpGraph DBA has no gate and no semantic RoPE and needs model.attn_dim = "
                            f"model.dba.sem_dim + model.dba.geo_dim; got dba.gate={m.dba.gate}, dba.rope_semantic="
                            f"{m.dba.rope_semantic}, attn_dim={attn_dim(m)}, sem_dim + geo_dim="
                            f"{m.dba.sem_dim + m.dba.geo_dim}")
    q_geo, k_geo = (_reordered(p["q_geo"], H), _reordered(p["k_geo"], K)) if rope else (p["q_geo"], p["k_geo"])
    if m.dba.tie_qk:
      if not all(np.array_equal(q_geo[x], k_geo[x]) for x in q_geo):
        raise ConversionError(f"{a}: the OpGraph tie-QK ablation shares one qk_proj, but q_geo and k_geo differ")
      _fuse(out, node("qk_proj"), [p["q_sem"], q_geo])
    else:
      _fuse(out, node("q_proj"), [p["q_sem"], q_geo])
      _fuse(out, node("k_proj"), [p["k_sem"], k_geo])
  _torch_linear(out, node("v_proj"), p["v"])
  _torch_linear(out, node("out_proj"), p["out"])
  if m.dba.gate:
    out[a + "decoupled_gate_logit"] = _f32(p["gate_logit"])
  if m.dba.gate_dynamic:
    g = p["gate_proj"]
    if "bias" in g and np.any(np.asarray(g["bias"]) != 0):
      raise ConversionError(f"{a}decoupled_gate_proj: caramba's gate projection has no bias, but gate_proj.bias != 0")
    out[a + "decoupled_gate_proj.weight"] = _f32(np.asarray(g["kernel"]).T)
  if m.dba.null_attn:
    nodes = {"k_sem_null": "null_k_sem_lin", "k_geo_null": "null_k_geo_lin", "v_null": "null_v_lin"}
    for name, node_id in nodes.items():
      x = _f32(p[name])
      if layout == "paper":
        out[a + name] = x
      else:
        out[a + _param_node(layout, node_id)] = x.reshape(1, 1, -1)


def _layer(blocks, i: int, scanned: bool) -> dict:
  if scanned:
    return _map(lambda x: np.asarray(x)[i], blocks)
  return blocks[i] if i in blocks else blocks[str(i)]


def from_params(params: dict, c, layout: str = "paper") -> dict:
  """A caramba state dict (float32) for these params: `layout` "paper" (22-layer AttentionLayer keys) or "opgraph"
  (12-layer OpGraph keys)."""
  if layout not in FINAL:
    raise ConversionError(f"caramba layout {layout!r} is not one of {sorted(FINAL)}")
  m = c.model
  if m.attn_kind not in ("standard", "dba") or m.norm != "rmsnorm" or m.mlp != "swiglu" or m.tie_embeddings \
      or m.positions == "learned":
    raise ConversionError("caramba models are RMSNorm + SwiGLU + untied head with RoPE (or none) and standard or DBA "
                          f"attention; got attn_kind={m.attn_kind}, norm={m.norm}, mlp={m.mlp}, "
                          f"tie_embeddings={m.tie_embeddings}, positions={m.positions}")
  if m.attn_kind == "dba" and kv_heads(m) != m.n_heads:
    raise ConversionError(f"model.n_kv_heads={m.n_kv_heads}: caramba DBA checkpoints need n_kv_heads == n_heads")
  F = m.d_ff
  out = {EMBED: _f32(params["embed"])}
  for i in range(m.n_layers):
    p = _layer(params["blocks"], i, m.scan_layers)
    out[_attn(i) + "0.weight"] = _f32(p["attn_norm"]["scale"])
    _attn_from_params(out, _attn(i) + "1.", p["attn"], m, layout)
    f = _ffn(i)
    out[f + "0.weight"] = _f32(p["mlp_norm"]["scale"])
    w_in = np.asarray(p["mlp"]["w_in"])  # [d, 2, F] -> rows [gate; up]
    out[f + "1.w_gate_up.weight"] = _f32(w_in.transpose(1, 2, 0).reshape(2 * F, m.d_model))
    if "b_in" in p["mlp"]:
      out[f + "1.w_gate_up.bias"] = _f32(np.asarray(p["mlp"]["b_in"]).reshape(2 * F))
    _torch_linear(out, f + "1.w_down.", p["mlp"]["w_out"])
  norm_key, head_key = FINAL[layout]
  out[norm_key] = _f32(params["final_norm"]["scale"])
  out[head_key] = _f32(np.asarray(params["head"]["kernel"]).T)
  return out
