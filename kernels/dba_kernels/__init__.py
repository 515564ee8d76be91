"""Pallas kernels for dba_jax (imported as `dba_kernels`, never `kernels`, which is an unrelated PyPI package).

Each kernel joins `dba_jax.ops.attention(..., impl=...)` and is tested against that module's dtype-generic
float64 reference. The first kernels arrive with the selective-attention issues.
"""
