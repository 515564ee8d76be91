"""Pallas kernels for dba_jax, imported as `dba_kernels`. The name is never `kernels`, because that is an
unrelated PyPI package.

Each kernel sits behind an `impl=` switch in dba_jax. It is tested in interpret mode on CPU against a
dtype-generic float64 reference. Kernels so far:

  cumsum: blocked exclusive cumulative sum down the query axis (selective attention's F), with a custom VJP.
  flash_attention: flash attention with q/k head dim != v head dim, GQA, causal + always-visible prefix, custom VJP.
  selective_flash: fused selective attention (F rebuilt per tile, O(T) activations), forward and custom VJP.
  protect_attack: blocked protect-and-attack scan down the query axis (selective attention with protection,
    selective.md §5.4), with the closed-form custom VJP as a reverse-walking kernel.

_backend holds what they share: the target platform, interpret mode on CPU, and the compiler params that pick
Pallas-Triton on GPU and mark TPU grid axes parallel.
"""
