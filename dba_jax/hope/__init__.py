"""HOPE / nested learning (others.md part B): CMS memory levels with a teach-signal inner loop, as Decoder blocks.

  blocks.py  HopeBlock (model.block = hope_attention | hope_transformer): post-norm attention, CMS levels
  cms.py     a level's math, DeepMomentum, the online (sub-chunked) update pass for one context
  selfmod.py hope_selfmod (self-modifying Titans → CMS) and hope_hybrid (attention → Titan level + SelfModifier → CMS)
  teach.py   the teach signal: closed form, scale / clip / schedule, surprise
  step.py    the training loss: two passes per online chunk, fast state per batch row, in one jitted step
  evals.py   passkey with and without memory
  titans.py  the Titans paper's neural memory: per-token recurrence and the chunked parallel form (matmuls per chunk)
  titans_blocks.py  titans_mac | titans_mag | titans_mal: the memory inside the forward, persistent tokens, plain LM loss
"""
