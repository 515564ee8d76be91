"""Run configuration: one ConfigDict schema, validation, and derived sizes.

Every preset in configs/ starts from `base_config()` and changes fields, so the schema (and the set of legal
keys) lives here only. The config is locked: assigning a key that is not in the schema raises.
"""
from __future__ import annotations

import math

import ml_collections

Config = ml_collections.ConfigDict


class ConfigError(ValueError):
  """A config value is impossible; the message names the key and the value."""


def base_config() -> Config:
  c = Config()

  c.model = m = Config()
  m.vocab_size = 256  # tokenizer vocabulary; the embedding is padded up to `pad_vocab_to` multiples
  m.pad_vocab_to = 128
  m.d_model = 128
  m.n_layers = 4
  m.n_heads = 4
  m.n_kv_heads = 0  # 0: same as n_heads (MHA); fewer: grouped-query attention
  m.d_ff = 512
  m.max_seq_len = 128  # learned position table size; RoPE needs no table
  m.attn_kind = "standard"  # standard | dba
  m.attn_dim = 0  # 0: d_model. Smaller gives the "bottleneck" baseline; for DBA it is the value width
  m.sem_dim = 0  # DBA semantic q/k width (all heads)
  m.geo_dim = 0  # DBA geometric q/k width (all heads), RoPE'd
  m.dba_gate = False  # static per-head gate logit, init 0 (= ungated at init)
  m.dba_gate_dynamic = False  # zero-initialised Linear(d_model -> heads) added to the gate logit
  m.null_attn = False  # learned per-head null key/value, always visible
  m.tie_qk = False  # DBA: k_sem shares q_sem's weight
  m.rope_semantic = False  # DBA ablation: also rotate the semantic path
  # selective attention (attn_kind="selective"; selective.md §1.2, §3-4)
  m.sel_head = 0  # the head whose logits select
  m.sel_protect_bos = True  # never mask key position 0 of the window
  m.sel_allow_self_mask = False
  m.sel_relu_leak = 0.0  # leaky-ReLU slope for S (future entries are zeroed first)
  m.sel_relu_after_cumsum = False
  m.sel_scan = "xla"  # scan of the materialised F (attn_impl xla, or a variant the fused kernel lacks): reference | xla | pallas
  m.sel_scan_dtype = "float32"  # float32 | float64 (accumulation of F)
  m.sel_disable = False  # keep the selective module (materialised attention, init) but no F
  m.sel_mask_heads = 0  # m > 0: m extra heads only select (1: none_with_no_head, 2: two_masks, n_heads: one per head)
  m.sel_mask_slices = 1  # s > 1 with sel_mask_heads=1: n_sliced_masks (the selection head's q/k in s slices)
  m.sel_combo = "none"  # none | with_head_zero | with_head_zero_and_bias: S from a linear mix of all heads' logits
  m.sel_combo_lr_scale = 1.0  # lr multiplier of the selection mixes (combo and latent masks; never weight-decayed)
  m.sel_latent_masks = 0  # n > 0: n_latent_masks (n latent masks -> Linear(n -> heads, bias) -> one mask per head)
  m.sel_latent_full_heads = False  # one_head_per_latent_mask: n dedicated heads instead of n slices of one head
  m.sel_latent_init = "normal"  # normal (N(0, 0.02), ~selection off) | identity (weights 1) | inverse (weights 1/n)
  m.sel_latent_multiplier = 1.0  # latent_mask_runtime_multiplier: S *= c after the Linear
  m.sel_residual_masks = False  # residual_attention_masks: logits += Linear(heads -> heads)(previous layer's logits)
  m.sel_protection = "none"  # none | zero | head_two | linear_combo | linear_combo_head_two | leaky_relu | big_constant
  m.sel_protection_scale = 1.0  # P *= scale
  m.sel_protection_bias = 0.0  # P = ReLU(P + bias)
  m.sel_leaky_alpha = 0.0  # leaky_relu protection: P = ReLU(-alpha * L_0 + bias)
  m.sel_leaky_bias = 0.0
  m.memory_penalty = "none"  # none | paper | repo (the form the original code computed)
  m.memory_epsilon = 0.1
  m.memory_tau = 1.0
  m.positions = "rope"  # rope | learned | none
  m.rope_base = 10000.0
  m.norm = "rmsnorm"  # rmsnorm | layernorm
  m.norm_eps = 1e-5
  m.mlp = "swiglu"  # swiglu (fused gate|up) | gelu
  m.bias = False
  m.tie_embeddings = False
  m.dropout = 0.0  # on embeddings and residual branches
  m.init_std = 0.02
  m.scale_residual_init = True  # GPT-2: out/down projections get std / sqrt(2 * n_layers)
  m.scan_layers = True
  m.scan_unroll = 1  # layers per iteration of the layer scan; 0: fully unrolled (same parameters, same math)
  # pre_norm (x + attn(norm x), x + mlp(norm x)) | hope_attention | hope_selfmod | hope_hybrid | hope_transformer
  # (model.hope; others.md B) | titans_mac | titans_mag | titans_mal (the Titans paper's memory; model.hope.titans_*)
  m.block = "pre_norm"
  # HOPE / nested learning (model.block = hope_*; dba_jax/hope/, others.md part B)
  m.hope = h = Config()
  h.cms_periods = (4, 16, 64)  # CMS levels, fastest first: tokens between a level's inner updates
  h.cms_hidden_mult = 4
  h.inner_opt = "nl_l2_precond"  # nl_l2_precond | preconditioned | dmgd | muon (tanh, as the original) | muon_ns
  h.inner_lr = 3e-4
  h.inner_beta = 0.9  # DeepMomentum's EMA
  h.teach = "per_layer"  # per_layer (autograd at every block output) | global (closed form at the final norm)
  h.teach_norm = "row"  # row: δ of each row's mean CE (fast state is per row) | batch: of the batch mean (original)
  h.teach_scale = 0.1
  h.teach_clip = 5.0  # per-token norm clip of the scaled teach signal (0: none)
  h.teach_warmup = 0  # steps; 0: full scale from step 0
  h.teach_decay_start = 0
  h.teach_decay_duration = 0  # 0: no decay (the original decayed to exactly 0 from step 140k)
  h.surprise_threshold = 0.0  # rows whose mean ‖scaled δ‖ is below it skip the update (0: no gate)
  h.online_chunk = 0  # tokens per online chunk (attention sees only its chunk); 0: the whole sequence
  h.flush_partial = False  # also update on a partial buffer at the end of a chunk
  h.qk_l2_norm = False
  h.local_conv = 0  # causal depthwise conv window before W_qkv (0: none)
  h.memory = True  # False: no fast weight ever moves (every memory block's "without memory" baseline)
  # True: the fast state carried between online chunks stays differentiable, so a later chunk's CE trains what
  # shaped the write (the hybrid's SelfModifier, which the original never trained); costs the update passes' memory
  h.grad_through_write = False
  # [selfmod / hybrid fields (dba_jax/hope/selfmod.py) go here]
  # hope_selfmod: self-modifying Titans (others.md B.5), memories M(x) = x + W1·GELU(W2·x) for k, v, q, memory, η, α
  h.selfmod_lr = 1e-3  # η_t = softplus(M_η(x))·selfmod_lr (the original's self_mod_lr); 0: the memories never move
  h.selfmod_chunk = 8  # tokens between updates of M_k, M_v, M_η, M_α (and M_q when adaptive)
  h.selfmod_chunk_memory = 64  # tokens between updates of M_memory
  h.selfmod_objective = "l2"  # l2: ‖M(k) − M(v)‖² | dot: −⟨M(k), M(v)⟩
  h.selfmod_stopgrad_vhat = True  # the self-generated target M(v) is a constant of the inner loss
  h.selfmod_rank1 = True  # DGD: W2 ← W2(α I − η k kᵀ) − η G2; False: α W2 − η G2
  h.selfmod_alpha = True  # α_t = σ(M_α(x)); False: α_t = 1 (no forgetting)
  h.selfmod_skip = False  # M_η, M_α (d → 1) add W_skip·x (the package's default; the paper preset has none)
  h.selfmod_momentum = 0.0  # heavy-ball buffer b ← β b + G on the inner gradients (0: none)
  h.selfmod_adaptive_q = False  # q = M_q(x) (learned in context) instead of the fixed W_q·x
  h.selfmod_conv = 4  # causal depthwise conv window before the memories (0: none)
  h.selfmod_learn = "always"  # always: every forward learns within the sequence | update_pass: the original's
  h.selfmod_write_grad = False  # True: outer gradients through the in-sequence write (M_k, M_v, M_η, M_α learn too)
  # hope_hybrid: attention → Titan level M(a) = LN(c(W2·GELU(W1 a + b1) + b2)) → CMS(a + M(a)), SelfModifier target
  h.titan_period = 8  # the Titan level's inner-update period
  h.titan_clock = "tokens"  # tokens: every titan_period tokens of the update pass | calls: the original's block calls
  h.titan_lr = 6e-4  # its DeepMomentum step (model.hope.inner_opt, inner_beta)
  h.titan_hidden_mult = 4
  h.self_mod_hidden = 4  # SelfModifier MLP 3d → h·d → h·d → d
  # [titans fields (dba_jax/hope/titans_blocks.py) go here]
  # titans_mac | titans_mag | titans_mal: the Titans paper's neural memory (dba_jax/hope/titans_blocks.py)
  h.titans_chunk = 32  # memory chunk: gradients at chunk-start weights, momentum and decay scanned inside it
  h.titans_window = 32  # MAC: segment length (divisible by titans_chunk); MAG / MAL: sliding-window width
  h.titans_persistent = 8  # learnable persistent tokens, always-visible leading attention keys (0: none)
  h.titans_memory_depth = 2  # layers of the memory MLP M (hidden width d_model; 1: a linear map)
  h.titans_lr = 0.05  # largest inner step: θ_t = titans_lr·σ(x·w_θ + b_θ) (0.2 diverged at init, d 128, chunk 32)
  h.titans_conv = 4  # causal depthwise conv taps after the memory's q/k/v projections (0: none)
  h.titans_store_first = True  # token t reads M_t (its own write included); False: the memory at its chunk start
  # MAC rotary positions: "segment" restarts them every segment (attention is segment-local, so nothing is lost and
  # no query ever sits at a position training did not reach); "absolute" counts from the sequence start, where the
  # position-free persistent keys make every score depend on the query's absolute position (runs before 2026-12-06)
  h.titans_positions = "absolute"
  # muP (selective.md §7): base widths and the multipliers they imply; off by default
  m.mup = False  # attn scale 1/d_head, readout x 1/width_mult, matrix init / sqrt(width_mult), MuAdamW lr and wd
  m.mup_base_d_model = 768  # width_mult = d_model / mup_base_d_model
  m.mup_zero_query = False  # mup_zero_init: zero the query projections
  m.attn_impl = "auto"  # reference | xla | pallas (flash kernels) | auto (pallas on GPU/TPU, xla on CPU)
  m.compute_dtype = "float32"  # float32 | bfloat16; parameters and optimizer state are always float32

  c.data = d = Config()
  d.source = "stdlib"  # stdlib | npy | bin | text | synthetic (made from data.seed by data.generator)
  d.generator = ""  # synthetic: passkey | arith_qa (dba_jax.data.GENERATORS) | module:function
  d.synthetic_chars = 2_000_000  # synthetic: train split size in characters
  d.mix_stdlib = 0.0  # synthetic: fraction of the train/val tokens taken from the stdlib corpus
  d.train_path = ""  # file or glob for npy / bin / text
  d.val_path = ""  # empty: hold out `val_fraction` of the train tokens (stdlib splits by file hash)
  d.val_fraction = 0.05
  d.tokenizer = "byte"  # byte | gpt2 (tiktoken, only from files already on this machine) | bpe_qa (in-process BPE)
  d.sampling = "random"  # random windows (DBA runs) | contiguous windows (nanoGPT runs)
  d.seq_len = 128
  d.seed = 0

  c.optim = o = Config()
  o.lr = 3e-4
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.1
  o.decay = "all"  # all | matrices (only >= 2-D parameters decay)
  o.warmup_steps = 100
  o.min_lr_ratio = 0.0
  o.clip_norm = 1.0  # 0 disables clipping

  c.train = t = Config()
  t.steps = 1000
  t.batch_size = 16  # sequences per optimizer step (global), split into grad_accum micro-batches
  t.grad_accum = 1
  # > 0: vocab projection + cross-entropy fused over chunks of this many tokens (losses.fused_head_nll_mean:
  # no [B, T, V] logits kept for backward); must divide batch_size / grad_accum x seq_len. 0: logits, then nll
  t.ce_chunk = 0
  t.seed = 0
  t.log_every = 10
  t.eval_every = 200
  t.eval_batches = 8
  t.ckpt_every = 500
  t.keep_ckpts = 3
  t.async_ckpt = True
  t.init_from = ""  # a dba_jax workdir or checkpoint dir: start from its params (fresh optimizer)
  t.surgery = "none"  # none | add_head_start | add_head_end (applied to init_from's params)
  t.surgery_init = "ko_zero"  # normal | zero | k_zero | ko_zero | o_zero | o_rescaled
  t.nonfinite = "stop"  # on a NaN/inf loss or gradient: stop (last good checkpoint kept) | skip the batch
  t.on_no_good_checkpoint = "stop"  # every checkpoint broken: stop (say so) | restart from step 0

  c.mesh = Config()
  c.mesh.shape = (-1, 1, 1)  # over (data, fsdp, tensor); -1 takes the remaining devices
  return c


def lock(c: Config) -> Config:
  c.lock()
  return c


def padded_vocab(m: Config) -> int:
  return int(math.ceil(m.vocab_size / m.pad_vocab_to) * m.pad_vocab_to)


def kv_heads(m: Config) -> int:
  return m.n_kv_heads or m.n_heads


def attn_dim(m: Config) -> int:
  return m.attn_dim or m.d_model


def _need(cond: bool, msg: str):
  if not cond:
    raise ConfigError(msg)


def _one_of(key: str, value, options):
  _need(value in options, f"{key}={value!r} is not one of {list(options)}")


def validate(c: Config) -> Config:
  """Raises ConfigError naming the first impossible field. Returns the config for chaining."""
  m = c.model
  _one_of("model.attn_kind", m.attn_kind, ("standard", "dba", "selective"))
  _one_of("model.positions", m.positions, ("rope", "learned", "none"))
  _one_of("model.norm", m.norm, ("rmsnorm", "layernorm"))
  _one_of("model.mlp", m.mlp, ("swiglu", "gelu"))
  _need(m.scan_unroll >= 0, f"model.scan_unroll={m.scan_unroll} must be >= 0 (0: fully unrolled)")
  _one_of("model.attn_impl", m.attn_impl, ("reference", "xla", "pallas", "auto"))
  _one_of("model.compute_dtype", m.compute_dtype, ("float32", "bfloat16", "float64"))
  for key in ("vocab_size", "pad_vocab_to", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
    _need(m[key] > 0, f"model.{key}={m[key]} must be positive")
  H, K = m.n_heads, kv_heads(m)
  _need(H % K == 0, f"model.n_heads={H} is not a multiple of model.n_kv_heads={K}")
  A = attn_dim(m)
  _need(A % H == 0, f"model.attn_dim={A} is not divisible by model.n_heads={H}")
  if m.attn_kind == "selective":
    _one_of("model.sel_scan", m.sel_scan, ("reference", "xla", "pallas"))
    _one_of("model.sel_scan_dtype", m.sel_scan_dtype, ("float32", "float64"))
    _one_of("model.memory_penalty", m.memory_penalty, ("none", "paper", "repo"))
    _one_of("model.sel_protection", m.sel_protection, ("none", "zero", "head_two", "linear_combo",
                                                       "linear_combo_head_two", "leaky_relu", "big_constant"))
    _need(m.sel_protection not in ("head_two", "linear_combo_head_two") or H >= 2,
          f"model.sel_protection={m.sel_protection!r} reads head index 1 but n_heads={H}")
    _one_of("model.sel_combo", m.sel_combo, ("none", "with_head_zero", "with_head_zero_and_bias"))
    _need(m.sel_mask_heads >= 0, f"model.sel_mask_heads={m.sel_mask_heads} must be >= 0")
    _need(m.sel_combo == "none" or m.sel_mask_heads == 0, "model.sel_combo and model.sel_mask_heads exclude each other")
    _one_of("model.sel_latent_init", m.sel_latent_init, ("normal", "identity", "inverse"))
    if m.sel_latent_masks:
      n = m.sel_latent_masks
      need_heads = n if m.sel_latent_full_heads else 1
      _need(m.sel_mask_heads == need_heads,
            f"model.sel_latent_masks={n} needs model.sel_mask_heads={need_heads} (the heads whose logits are latents)")
      _need(m.sel_latent_full_heads or ((A // H) % n == 0 and m.sel_mask_slices == n),
            f"model.sel_latent_masks={n} slices one head: needs model.sel_mask_slices={n} dividing the head dim {A // H}")
    _need(m.sel_mask_slices == 1 or (m.sel_mask_heads == 1 and (A // H) % m.sel_mask_slices == 0),
          f"model.sel_mask_slices={m.sel_mask_slices} needs model.sel_mask_heads=1 and must divide the head dim {A // H}")
    _need(m.memory_penalty == "none" or (m.sel_mask_heads == 0 and m.sel_combo == "none"),
          "model.memory_penalty applies to the default single-head selection only (as in the original)")
    _need(m.sel_protection == "none" or m.sel_mask_heads == 0,
          "model.sel_protection applies to single-mask selection; set model.sel_mask_heads=0")
    _need(0 <= m.sel_head < H, f"model.sel_head={m.sel_head} is not a head index (n_heads={H})")
    _need(K == H, f"selective attention needs n_kv_heads == n_heads; got {K} and {H}")
  else:
    _need(m.memory_penalty == "none", "model.memory_penalty needs model.attn_kind='selective'")
  if m.attn_kind in ("standard", "selective"):
    _need(not (m.dba_gate or m.dba_gate_dynamic or m.tie_qk or m.rope_semantic),
          "model.dba_gate / dba_gate_dynamic / tie_qk / rope_semantic need model.attn_kind='dba'")
    if m.positions == "rope":
      _need((A // H) % 2 == 0, f"RoPE needs an even head dim; attn_dim/n_heads = {A // H}")
  else:
    for key in ("sem_dim", "geo_dim"):
      _need(m[key] > 0, f"model.{key}={m[key]} must be positive for attn_kind='dba'")
      _need(m[key] % H == 0, f"model.{key}={m[key]} is not divisible by model.n_heads={H}")
    if m.positions == "rope":
      _need((m.geo_dim // H) % 2 == 0, f"RoPE needs an even geometric head dim; geo_dim/n_heads = {m.geo_dim // H}")
      if m.rope_semantic:
        _need((m.sem_dim // H) % 2 == 0, f"rope_semantic needs an even semantic head dim; got {m.sem_dim // H}")
    _need(not m.dba_gate_dynamic or m.dba_gate, "model.dba_gate_dynamic needs model.dba_gate=True")
  _need(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")

  d = c.data
  _one_of("data.source", d.source, ("stdlib", "npy", "bin", "text", "synthetic"))
  _one_of("data.tokenizer", d.tokenizer, ("byte", "gpt2", "bpe_qa"))
  _one_of("data.sampling", d.sampling, ("random", "contiguous"))
  _need(d.seq_len > 0, f"data.seq_len={d.seq_len} must be positive")
  if m.positions == "learned":
    _need(d.seq_len <= m.max_seq_len, f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
  if d.source == "synthetic":
    _need(bool(d.generator), "data.source='synthetic' needs data.generator (a registered generator name)")
    _need(d.synthetic_chars > 0 and 0.0 <= d.mix_stdlib < 1.0,
          f"data.synthetic_chars={d.synthetic_chars} must be > 0 and data.mix_stdlib={d.mix_stdlib} in [0, 1)")
  elif d.source != "stdlib":
    _need(bool(d.train_path), f"data.train_path is empty but data.source={d.source!r} needs a file")
  _need(0.0 < d.val_fraction < 1.0 or bool(d.val_path), f"data.val_fraction={d.val_fraction} must be in (0, 1)")

  o = c.optim
  _one_of("optim.decay", o.decay, ("all", "matrices"))
  _need(o.lr > 0, f"optim.lr={o.lr} must be positive")
  _need(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")

  t = c.train
  _need(t.steps > 0, f"train.steps={t.steps} must be positive")
  _need(t.grad_accum > 0 and t.batch_size % t.grad_accum == 0,
        f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
  for key in ("log_every", "eval_every", "ckpt_every", "keep_ckpts"):
    _need(t[key] > 0, f"train.{key}={t[key]} must be positive")
  _one_of("train.nonfinite", t.nonfinite, ("stop", "skip"))
  micro_tokens = t.batch_size // max(t.grad_accum, 1) * c.data.seq_len
  _need(t.ce_chunk >= 0 and (t.ce_chunk == 0 or micro_tokens % t.ce_chunk == 0),
        f"train.ce_chunk={t.ce_chunk} must be 0 or divide the {micro_tokens} tokens of a micro-batch")
  _need(not (t.ce_chunk and (m.mup or m.block != "pre_norm")),
        f"train.ce_chunk={t.ce_chunk} needs model.mup=False and model.block='pre_norm' (the plain readout)")
  _one_of("train.on_no_good_checkpoint", t.on_no_good_checkpoint, ("stop", "restart"))
  _one_of("train.surgery", t.surgery, ("none", "add_head_start", "add_head_end"))
  _one_of("train.surgery_init", t.surgery_init, ("normal", "zero", "k_zero", "ko_zero", "o_zero", "o_rescaled"))
  _need(t.surgery == "none" or bool(t.init_from), "train.surgery needs train.init_from (the model to operate on)")
  _need(len(c.mesh.shape) == 3, f"mesh.shape={tuple(c.mesh.shape)} must have 3 entries (data, fsdp, tensor)")
  _one_of("model.block", m.block, BLOCK_NAMES)
  if m.block.startswith("hope_"):
    _validate_hope(c)
  if m.block.startswith("titans_"):
    _validate_titans(c)
  return c


BLOCK_NAMES = ("pre_norm", "hope_attention", "hope_selfmod", "hope_hybrid", "hope_transformer",
               "titans_mac", "titans_mag", "titans_mal")


def _validate_titans(c: Config):
  m, h = c.model, c.model.hope
  _need(m.attn_kind == "standard", f"model.block={m.block!r} has its own softmax attention: set "
        f"model.attn_kind='standard' (got {m.attn_kind!r})")
  for key in ("titans_chunk", "titans_window", "titans_memory_depth"):
    _need(h[key] > 0, f"model.hope.{key}={h[key]} must be positive")
  for key in ("titans_persistent", "titans_conv"):
    _need(h[key] >= 0, f"model.hope.{key}={h[key]} must be >= 0")
  _need(h.titans_lr > 0, f"model.hope.titans_lr={h.titans_lr} must be positive")
  _need(h.titans_positions in ("absolute", "segment"),
        f"model.hope.titans_positions={h.titans_positions!r} must be absolute or segment")
  _need(h.titans_positions == "absolute" or m.block == "titans_mac",
        f"model.hope.titans_positions={h.titans_positions!r} is for titans_mac (MAG / MAL attend over a sliding window)")
  if m.block == "titans_mac":
    _need(h.titans_window % h.titans_chunk == 0, f"model.hope.titans_window={h.titans_window} (the MAC segment) "
          f"is not a multiple of model.hope.titans_chunk={h.titans_chunk}")


def _validate_hope(c: Config):
  m, h = c.model, c.model.hope
  _need(m.attn_kind == "standard" and kv_heads(m) == m.n_heads and attn_dim(m) == m.d_model,
        f"model.block={m.block!r} has its own attention (standard, all heads, width d_model); got model.attn_kind="
        f"{m.attn_kind!r}, n_kv_heads={m.n_kv_heads}, attn_dim={m.attn_dim}")
  _need(m.d_model % m.n_heads == 0, f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
  _need(m.norm == "layernorm", f"model.block={m.block!r} uses LayerNorm: set model.norm='layernorm'")
  _need(m.positions != "learned", f"model.block={m.block!r} has no learned positions (model.positions='none')")
  periods = tuple(h.cms_periods)
  _need(len(periods) > 0 and all(p > 0 for p in periods), f"model.hope.cms_periods={periods} must be positive")
  _need(all(p % min(periods) == 0 for p in periods),
        f"model.hope.cms_periods={periods} must be multiples of the smallest period")
  _one_of("model.hope.inner_opt", h.inner_opt, ("nl_l2_precond", "preconditioned", "dmgd", "muon", "muon_ns"))
  _one_of("model.hope.teach", h.teach, ("per_layer", "global"))
  _need(not (h.teach == "per_layer" and m.attn_impl == "pallas" and m.block != "hope_transformer"),
        "model.hope.teach='per_layer' differentiates attention's backward, which the Pallas kernels cannot: use "
        "model.attn_impl='auto' or 'xla' (or model.hope.teach='global')")
  _one_of("model.hope.teach_norm", h.teach_norm, ("row", "batch"))
  chunk = h.online_chunk or c.data.seq_len
  _need(c.data.seq_len % chunk == 0,
        f"model.hope.online_chunk={h.online_chunk} must divide data.seq_len={c.data.seq_len}")
  _need(h.local_conv >= 0 and h.cms_hidden_mult > 0,
        "model.hope.local_conv must be >= 0 and model.hope.cms_hidden_mult > 0")
  if m.block == "hope_selfmod":
    for key in ("selfmod_chunk", "selfmod_chunk_memory"):
      _need(h[key] > 0, f"model.hope.{key}={h[key]} must be a positive token count")
    _need(h.selfmod_lr >= 0, f"model.hope.selfmod_lr={h.selfmod_lr} must be >= 0 (0: the memories never move)")
    _need(0 <= h.selfmod_momentum < 1, f"model.hope.selfmod_momentum={h.selfmod_momentum} must be in [0, 1)")
    _need(h.selfmod_conv >= 0, f"model.hope.selfmod_conv={h.selfmod_conv} must be >= 0 (0: no conv)")
    _one_of("model.hope.selfmod_objective", h.selfmod_objective, ("l2", "dot"))
    _one_of("model.hope.selfmod_learn", h.selfmod_learn, ("always", "update_pass"))
  if m.block == "hope_hybrid":
    _need(h.titan_period > 0, f"model.hope.titan_period={h.titan_period} must be positive")
    _need(h.titan_lr >= 0, f"model.hope.titan_lr={h.titan_lr} must be >= 0")
    _need(h.titan_hidden_mult > 0 and h.self_mod_hidden > 0,
          f"model.hope.titan_hidden_mult={h.titan_hidden_mult} and model.hope.self_mod_hidden={h.self_mod_hidden} "
          "must be positive")
    _one_of("model.hope.titan_clock", h.titan_clock, ("tokens", "calls"))
