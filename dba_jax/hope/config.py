"""model.hope: the HOPE / nested-learning and Titans blocks' config section (others.md part B) and its rules."""
from __future__ import annotations

from dba_jax.configlib import Config, Field, Section, attn_dim, kv_heads, need

HOPE_BLOCKS = ("hope_attention", "hope_selfmod", "hope_hybrid", "hope_transformer")
TITANS_BLOCKS = ("titans_mac", "titans_mag", "titans_mal", "titans_lmm")

SECTION = Section(
    "HOPE / nested learning (model.block = hope_*) and Titans (model.block = titans_*)",
    cms_periods=Field((4, 16, 64), "CMS levels, fastest first: tokens between a level's inner updates", gt=0),
    cms_hidden_mult=Field(4, "CMS MLP width / d_model", ge=1),
    inner_opt=Field("nl_l2_precond", "DeepMomentum's variant (cms.deep_momentum); muon: tanh, as the original",
                    choices=("nl_l2_precond", "preconditioned", "dmgd", "muon", "muon_ns", "l2_objective")),
    inner_lr=Field(3e-4, "inner (fast-weight) step size", ge=0.0),
    inner_beta=Field(0.9, "DeepMomentum's EMA", ge=0.0, lt=1.0),
    teach=Field("per_layer", "per_layer (autograd at every block output) | global (closed form at the final norm)",
                choices=("per_layer", "global")),
    teach_norm=Field("row", "row: δ of each row's mean CE (fast state is per row) | batch: of the batch mean "
                     "(original)", choices=("row", "batch")),
    teach_scale=Field(0.1, "scale of the teach signal", ge=0.0),
    teach_clip=Field(5.0, "per-token norm clip of the scaled teach signal (0: none)", ge=0.0),
    teach_warmup=Field(0, "steps; 0: full scale from step 0", ge=0),
    teach_decay_start=Field(0, "step the teach decay starts", ge=0),
    teach_decay_duration=Field(0, "0: no decay (the original decayed to exactly 0 from step 140k)", ge=0),
    surprise_threshold=Field(0.0, "rows whose surprise_metric is below it skip the update (0: no gate)", ge=0.0),
    surprise_metric=Field("teach_norm", "teach_norm: the row's mean ‖scaled δ‖ (the original's l2) | loss: its mean "
                          "CE | logit_entropy: its mean predictive entropy (nats)",
                          choices=("teach_norm", "loss", "logit_entropy")),
    online_chunk=Field(0, "tokens per online chunk (attention sees only its chunk); 0: the whole sequence", ge=0),
    flush_partial=Field(False, "also update on a partial buffer at the end of a chunk"),
    qk_l2_norm=Field(False, "L2-normalise q and k"),
    local_conv=Field(0, "causal depthwise conv window before W_qkv (0: none)", ge=0),
    init=Field("normal", "normal: N(0, model.init_std) weights | torch_default: the original's torch defaults "
               "(Linear U(±1/sqrt(fan_in)) weights and biases, Embedding N(0, 1); dba_jax/hope/torch_init.py)",
               choices=("normal", "torch_default")),
    memory=Field(True, "False: no fast weight ever moves (every memory block's 'without memory' baseline)"),
    writes=Field(True, "False: nothing is written (Titans θ = 0, selfmod η = 0, no CMS / Titan-level step) but the "
                 "forgetting α still acts: the 'writes off' baseline beside hope.memory=False"),
    grad_through_write=Field(False, "the fast state carried between online chunks stays differentiable, so a later "
                             "chunk's CE trains what shaped the write (costs the update passes' memory)"),
    # hope_selfmod: self-modifying Titans (others.md B.5), memories M(x) = x + W1·GELU(W2·x) for k, v, q, memory, η, α
    selfmod_lr=Field(1e-3, "η_t = softplus(M_η(x))·selfmod_lr (the original's self_mod_lr); 0: the memories never "
                     "move", ge=0.0),
    selfmod_chunk=Field(8, "tokens between updates of M_k, M_v, M_η, M_α (and M_q when adaptive)", ge=1),
    selfmod_chunk_memory=Field(64, "tokens between updates of M_memory", ge=1),
    selfmod_objective=Field("l2", "l2: ‖M(k) − M(v)‖² | dot: −⟨M(k), M(v)⟩", choices=("l2", "dot")),
    selfmod_stopgrad_vhat=Field(True, "the self-generated target M(v) is a constant of the inner loss"),
    selfmod_rank1=Field(True, "DGD: W2 ← W2(α I − η k kᵀ) − η G2; False: α W2 − η G2"),
    selfmod_alpha=Field(True, "α_t = σ(M_α(x) + selfmod_alpha_init); False: α_t = 1 (no forgetting)"),
    selfmod_alpha_init=Field(0.0, "offset b in α_t = σ(M_α(x) + b): a fresh memory keeps σ(b) per token (4: 0.98); "
                             "0: the original (α ≈ 1/2, every memory halves per token)"),
    selfmod_alpha_grad=Field(True, "M_α learns through the decay alone (reads see c·W0 + the writes as constants, "
                             "c = Π α); False: the original's frozen α (parity)"),
    selfmod_skip=Field(False, "M_η, M_α (d → 1) add W_skip·x (the package's default; the paper preset has none)"),
    selfmod_momentum=Field(0.0, "heavy-ball buffer b ← β b + G on the inner gradients (0: none)", ge=0.0, lt=1.0),
    selfmod_adaptive_q=Field(False, "q = M_q(x) (learned in context) instead of the fixed W_q·x"),
    selfmod_conv=Field(4, "causal depthwise conv window before the memories (0: none)", ge=0),
    selfmod_learn=Field("always", "always: every forward learns within the sequence | update_pass: the original's",
                        choices=("always", "update_pass")),
    selfmod_write_grad=Field(False, "outer gradients through the in-sequence write (M_k, M_v, M_η, M_α learn too)"),
    # hope_hybrid: attention → Titan level M(a) = LN(c(W2·GELU(W1 a + b1) + b2)) → CMS(a + M(a)), SelfModifier target
    titan_period=Field(8, "the Titan level's inner-update period", ge=1),
    titan_clock=Field("tokens", "tokens: every titan_period tokens of the update pass | calls: the original's block "
                      "calls", choices=("tokens", "calls")),
    titan_lr=Field(6e-4, "the Titan level's DeepMomentum step (inner_opt, inner_beta)", ge=0.0),
    titan_hidden_mult=Field(4, "Titan level MLP width / d_model", ge=1),
    self_mod_hidden=Field(4, "SelfModifier MLP 3d → h·d → h·d → d", ge=1),
    # titans_mac | _mag | _mal | _lmm: the Titans paper's neural memory (dba_jax/hope/titans_blocks.py)
    titans_chunk=Field(32, "memory chunk: gradients at chunk-start weights, momentum and decay scanned inside it",
                       ge=1),
    titans_window=Field(32, "MAC: segment length (divisible by titans_chunk); MAG / MAL: sliding-window width", ge=1),
    titans_persistent=Field(8, "learnable persistent tokens, always-visible leading attention keys (0: none)", ge=0),
    titans_memory_depth=Field(2, "layers of the memory MLP M (hidden width d_model; 1: a linear map)", ge=1),
    titans_lr=Field(0.05, "largest inner step: θ_t = titans_lr·σ(x·w_θ + b_θ) (0.2 diverged at init, d 128, chunk 32)",
                    gt=0.0),
    titans_conv=Field(4, "causal depthwise conv taps after the memory's q/k/v projections (0: none)", ge=0),
    titans_store_first=Field(True, "token t reads M_t (its own write included); False: the memory at its chunk start"),
    # MAC rotary positions: "segment" restarts them every segment (attention is segment-local, so nothing is lost and
    # no query ever sits at a position training did not reach); "absolute" counts from the sequence start, where the
    # position-free persistent keys make every score depend on the query's absolute position (runs before 2026-12-06)
    titans_positions=Field("absolute", "MAC rotary positions: absolute | segment", choices=("absolute", "segment")),
)


def validate(c: Config, default_kind: str):
  """Rules of model.block = hope_* / titans_* (their attention is their own: model.attn_kind stays the default)."""
  m, h = c.model, c.model.hope
  if m.block in TITANS_BLOCKS:
    need(m.attn_kind == default_kind, f"model.block={m.block!r} has its own softmax attention: set "
         f"model.attn_kind={default_kind!r} (got {m.attn_kind!r})")
    need(h.titans_positions == "absolute" or m.block == "titans_mac",
         f"model.hope.titans_positions={h.titans_positions!r} is for titans_mac (MAG / MAL attend over a sliding "
         "window, LMM has no attention)")
    if m.block == "titans_mac":
      need(h.titans_window % h.titans_chunk == 0, f"model.hope.titans_window={h.titans_window} (the MAC segment) "
           f"is not a multiple of model.hope.titans_chunk={h.titans_chunk}")
  if m.block not in HOPE_BLOCKS:
    need(h.init == "normal", f"model.hope.init={h.init!r} is for the HOPE blocks (model.block={m.block!r})")
    return
  need(m.attn_kind == default_kind and kv_heads(m) == m.n_heads and attn_dim(m) == m.d_model,
       f"model.block={m.block!r} has its own attention (all heads, width d_model); got model.attn_kind="
       f"{m.attn_kind!r}, n_kv_heads={m.n_kv_heads}, attn_dim={m.attn_dim}")
  need(m.d_model % m.n_heads == 0, f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
  need(m.norm == "layernorm", f"model.block={m.block!r} uses LayerNorm: set model.norm='layernorm'")
  need(m.positions != "learned", f"model.block={m.block!r} has no learned positions (model.positions='none')")
  periods = tuple(h.cms_periods)
  need(len(periods) > 0, f"model.hope.cms_periods={periods} must not be empty")
  need(all(p % min(periods) == 0 for p in periods),
       f"model.hope.cms_periods={periods} must be multiples of the smallest period")
  need(not (h.teach == "per_layer" and m.attn_impl == "pallas" and m.block != "hope_transformer"),
       "model.hope.teach='per_layer' differentiates attention's backward, which the Pallas kernels cannot: use "
       "model.attn_impl='auto' or 'xla' (or model.hope.teach='global')")
  chunk = h.online_chunk or c.data.seq_len
  need(c.data.seq_len % chunk == 0,
       f"model.hope.online_chunk={h.online_chunk} must divide data.seq_len={c.data.seq_len}")
