r"""Evaluates a ClipCrop trained on GAIC (configs/gaic_b32.py) on TextCrop (test only).

The argument is the training run's variant (same syntax as configs/gaic_b32.py), so the model
matches the checkpoints; `--workdir` is the training workdir (its latest checkpoint is evaluated,
results go to `<workdir>/eval_textcrop.json`):

  python -m clipcrop_jax.build_dataset datasets/textcrop --manual_dir=RAW_TEXTCROP --data_dir=DATA
  python -m clipcrop_jax.main --config=configs/textcrop_eval.py --workdir=WORK/full \
      --config.dataset.data_dir=DATA --config.eval.base_workdir=WORK/base

`eval.base_workdir` (optional) is a trained ClipCrop-base workdir (configs/gaic_b32.py:base) for
the `clipcrop_base` baseline; left empty, that baseline is skipped.

Paper: ClipCrop IoU-Mean 0.4992, IoU-Max 0.5956.
"""

import importlib.util
import os


def _gaic_b32():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gaic_b32.py')
  spec = importlib.util.spec_from_file_location('clipcrop_configs_gaic_b32', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  config = _gaic_b32().get_config(arg)
  config.mode = 'eval'
  config.eval.update(datasets=(('textcrop', 'test'),), base_workdir='')
  return config
