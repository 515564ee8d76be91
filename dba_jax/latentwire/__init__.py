"""LatentWire: a learned soft-token bridge from one language model's hidden states into another's input (issue 15).

  (dba_jax/arith_qa.py: the arithmetic word problems with checkable "#### n" answers, train / held-out splits, and
  the LM corpus; dba_jax/tokenizers.py: "bpe_qa", a tiny byte-level BPE, so source and target tokenise differently)
  tasks.py      the task (synthetic with its fact-level split, GSM8K / SQuAD jsonl): prompts, answers, scores
  sides.py      the frozen LMs (dba-train or dba-convert'ed HF dirs, own tokenizers, placed on the mesh), batched
                greedy decoding, log-likelihood scoring
  bridge.py     the translator (K learned queries, gated cross-attention to the source) and RMS matching
  losses.py     answer NLL, KL to the text-prompted teacher on answer positions, InfoNCE over the K soft tokens
  interlingua.py  the interlingua variant: byte encoder -> M latents Z -> one adapter per receiving LM
  train.py      dba-latentwire-train: the training loop of a bridge or an interlingua (the LMs frozen)
  (dba_jax/evals/latentwire.py: dba-eval latentwire, every baseline on the same held-out questions, joint two-model
  rescoring, exact match / F1 and byte accounting)
"""
