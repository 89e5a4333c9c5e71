"""Orbax checkpoints of a training run: save, list, and restore the newest usable step.

`restore_latest` lists `<workdir>/checkpoints/<N>` itself and tries them newest first; an unusable
step (empty, truncated, corrupt, other shapes) is logged with the reason and, when training goes on,
moved to `<workdir>/checkpoints_unusable/<N>` (never deleted). The reads a failed Orbax restore
abandons are silenced and collected (`_quiet_abandoned_reads`).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging as python_logging
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterator, Optional

from absl import logging
import jax
import ml_collections

from clipcrop_jax import errors

CHECKPOINT_DIR = 'checkpoints'
UNUSABLE_CHECKPOINT_DIR = 'checkpoints_unusable'
# After a failed restore, how long its abandoned reads get to end quietly (`_restore_step`).
ABANDONED_READS_SETTLE_S = 1.0

TrainState = Any  # `trainer.TrainState` (any pytree with a `step`)


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  options = ocp.CheckpointManagerOptions(
      max_to_keep=max(1, int(config.checkpoint.keep)), create=True
  )
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), options=options
  )


def save_checkpoint(manager, state: TrainState) -> None:
  """Saves `state` at its step; raises if Orbax skips it (it does when a step >= it exists)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint.args  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import

  step = int(jax.device_get(state.step))
  if manager.save(step, args=ocp.args.StandardSave(state)) is False:
    raise RuntimeError(
        f'Orbax did not save step {step} in {manager.directory}: it already holds '
        f'step {manager.latest_step()}'
    )
  manager.wait_until_finished()


def checkpoint_steps(workdir: str) -> list[int]:
  """The step folders `<workdir>/checkpoints/<N>` on disk, ascending (usable or not)."""
  directory = pathlib.Path(workdir) / CHECKPOINT_DIR
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _error_summary(error: BaseException) -> str:
  """'Type: first line' of the innermost cause of `error` (Orbax wraps TensorStore's errors)."""
  seen = set()
  while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  lines = str(error).strip().splitlines()
  text = f'{type(error).__name__}: {lines[0].strip()}' if lines else type(error).__name__
  return text if len(text) <= 300 else text[:297] + '...'


def _abandoned_read(report: Any) -> bool:
  """An "Exception ignored" report left by a read of a failed Orbax restore."""
  return inspect.iscoroutine(report.object) or (
      isinstance(report.exc_value, RuntimeError) and 'Event loop is closed' in str(report.exc_value)
  )


def _unretrieved_read_error(record: python_logging.LogRecord) -> bool:
  """asyncio's log line for a failed read whose error nobody awaited (a failed Orbax restore)."""
  return record.getMessage().split('\n', 1)[0].endswith('exception was never retrieved')


@contextlib.contextmanager
def _quiet_abandoned_reads() -> Iterator[Callable[[], None]]:
  """Silences the reads a failed Orbax restore abandons, then frees them.

  When one read of a step fails, Orbax closes its event loop with the other reads pending. Left
  alone, they print tracebacks at random later times: "Exception ignored" reports (TensorStore
  callbacks finding the loop closed; the coroutines when garbage-collected) and asyncio's
  "exception was never retrieved" log lines. Within this block those are dropped (any other
  report or log line passes). The block yields `settle`, which gives the stragglers
  `ABANDONED_READS_SETTLE_S` to end and collects them; one that ends later still prints.
  """
  hook = sys.unraisablehook
  sys.unraisablehook = lambda report: None if _abandoned_read(report) else hook(report)
  asyncio_logger = python_logging.getLogger('asyncio')
  log_filter = lambda record: not _unretrieved_read_error(record)
  asyncio_logger.addFilter(log_filter)

  def settle():
    time.sleep(ABANDONED_READS_SETTLE_S)
    gc.collect()

  try:
    yield settle
  finally:
    asyncio_logger.removeFilter(log_filter)
    sys.unraisablehook = hook


def _restore_step(
    checkpointer, step_dir: pathlib.Path, abstract_state: TrainState
) -> tuple[Optional[TrainState], Optional[str]]:
  """(state, None) from one step folder, restored as `CheckpointManager` does, or (None, why)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint.args  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import

  if not any(step_dir.iterdir()):
    return None, 'empty folder'
  reason = None
  with _quiet_abandoned_reads() as settle:
    try:
      restored = checkpointer.restore(
          step_dir, args=ocp.args.Composite(default=ocp.args.StandardRestore(abstract_state))
      )
    except Exception as e:  # pylint: disable=broad-except
      reason = _error_summary(e)
    if reason is not None:  # outside the `except`: its traceback no longer holds the reads
      settle()
  if reason is not None:
    return None, reason
  state = restored['default']
  found = int(jax.device_get(state.step))
  if found != int(step_dir.name):
    return None, f'holds step {found}'
  return state, None


def _set_aside(workdir: str, failed: list[tuple[int, str]]) -> None:
  """Moves unusable step folders to `<workdir>/checkpoints_unusable/<N>[.k]` (process 0)."""
  if jax.process_index() == 0:
    root = pathlib.Path(workdir) / UNUSABLE_CHECKPOINT_DIR
    root.mkdir(exist_ok=True)
    for step, reason in failed:
      target, k = root / str(step), 1
      while target.exists():
        target, k = root / f'{step}.{k}', k + 1
      os.rename(pathlib.Path(workdir) / CHECKPOINT_DIR / str(step), target)
      logging.warning(
          'Moved the unusable checkpoint step %d (%s) to %s; nothing was deleted. '
          'Training goes on and saves step %d again.',
          step,
          reason,
          target,
          step,
      )
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices('clipcrop_set_aside_checkpoints')


def restore_latest(
    workdir: str, abstract_state: TrainState, *, set_aside: bool
) -> tuple[Optional[TrainState], Optional[int]]:
  """The newest checkpoint of `<workdir>/checkpoints` that restores, as (state, step).

  Step folders are listed here (not by Orbax's CheckpointManager, which an empty or corrupt step
  folder confuses) and tried newest first. A folder that does not restore (empty, truncated or
  corrupt files, other shapes, a different step inside) is logged with the reason and the
  previous step is tried.

  Args:
    workdir: the run's workdir.
    abstract_state: shapes, dtypes and shardings to restore into.
    set_aside: True when the caller will save checkpoints again (training): the unusable folders
      newer than the restored step are then moved to `<workdir>/checkpoints_unusable/<N>` (never
      deleted), since Orbax would otherwise skip saving any step up to theirs and, with
      `checkpoint.keep`, garbage-collect good steps while keeping them. False (evaluation)
      changes nothing on disk.

  Returns:
    (state, step), or (None, None) when there is no step folder at all.

  Raises:
    CheckpointRestoreError: step folders exist but none restores (one line listing every step
      and why; nothing is moved).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = pathlib.Path(workdir) / CHECKPOINT_DIR
  failed: list[tuple[int, str]] = []
  state, restored_step = None, None
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    for step in reversed(checkpoint_steps(workdir)):
      state, reason = _restore_step(checkpointer, directory / str(step), abstract_state)
      if state is not None:
        restored_step = step
        break
      failed.append((step, reason))
      logging.warning(
          'Checkpoint step %d in %s is unusable (%s); trying the previous step.',
          step,
          directory,
          reason,
      )
  finally:
    checkpointer.close()
  if state is None and failed:
    raise errors.CheckpointRestoreError(
        f'no usable checkpoint in {directory}: '
        + '; '.join(f'step {s}: {r}' for s, r in failed)
        + ' (nothing was moved or deleted; repair or remove these step folders, or use a new '
        'workdir)'
    )
  if failed and set_aside:
    _set_aside(workdir, failed)
  return state, restored_step
