"""Compare the quickstart baseline and DBA runs (python -m dba_jax.quickstart trains both).

  dba-eval compare --manifest configs/compare/quickstart.py [--out runs/compare/quickstart]
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "quickstart"
  # Paths are relative to the directory dba-eval runs in; exactly one checkpoint is the baseline.
  c.checkpoints = [
      {"name": "baseline", "path": "runs/quickstart/baseline", "baseline": True},
      {"name": "dba", "path": "runs/quickstart/dba", "baseline": False},
  ]
  c.eval = {"split": "val", "seq_len": 0, "max_windows": 256, "batch_size": 8}  # seq_len 0: the run's own
  # suite v1 (121 probes) or v2 (seeded, per_category probes per category); limit > 0 for a quick look.
  c.behavior = {"suite": "v1", "seed": 42, "per_category": 30, "limit": 0, "max_new": 24, "n_resamples": 2000}
  c.latency = {"context_lengths": (32, 64, 128), "decode_tokens": 32, "repeats": 2}
  # last-layer attention heat-maps and attention mass on a few probes whose answer is in the prompt
  c.attention = {"probes": 3, "max_tokens": 48}
  c.cache = "float16"  # KV-cache kind for the KV-bytes and latency measurements
  return c
