"""The `upcycle` settings of a dba-upcycle config file (configs/dba_upcycle.py:get_upcycle): which initialiser, how
the student's DBA widths follow the teacher, and the two distillation phases. The student's own run config (model,
data, optim, train, mesh: what dba-train reads afterwards) is the file's get_config; its data section (source,
seq_len, tokenizer) is also what distillation reads."""
from __future__ import annotations

from dba_jax.configlib import Field, Section

INITS = ("random", "svd_caramba", "svd_joint")


def _phase(doc: str, steps: int, lr: float) -> Section:
  return Section(
      doc,
      steps=Field(steps, "optimizer steps (0 skips the phase)", ge=0),
      lr=Field(lr, "peak AdamW learning rate (no weight decay)", gt=0.0),
      warmup_steps=Field(0, "linear warmup, then cosine decay to lr / 10", ge=0),
  )


SECTION = Section(
    "dba-upcycle",
    init=Field("svd_joint", "the semantic / geometric Q-K initialiser (dba-upcycle --init overrides it)",
               choices=INITS),
    teacher_shapes=Field("check", "check: the config's model widths must equal the teacher's; take: the teacher's "
                         "widths replace them (DBA widths then from the *_frac fields)", choices=("check", "take")),
    sem_frac=Field(0.0, "take: semantic width per head = this x the teacher's head dim (even, >= 2)", ge=0.0, le=1.0),
    geo_frac=Field(0.0, "take: geometric width per head = this x the teacher's head dim (even, >= 2)", ge=0.0,
                   le=1.0),
    v_frac=Field(1.0, "take: value width per head = this x the teacher's head dim", gt=0.0, le=1.0),
    sem_pairs=Field("slow", "svd_joint: the teacher's rotary pairs the semantic path takes besides the geometric "
                    "ones: slow (turning < 1 radian over sem_horizon tokens) | all (un-rotated)",
                    choices=("slow", "all")),
    sem_horizon=Field(0, "svd_joint, slow: the horizon in tokens (0: data.seq_len)", ge=0),
    batch_size=Field(8, "sequences per distillation step", ge=1),
    eval_batches=Field(4, "validation batches behind every reported loss", ge=1),
    seed=Field(0, "the student's random init (kept where no initialiser writes) and the data order", ge=0),
    clip_norm=Field(1.0, "global gradient-norm clip; 0 disables it", ge=0.0),
    log_every=Field(25, "steps between progress lines", ge=1),
    blockwise=Section(
        "phase 1: every DBA layer against its teacher layer on the teacher's own hidden states (all layers at once:"
        " their inputs do not depend on each other)",
        **_phase("", 200, 1e-3).entries,
        loss=Field("mse", "per layer, of the attention output: mse | l1 (caramba's DistillLoss)",
                   choices=("mse", "l1")),
    ),
    kd=Section(
        "phase 2: end to end, KL(teacher || student) of the next-token distributions",
        **_phase("", 200, 3e-4).entries,
        temperature=Field(1.0, "softmax temperature of both distributions (the loss is scaled by its square)",
                          gt=0.0),
        params=Field("all", "what KD trains: all | attention (the rest stays the teacher's)",
                     choices=("all", "attention")),
    ),
)


def defaults():
  return SECTION.defaults()
