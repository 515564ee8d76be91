"""HOPE (Nested Learning) models: post-norm attention + continuum memory levels, no positions, tied head.

  dba-train --config=configs/hope.py:cpu --workdir=runs/hope_cpu             # bytes, d 128, 2 layers, T 128
  dba-train --config=configs/hope.py:cpu --config.model.block=hope_transformer --workdir=runs/hope_tf
  dba-train --config=configs/hope.py:attention --workdir=runs/hope           # the original's pilot shapes

Variants built so far: attention (hope_attention at the pilot's shapes), selfmod (hope_selfmod: self-modifying Titans
→ CMS), hybrid (hope_hybrid: attention → Titan level → CMS, the original's default), transformer (its baseline
block), cpu (any block via --config.model.block); titans_mac / titans_mag / titans_mal / titans_lmm (the Titans
paper's memory as context / gate / layer / alone, at the cpu sizes, trained with the plain next-token loss;
dba_jax/hope/titans_blocks.py).
The memory learns during each sequence: `hope.online_chunk` tokens at a time, two passes per chunk (read, then the
teach-signal update of the CMS fast weights), one fast state per batch row (dba_jax/hope/step.py).

cpu has a live inner loop (issue 29; BUILD_NOTES "live presets"): teach 1, inner lr 0.1, β 0 (the original's teach
0.1, inner lr 3e-4, β 0.9 move the CMS weights by ~1e-7 of themselves: logits change at float noise; inner lr 1
cost hope_selfmod 0.12 nats in 100 steps), and for hope_selfmod α = σ(M_α(x) + 4) with M_memory stepping every 8
tokens (the original's σ(M_α(x)) ≈ ½ halves every memory per token). M_α learns through the decay at every size
(hope.selfmod_alpha_grad). The pilot-shape variants keep the original's values (not verified at d 512). The
original's values at the cpu sizes (parity runs):
  --config.model.hope.teach_scale=0.1 --config.model.hope.inner_lr=3e-4 --config.model.hope.inner_beta=0.9
  --config.model.hope.selfmod_alpha_init=0 --config.model.hope.selfmod_chunk_memory=32
  --config.model.hope.selfmod_alpha_grad=false
"""
from dba_jax.config import base_config, lock

BUILT = ("attention", "selfmod", "hybrid", "transformer", "cpu", "titans_mac", "titans_mag", "titans_mal",
         "titans_lmm", "recall")
PLANNED = ()


def get_config(variant: str = "cpu"):
  if variant not in BUILT:
    extra = f" ({variant} is planned, not built yet)" if variant in PLANNED else ""
    raise ValueError(f"unknown variant {variant!r} of hope{extra}; choose one of {', '.join(BUILT)}")
  c = base_config()
  m, h = c.model, c.model.hope
  if variant == "recall":
    return _recall(c)
  blocks = {"transformer": "hope_transformer", "selfmod": "hope_selfmod", "hybrid": "hope_hybrid"}
  m.block = blocks.get(variant, "hope_attention")
  # model.bias only reaches the final LayerNorm here (HOPE blocks set their own biases): torch LN has one.
  m.positions, m.norm, m.tie_embeddings, m.bias = "none", "layernorm", True, True
  m.scale_residual_init = False
  o, t = c.optim, c.train
  # Outer optimiser: the original's CPU configs (and others.md B.9's small version) train with AdamW; its pilot with
  # the Muon + AdamW hybrid (optim.name="muon": torch.optim.Muon on the matrices, AdamW on embedding, norms and
  # biases, one lr and weight decay) at a constant lr (no schedule).
  if variant == "cpu" or variant.startswith("titans_"):  # others.md B.9: bytes, CMS 4/16/64, AdamW 3e-4, 1-2k steps
    m.vocab_size, m.pad_vocab_to, m.d_model, m.n_layers, m.n_heads, m.max_seq_len = 256, 128, 128, 2, 4, 128
    h.cms_periods, h.online_chunk = (4, 16, 64), 32
    c.data.seq_len = 128
    o.lr, o.warmup_steps, o.weight_decay = 3e-4, 50, 0.0
    t.steps, t.batch_size, t.log_every, t.eval_every, t.eval_batches, t.ckpt_every = 1000, 8, 25, 250, 8, 250
  else:  # configs/pilot.yaml shapes (dim 512, 12 layers, 8 heads, T 2048) with a byte vocabulary here
    m.vocab_size, m.pad_vocab_to, m.d_model, m.n_layers, m.n_heads, m.max_seq_len = 256, 128, 512, 12, 8, 2048
    h.cms_periods, h.online_chunk = (1, 4, 32, 128), 256
    c.data.seq_len = 2048
    o.name, o.lr, o.momentum, o.weight_decay, o.warmup_steps, o.min_lr_ratio = "muon", 2.5e-4, 0.95, 0.02, 0, 1.0
    t.steps, t.batch_size = 246_667, 6
  h.teach_scale, h.teach_clip, h.surprise_threshold = 0.1, 5.0, 0.0  # no surprise gate (it silenced the original)
  h.inner_opt, h.inner_lr = "nl_l2_precond", 3e-4
  # selfmod: configs/hope/pilot_selfmod.yaml (chunks 8 / 64, η scale 1e-3; B.9: 8 / 32 on CPU), no W_skip (the paper
  # preset); hybrid: the pilot's Titan level (period 8, DeepMomentum lr 6e-4), on the token clock.
  h.selfmod_lr, h.selfmod_chunk, h.selfmod_chunk_memory, h.selfmod_skip = 1e-3, 8, 32 if variant == "cpu" else 64, False
  h.titan_period, h.titan_lr, h.titan_clock = 8, 6e-4, "tokens"
  if variant == "cpu":  # a live inner loop (docstring): at the values above the CMS moves by ~1e-7 of its weights
    h.teach_scale, h.inner_lr, h.inner_beta = 1.0, 0.1, 0.0
    # α = σ(M_α(x) + 4) ≈ 0.98 (σ(0) = ½ erased every memory within a chunk); M_memory steps every 8 tokens, so reads
    # inside an online chunk of 32 see its steps and M_α's decay gradient reaches the loss
    h.selfmod_alpha_init, h.selfmod_chunk_memory = 4.0, 8
  if variant.startswith("titans_"):  # the Titans paper's memory blocks (dba_jax/hope/titans_blocks.py), plain LM loss
    # RoPE: attention is local (segment / window), so relative distances never outgrow training; MAC restarts the
    # positions every segment (the position-free persistent keys would otherwise tie every score to the query's
    # absolute position, unseen beyond the training length). GELU MLP 4d and no biases like the transformer baseline.
    m.block, m.positions, m.mlp, m.d_ff, m.bias = variant, "rope", "gelu", 4 * m.d_model, False
    h.titans_chunk, h.titans_window, h.titans_persistent, h.titans_memory_depth = 32, 32, 8, 2
    h.titans_positions = "segment" if variant == "titans_mac" else "absolute"
    o.lr = 1e-3
  return lock(c)


def _recall(c):
  """The token-level passkey (`dba-eval hope recall`, dba_jax/evals/hope_recall.py): a tiny titans_mac, T 32 = two
  segments of 16, so the needle is out of attention's reach and only the memory can carry it. A linear memory with
  a large inner step and clipped outer steps learns it in ~150 steps; the cpu preset's depth-2 memory at titans_lr
  0.05 stayed at chance for 500 (BUILD_NOTES). titans_lr 0.4 diverges past ~100 tokens at init (a chunk's correlated
  keys), trained models stay finite at 4x; 0.2 is stable and what the MAL / LMM runs used. Another block:
  --set model.block=titans_mag --set model.hope.titans_positions=absolute (segment positions are MAC's)."""
  m, h, o = c.model, c.model.hope, c.optim
  m.block, m.positions, m.norm, m.mlp, m.bias, m.tie_embeddings = "titans_mac", "rope", "layernorm", "gelu", False, True
  m.scale_residual_init = False
  m.vocab_size, m.pad_vocab_to, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.max_seq_len = 32, 8, 32, 2, 2, 128, 4096
  h.titans_chunk, h.titans_window, h.titans_persistent, h.titans_memory_depth, h.titans_lr = 8, 16, 4, 1, 0.4
  h.titans_positions = "segment"
  c.data.seq_len = 32
  o.lr, o.warmup_steps, o.weight_decay, o.clip_norm = 2e-3, 20, 0.0, 1.0
  c.train.steps, c.train.batch_size = 600, 64
  return lock(c)
