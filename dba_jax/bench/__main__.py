"""`python -m dba_jax.bench` (gpu_check runs it so): the dba-bench command."""
from dba_jax.bench import cli

cli()
