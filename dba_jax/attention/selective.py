"""Selective attention (Leviathan et al.; selective.md §1.2, §3-4): standard attention whose logits lose the
selection mask F. Op: dba_jax.ops.selective. Config: model.selective (the names SelectiveSpec uses)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dba_jax.attention.base import Kind, even_rope, no_keep_hook
from dba_jax.attention.standard import StandardAttention
from dba_jax.configlib import Config, Field, Section, attn_dim, kv_heads, need
from dba_jax.layers import Hooks, LayerIO, normal_init
from dba_jax.ops import selective

SECTION = Section(
    "selective attention (model.attn_kind='selective')",
    selection_head=Field(0, "the head whose logits select", ge=0),
    protect_bos=Field(True, "never mask key position 0 of the window"),
    allow_self_mask=Field(False, "a query may mask its own key"),
    relu_leak=Field(0.0, "leaky-ReLU slope for S (future entries are zeroed first)"),
    relu_after_cumsum=Field(False, "ReLU(F) after the cumulative sum"),
    scan=Field("xla", "scan of a materialised F (attn_impl xla, or a variant the fused kernel lacks)",
               choices=selective.SCANS),
    scan_dtype=Field("float32", "accumulation dtype of F", choices=("float32", "float64")),
    disable_selection=Field(False, "keep the module (materialised attention, init) but no F"),
    selection_heads=Field(0, "m > 0: m extra heads only select (1: none_with_no_head, 2: two_masks, n_heads: one "
                          "per head)", ge=0),
    selection_slices=Field(1, "s > 1 with selection_heads=1: n_sliced_masks (the selection head's q/k in s slices)",
                           ge=1),
    combo=Field("none", "S from a linear mix of all heads' logits",
                choices=("none", "with_head_zero", "with_head_zero_and_bias")),
    combo_lr_scale=Field(1.0, "lr multiplier of the selection mixes (combo and latent masks; never weight-decayed)",
                         ge=0.0),
    latent_masks=Field(0, "n > 0: n_latent_masks (n latent masks -> Linear(n -> heads, bias) -> one mask per head)",
                       ge=0),
    latent_full_heads=Field(False, "one_head_per_latent_mask: n dedicated heads instead of n slices of one head"),
    latent_init=Field("normal", "normal (N(0, 0.02), ~selection off) | identity (weights 1) | inverse (1/n)",
                      choices=("normal", "identity", "inverse")),
    latent_multiplier=Field(1.0, "latent_mask_runtime_multiplier: S *= c after the Linear"),
    residual_masks=Field(False, "residual_attention_masks: logits += Linear(heads -> heads)(previous layer's logits)"),
    protection=Field("none", "protect-and-attack kind", choices=selective.PROTECTIONS),
    protection_scale=Field(1.0, "P *= scale"),
    protection_bias=Field(0.0, "P = ReLU(P + bias)"),
    leaky_alpha=Field(0.0, "leaky_relu protection: P = ReLU(-alpha * L_0 + bias)"),
    leaky_bias=Field(0.0, "leaky_relu protection's bias"),
    memory_penalty=Field("none", "loss term on F: paper | repo (the form the original code computed)",
                         choices=("none", "paper", "repo")),
    memory_epsilon=Field(0.1, "weight of the memory penalty in the loss", ge=0.0),
    memory_tau=Field(1.0, "the penalty's F threshold", gt=0.0),
)
SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(selective.SelectiveSpec))


def spec(m: Config) -> selective.SelectiveSpec:
  """The static variant, built once from model.selective (the same names)."""
  return selective.SelectiveSpec(**{k: m.selective[k] for k in SPEC_FIELDS})


class SelectiveAttention(StandardAttention):
  """`aux` is the layer's memory penalty when one is configured. Like the original, its out projection keeps the
  plain init std."""

  def __init__(self, m: Config, out_std: float, rngs: nnx.Rngs):
    s = m.selective
    super().__init__(m, m.init_std, rngs, extra_heads=s.selection_heads)
    self.spec = spec(m)
    H = self.Hp
    # "with_head_zero": Linear(heads -> 1) over all heads' logits, one-hot on head 0 (= the default at init);
    # "_and_bias" adds a bias with PyTorch's default-uniform init, as the original's early return left it.
    combo = s.combo != "none"
    bias = jax.random.uniform(rngs.params(), (), jnp.float32, -H ** -0.5, H ** -0.5) \
        if s.combo == "with_head_zero_and_bias" else jnp.zeros((), jnp.float32)
    self.sel_combo_w = nnx.Param(jnp.zeros((H,), jnp.float32).at[0].set(1.0), axes=(None,)) if combo else None
    self.sel_combo_b = nnx.Param(bias, axes=()) if combo else None
    combo_w = combo_b = None
    if s.protection == "linear_combo":  # Linear(heads -> 1): N(0, 0.02) weights, zero bias
      combo_w, combo_b = normal_init(rngs, (H,), 0.02), jnp.zeros((), jnp.float32)
    elif s.protection == "linear_combo_head_two":  # one-hot on head 1; PyTorch's default-uniform bias
      combo_w = jnp.zeros((H,), jnp.float32).at[1].set(1.0)
      combo_b = jax.random.uniform(rngs.params(), (), jnp.float32, -H ** -0.5, H ** -0.5)
    self.protect_w = nnx.Param(combo_w, axes=(None,)) if combo_w is not None else None
    self.protect_b = nnx.Param(combo_b, axes=()) if combo_b is not None else None
    # "n_latent_masks": Linear(n latents -> attending heads) with bias, in the selection-head lr group.
    n, A = s.latent_masks, m.n_heads
    if n:
      w = {"normal": lambda: normal_init(rngs, (n, A), 0.02), "identity": lambda: jnp.ones((n, A), jnp.float32),
           "inverse": lambda: jnp.full((n, A), 1.0 / n, jnp.float32)}[s.latent_init]()
    self.sel_latent_w = nnx.Param(w, axes=(None, None)) if n else None
    self.sel_latent_b = nnx.Param(jnp.zeros((A,), jnp.float32), axes=(None,)) if n else None
    # "residual_attention_masks": Linear(heads -> heads), no bias, over the previous layer's logits.
    self.res_mix = nnx.Param(normal_init(rngs, (H, H), 0.02), axes=(None, None)) if s.residual_masks else None

  def weights(self) -> selective.Weights:
    pair = lambda w, b: None if w is None else (w[...], b[...])
    return selective.Weights(pair(self.sel_combo_w, self.sel_combo_b), pair(self.protect_w, self.protect_b),
                             pair(self.sel_latent_w, self.sel_latent_b))

  def attend(self, q_BTHD, k_BSKD, v_BSKD, positions_T, keys, io: LayerIO, hooks: Hooks):
    s = self.m.selective
    if keys is not None:  # cached decoding: F rows from the carried column sums
      no_keep_hook(hooks, "cached selective")
      valid_T = jnp.ones(positions_T.shape, bool) if hooks.valid_T is None else hooks.valid_T
      o, f, colsum = selective.cached_attention(
          q_BTHD, k_BSKD, v_BSKD, self.spec, scale=self.scale, mask_BTS=keys[1], q_pos_T=positions_T,
          k_pos_BS=keys[0], valid_T=valid_T, colsum_BS=io.state["colsum"], return_probs=hooks.return_probs)
      probs = None
      if hooks.return_probs:
        o, probs = o
      return o, dataclasses.replace(io, state={**io.state, "colsum": colsum}, probs=probs)
    residual = None
    if self.res_mix is not None:
      residual = jnp.einsum("bgts,gh->bhts", io.res, self.res_mix[...].astype(io.res.dtype))
    r = selective.apply(q_BTHD, k_BSKD, v_BSKD, self.spec, scale=self.scale, weights=self.weights(),
                        residual_BHTS=residual, keep_fn=hooks.keep_fn, return_mask=s.memory_penalty != "none",
                        return_probs=hooks.return_probs, impl=self.m.attn_impl)
    aux = None
    if s.memory_penalty != "none":
      aux = jnp.stack([selective.memory_penalty_paper(r.f, s.memory_tau),
                       selective.memory_penalty_repo(r.f, s.memory_tau)]).astype(jnp.float32)
    res = r.residual if self.res_mix is not None else io.res
    return r.out, dataclasses.replace(io, aux=aux, res=res, probs=r.probs if hooks.return_probs else None)


def validate(m: Config):
  s, H, K = m.selective, m.n_heads, kv_heads(m)
  D = attn_dim(m) // H
  even_rope(m, D, "attn_dim/n_heads")
  need(s.protection not in ("head_two", "linear_combo_head_two") or H >= 2,
       f"model.selective.protection={s.protection!r} reads head index 1 but n_heads={H}")
  need(s.combo == "none" or s.selection_heads == 0,
       "model.selective.combo and model.selective.selection_heads exclude each other")
  if s.latent_masks:
    n = s.latent_masks
    need_heads = n if s.latent_full_heads else 1
    need(s.selection_heads == need_heads, f"model.selective.latent_masks={n} needs model.selective.selection_heads="
         f"{need_heads} (the heads whose logits are latents)")
    need(s.latent_full_heads or (D % n == 0 and s.selection_slices == n),
         f"model.selective.latent_masks={n} slices one head: needs model.selective.selection_slices={n} dividing the "
         f"head dim {D}")
  need(s.selection_slices == 1 or (s.selection_heads == 1 and D % s.selection_slices == 0),
       f"model.selective.selection_slices={s.selection_slices} needs model.selective.selection_heads=1 and must "
       f"divide the head dim {D}")
  need(s.memory_penalty == "none" or (s.selection_heads == 0 and s.combo == "none"),
       "model.selective.memory_penalty applies to the default single-head selection only (as in the original)")
  need(s.protection == "none" or s.selection_heads == 0,
       "model.selective.protection applies to single-mask selection; set model.selective.selection_heads=0")
  need(s.selection_head < H, f"model.selective.selection_head={s.selection_head} is not a head index (n_heads={H})")
  need(K == H, f"selective attention needs n_kv_heads == n_heads; got {K} and {H}")


def uncached(m: Config) -> list:
  """Cached decoding (and slot eviction) supports the default head selection only."""
  s = m.selective
  extras = {"selection_heads": s.selection_heads, "combo": s.combo != "none", "latent_masks": s.latent_masks,
            "residual_masks": s.residual_masks, "protection": s.protection != "none"}
  return [f"model.selective.{k}" for k, v in extras.items() if v]


def carry(m: Config, B: int, T: int, dtype):
  """Residual masks: layer 0 mixes zero logits."""
  if not m.selective.residual_masks:
    return None
  return jnp.zeros((B, m.n_heads + m.selective.selection_heads, T, T), jnp.promote_types(dtype, jnp.float32))


def penalty(m: Config):
  s = m.selective
  if s.memory_penalty == "none":
    return None
  return lambda aux: s.memory_epsilon * aux["memory_" + s.memory_penalty]


def lr_groups(m: Config) -> dict:
  """The selection mixes train at their own lr scale and never decay."""
  return {name: m.selective.combo_lr_scale for name in ("sel_combo_w", "sel_combo_b", "sel_latent_w", "sel_latent_b")}


KIND = Kind("selective", SelectiveAttention, SECTION, validate, key_state=lambda m: {"colsum": jnp.float32},
            evict_by="colsum", uncached=uncached,
            unprunable=lambda m: ["model.selective.disable_selection"] if m.selective.disable_selection else [],
            score_penalty=lambda m, f: jax.nn.relu(f) if m.selective.relu_after_cumsum else f,
            carry=carry, penalty=penalty, lr_groups=lr_groups)
