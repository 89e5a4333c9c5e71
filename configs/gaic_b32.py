r"""ClipCrop on GAIC (journal + ClipCrop captions), B/32 OWL-ViT: the paper's run and its ablations.

Variants (`--config=configs/gaic_b32.py:<variant>[,encoder=<owlvit config>]`):

  full        text + keywords (default; the paper's ClipCrop)
  main        full caption only
  key         keywords only
  base        no text (ClipCrop-base; its eval drops the `clipcrop_base` baseline)
  no_mosaic   full, without mosaic augmentation (mosaic_probs (1, 0, 0))

  `encoder=clip_b16` (or any name of `clipcrop_jax/owlvit/configs.py`) swaps the OWL-ViT encoder;
  pass the matching checkpoint in `init_from.owlvit`.

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
  # 3. Text sets (test only): configs/horanyi_pr_eval.py, configs/textcrop_eval.py.
  # All ablations x seeds: python tools/sweep.py configs/sweep.py --workdir_root=WORK

Paper numbers (ClipCrop, B/32):
  GAIC test       Acc1/5 79.8, Acc1/10 89.6   (ClipCrop-base: 87.2 / 94.4 per the paper table)
  Horanyi-PR      IoU-Mean 0.5551, IoU-Max 0.7284
  TextCrop        IoU-Mean 0.4992, IoU-Max 0.5956
"""

from clipcrop_jax import default_config

VARIANTS = ('full', 'main', 'key', 'base', 'no_mosaic')


def parse_arg(arg):
  """'variant[,encoder=name]' -> (variant, encoder or None)."""
  variant, encoder = 'full', None
  for i, part in enumerate(p.strip() for p in (arg or '').split(',')):
    if not part:
      continue
    if '=' in part:
      key, value = (s.strip() for s in part.split('=', 1))
      if key == 'encoder':
        encoder = value
      elif key == 'variant':
        variant = value
      else:
        raise ValueError(f'gaic_b32: unknown option {key!r} in {arg!r} (variant, encoder)')
    elif i == 0:
      variant = part
    else:
      raise ValueError(f'gaic_b32: bad argument {arg!r}; expected variant[,encoder=name]')
  if variant not in VARIANTS:
    raise ValueError(f'gaic_b32: variant {variant!r}; expected one of {VARIANTS}')
  return variant, encoder


def get_config(arg=None):
  variant, encoder = parse_arg(arg)
  config = default_config.get_default_config()
  config.model.update(owlvit=encoder or 'clip_b32', mode='full', decoder_layers=6,
                      num_queries=90)
  config.dataset.update(name='gaic/journal', train_split='train',
                        mosaic_probs=(1 / 3, 1 / 3, 1 / 3))
  config.batch_size = 32
  config.num_epochs = 180
  config.optimizer.update(learning_rate=1e-4, end_learning_rate=1e-6)
  config.eval.update(datasets=(('gaic/journal', 'test'),),
                     baselines=default_config.BASELINES)
  if variant in ('main', 'key', 'base'):
    config.model.mode = variant
  if variant == 'base':
    config.eval.baselines = tuple(b for b in default_config.BASELINES if b != 'clipcrop_base')
  if variant == 'no_mosaic':
    config.dataset.mosaic_probs = (1.0, 0.0, 0.0)
  return config
