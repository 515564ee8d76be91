"""What every `dba-eval` subcommand shares: the user-error exception and loading a checkpoint under it."""
from __future__ import annotations

from dba_jax import loading
from dba_jax.loading import load_model


class EvalError(Exception):
  """A user error (a bad path, flag or checkpoint): dba-eval prints the message and exits 2, no traceback."""


def read_checkpoint_config(path: str):
  """The run config of a workdir or checkpoints/<step> directory, without loading the model: what a subcommand checks
  its arguments against before any work."""
  try:
    return loading.read_config(loading.locate(path)[0])
  except (OSError, ValueError) as e:
    raise EvalError(str(e)) from None


def load_checkpoint(path: str):
  """(model, config) of a workdir or checkpoints/<step> directory, a missing or malformed one as an EvalError;
  model.step and model.checkpoint_dir name the checkpoint read (loading.load_model)."""
  try:
    return load_model(path)
  except (FileNotFoundError, ValueError) as e:
    raise EvalError(str(e)) from None
