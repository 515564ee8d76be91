"""The bridge's loss terms, with the fixed definitions (issue 15; the original's defects in others.md C.3):

  answer_nll   the target's mean NLL over answer tokens only (labels exact: no soft, stub or padding position).
  answer_kl    on answer positions only, KL between the text-prompted target (teacher, [prompt ; answer]) and the
               bridged target (student, [soft ; stub ; answer]), both over the real vocabulary. direction
               "student_teacher" = KL(bridged ‖ text), what the original's comment stated (its code computed the
               reverse, on soft-token positions); "teacher_student" = KL(text ‖ bridged), forward distillation.
  info_nce     masked means: the K soft tokens (after RMS matching) against the target's input embeddings of the
               literal prompt without padding; cosine / tau, cross-entropy against the diagonal (in-batch negatives).
  first_k_ce   the interlingua's first-token (k = 1) and K-token CE: answer NLL over each row's first k answer tokens.
  kd_first_k   the interlingua's distillation: tau²·KL(text teacher ‖ student) at temperature tau, first k answer
               tokens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dba_jax import losses

KL_DIRECTIONS = ("student_teacher", "teacher_student")


def masked_mean(x, mask):
  """Mean of x over mask (same shape); 0 when the mask is empty."""
  m = mask.astype(x.dtype)
  return (x * m).sum() / jnp.maximum(m.sum(), 1.0)


def masked_pool(x_BTd, mask_BT):
  """Mean over the unmasked positions of each row: [B, d]."""
  m = mask_BT.astype(x_BTd.dtype)[..., None]
  return (x_BTd * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def answer_nll(logits_BTV, targets_BT, mask_BT, vocab: int):
  return masked_mean(losses.nll(logits_BTV, targets_BT, vocab), mask_BT)


def _log_probs(logits_BTV, vocab: int):
  return jax.nn.log_softmax(logits_BTV[..., :vocab].astype(jnp.promote_types(logits_BTV.dtype, jnp.float32)), -1)


def answer_kl(student_BTV, teacher_BTV, mask_BT, vocab: int, direction: str = "student_teacher"):
  """Mean over answer positions of the per-position KL (summed over the vocabulary); the teacher is constant."""
  if direction not in KL_DIRECTIONS:
    raise ValueError(f"KL direction {direction!r} is not one of {KL_DIRECTIONS}")
  ls, lt = _log_probs(student_BTV, vocab), jax.lax.stop_gradient(_log_probs(teacher_BTV, vocab))
  p, lp, lq = (jnp.exp(ls), ls, lt) if direction == "student_teacher" else (jnp.exp(lt), lt, ls)
  return masked_mean((p * (lp - lq)).sum(-1), mask_BT)


def info_nce(soft_BKd, soft_mask_BK, prompt_BTd, prompt_mask_BT, tau: float = 0.07):
  """InfoNCE between pooled soft tokens and pooled prompt embeddings (stop-gradient); >= ln B at chance."""
  s = masked_pool(soft_BKd, soft_mask_BK)
  t = jax.lax.stop_gradient(masked_pool(prompt_BTd, prompt_mask_BT))
  unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)
  logits_BB = jnp.einsum("id,jd->ij", unit(s), unit(t)) / tau
  return (jax.nn.logsumexp(logits_BB, -1) - jnp.diagonal(logits_BB)).mean()


# ----------------------------------------------------- the interlingua's early-token terms (hope_latentwire.md B)

def first_k(mask_BT, k: int):
  """The first k positions of each row's mask (its first k answer tokens)."""
  return mask_BT & (jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) <= k)


def first_k_ce(logits_BTV, targets_BT, mask_BT, k: int, vocab: int):
  """Mean CE over the first k answer tokens of each row (k = 1: the first-token CE). Teacher-forced logits at those
  positions are what the original's step-by-step loop computes, one decoding step at a time."""
  return answer_nll(logits_BTV, targets_BT, first_k(mask_BT, k), vocab)


def kd_first_k(student_BTV, teacher_BTV, mask_BT, k: int, vocab: int, tau: float):
  """tau² · KL(softmax(teacher/tau) ‖ softmax(student/tau)) over the first k answer positions, averaged over them
  (the original's kd_first_k_prefix_vs_text: forward KL to the text-prompted teacher, temperature tau)."""
  ls = _log_probs(student_BTV / tau, vocab)
  lt = jax.lax.stop_gradient(_log_probs(teacher_BTV / tau, vocab))
  return tau * tau * masked_mean((jnp.exp(lt) * (lt - ls)).sum(-1), first_k(mask_BT, k))
