"""Test setup: 8 simulated CPU devices (before JAX starts), absl flags parsed, small shared helpers."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The TPU compile tests (libtpu from the tpu extra): no metadata server on a CPU host, and both xdist workers (and
# their subprocesses) may hold a TPU topology at once.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import flags  # noqa: E402

flags.FLAGS(sys.argv[:1])  # libraries that read absl flags must not see pytest's argv

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
