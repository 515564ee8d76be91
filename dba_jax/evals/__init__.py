"""Evaluations: everything that measures a trained model and reports, never trains it.

Modules (import them directly; this package imports nothing heavy):
  stats                the one statistics module: Wilson interval, paired bootstrap, exact McNemar, paired t and the
                       exact sign-flip test (behaviour suites, HOPE, LatentWire, dba-seeds)
  common               EvalError (a user error: dba-eval exits 2) and load_checkpoint
  perplexity           which tokens perplexity scores, and `dba-eval ppl`
  generation           `dba-eval generate`: text through the KV-cache decoder (dba_jax/generate.py)
  pruning              context pruning for selective attention (keep ratios, per-layer KV budgets), `dba-eval prune`
  behavior/            behaviour suites: suite data (probes, suite_v1, suite_v2), scoring, report
  attention_probes     where the last layer looks while a checkpoint answers (the compare figure's attention panels)
  compare_checkpoints  `dba-eval compare`: checkpoints measured side by side (loss, behaviour, memory, latency)
  runs_table           training runs side by side from their logs: a Markdown table and a loss-curve SVG
  hope_memory          HOPE / Titans memory evals (passkey, NIAH, continual, read), `dba-eval hope`
  hope_report          the HOPE / Titans results table of launch/hope_results.sh
  latentwire           `dba-eval latentwire`: the bridge against every baseline, exact match and bytes
  addition             greedy exact match of the addition models (`dba-addition-eval`, `dba-eval addition`)

evals may import the model's packages (model, hope, latentwire, addition, data, generate); none of those, nor ops,
attention, formats, layers or train, imports evals.
"""
