"""Train and/or evaluate ClipCrop.

  python -m clipcrop_jax.main --config=configs/gaic_b32.py --workdir=/tmp/clipcrop
  python -m clipcrop_jax.main --config=configs/tiny.py --workdir=/tmp/w --config.mode=eval

`--config.<field>=value` overrides any field (the config is locked: a misspelt field is an error).
`config.mode`: 'train', 'eval' (latest checkpoint of the workdir) or 'train_and_eval'. Re-running a
command on the same workdir resumes from its newest usable checkpoint.

Errors print one `error: ...` line on stderr, without a traceback: exit code 2 for a bad command
line or config (unknown or misspelt flag or field, a value out of range, a workdir that is a file;
checked by `default_config.validate_config` before any data or model is built), 1 for a run that
cannot go on (`train_lib.RunError`: dataset not prepared, no usable checkpoint, non-finite loss).
"""

from __future__ import annotations

import logging as python_logging
import os
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from clipcrop_jax import default_config

MODES = default_config.MODES

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and results go here.')


_QUIET_PACKAGES = ('orbax', 'tensorflow_datasets')


class _QuietLibraries(python_logging.Filter):
  """Drops INFO lines of Orbax / TFDS internals (one per checkpoint file, dataset read, ...)."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    if record.levelno >= python_logging.WARNING:
      return True
    path = record.pathname.replace(os.sep, '/')
    return not any(f'/{p}/' in path for p in _QUIET_PACKAGES)


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize` for multi-host runs (`config.distributed.initialize`)."""
  d = config.distributed
  if not d.initialize:
    return
  kwargs = {}
  if d.coordinator_address:
    kwargs = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                  process_id=d.process_id)
  # Cross-process collectives on CPU need gloo (the default from some jax version on; older
  # versions default to none). Only the CPU client reads it, so GPU / TPU runs are unaffected.
  if getattr(jax.config, 'jax_cpu_collectives_implementation', 'gloo') in (None, 'none'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)  # without arguments: cluster auto-detection (TPU, SLURM)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs `config.mode` in `workdir`; returns the evaluation summaries (empty for 'train')."""
  from clipcrop_jax import evaluate  # pylint: disable=g-import-not-at-top
  from clipcrop_jax import train_lib  # pylint: disable=g-import-not-at-top
  if config.mode not in MODES:
    raise ValueError(f'config.mode={config.mode!r}; expected one of {MODES}')
  logging.info('%d process(es), %d device(s): %s', jax.process_count(), jax.device_count(),
               jax.devices()[0].platform)
  results = {}
  if config.mode == 'synthetic_pipeline':
    from clipcrop_jax import synthetic_pipeline  # pylint: disable=g-import-not-at-top
    return synthetic_pipeline.run(config, workdir)
  if config.mode in ('train', 'train_and_eval'):
    def eval_fn(state, step):
      evaluate.evaluate(config, state.params, mesh_of(state), workdir, step)
    state = train_lib.train(config, workdir, eval_fn=eval_fn)
    if config.mode == 'train_and_eval':
      results = evaluate.evaluate(config, state.params, mesh_of(state), workdir,
                                  int(jax.device_get(state.step)))
  else:
    state, mesh = train_lib.final_state(config, workdir)
    results = evaluate.evaluate(config, state.params, mesh, workdir,
                                int(jax.device_get(state.step)))
  return results


def mesh_of(state: Any) -> jax.sharding.Mesh:
  return jax.tree_util.tree_leaves(state.params)[0].sharding.mesh


def main(argv) -> None:
  if len(argv) > 1:
    default_config.usage_exit(f'unexpected arguments {argv[1:]}')
  config, workdir = default_config.config_or_exit(_CONFIG), _WORKDIR.value
  if config is None or not workdir:
    default_config.usage_exit('--config and --workdir are required')
  try:
    default_config.validate_config(config, workdir)
  except default_config.ConfigError as e:
    default_config.usage_exit(str(e))
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # tf.data only: keep the accelerators for JAX
  initialize_distributed(config)
  from clipcrop_jax import train_lib  # pylint: disable=g-import-not-at-top
  try:
    run(config, workdir)
  except train_lib.RunError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=default_config.parse_flags)
