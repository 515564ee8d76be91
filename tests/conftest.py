"""Test setup: 8 simulated CPU devices (before JAX starts), absl flags parsed, small shared helpers."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The tests compile hundreds of tiny programs and run each a few times, so XLA's backend optimisations cost more than
# they save: without them a tiny training run takes half the time (tests/test_generate.py 277 s -> 122 s). The CLIs
# the tests start inherit this; JAX_DISABLE_MOST_OPTIMIZATIONS=0 tests with the compiler's defaults.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The TPU compile tests (libtpu from the tpu extra): no metadata server on a CPU host, and both xdist workers (and
# their subprocesses) may hold a TPU topology at once.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import flags  # noqa: E402

flags.FLAGS(sys.argv[:1])  # libraries that read absl flags must not see pytest's argv

import jax  # noqa: E402
import pytest  # noqa: E402

import slow_tier  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def optimized():
  """The compiler's default optimisations: for a test whose run time outweighs its compile time (the 60-step
  quickstart run: 47 s optimised, 81 s not), and for outputs recorded from optimised programs (an nf4 cache level
  flips with the last bit). JAX's in-memory caches do not key on this flag: compiled executables are dropped before
  and after, so no test mixes programs compiled both ways (the float16 cache's goldens do not survive that)."""
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", False)
  jax.clear_caches()
  yield
  jax.config.update("jax_disable_most_optimizations", before)
  jax.clear_caches()


@pytest.hookimpl(tryfirst=True)  # before `-m 'not slow'` deselects
def pytest_collection_modifyitems(config, items):
  """Marks slow_tier's tests slow: the listed ones, and every parametrization but the first of FIRST_ONLY."""
  seen = set()
  for item in items:
    rel = os.path.basename(str(item.fspath))
    base = f"{rel}::{getattr(item, 'originalname', item.name)}"
    if f"{rel}::{item.name}" in slow_tier.SLOW or (base in slow_tier.FIRST_ONLY and base in seen):
      item.add_marker(pytest.mark.slow)
    seen.add(base)
