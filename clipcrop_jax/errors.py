"""Errors a user can act on (not bugs in this code): the command lines print them as one line.

`RunError` and its subclasses mean that a run cannot start or go on for a reason outside the
code (a dataset not prepared, no usable checkpoint, a loss that became NaN). `python -m
clipcrop_jax.main` and `python -m clipcrop_jax.detection_train` print `error: <message>` on
stderr and exit with code 1, without a traceback. (A bad config or command line is a
`config_validation.ConfigError`: exit code 2.)
"""

from __future__ import annotations


class RunError(Exception):
  """A run cannot start or go on for a reason the user can act on (not a bug in this code)."""


class DatasetNotPreparedError(RunError, FileNotFoundError):
  """The TFDS dataset a config names is not prepared in its data_dir."""


class NoCheckpointError(RunError, FileNotFoundError):
  """`<workdir>/checkpoints` has no step folder (evaluation of an untrained workdir)."""


class CheckpointRestoreError(RunError):
  """`<workdir>/checkpoints` has step folders but none of them restores."""


class NonFiniteLossError(RunError, FloatingPointError):
  """The training loss became NaN or Inf."""


def one_line(error: BaseException) -> str:
  """`error` as one line for a per-item failure report (a skipped image): its message with all
  whitespace collapsed, prefixed by the exception type unless it is a ValueError / OSError (the
  expected kinds of bad input), so that an unexpected failure is recognisable as one."""
  reason = ' '.join(str(error).split()) or type(error).__name__
  if not isinstance(error, (ValueError, OSError)):
    reason = f'{type(error).__name__}: {reason}'
  return reason
