"""Upcycling a pretrained Llama-family model into a DBA model (docs/upcycle.md).

  init.py     the student's parameters from the teacher's: embeddings, norms, MLP and head copied, V / O copied or
              truncated, the semantic and geometric Q / K from one of three initialisers (random, svd_caramba,
              svd_joint)
  distill.py  blockwise distillation (each DBA layer against its teacher layer, on the teacher's own hidden
              states), then end-to-end KD on the teacher's logits; the losses the report quotes
  cli.py      `dba-upcycle HF_OR_DBA_DIR --config=configs/dba_upcycle.py:VARIANT --out DIR [--init ...]`
"""
