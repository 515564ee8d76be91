"""What every `dba-eval` subcommand shares: the user-error exception and loading a checkpoint under it."""
from __future__ import annotations

from dba_jax.loading import load_model


class EvalError(Exception):
  """A user error (a bad path, flag or checkpoint): dba-eval prints the message and exits 2, no traceback."""


def load_checkpoint(path: str):
  """(model, config) of a workdir or checkpoints/<step> directory, a missing or malformed one as an EvalError."""
  try:
    return load_model(path)
  except (FileNotFoundError, ValueError) as e:
    raise EvalError(str(e)) from None
