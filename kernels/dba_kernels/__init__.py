"""Pallas kernels for dba_jax, imported as `dba_kernels`. The name is never `kernels`, because that is an
unrelated PyPI package.

Each kernel sits behind an `impl=` switch in dba_jax. It is tested in interpret mode on CPU against a
dtype-generic float64 reference. Kernels so far:

  cumsum: blocked exclusive cumulative sum down the query axis (selective attention's F), with a custom VJP.
"""
