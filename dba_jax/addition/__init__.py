"""Tiny 10-digit addition transformers (others.md System A): data, model, training, conversion (evaluation:
dba_jax/evals/addition.py).

  python -m dba_jax.addition.train --config=configs/addition.py:456p --workdir=DIR   (dba-addition-train)
  python -m dba_jax.evals.addition --checkpoint best_456p_s43.pt [--strict] [--out X.json]   (dba-addition-eval)
  python -m dba_jax.addition.shrink --config=configs/addition.py:456p+ft --checkpoint=SRC --out=DIR [overrides]
      (dba-addition-shrink: a smaller or folded model from a trained one, no training)
"""
