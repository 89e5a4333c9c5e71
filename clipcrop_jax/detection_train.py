"""Fine-tunes (or trains) the OWL-ViT detector on labelled boxes: the command line.

  python -m clipcrop_jax.detection_train --config=configs/owlvit_detection_tiny.py \
      --workdir=/tmp/det --config.dataset.data_dir=/tmp/data

The task is `clipcrop_jax.training.detection_task` (data, loss, export; docs/training.md). A bad
flag or config is one `error:` line (exit code 2), an `errors.RunError` one line (exit code 1).
"""

from __future__ import annotations

from absl import app
from absl import flags
from ml_collections import config_flags

from clipcrop_jax import config_validation

_CONFIG = _WORKDIR = None  # defined when run as a command (importing it defines no flags)


def main(argv) -> None:
  """Trains `--config` in `--workdir` (resuming from its checkpoints)."""
  if len(argv) > 1:
    config_validation.usage_exit(f'unexpected arguments {argv[1:]}')
  config, workdir = config_validation.config_or_exit(_CONFIG), _WORKDIR.value
  from clipcrop_jax.training import detection_task  # pylint: disable=g-import-not-at-top
  from clipcrop_jax.training import trainer  # pylint: disable=g-import-not-at-top

  trainer.run_command(
      config,
      workdir,
      lambda: detection_task.train_detection(config, workdir),
      task=detection_task.DetectionTask.name,
  )


if __name__ == '__main__':
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and the export go here.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=config_validation.parse_flags)
