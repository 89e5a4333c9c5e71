"""Train and/or evaluate ClipCrop.

  python -m clipcrop_jax.main --config=configs/gaic_b32.py --workdir=/tmp/clipcrop
  python -m clipcrop_jax.main --config=configs/tiny.py --workdir=/tmp/w --config.run=eval

`--config.<field>=value` overrides any field (the config is locked: a misspelt field is an error).
`config.run`: 'train', 'eval' (latest checkpoint of the workdir), 'train_and_eval' or
'synthetic_pipeline' (configs/synthetic.py). Re-running a command on the same workdir resumes from
its newest usable checkpoint.

Errors print one `error: ...` line on stderr, without a traceback: exit code 2 for a bad command
line or config (unknown or misspelt flag or field, a value out of range, a workdir that is a file;
checked by `config_validation.validate_config` before any data or model is built), 1 for a run that
cannot go on (`errors.RunError`: dataset not prepared, no usable checkpoint, non-finite loss).
"""

from __future__ import annotations

from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from clipcrop_jax import config_validation

from clipcrop_jax import default_config
from clipcrop_jax import sharding as sharding_lib

RUNS = default_config.RUNS

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/*.py).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and results go here.')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs `config.run` in `workdir`; returns the evaluation summaries (empty for 'train')."""
  from clipcrop_jax import evaluate  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import clipcrop_task  # pylint: disable=g-import-not-at-top

  if config.run not in RUNS:
    raise ValueError(f'config.run={config.run!r}; expected one of {RUNS}')
  logging.info(
      '%d process(es), %d device(s): %s',
      jax.process_count(),
      jax.device_count(),
      jax.devices()[0].platform,
  )
  results = {}
  if config.run == 'synthetic_pipeline':
    from clipcrop_jax.experiments import synthetic_pipeline  # pylint: disable=g-import-not-at-top

    return synthetic_pipeline.run(config, workdir)
  if config.run in ('train', 'train_and_eval'):

    def eval_fn(state, step):
      evaluate.evaluate(config, state.params, sharding_lib.mesh_of(state.params), workdir, step)

    state = clipcrop_task.train(config, workdir, eval_fn=eval_fn)
    if config.run == 'train_and_eval':
      results = evaluate.evaluate(
          config,
          state.params,
          sharding_lib.mesh_of(state.params),
          workdir,
          int(jax.device_get(state.step)),
      )
  else:
    state, mesh = clipcrop_task.final_state(config, workdir)
    results = evaluate.evaluate(
        config, state.params, mesh, workdir, int(jax.device_get(state.step))
    )
  return results


def main(argv) -> None:
  if len(argv) > 1:
    config_validation.usage_exit(f'unexpected arguments {argv[1:]}')
  config, workdir = config_validation.config_or_exit(_CONFIG), _WORKDIR.value
  from clipcrop_jax.training import trainer  # pylint: disable=g-import-not-at-top

  trainer.run_command(config, workdir, lambda: run(config, workdir))


if __name__ == '__main__':
  app.run(main, flags_parser=config_validation.parse_flags)
