r"""ClipCrop on GAIC (journal + ClipCrop captions), B/32 OWL-ViT: the paper's run and its ablations.

`get_config` argument (`--config=configs/gaic_b32.py:<variant>[,encoder=<owlvit config>]`, or
`variant=<variant>`; `clipcrop_jax.config_lib.parse_arg`):

  full        text + keywords (default; the paper's ClipCrop)
  main        full caption only
  key         keywords only
  base        no text (ClipCrop-base; its eval drops the `clipcrop_base` baseline)
  no_mosaic   full, without mosaic augmentation (mosaic_probs (1, 0, 0))

  `encoder=clip_b16` (or any name of `clipcrop_jax/owlvit/configs.py`; default clip_b32) swaps the
  OWL-ViT encoder; pass the matching checkpoint in `init_from.owlvit`.

Commands:

  # 1. GAIC journal (2636 train / 200 val / 500 test) with the released captions, see
  #    datasets/gaic/README.md for the RAW layout.
  python -m clipcrop_jax.build_dataset datasets/gaic --config journal \
      --manual_dir=RAW --data_dir=DATA
  # 2. Train (batch 32, 180 epochs, AdamW 1e-4 -> 1e-6 cosine) and evaluate on GAIC test.
  python -m clipcrop_jax.main --config=configs/gaic_b32.py --workdir=WORK/full \
      --config.init_from.owlvit=/path/clip_vit_b32_b0203fc8 --config.dataset.data_dir=DATA
  # Ablation, e.g. ClipCrop-base:
  python -m clipcrop_jax.main --config=configs/gaic_b32.py:base --workdir=WORK/base \
      --config.init_from.owlvit=/path/clip_vit_b32_b0203fc8 --config.dataset.data_dir=DATA
  # 3. Text sets (test only): configs/text_eval.py:horanyi_pr, configs/text_eval.py:textcrop.
  # All ablations x seeds:
  #   python tools/launch_sweep.py configs/gaic_ablation_sweep.py --workdir_root=WORK

Paper numbers (ClipCrop, B/32):
  GAIC test       Acc1/5 79.8, Acc1/10 89.6   (ClipCrop-base: 87.2 / 94.4 per the paper table)
  Horanyi-PR      IoU-Mean 0.5551, IoU-Max 0.7284
  TextCrop        IoU-Mean 0.4992, IoU-Max 0.5956
"""

from clipcrop_jax import config_lib
from clipcrop_jax import default_config

VARIANTS = ('full', 'main', 'key', 'base', 'no_mosaic')


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant='full', encoder='clip_b32')
  if arg.variant not in VARIANTS:
    raise ValueError(f'gaic_b32.py: variant={arg.variant!r}; expected one of {VARIANTS}')
  config = default_config.get_default_config()
  config.model.update(owlvit=arg.encoder, mode='full', decoder_layers=6, num_queries=90)
  config.dataset.update(
      name='gaic/journal', train_split='train', mosaic_probs=(1 / 3, 1 / 3, 1 / 3)
  )
  config.batch_size = 32
  config.num_epochs = 180
  config.optimizer.update(learning_rate=1e-4, end_learning_rate=1e-6)
  config.eval.update(datasets=(('gaic/journal', 'test'),), baselines=default_config.BASELINES)
  if arg.variant in ('main', 'key', 'base'):
    config.model.mode = arg.variant
  if arg.variant == 'base':
    config.eval.baselines = tuple(b for b in default_config.BASELINES if b != 'clipcrop_base')
  if arg.variant == 'no_mosaic':
    config.dataset.mosaic_probs = (1.0, 0.0, 0.0)
  return config
