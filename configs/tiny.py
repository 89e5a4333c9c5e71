r"""Tiny ClipCrop run for tests and smoke checks: tiny OWL-ViT, 2-layer decoder, synthetic data.

  python -m clipcrop_jax.build_dataset datasets/synthetic --config tiny --data_dir /tmp/data
  python -m clipcrop_jax.main --config=configs/tiny.py --workdir=/tmp/tiny \
      --config.dataset.data_dir=/tmp/data

Runs in well under a minute on 2 CPU cores (random weights: the numbers mean nothing).
"""

from clipcrop_jax import default_config


def get_config():
  config = default_config.get_default_config()
  config.model.update(
      owlvit='tiny',
      decoder_layers=2,
      decoder_width=32,
      decoder_heads=2,
      decoder_mlp_dim=64,
      num_queries=12,
  )
  config.dataset.update(
      name='synthetic_crops/tiny', data_dir='', max_crops=128, max_queries=4, shuffle_buffer=16
  )
  config.batch_size = 8
  config.num_train_steps = 2
  config.optimizer.update(learning_rate=1e-3, end_learning_rate=1e-5, warmup_steps=0)
  config.checkpoint.update(every_steps=1, keep=2)
  config.log_every_steps = 1
  config.eval.update(
      datasets=(('synthetic_crops/tiny', 'ambiguity'), ('synthetic_crops/tiny', 'test')),
      batch_size=8,
      baselines=default_config.BASELINES,
  )
  return config
