r"""Evaluates a ClipCrop trained on GAIC (configs/gaic_b32.py) on a text-conditioned test set.

`get_config` argument: `<dataset>[,variant=<variant>][,encoder=<owlvit config>]`, or
`dataset=<dataset>,...`; the dataset is `horanyi_pr` or `textcrop` (required), the variant and
encoder those of the training run (as in configs/gaic_b32.py, default `full` and `clip_b32`) so the
model matches its checkpoints. `--workdir` is the training workdir: its latest checkpoint is
evaluated and the results go to `<workdir>/eval_<dataset>.json`.

  python -m clipcrop_jax.build_dataset datasets/horanyi_pr --manual_dir=RAW_HPR --data_dir=DATA
  python -m clipcrop_jax.main --config=configs/text_eval.py:horanyi_pr --workdir=WORK/full \
      --config.dataset.data_dir=DATA --config.eval.base_workdir=WORK/base
  python -m clipcrop_jax.build_dataset datasets/textcrop --manual_dir=RAW_TEXTCROP --data_dir=DATA
  python -m clipcrop_jax.main --config=configs/text_eval.py:textcrop,variant=key \
      --workdir=WORK/key --config.dataset.data_dir=DATA

`eval.base_workdir` (optional) is a trained ClipCrop-base workdir (configs/gaic_b32.py:base) for
the `clipcrop_base` baseline; left empty, that baseline is skipped.

Paper (ClipCrop, B/32): Horanyi-PR IoU-Mean 0.5551, IoU-Max 0.7284; TextCrop IoU-Mean 0.4992,
IoU-Max 0.5956.
"""

import os

from clipcrop_jax import config_lib

DATASETS = ('horanyi_pr', 'textcrop')
GAIC_B32 = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gaic_b32.py')


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, dataset='', variant='full', encoder='clip_b32')
  if arg.dataset not in DATASETS:
    raise ValueError(
        f'text_eval.py: dataset={arg.dataset!r}; expected one of {DATASETS} '
        '(--config=configs/text_eval.py:horanyi_pr)'
    )
  config = config_lib.load_config_file(GAIC_B32, f'variant={arg.variant},encoder={arg.encoder}')
  config.run = 'eval'
  config.eval.update(datasets=((arg.dataset, 'test'),), base_workdir='')
  return config
