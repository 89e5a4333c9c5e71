r"""Tiny OWL-ViT detection fine-tuning run (tests, smoke checks): random-init `tiny` detector.

  python -m clipcrop_jax.build_dataset datasets/synthetic --config tiny --data_dir /tmp/data
  python -m clipcrop_jax.detection_train --config=configs/owlvit_detection_tiny.py \
      --workdir=/tmp/det_tiny --config.dataset.data_dir=/tmp/data

A few seconds on CPU; random weights, so the numbers mean nothing.
"""

from clipcrop_jax import default_config


def get_config():
  config = default_config.get_detection_config()
  config.model.owlvit = 'tiny'
  config.init_from.owlvit = ''
  config.dataset.update(
      name='synthetic_crops/tiny',
      data_dir='',
      train_split='train',
      label_key='name',
      max_objects=8,
      max_labels=24,
      flip=True,
      shuffle_buffer=8,
  )
  config.batch_size = 4
  config.num_train_steps = 3
  config.optimizer.update(
      learning_rate=1e-3, end_learning_rate=1e-5, warmup_steps=0, grad_clip_norm=1.0
  )
  config.checkpoint.update(every_steps=2, keep=2)
  config.log_every_steps = 1
  config.eval.update(split='validation', batch_size=4, every_steps=-1, max_examples=-1)
  return config
