"""Test setup: 8 simulated CPU devices (before JAX starts), absl flags parsed, small shared helpers."""
import os
import sys

# The tests compile hundreds of tiny programs and run each a few times, so LLVM's optimisation passes cost more than
# they save: level 0 halves a tiny training run's wall time (measured: tests/test_generate.py 277 s -> 122 s). An
# xla_backend_optimization_level already in XLA_FLAGS wins (e.g. =2 to test with the compiler's default).
FAST_COMPILE = "" if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", "") else \
    " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + FAST_COMPILE +
                           " --xla_force_host_platform_device_count=8").strip()
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
