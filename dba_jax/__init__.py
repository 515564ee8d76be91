"""dba_jax: efficient-attention transformer research in JAX / Flax NNX."""
from dba_jax import ops
from dba_jax.loading import load_model

__all__ = ["load_model", "ops"]
